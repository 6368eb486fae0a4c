"""A proxy process's end of ``--workers``: the broker, seen through AMP.

:class:`RemoteBroker` offers what the web side uses of
:class:`~dockerspaces.broker.broker.Broker` (``acquire``, ``launch_worker``,
``containers``) and hands out :class:`RemoteLease` objects with the API of
:class:`~dockerspaces.broker.model.Lease`. :class:`RemoteBoard` is the waiting pages'
board kept in the broker's process. :class:`ChildBox` answers what the broker's
process sends unasked: progress, facts other children noted, the containers, and
this process's request metrics when ``/monitor:metrics`` is read.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from ..broker.errors import BackendRefused, Draining
from ..broker.model import Progress as BrokerProgress
from ..broker.quota import Owner
from ..broker.snapshot import ContainerView
from ..engine.interface import NetworkInfo
from ..metrics import Metrics
from ..spec import JobSpec, SpecError, parse_route
from . import commands as c

log = Logger()


class ChildBox(amp.AMP):
    """The child's end of its connection to the broker's process."""

    def __init__(self, metrics: Metrics | None = None, on_lost: Callable[[], None] | None = None):
        super().__init__()
        self.metrics = metrics if metrics is not None else Metrics()
        self.on_lost = on_lost
        self.progress: dict[int, Callable[[BrokerProgress], None]] = {}
        #: facts noted by other children, by table (see :meth:`learn`)
        self.learners: dict[str, Callable[[str, str], None]] = {}
        self.views: list[ContainerView] = []
        self.connected = False

    def connectionMade(self) -> None:
        """Connected to the broker's process."""
        super().connectionMade()
        self.connected = True

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """The broker's process is gone: this child has nothing left to do."""
        self.connected = False
        super().connectionLost(reason)
        if self.on_lost is not None:
            self.on_lost()

    def note(self, table: str, key: str, value: str) -> None:
        """Tell the broker's process (and so every other child) a fact."""
        if self.connected:
            self.callRemote(c.Note, table=table, key=key, value=value)

    def lookup(self, table: str, key: str) -> Deferred[str | None]:
        """A fact this child missed, asked of the broker's process (None: unknown)."""
        if not self.connected:
            return succeed(None)
        d = self.callRemote(c.Lookup, table=table, key=key)
        return d.addCallbacks(lambda r: r["value"], lambda _: None)

    @c.Progress.responder
    def got_progress(
        self,
        ask: int,
        state: str,
        position: int | None,
        detail: str | None,
        current: int | None,
        total: int | None,
    ) -> dict[str, Any]:
        """A waiting request's progress."""
        cb = self.progress.get(ask)
        if cb is not None:
            cb(BrokerProgress(state, position, detail, current, total))
        return {}

    @c.Fact.responder
    def fact(self, table: str, key: str, value: str) -> dict[str, Any]:
        """Another child's fact."""
        learn = self.learners.get(table)
        if learn is not None:
            learn(key, value)
        return {}

    @c.Containers.responder
    def containers(self, views: bytes) -> dict[str, Any]:
        """The broker's containers now."""
        out = []
        for segment, display, state, owner, users in json.loads(views):
            try:
                spec = parse_route(segment)
            except SpecError:
                continue
            if isinstance(spec, JobSpec):
                out.append(ContainerView("", "", 0, spec.key, display, state, 0, spec, tuple(users), owner))
        self.views = out
        return {}

    @c.ReadMetrics.responder
    def read_metrics(self) -> dict[str, bytes]:
        """This process's metrics."""
        return {"metrics": json.dumps(self.metrics.export()).encode("utf-8")}


def _lost(f: Failure) -> Exception:
    """What a request gets when the broker's process does not answer."""
    if f.check(c.Refused):
        return c.error_of(str(f.value))
    return Draining(f"the broker's process is gone: {f.getErrorMessage()}")


@define(eq=False)
class RemoteLease:
    """A lease held through the broker's process (the API of ``broker.model.Lease``)."""

    broker: RemoteBroker = field(repr=False)
    id: int
    endpoint: str
    display: str
    container_id: str
    queued_for: float
    released: bool = False

    def release(self) -> None:
        """Give the container back (idempotent)."""
        if not self.released:
            self.released = True
            self.broker.give_back(self, False)

    def failed(self) -> None:
        """Give it back as crashed (refused or reset before answering)."""
        if not self.released:
            self.released = True
            self.broker.give_back(self, True)

    def confirm(self, grace: float) -> Deferred[bool]:
        """Is the container still alive? (a lost broker process: it is not)"""
        if self.released:
            return succeed(False)
        d = self.broker.box.callRemote(c.Confirm, lease=self.id, grace=grace)
        return d.addCallbacks(lambda r: bool(r["alive"]), lambda _: False)

    def died_before(self, when: float, grace: float) -> Deferred[bool]:
        """Did its process end before ``when`` (wall-clock seconds)?"""
        d = self.broker.box.callRemote(c.DiedBefore, lease=self.id, when=when, grace=grace)
        return d.addCallbacks(lambda r: bool(r["died"]), lambda _: False)

    def retry(self, failed: bool = True) -> Deferred[RemoteLease]:
        """Serve the request again (see ``Lease.retry``)."""
        if self.released:
            return fail(BackendRefused(f"{self.display}: the container refused the request"))
        self.released = True
        self.broker.held.discard(self.id)
        return self.broker.ask(c.Retry, lease=self.id, failed=failed)


class BoardCallback:
    """The progress callback of a waiting page whose board is the broker process's:
    the acquire names the token and progress goes straight to the board."""

    def __init__(self, token: str):
        self.token = token

    def __call__(self, progress: object) -> None:
        """Nothing here: the broker's process publishes it."""


