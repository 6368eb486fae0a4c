"""Browser pages: the waiting page for cold starts and the ``/monitor:broker/`` dashboard.

A browser navigating to ``/x:…/`` whose container must be pulled or started would
otherwise stare at a blank tab for minutes.  The :class:`WaitingRoom` gives it, after
``page_delay`` seconds without a container, an HTML page that polls
``/monitor:progress/<token>`` (:class:`ProgressResource`, fed by the broker's
``Progress`` callbacks through the :class:`ProgressBoard`) and reloads the original URL
once the container is ready.  The acquire goes on in the background for the page: when
it yields a lease, the lease is released at once (the container stays warm, handed to
the reload or, for ``x:``, to whoever is first).  A page nobody polls any more for
``abandon_after`` seconds leaves the queue (a cold start still finishes).

API clients (no ``text/html`` in ``Accept``, ``fetch()``/XHR, WebSocket handshakes,
non-GET) keep the blocking behaviour.

``/monitor:broker/`` opened by a browser gets :class:`DashboardResource`'s HTML, which
polls the same URL for JSON; other clients get the JSON as before.
"""

from __future__ import annotations

import html
import json
import secrets
from collections.abc import Callable
from importlib import resources
from typing import Any, Protocol

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from ..spec import split_uri
from .site import done_or_gone

WAITING_STATES = ("queued", "pulling", "starting")
_HTML_TYPES = (b"text/html", b"application/xhtml+xml")


def _static(name: str) -> str:
    return (resources.files("dockerspaces.web") / "static" / name).read_text(encoding="utf-8")


def _accept_q(accept: bytes) -> dict[bytes, float]:
    out: dict[bytes, float] = {}
    for item in accept.split(b","):
        parts = [p.strip() for p in item.split(b";")]
        if not parts[0]:
            continue
        q = 1.0
        for p in parts[1:]:
            if p.lower().startswith(b"q="):
                try:
                    q = float(p[2:])
                except ValueError:
                    q = 0.0
        out[parts[0].lower()] = max(q, out.get(parts[0].lower(), 0.0))
    return out


def wants_html(request: Request) -> bool:
    """True when the client prefers an HTML page: a browser navigation (GET, ``Accept``
    naming ``text/html`` at least as high as anything else), not fetch/XHR/WebSocket."""
    if request.method != b"GET":
        return False
    h = request.requestHeaders
    if h.hasHeader(b"upgrade") or h.hasHeader(b"x-requested-with"):
        return False
    mode = h.getRawHeaders(b"sec-fetch-mode", [b"navigate"])[0]
    if mode.lower() not in (b"navigate", b"nested-navigate"):
        return False
    accept = b",".join(h.getRawHeaders(b"accept", []))
    qs = _accept_q(accept)
    html_q = max((qs.get(t, 0.0) for t in _HTML_TYPES), default=0.0)
    if html_q <= 0:
        return False
    others = [q for t, q in qs.items() if t not in _HTML_TYPES and not t.endswith(b"*")]
    return html_q >= max(others, default=0.0)


@define
class _Entry:
    display: str
    url: str
    created: float
    updated: float
    polled: float
    state: str = "queued"
    position: int | None = None
    detail: str | None = None
    current: int | None = None
    total: int | None = None
    done: bool = False


@define
class ProgressBoard:
    """token → latest progress of one waiting page; entries expire ``ttl`` seconds after
    their last update or poll (checked lazily, no timers)."""

    clock: Any
    ttl: float = 600.0
    entries: dict[str, _Entry] = field(factory=dict)

    def new(self, display: str, url: str) -> str:
        """Register a waiting page for ``display`` that returns to ``url``; its token."""
        token = secrets.token_urlsafe(16)
        self.add(token, display, url)
        return token

    def add(self, token: str, display: str, url: str) -> None:
        """Register a page under a token made elsewhere (a ``--workers`` child's)."""
        self.expire()
        now = self.clock.seconds()
        self.entries[token] = _Entry(display, url, now, now, now)

    def publish(self, token: str, progress: Any) -> None:
        """Record a broker ``Progress`` (state, position, detail, current, total)."""
        e = self.entries.get(token)
        if e is None or e.done:
            return
        e.state = str(progress.state)
        e.position = progress.position
        e.detail = progress.detail
        e.current, e.total = progress.current, progress.total
        e.updated = self.clock.seconds()

    def callback(self, token: str) -> Callable[[Any], None]:
        """A progress callback for ``broker.acquire(spec, progress=...)``."""
        return lambda p: self.publish(token, p)

    def finish(self, token: str, state: str, detail: str | None = None) -> None:
        """Final state: ``ready`` (reload now) or ``failed`` (with ``detail``)."""
        e = self.entries.get(token)
        if e is None:
            return
        e.state, e.detail, e.done = state, detail, True
        e.position = None
        e.updated = self.clock.seconds()

    def discard(self, token: str) -> None:
        """Forget a token (its request was served without a page)."""
        self.entries.pop(token, None)

    def last_poll(self, token: str) -> float | None:
        """When the page last asked for its progress (None: unknown token)."""
        e = self.entries.get(token)
        return e.polled if e else None

    def get(self, token: str) -> dict[str, Any] | None:
        """The page's view (and note that it polled), or None if unknown or expired."""
        self.expire()
        e = self.entries.get(token)
        if e is None:
            return None
        now = self.clock.seconds()
        e.polled = now
        return {
            "state": e.state,
            "position": e.position,
            "detail": e.detail,
            "current": e.current,
            "total": e.total,
            "display": e.display,
            "url": e.url,
            "waited": round(now - e.created, 3),
        }

    def expire(self) -> None:
        """Drop entries not updated or polled for ``ttl`` seconds."""
        limit = self.clock.seconds() - self.ttl
        for token in [t for t, e in self.entries.items() if max(e.updated, e.polled) < limit]:
            del self.entries[token]


