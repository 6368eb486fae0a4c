"""The AMP commands between a proxy process (a child) and the broker's process.

A child asks; the broker's process answers:

- :class:`Acquire` / :class:`Retry` / :class:`LaunchWorker` (an ``ask`` number the
  child picked, so that :class:`Cancel` can name it), :class:`Release`,
  :class:`Confirm`, :class:`DiedBefore`: the broker's lease API, one message each;
- :class:`BoardNew` / :class:`BoardFinish` / :class:`BoardDiscard` /
  :class:`BoardLastPoll`: the waiting pages' progress board, which lives with the
  broker (a page's polls may reach any child);
- :class:`Note` / :class:`Lookup`: facts one child learnt that every child needs
  (a ``dsroute`` reference, an app host's label, how clients reach a key);
- :class:`Networks`: an engine's networks, for the ``host:`` policy.

The broker's process tells a child, unasked: :class:`Progress` (a waiting request's),
:class:`Fact` (another child's :class:`Note`), :class:`Containers` (the broker's
containers changed); and asks it :class:`ReadMetrics` (its request metrics, for
``/monitor:metrics``).

Specs cross as their route segment (parsed again on the broker's side: a child never
sends objects), owners and metrics as JSON; broker errors as :class:`Refused` with
their class name, status, Retry-After and message.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any, ClassVar

from twisted.protocols import amp
from twisted.python.compat import nativeString

from ..broker import errors as broker_errors
from ..broker.errors import BrokerError
from ..broker.quota import Owner
from ..spec import JobSpec, SpecError, parse_route
from ..twistedseam import flush_now, is_plain_tcp

#: the longest value AMP carries in one key
CHUNK = 0xFFFF


class BigBytes(amp.Argument):
    """Bytes of any length: AMP values are at most 64 KiB, so the value is split over
    the keys ``NAME.0``, ``NAME.1``, … and ``NAME`` holds their number."""

    def toBox(self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: Any) -> None:
        """Split ``objects[name]`` into chunks."""
        value: bytes = objects[nativeString(name)]
        chunks = [value[i : i + CHUNK] for i in range(0, len(value), CHUNK)] or [b""]
        strings[name] = str(len(chunks)).encode("ascii")
        for i, chunk in enumerate(chunks):
            strings[name + b".%d" % i] = chunk

    def fromBox(self, name: bytes, strings: dict[bytes, bytes], objects: dict[str, Any], proto: Any) -> None:
        """Join the chunks again."""
        n = int(strings[name])
        objects[nativeString(name)] = b"".join(strings[name + b".%d" % i] for i in range(n))


class PromptAMP(amp.AMP):
    """AMP whose every box leaves at once, not at the end of the reactor turn: a lease
    is on a request's path, and a fact must leave before the answer that hands it to a
    browser (the UNIX socket is written directly, as the proxy writes its answers)."""

    def sendBox(self, box: amp.AmpBox) -> None:
        """Send ``box`` now."""
        super().sendBox(box)
        t = self.transport
        if is_plain_tcp(t):
            flush_now(t)


class Refused(Exception):
    """A broker error crossing the wire: its description is :func:`refusal`'s JSON."""


#: what a lease answer carries
LEASE = [
    (b"lease", amp.Integer()),
    (b"endpoint", amp.Unicode()),
    (b"display", amp.Unicode()),
    (b"container", amp.Unicode()),
    (b"queued_for", amp.Float()),
]
_ERRORS: dict[type[Exception], bytes] = {Refused: b"REFUSED"}


class Acquire(amp.Command):
    """A lease for the spec of route ``segment`` for ``owner`` (JSON, empty: accounts
    off). ``board``: the waiting page's token (progress goes to the board), else
    ``progress``: push :class:`Progress` for ``ask``."""

    arguments = [
        (b"ask", amp.Integer()),
        (b"segment", amp.Unicode()),
        (b"owner", amp.Unicode()),
        (b"board", amp.Unicode()),
        (b"progress", amp.Boolean()),
    ]
    response = LEASE
    errors = _ERRORS


class Retry(amp.Command):
    """``lease.retry(failed)``: the request back to the head of its key's line."""

    arguments = [(b"ask", amp.Integer()), (b"lease", amp.Integer()), (b"failed", amp.Boolean())]
    response = LEASE
    errors = _ERRORS


class LaunchWorker(amp.Command):
    """``broker.launch_worker``; answered once the worker has started."""

    arguments = [(b"ask", amp.Integer()), (b"segment", amp.Unicode()), (b"owner", amp.Unicode())]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    errors = _ERRORS


class Cancel(amp.Command):
    """The client of ask ``ask`` left: leave the line (an answer already sent is
    given back by the child)."""

    arguments = [(b"ask", amp.Integer())]
    requiresAnswer = False


class Release(amp.Command):
    """``lease.release()``, or ``lease.failed()`` when ``failed``."""

    arguments = [(b"lease", amp.Integer()), (b"failed", amp.Boolean())]
    requiresAnswer = False


class Confirm(amp.Command):
    """``lease.confirm(grace)``: is the container still alive?"""

    arguments = [(b"lease", amp.Integer()), (b"grace", amp.Float())]
    response = [(b"alive", amp.Boolean())]