@define(eq=False)
class RemoteBoard:
    """The waiting pages' board of ``pages.ProgressBoard``, kept in the broker's process
    (a page's polls may reach any child)."""

    box: ChildBox

    def new(self, display: str, url: str) -> str:
        """A token for a new page."""
        token = secrets.token_urlsafe(16)
        if self.box.connected:
            self.box.callRemote(c.BoardNew, token=token, display=display, url=url)
        return token

    def callback(self, token: str) -> BoardCallback:
        """The acquire's progress callback (see :class:`BoardCallback`)."""
        return BoardCallback(token)

    def finish(self, token: str, state: str, detail: str | None = None) -> None:
        """The page's final state."""
        if self.box.connected:
            self.box.callRemote(c.BoardFinish, token=token, state=state, detail=detail)

    def discard(self, token: str) -> None:
        """Forget the page."""
        if self.box.connected:
            self.box.callRemote(c.BoardDiscard, token=token)

    def last_poll(self, token: str) -> Deferred[float | None]:
        """When the page last polled (None: unknown, or no broker process)."""
        d = self.box.callRemote(c.BoardLastPoll, token=token)
        return d.addCallbacks(lambda r: r["polled"], lambda _: None)


@define(eq=False)
class RemoteBroker:
    """The broker, one AMP message away (see module)."""

    box: ChildBox
    held: set[int] = field(factory=set)
    asks: dict[int, Deferred[Any]] = field(factory=dict)
    _next: int = 0
    _idle_waiters: list[Deferred[None]] = field(factory=list)

    def acquire(
        self,
        spec: JobSpec,
        progress: Callable[[BrokerProgress], None] | None = None,
        owner: Owner | None = None,
    ) -> Deferred[RemoteLease]:
        """A lease on a container for ``spec`` (see ``Broker.acquire``)."""
        board = progress.token if isinstance(progress, BoardCallback) else ""
        push = progress is not None and not board
        return self.ask(
            c.Acquire,
            segment=spec.segment(),
            owner=c.owner_json(owner),
            board=board,
            progress=push,
            on_progress=progress if push else None,
        )

    def launch_worker(
        self,
        spec: JobSpec,
        progress: Callable[[BrokerProgress], None] | None = None,
        owner: Owner | None = None,
    ) -> Deferred[None]:
        """Start one more worker (see ``Broker.launch_worker``); fires once started."""
        return self.ask(c.LaunchWorker, segment=spec.segment(), owner=c.owner_json(owner))

    def containers(self) -> list[ContainerView]:
        """The broker's containers as last told (spec, display, state, owner, users)."""
        return self.box.views

    @property
    def idle(self) -> bool:
        """No lease held and nothing asked."""
        return not self.held and not self.asks

    def when_idle(self) -> Deferred[None]:
        """Fires once :attr:`idle` (a draining child waits for this)."""
        if self.idle:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def _maybe_idle(self) -> None:
        if self.idle and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    # -- the wire ----------------------------------------------------------------------

    def ask(
        self,
        command: type[amp.Command],
        on_progress: Callable[[BrokerProgress], None] | None = None,
        **kw: Any,
    ) -> Deferred[Any]:
        """Send ``command`` under a new ask number; cancelling the result withdraws it."""
        self._next += 1
        ask = self._next
        box = self.box

        def cancel(_: Deferred[Any]) -> None:
            self.asks.pop(ask, None)
            box.progress.pop(ask, None)
            if box.connected:
                box.callRemote(c.Cancel, ask=ask)
            self._maybe_idle()

        d: Deferred[Any] = Deferred(cancel)
        if not box.connected:
            d.errback(Draining("the broker's process is gone"))
            return d
        self.asks[ask] = d
        if on_progress is not None:
            box.progress[ask] = on_progress
        box.callRemote(command, ask=ask, **kw).addCallbacks(
            self._answered, self._refused, callbackArgs=(ask, d), errbackArgs=(ask, d)
        )
        return d

    def _answered(self, answer: dict[str, Any], ask: int, d: Deferred[Any]) -> None:
        self.asks.pop(ask, None)
        self.box.progress.pop(ask, None)
        lease = None
        if "lease" in answer:
            lease = RemoteLease(
                self,
                answer["lease"],
                answer["endpoint"],
                answer["display"],
                answer["container"],
                answer["queued_for"],
            )
            self.held.add(lease.id)
        if d.called:  # withdrawn while the answer was on its way: given back
            if lease is not None:
                lease.release()
            return
        d.callback(lease)
        if lease is None:
            self._maybe_idle()

    def _refused(self, f: Failure, ask: int, d: Deferred[Any]) -> None:
        self.asks.pop(ask, None)
        self.box.progress.pop(ask, None)
        if not d.called:
            d.errback(_lost(f))
        self._maybe_idle()

    def give_back(self, lease: RemoteLease, failed: bool) -> None:
        """Release ``lease`` (``failed``: as crashed)."""
        self.held.discard(lease.id)
        if self.box.connected:
            self.box.callRemote(c.Release, lease=lease.id, failed=failed)
        self._maybe_idle()


@define(eq=False)
class RemoteNetworks:
    """An engine's ``networks()`` asked of the broker's process (the ``host:`` policy)."""

    box: ChildBox
    name: str

    def networks(self) -> Deferred[list[NetworkInfo]]:
        """The engine's networks."""

        def decode(r: dict[str, bytes]) -> list[NetworkInfo]:
            return [
                NetworkInfo(str(n), str(d), tuple(s), tuple(r_)) for n, d, s, r_ in json.loads(r["networks"])
            ]

        def refused(f: Failure) -> Failure:
            return Failure(_lost(f))

        return self.box.callRemote(c.Networks, engine=self.name).addCallbacks(decode, refused)