def waiting_page(token: str, display: str, url: str) -> bytes:
    """The waiting page's HTML (style and script inlined: no further request needed)."""
    page = _static("waiting.html")
    for k, v in (
        ("{{STYLE}}", _static("style.css")),
        ("{{SCRIPT}}", _static("waiting.js")),
        ("{{TOKEN}}", html.escape(token)),
        ("{{DISPLAY}}", html.escape(display)),
        ("{{URL}}", html.escape(url)),
    ):
        page = page.replace(k, v)
    return page.encode("utf-8")


class Board(Protocol):
    """What the waiting room asks of a board: :class:`ProgressBoard`, or a
    ``--workers`` child's ``RemoteBoard`` (the broker process's board)."""

    def new(self, display: str, url: str) -> str:
        """A token for a new page."""

    def callback(self, token: str) -> Callable[[Any], None]:
        """The acquire's progress callback for the page."""

    def finish(self, token: str, state: str, detail: str | None = None) -> None:
        """The page's final state."""

    def discard(self, token: str) -> None:
        """Forget the page."""

    def last_poll(self, token: str) -> float | Deferred[float | None] | None:
        """When the page last polled."""


@define
class WaitingRoom:
    """Decides, per browser request, between forwarding and the waiting page."""

    board: Board
    clock: Any
    page_delay: float = 1.0
    abandon_after: float = 30.0
    poll_path: str = "/monitor:progress/"

    def acquire(
        self, request: Request, display: str, start: Callable[[Callable[[Any], None]], Deferred[Any]]
    ) -> Deferred[Any]:
        """Start the acquire (``start(progress_callback)``); the result fires with the lease
        when it comes within ``page_delay``, or with ``None`` once the waiting page has
        been sent (the room then owns the acquire). Cancelling it before the page was sent
        cancels the acquire (the client left)."""
        url = request.uri.decode("latin-1")
        token = self.board.new(display, url)
        state = {"paged": False}

        def cancel(_: Deferred[Any]) -> None:
            if not state["paged"] and not inner.called:
                inner.cancel()

        outer: Deferred[Any] = Deferred(cancel)
        inner = start(self.board.callback(token))
        timer = None

        def got(result: Any) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            if state["paged"]:
                if isinstance(result, Failure):
                    if not result.check(CancelledError):
                        self.board.finish(token, "failed", result.getErrorMessage())
                    else:
                        self.board.finish(token, "failed", "the wait was abandoned")
                else:
                    self.board.finish(token, "ready")
                    result.release()
                return
            self.board.discard(token)
            if not outer.called:
                if isinstance(result, Failure):
                    outer.errback(result)
                else:
                    outer.callback(result)
            elif not isinstance(result, Failure):
                result.release()

        def page() -> None:
            if inner.called or outer.called:
                return
            if done_or_gone(request):
                return
            state["paged"] = True
            body = waiting_page(token, display, url)
            request.setResponseCode(202)
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            request.setHeader(b"content-length", str(len(body)).encode())
            request.write(body)
            request.finish()
            outer.callback(None)
            self.clock.callLater(self.abandon_after, watchdog)

        def watchdog() -> None:
            if not inner.called:  # (a --workers child's board answers later)
                last: Deferred[Any] = maybeDeferred(self.board.last_poll, token)
                last.addCallback(judge)

        def judge(last: float | None) -> None:
            if inner.called:
                return
            if last is None or self.clock.seconds() - last >= self.abandon_after:
                inner.cancel()  # nobody watches any more: leave the queue
            else:
                self.clock.callLater(self.abandon_after, watchdog)

        inner.addBoth(got)
        if not inner.called:
            timer = self.clock.callLater(self.page_delay, page)
        return outer


class ProgressResource(Resource):
    """``/monitor:progress/<token>``: the waiting page's progress as JSON (404 if unknown)."""

    isLeaf = True

    def __init__(self, board: ProgressBoard):
        super().__init__()
        self.board = board

    def render_GET(self, request: Request) -> bytes:
        """The JSON view of one token."""
        token = split_uri(request.uri).rest.strip(b"/").decode("latin-1")
        view = self.board.get(token) if token else None
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        if view is None:
            request.setResponseCode(404)
            return b'{"state": "unknown"}\n'
        return json.dumps(view).encode() + b"\n"


class DashboardResource(Resource):
    """``/monitor:broker/``: an HTML dashboard for browsers, the JSON for everyone else."""

    isLeaf = True

    def __init__(self, json_resource: Resource):
        super().__init__()
        self.json_resource = json_resource

    def render(self, request: Request) -> Any:  # type: ignore[override]
        """HTML for a browser navigation; otherwise the wrapped JSON resource."""
        if wants_html(request):
            page = _static("dashboard.html")
            page = page.replace("{{STYLE}}", _static("style.css"))
            page = page.replace("{{SCRIPT}}", _static("dashboard.js"))
            body = page.encode("utf-8")
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            request.setHeader(b"cache-control", b"no-store")
            return body
        return self.json_resource.render(request)
