"""``/monitor:metrics`` (Prometheus text) and ``/monitor:health`` (liveness for probes).

- :class:`MetricsResource` renders :class:`dockerspaces.metrics.Metrics` with gauges from
  the broker snapshot taken at scrape time.
- :class:`HealthResource` answers ``200`` when this instance is serving (not shutting
  down) and at least one engine answers ``ping()`` within ``timeout`` seconds, else
  ``503`` with ``Retry-After``; the body is a small JSON object naming each engine's
  answer (no URLs, no credentials).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..engine.interface import IEngine
from ..metrics import CONTENT_TYPE, Metrics
from .errors import finish_error
from .site import done_or_gone


class MetricsResource(Resource):
    """``GET /monitor:metrics``: every metric in the Prometheus text format."""

    isLeaf = True

    def __init__(
        self,
        metrics: Metrics,
        snapshot: Callable[[], dict[str, Any]] | None = None,
        gather: Callable[[], Deferred[Metrics]] | None = None,
    ):
        super().__init__()
        self.metrics, self.snapshot = metrics, snapshot
        self.gather = gather  # --workers: these metrics and every child's, summed

    def render_GET(self, request: Request) -> Any:
        """The exposition."""
        request.setHeader(b"content-type", CONTENT_TYPE)
        request.setHeader(b"cache-control", b"no-store")
        if self.gather is None:
            snap = self.snapshot() if self.snapshot is not None else None
            return self.metrics.render(snap)

        def write(metrics: Metrics) -> None:
            snap = self.snapshot() if self.snapshot is not None else None
            if not done_or_gone(request):
                request.write(metrics.render(snap))
                request.finish()

        self.gather().addCallback(write).addErrback(
            lambda f: finish_error(request, 503, f"metrics: {f.getErrorMessage()}", 5)
        )
        return NOT_DONE_YET

    render_HEAD = render_GET


class HealthResource(Resource):
    """``GET /monitor:health``: 200 when serving and some engine answers a ping, else 503."""

    isLeaf = True

    def __init__(
        self,
        engines: Mapping[str, IEngine],
        clock: IReactorTime,
        *,
        serving: Callable[[], bool] = lambda: True,
        timeout: float = 5.0,
    ):
        super().__init__()
        self.engines, self.clock, self.serving, self.timeout = engines, clock, serving, timeout

    def check(self) -> Deferred[tuple[bool, dict[str, object]]]:
        """Ping every engine (bounded by ``timeout``): (healthy, details)."""
        names = list(self.engines)
        pings: list[Deferred[bool]] = []
        for name in names:
            d = maybeDeferred(self.engines[name].ping)
            d.addTimeout(self.timeout, self.clock)
            pings.append(d)

        def done(results: Sequence[tuple[bool, object]]) -> tuple[bool, dict[str, object]]:
            engines: dict[str, str] = {}
            for name, (ok, value) in zip(names, results, strict=True):
                if isinstance(value, Failure):
                    engines[name] = f"down: {value.getErrorMessage()[:200]}"
                else:
                    engines[name] = "up" if ok and value else "down"
            serving = bool(self.serving())
            healthy = serving and any(v == "up" for v in engines.values())
            return healthy, {
                "status": "ok" if healthy else "unavailable",
                "serving": serving,
                "engines": engines,
            }

        return DeferredList(pings, consumeErrors=True).addCallback(done)

    def render_GET(self, request: Request) -> object:
        """Answer once the pings are in."""

        def answer(result: tuple[bool, dict[str, object]]) -> None:
            if done_or_gone(request):
                return
            healthy, details = result
            body = json.dumps(details).encode() + b"\n"
            request.setResponseCode(200 if healthy else 503)
            if not healthy:
                request.setHeader(b"retry-after", b"10")
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"content-length", str(len(body)).encode())
            if request.method != b"HEAD":
                request.write(body)
            request.finish()

        self.check().addCallback(answer)
        return NOT_DONE_YET

    render_HEAD = render_GET
