"""Structured log events: one per proxied request, one per container event.

Events go through :mod:`twisted.logger` under the namespaces ``dockerspaces.request``
and ``dockerspaces.container``; every event carries its fields as keys (``ds_kind``,
``ds_route``, ``ds_status``, …) and a readable ``log_format``, so twistd's ordinary text
log shows a line and :func:`json_observer` writes one JSON object per line.

What is logged is safe by construction: a job is shown by ``JobSpec.display`` (env
names and a hash, never values), a path through :func:`safe_path` (the route's env
redacted by ``spec.redact_path`` and query *values* replaced by ``…``); credentials and
env values are never passed in.

:func:`setup_logging` returns the observer for ``--log-format``: JSON lines, or
twistd's text lines written cheaply (:mod:`dockerspaces.logoutput`) to the file twistd
would have used; ``None`` leaves the text log to twistd itself (``--syslog``,
``--logger``, or no destination given). The app makes it the log observer of the
twistd Application with :class:`ObservedMultiService` (twistd consults the
Application's ``ILogObserver`` component before ``--logfile``).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from time import time
from typing import IO

from twisted.application.service import IServiceCollection
from twisted.internet.interfaces import IAddress
from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
)
from twisted.python.components import Componentized
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from .logoutput import URGENT, LineWriter, LoopReactor, TextObserver
from .services import StopInOrder
from .spec import redact_path

REQUEST_NS = "dockerspaces.request"
CONTAINER_NS = "dockerspaces.container"

#: container events (``log_container(event, …)``)
CONTAINER_EVENTS = (
    "pull-start",
    "pull-end",
    "create",
    "start",
    "ready",
    "stop",
    "evict",
    "crash",
    "adopt",
    "remove",
    "fail",
)

_request_log = Logger(namespace=REQUEST_NS)
_container_log = Logger(namespace=CONTAINER_NS)


#: URIs up to this long have their :func:`safe_path` cached (a page's requests repeat)
_SAFE_PATH_MAX = 512


def safe_path(uri: bytes) -> str:
    """A request URI fit for logs: route env redacted, query values replaced by ``…``."""
    if len(uri) <= _SAFE_PATH_MAX:
        return _safe_path_cached(uri)
    return _safe_path(uri)


def _safe_path(uri: bytes) -> str:
    raw, _, query = uri.partition(b"?")
    path = redact_path(raw)
    if not query:
        return path
    names = []
    for item in query.split(b"&"):
        name, eq, _value = item.partition(b"=")
        names.append(name.decode("latin-1") + ("=…" if eq else ""))
    return path + "?" + "&".join(names)


_safe_path_cached = lru_cache(maxsize=1024)(_safe_path)


def request_text(
    kind: str,
    route: str,
    method: str,
    path: str,
    status: int,
    nbytes: int,
    seconds: float,
    queue_wait: float | None,
    reason: str | None,
    user: str | None = None,
) -> str:
    """The readable text of a request line (``path`` already made safe; ``user``: the
    signed-in user, with ``--auth accounts``)."""
    # One f-string: twisted.logger's own formatting of a many-field format string was
    # a fifth of the proxy's CPU per small request.
    text = f"{kind} {route} {method} {path} -> {status} {nbytes}B in {seconds:.3f}s"
    if queue_wait is not None:
        text += f" queued {queue_wait:.3f}s"
    if reason:
        text += f" ({reason})"
    if user is not None:
        text += f" user={user}"
    return text


def log_request(
    *,
    kind: str,
    route: str,
    method: bytes | str,
    uri: bytes,
    status: int,
    nbytes: int,
    seconds: float,
    queue_wait: float | None = None,
    client: str | None = None,
    reason: str | None = None,
    logger: Logger | None = None,
    user: str | None = None,
) -> None:
    """Log one finished (or abandoned) proxied request as a :mod:`twisted.logger` event.

    ``kind``: ``x``/``y``/``worker``/``host``/``shost``/``root``/``monitor``/``docker``;
    ``route``: the displayed key (``JobSpec.display``) or host; ``uri``: the raw request
    URI (it is redacted here); ``reason``: how it ended when not normally
    (``client-gone``, ``backend-error``, …).
    """
    m = method.decode("latin-1") if isinstance(method, bytes) else method
    path = safe_path(uri)
    text = request_text(kind, route, m, path, status, nbytes, seconds, queue_wait, reason, user)
    log = logger or _request_log
    # The event ``log.info("{ds_text}", ds_…=…)`` would build, handed to the logger's
    # observer (the global publisher: twistd's or the JSON observer) directly:
    # ``Logger.emit`` re-validates the level against a freshly sorted list per call.
    log.observer(
        {
            "ds_text": text,
            "ds_event": "request",
            "ds_kind": kind,
            "ds_route": route,
            "ds_method": m,
            "ds_path": path,
            "ds_status": status,
            "ds_bytes": nbytes,
            "ds_seconds": seconds,
            "ds_queue_wait": queue_wait,
            "ds_client": client,
            "ds_reason": reason,
            "ds_user": user,
            "log_logger": log,
            "log_level": LogLevel.info,
            "log_namespace": log.namespace,
            "log_source": log.source,
            "log_format": "{ds_text}",
            "log_time": time(),
        }
    )


#: what a request line of the text log carries between its timestamp and its text
_REQUEST_HEAD = f" [{REQUEST_NS}#info] "


class RequestLog:
    """The request log (the access log): where :class:`~dockerspaces.web.accesslog.Recorder`
    sends one line per request.

    By default each line is a :mod:`twisted.logger` event (:func:`log_request`), seen by
    every observer. When the process's log *is* our :class:`TextObserver` (text format,
    written by us to twistd's destination), lines go straight to it instead, the same
    text in the same file and order, without building an event of 19 keys and passing
    it through the publisher for every request (on the hot path: see BENCHMARKS.md).
    JSON lines and twistd's own observers
    (``--syslog``, ``--logger``) keep the event path.
    """

    def __init__(
        self, text: TextObserver | None = None, logger: Logger | None = None, now: Callable[[], float] = time
    ):
        self.text = text
        self.logger = logger
        self.now = now

    def __call__(
        self,
        kind: str,
        route: str,
        method: bytes,
        uri: bytes,
        status: int,
        nbytes: int,
        seconds: float,
        queue_wait: float | None,
        client: IAddress | None,
        reason: str | None,
        user: str | None = None,
    ) -> None:
        """Log one request (``client`` is the peer address object, or None; ``user`` the
        signed-in user)."""
        text = self.text
        if text is None:
            log_request(
                kind=kind,
                route=route,
                method=method,
                uri=uri,
                status=status,
                nbytes=nbytes,
                seconds=seconds,
                queue_wait=queue_wait,
                client=getattr(client, "host", None),
                reason=reason,
                logger=self.logger,
                user=user,
            )
            return
        text.line(
            _REQUEST_HEAD,
            request_text(
                kind,
                route,
                method.decode("latin-1"),
                safe_path(uri),
                status,
                nbytes,
                seconds,
                queue_wait,
                reason,
                user,
            ),
            self.now(),
        )


def log_container(
    event: str,
    display: str,
    host: str,
    slot: int | None = None,
    *,
    container: str | None = None,
    seconds: float | None = None,
    detail: str | None = None,
    logger: Logger | None = None,
) -> None:
    """Log one container event (``pull-start``, ``ready``, ``evict``, ``crash``, …).

    ``display`` is the key as shown (``JobSpec.display``); ``slot`` the slot's host port;
    ``container`` the container id (shortened here); ``seconds`` how long the step took;
    ``detail`` a short free text (an exit code, a log tail -- never env values).
    """
    level = LogLevel.warn if event in ("crash", "fail") else LogLevel.info
    fmt = "container {ds_event} {ds_route} on {ds_host}"
    if slot is not None:
        fmt += ":{ds_slot}"
    if container:
        fmt += " [{ds_container}]"
    if seconds is not None:
        fmt += " after {ds_seconds:.3f}s"
    if detail:
        fmt += ": {ds_detail}"
    (logger or _container_log).emit(
        level,
        fmt,
        ds_event=event,
        ds_route=display,
        ds_host=host,
        ds_slot=slot,
        ds_container=container[:12] if container else None,
        ds_seconds=seconds,
        ds_detail=detail,
    )


def event_record(event: LogEvent) -> dict[str, object]:
    """The JSON-ready record of a log event: time, level, namespace, message, ``ds_*``."""
    level = event.get("log_level")
    rec: dict[str, object] = {
        "time": datetime.fromtimestamp(event.get("log_time") or 0, UTC)
        .isoformat(timespec="milliseconds")
        .replace("+00:00", "Z"),
        "level": getattr(level, "name", None) or str(level or "info"),
        "namespace": event.get("log_namespace", "-"),
    }
    for k, v in event.items():
        if k.startswith("ds_") and v is not None:
            rec[k[3:]] = v
    msg = formatEvent(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        msg += "\n" + failure.getTraceback()
    rec["message"] = msg
    return rec


@implementer(ILogObserver)
class JsonLinesObserver:
    """Writes every event as one JSON object per line (see :func:`event_record`): to
    ``out`` at once, or batched through ``writer`` (``warn`` and above at once)."""

    def __init__(self, out: IO[str], writer: LineWriter | None = None):
        self.out = out
        self.writer = writer

    def __call__(self, event: LogEvent) -> None:
        """Write one event."""
        line = json.dumps(event_record(event), default=str, ensure_ascii=False) + "\n"
        if self.writer is not None:
            self.writer.write(line, event.get("log_level") in URGENT)
            return
        self.out.write(line)
        self.out.flush()


def json_observer(out: IO[str] | None = None, reactor: LoopReactor | None = None) -> JsonLinesObserver:
    """A JSON-lines observer on ``out`` (stdout by default), batched when given the
    ``reactor``."""
    target = out if out is not None else sys.stdout
    return JsonLinesObserver(target, LineWriter(target, reactor) if reactor is not None else None)


def setup_logging(
    fmt: str, out: IO[str] | None = None, reactor: LoopReactor | None = None
) -> JsonLinesObserver | TextObserver | None:
    """The log observer for ``--log-format fmt`` writing to ``out``.

    ``json``: JSON lines on ``out`` (stdout when None). ``text``: twistd's text lines,
    batched per reactor iteration, when ``out`` and ``reactor`` are given; else
    ``None``: twistd's own observer (``--logfile``, ``--syslog``, ``--logger``).
    """
    if fmt == "json":
        return json_observer(out, reactor)
    if fmt != "text":
        raise ValueError(f"unknown log format {fmt!r}")
    if out is None or reactor is None:
        return None
    return TextObserver(LineWriter(out, reactor))


class ObservedMultiService(StopInOrder):
    """A top-level service that, attached to twistd's Application, makes ``observer`` its
    log observer (an explicit ``twistd --logger`` still wins); its children stop one
    after another (:class:`~dockerspaces.services.StopInOrder`)."""

    def __init__(self, observer: JsonLinesObserver | TextObserver | None):
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: IServiceCollection | Componentized) -> None:
        """Register the observer on the Application (a Componentized that adapts to
        ``IServiceCollection``), then attach as usual."""
        if (
            self.observer is not None
            and isinstance(parent, Componentized)
            and parent.getComponent(ILogObserver, None) is None
        ):
            parent.setComponent(ILogObserver, self.observer)
        super().setServiceParent(parent)
