"""One log line and one metrics observation per request, whatever way it ends."""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.interfaces import IReactorTime
from twisted.web.server import Request

from ..logs import RequestLog
from ..metrics import Metrics
from .site import on_lost

_ATTR = "_dockerspaces_route"
#: the request attribute holding the signed-in identity (``--auth accounts``)
IDENTITY_ATTR = "_dockerspaces_identity"
#: the attribute naming the ``--app-domain`` app host label a request came for (set by
#: the root; the auth gate sends such a browser to sign in on the main host)
APP_HOST_ATTR = "_dockerspaces_app_host"
#: the route kind of a request refused before routing (malformed or over a limit),
#: as of a malformed route segment
REFUSED = "bad"


@define
class RouteInfo:
    """What the root learned about a request: route kind, displayed route, timings."""

    kind: str
    route: str
    started: float
    queue_wait: float | None = None
    reason: str | None = None
    done: bool = False


def route_info(request: Request) -> RouteInfo | None:
    """The :class:`RouteInfo` attached to ``request`` by :meth:`Recorder.begin`, if any."""
    return getattr(request, _ATTR, None)


@define
class Recorder:
    """Attaches route info at dispatch and records the request when it ends: one line
    in the request log (``log``, a :class:`~dockerspaces.logs.RequestLog`) and one
    observation in ``metrics``."""

    clock: IReactorTime
    metrics: Metrics | None = None
    log: RequestLog = field(factory=RequestLog)

    def begin(self, request: Request, kind: str, route: str) -> None:
        """Called by the root once the route is known."""
        setattr(request, _ATTR, RouteInfo(kind, route, self.clock.seconds()))
        if self.metrics is not None:
            self.metrics.request_started(kind)
        # a site built with on_request_lost=recorder.lost tells us itself
        if getattr(getattr(request, "site", None), "on_request_lost", None) != self.lost:
            on_lost(request, lambda _: self.done(request, "client-gone"))

    def lost(self, request: Request) -> None:
        """The client went before ``request`` was done (the site's ``on_request_lost``)."""
        self.done(request, "client-gone")

    def refused(self, status: int, method: bytes, uri: bytes, client: Any, reason: str) -> None:
        """An answer the channel gave before any request was processed (the site's
        ``on_refused``: 400 malformed head, 413, 414, 431): logged and counted as
        route kind ``bad``; ``uri`` is what could be read of it (maybe nothing)."""
        self.log(REFUSED, "-", method or b"-", uri or b"-", status, 0, 0.0, None, client, reason)
        if self.metrics is not None:
            self.metrics.request_done(REFUSED, status, 0.0)

    def done(self, request: Request, reason: str | None = None) -> None:
        """Log and count the request once (site log hook, or the client going away)."""
        info: RouteInfo | None = getattr(request, _ATTR, None)
        if info is None or info.done:
            return
        info.done = True
        seconds = self.clock.seconds() - info.started
        status = 499 if reason == "client-gone" else request.code or 0
        identity = getattr(request, IDENTITY_ATTR, None)
        self.log(
            info.kind,
            info.route,
            request.method,
            request.uri,
            status,
            getattr(request, "sentLength", 0) or 0,
            seconds,
            info.queue_wait,
            request.getClientAddress(),
            reason or info.reason,
            None if identity is None else identity.user,
        )
        if self.metrics is not None:
            self.metrics.request_done(info.kind, status, seconds, info.queue_wait)
            if identity is not None:
                self.metrics.group_request(identity.group, info.kind, status)