class DiedBefore(amp.Command):
    """``lease.died_before(when, grace)`` (``when``: wall-clock seconds)."""

    arguments = [(b"lease", amp.Integer()), (b"when", amp.Float()), (b"grace", amp.Float())]
    response = [(b"died", amp.Boolean())]


class Revoke(amp.Command):
    """Give ``lease`` back if no request uses it (broker → child): ``given`` True when
    it was parked (kept after its request, :data:`~.childside.LINGER`) and is now the
    broker's to hand on; False when in use (it comes back when its request ends)."""

    arguments = [(b"lease", amp.Integer())]
    response = [(b"given", amp.Boolean())]


class Progress(amp.Command):
    """A waiting request's progress (broker → child)."""

    arguments = [
        (b"ask", amp.Integer()),
        (b"state", amp.Unicode()),
        (b"position", amp.Integer(optional=True)),
        (b"detail", amp.Unicode(optional=True)),
        (b"current", amp.Integer(optional=True)),
        (b"total", amp.Integer(optional=True)),
    ]
    requiresAnswer = False


class BoardNew(amp.Command):
    """A waiting page for ``display`` returning to ``url`` got ``token``."""

    arguments = [(b"token", amp.Unicode()), (b"display", amp.Unicode()), (b"url", amp.Unicode())]
    requiresAnswer = False


class BoardFinish(amp.Command):
    """The page's final state (``ready`` or ``failed`` with ``detail``)."""

    arguments = [
        (b"token", amp.Unicode()),
        (b"state", amp.Unicode()),
        (b"detail", amp.Unicode(optional=True)),
    ]
    requiresAnswer = False


class BoardDiscard(amp.Command):
    """The request was served without a page: forget ``token``."""

    arguments = [(b"token", amp.Unicode())]
    requiresAnswer = False


class BoardLastPoll(amp.Command):
    """When the page last polled (None: unknown token)."""

    arguments = [(b"token", amp.Unicode())]
    response = [(b"polled", amp.Float(optional=True))]


class Note(amp.Command):
    """A fact for every child: ``table`` (``route``, ``app``, ``origin``), ``key``, ``value``."""

    arguments = [(b"table", amp.Unicode()), (b"key", amp.Unicode()), (b"value", amp.Unicode())]
    requiresAnswer = False


class Fact(amp.Command):
    """Another child's :class:`Note` (broker → child)."""

    arguments = Note.arguments
    requiresAnswer = False


class Lookup(amp.Command):
    """A fact this child missed (None: nobody noted it)."""

    arguments = [(b"table", amp.Unicode()), (b"key", amp.Unicode())]
    response = [(b"value", amp.Unicode(optional=True))]


class Containers(amp.Command):
    """The broker's containers changed (broker → child): JSON list of
    ``[id, segment, display, state, owner, users]``."""

    arguments = [(b"views", BigBytes())]
    requiresAnswer = False


class Networks(amp.Command):
    """The networks of engine ``engine`` (JSON list of ``[name, driver, subnets, ip_ranges]``)."""

    arguments = [(b"engine", amp.Unicode())]
    response = [(b"networks", BigBytes())]
    errors = _ERRORS


class ReadMetrics(amp.Command):
    """A child's request metrics (JSON, :meth:`dockerspaces.metrics.Metrics.export`)."""

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = []
    response = [(b"metrics", BigBytes())]


# -- values on the wire --------------------------------------------------------------


@lru_cache(maxsize=1024)
def spec_of(segment: str) -> JobSpec:
    """The JobSpec of an x:/y: route segment (:class:`Refused` for anything else)."""
    try:
        route = parse_route(segment)
    except SpecError as e:
        raise Refused(refusal(BrokerError(f"bad route: {e}"), 400)) from None
    if not isinstance(route, JobSpec):
        raise Refused(refusal(BrokerError("not an x:/y: route"), 400))
    return route


def owner_json(owner: Owner | None) -> str:
    """An owner as JSON (empty for None)."""
    if owner is None:
        return ""
    return json.dumps([owner.user, owner.containers, owner.gpus, owner.queued, owner.group])


def owner_of(text: str) -> Owner | None:
    """:func:`owner_json` read back."""
    if not text:
        return None
    user, containers, gpus, queued, group = json.loads(text)
    return Owner(str(user), containers, gpus, queued, group)


def refusal(error: BaseException, status: int | None = None) -> str:
    """A broker (or engine) error as :class:`Refused`'s description."""
    return json.dumps(
        {
            "kind": type(error).__name__,
            "status": status if status is not None else getattr(error, "status", 502),
            "retry": getattr(error, "retry_after", None),
            "message": str(error),
        }
    )


class RemoteError(BrokerError):
    """A broker error of a kind this side has no class for (an engine's)."""


def error_of(description: str) -> BrokerError:
    """:func:`refusal` read back: the broker error of the same class, status and
    Retry-After."""
    try:
        d = json.loads(description)
    except ValueError:
        d = {"message": description}
    cls = getattr(broker_errors, str(d.get("kind")), None)
    message = str(d.get("message", "the broker refused"))
    retry = d.get("retry") if isinstance(d.get("retry"), int) else None
    if isinstance(cls, type) and issubclass(cls, BrokerError):
        err: BrokerError = cls(message, retry)
    else:
        err = RemoteError(message, retry)
    status = d.get("status")
    err.status = status if isinstance(status, int) else 502
    return err
