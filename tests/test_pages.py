"""Waiting page, progress board and dashboard (dockerspaces/web/pages.py; clock-driven)."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.trial import unittest
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from dockerspaces.broker.model import Progress
from dockerspaces.web.pages import (
    DashboardResource,
    ProgressBoard,
    ProgressResource,
    WaitingRoom,
    waiting_page,
    wants_html,
)

BROWSER = b"text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"


def request(
    uri: bytes = b"/x:a:1:80/", accept: bytes | None = BROWSER, method: bytes = b"GET", **headers: bytes
) -> DummyRequest:
    r = DummyRequest([b""])
    r.uri, r.method = uri, method
    if accept is not None:
        r.requestHeaders.setRawHeaders(b"accept", [accept])
    for k, v in headers.items():
        r.requestHeaders.setRawHeaders(k.replace("_", "-").encode(), [v])
    return r


class Lease:
    def __init__(self) -> None:
        self.released = 0

    def release(self) -> None:
        self.released += 1


class WantsHtmlTests(unittest.TestCase):
    def test_browser_navigation(self) -> None:
        self.assertTrue(wants_html(request()))
        self.assertTrue(wants_html(request(sec_fetch_mode=b"navigate")))

    def test_api_clients(self) -> None:
        self.assertFalse(wants_html(request(accept=None)))
        self.assertFalse(wants_html(request(accept=b"*/*")))
        self.assertFalse(wants_html(request(accept=b"application/json")))
        self.assertFalse(wants_html(request(accept=b"application/json, text/html;q=0.5")))
        self.assertFalse(wants_html(request(method=b"POST")))
        self.assertFalse(wants_html(request(sec_fetch_mode=b"cors")))
        self.assertFalse(wants_html(request(upgrade=b"websocket")))
        self.assertFalse(wants_html(request(x_requested_with=b"XMLHttpRequest")))
        self.assertFalse(wants_html(request(accept=b"text/html;q=0")))


class BoardTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.board = ProgressBoard(self.clock, ttl=60)

    def test_publish_and_get(self) -> None:
        t = self.board.new("x:a:1:80 env[]#abc", "/x:a:1:80/")
        self.board.publish(t, Progress("pulling", detail="layer 1", current=5, total=10))
        self.clock.advance(2)
        view = self.board.get(t)
        assert view is not None
        self.assertEqual(
            (view["state"], view["current"], view["total"], view["detail"]), ("pulling", 5, 10, "layer 1")
        )
        self.assertEqual(view["waited"], 2)
        self.assertEqual(view["url"], "/x:a:1:80/")
        self.board.finish(t, "ready")
        self.board.publish(t, Progress("starting"))  # late progress does not undo ready
        self.assertEqual(self.board.get(t)["state"], "ready")  # type: ignore[index]

    def test_expiry_and_unknown(self) -> None:
        t = self.board.new("k", "/u")
        self.assertIsNone(self.board.get("nope"))
        self.clock.advance(59)
        self.assertIsNotNone(self.board.get(t))  # a poll keeps it alive
        self.clock.advance(59)
        self.assertIsNotNone(self.board.get(t))
        self.clock.advance(61)
        self.assertIsNone(self.board.get(t))
        self.assertEqual(self.board.entries, {})

    def test_tokens_differ(self) -> None:
        self.assertNotEqual(self.board.new("k", "/u"), self.board.new("k", "/u"))


class WaitingRoomTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.board = ProgressBoard(self.clock)
        self.room = WaitingRoom(self.board, self.clock, page_delay=1.0, abandon_after=30.0)
        self.inner: Deferred[Any] = Deferred()
        self.callbacks: list[Any] = []
        self.results: list[Any] = []

    def start(self, cb: Any) -> Deferred[Any]:
        self.callbacks.append(cb)
        return self.inner

    def go(self, req: DummyRequest) -> Deferred[Any]:
        d = self.room.acquire(req, "x:a:1:80 env[]#abc", self.start)
        d.addBoth(self.results.append)
        return d

    def test_warm_container_is_forwarded(self) -> None:
        req = request()
        self.go(req)
        lease = Lease()
        self.clock.advance(0.5)
        self.inner.callback(lease)
        self.assertEqual(self.results, [lease])
        self.assertEqual(req.written, [])
        self.clock.advance(5)
        self.assertEqual(req.written, [])
        self.assertEqual(self.board.entries, {})

    def test_immediate_lease(self) -> None:
        lease = Lease()
        self.inner = succeed(lease)  # type: ignore[assignment]
        self.go(request())
        self.assertEqual(self.results, [lease])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_cold_start_gets_page_then_ready(self) -> None:
        req = request(b"/x:a:1:80/app?q=1")
        self.go(req)
        self.callbacks[0](Progress("queued", position=2))
        self.clock.advance(1.0)
        self.assertEqual(self.results, [None])
        self.assertEqual(req.responseCode, 202)
        self.assertTrue(req.finished)
        page = b"".join(req.written).decode()
        (token,) = self.board.entries
        self.assertIn(f'data-token="{token}"', page)
        self.assertIn('data-url="/x:a:1:80/app?q=1"', page)
        self.assertIn("/monitor:progress/", page)  # the script is inlined
        self.assertEqual(self.board.get(token)["position"], 2)  # type: ignore[index]
        self.callbacks[0](Progress("starting"))
        self.assertEqual(self.board.get(token)["state"], "starting")  # type: ignore[index]
        lease = Lease()
        self.inner.callback(lease)
        self.assertEqual(lease.released, 1)  # the page's lease goes back at once
        self.assertEqual(self.board.get(token)["state"], "ready")  # type: ignore[index]

    def test_failure_after_page(self) -> None:
        self.go(request())
        self.clock.advance(1.0)
        (token,) = self.board.entries
        self.inner.errback(RuntimeError("exit code 3: boom"))
        view = self.board.get(token)
        assert view is not None
        self.assertEqual((view["state"], view["detail"]), ("failed", "exit code 3: boom"))

    def test_failure_before_page_goes_to_the_request(self) -> None:
        self.inner = fail(RuntimeError("nope"))  # type: ignore[assignment]
        self.go(request())
        self.assertEqual(len(self.results), 1)
        self.assertTrue(self.results[0].check(RuntimeError))

    def test_client_leaves_before_page(self) -> None:
        cancelled: list[object] = []
        self.inner = Deferred(cancelled.append)
        d = self.go(request())
        d.cancel()
        self.assertEqual(cancelled, [self.inner])  # the broker's acquire was cancelled
        self.assertTrue(self.results[0].check(CancelledError))
        self.clock.advance(2)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_unwatched_page_leaves_the_queue(self) -> None:
        self.go(request())
        self.clock.advance(1.0)
        (token,) = self.board.entries
        for _ in range(3):  # polled: stays
            self.clock.advance(10)
            self.board.get(token)
        self.assertFalse(self.inner.called)
        self.clock.advance(31)  # no poll for 31 s
        self.clock.advance(30)
        self.assertTrue(self.inner.called)
        self.assertEqual(self.board.get(token)["state"], "failed")  # type: ignore[index]


class ResourceTests(unittest.TestCase):
    def test_progress_resource(self) -> None:
        clock = task.Clock()
        board = ProgressBoard(clock)
        t = board.new("x:a:1:80 env[]#abc", "/x:a:1:80/")
        board.publish(t, Progress("queued", position=3))
        req = request(b"/monitor:progress/" + t.encode(), accept=b"application/json")
        body = ProgressResource(board).render(req)
        self.assertEqual(json.loads(body)["position"], 3)
        req = request(b"/monitor:progress/unknown", accept=b"application/json")
        ProgressResource(board).render(req)
        self.assertEqual(req.responseCode, 404)

    def test_waiting_page_escapes(self) -> None:
        page = waiting_page("t", "x:a:1:80 <b>", '/x:a:1:80/?q="><script>').decode()
        self.assertNotIn('"><script>', page)
        self.assertIn("&lt;b&gt;", page)

    def test_dashboard_html_or_json(self) -> None:
        class Json(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                return b'{"Queues": {}}'

        dash = DashboardResource(Json())
        req = request(b"/monitor:broker/")
        html = dash.render(req)
        self.assertIn(b"<table", html)
        self.assertIn(b"XMLHttpRequest", html)
        self.assertEqual(dash.render(request(b"/monitor:broker/", accept=None)), b'{"Queues": {}}')
        self.assertEqual(
            dash.render(request(b"/monitor:broker/", accept=b"application/json")), b'{"Queues": {}}'
        )
