"""Unit tests for the proxy's exchange (dockerspaces/web/proxy.py): what the client
receives and how each exchange ends.

A real ``Request`` is driven through ``make_site``'s channel over a StringTransport
(the client); the backend is a :class:`BackendProtocol` over another StringTransport
(:class:`dockerspaces.testing.ProxyHarness`); once end to end over loopback sockets
with the real reactor.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error as ierror
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource

from dockerspaces.testing import (
    GET,
    ProxyHarness,
    head_of,
    values,
)
from dockerspaces.web.backend import Backend
from dockerspaces.web.proxy import ExchangeEnd, Proxy
from dockerspaces.web.site import make_site


class ResponseTests(SynchronousTestCase):
    """What the client receives, and how each exchange ends."""

    def test_streamed_head_sent_before_any_body(self) -> None:
        """A chunked answer (SSE, docker wait/events) shows its head at once."""
        h = ProxyHarness()
        ct, _ = h.answer(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        line, headers = head_of(ct.value())
        self.assertEqual(line, b"HTTP/1.1 200 OK")
        self.assertEqual(values(headers, b"content-type"), [b"text/event-stream"])
        self.assertEqual(h.ends, [])

    def test_repeated_header_in_two_spellings_kept(self) -> None:
        h = ProxyHarness()
        ct, _ = h.answer(
            b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nContent-Length: 0\r\n\r\n"
        )
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"set-cookie"), [b"a=1", b"b=2"])

    def test_sized_head_waits_for_the_body(self) -> None:
        """With a Content-Length the head goes out together with the first body bytes."""
        h = ProxyHarness()
        ct, p = h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(ct.value(), b"")
        p.dataReceived(b"hello")
        self.assertTrue(ct.value().endswith(b"\r\n\r\nhello"))

    def test_headers_and_chunked_body(self) -> None:
        h = ProxyHarness()
        _, ct = h.client(GET)
        p, bt = h.accept()
        p.dataReceived(
            b"HTTP/1.1 200 OK\r\nServer: backend/1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
            b"Connection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=3\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        line, headers = head_of(ct.value())
        self.assertEqual(line, b"HTTP/1.1 200 OK")
        self.assertEqual(values(headers, b"set-cookie"), [b"a=1", b"b=2"])
        self.assertEqual(values(headers, b"server"), [b"backend/1"])
        self.assertEqual(values(headers, b"x-hop"), [])
        self.assertEqual(values(headers, b"keep-alive"), [])
        self.assertEqual(values(headers, b"content-type"), [])  # no default added
        self.assertTrue(ct.value().endswith(b"5\r\nhello\r\n0\r\n\r\n"))
        self.assertEqual(h.ends, [ExchangeEnd("finished", 200, 5)])
        self.assertEqual(h.proxy.idle_connections(), 1)
        self.assertFalse(bt.disconnecting)

    def test_date_and_server_are_the_backends(self) -> None:
        h = ProxyHarness()
        ct, _ = h.answer(
            b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\nContent-Length: 0\r\n\r\n"
        )
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"date"), [b"Sun, 06 Nov 1994 08:49:37 GMT"])
        self.assertEqual(values(headers, b"server"), [])  # no Server of ours on theirs

    def test_date_added_when_backend_sent_none(self) -> None:
        """RFC 9110 6.6.1: a response forwarded without Date gets one."""
        h = ProxyHarness()
        ct, _ = h.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        _, headers = head_of(ct.value())
        (date,) = values(headers, b"date")
        self.assertRegex(date.decode(), r"^\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT$")
        self.assertEqual(values(headers, b"server"), [])

    def test_backpressure(self) -> None:
        """The backend transport is paused while the client transport is paused."""
        h = ProxyHarness()
        channel, _ = h.client(GET)
        p, bt = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
        self.assertEqual(bt.producerState, "producing")
        channel.pauseProducing()  # what the client transport does when its buffer fills
        self.assertEqual(bt.producerState, "paused")
        channel.resumeProducing()
        self.assertEqual(bt.producerState, "producing")
        p.dataReceived(b"y" * 90)
        self.assertEqual(h.ends, [ExchangeEnd("finished", 200, 100)])

    def test_client_gone_aborts_backend(self) -> None:
        h = ProxyHarness()
        channel, _ = h.client(GET)
        p, bt = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nxx")
        channel.connectionLost(Failure(ierror.ConnectionLost()))
        self.assertTrue(bt.disconnected)  # aborted, not a graceful close
        self.assertEqual(h.ends, [ExchangeEnd("client-gone", 200, 2)])
        p.dataReceived(b"more")  # late bytes are ignored
        p.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(len(h.ends), 1)
        self.assertEqual(h.proxy.idle_connections(), 0)
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_client_gone_while_connecting(self) -> None:
        h = ProxyHarness()
        channel, _ = h.client(GET)
        _, d = h.pending[0]
        channel.connectionLost(Failure(ierror.ConnectionLost()))
        self.assertEqual(h.ends, [ExchangeEnd("client-gone", None, 0)])
        self.assertTrue(d.called)  # the connect attempt was cancelled

    def test_backend_error_before_head_is_502(self) -> None:
        h = ProxyHarness()
        _, ct = h.client(GET)
        p, _ = h.accept()
        p.connectionLost(Failure(ierror.ConnectionLost("reset")))
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"127.0.0.1:9100", ct.value())
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 502, 0)])

    def test_unforwarded_refused(self) -> None:
        """With ``retry_unforwarded`` a refused connect is not answered: the caller
        forwards the request elsewhere."""
        h = ProxyHarness()
        h.retry = 1
        _, ct = h.client(GET)
        _, d = h.pending.pop()
        d.errback(Failure(ierror.ConnectionRefusedError()))
        self.assertEqual((ct.value(), ct.disconnecting), (b"", False))
        self.assertEqual(h.ends, [ExchangeEnd("unforwarded", None, 0)])

    def test_reset_after_sending_a_post_is_a_502(self) -> None:
        """A reset before any response byte, after the request went out: its bytes may
        have reached the app, so a request with a body gets its 502."""
        h = ProxyHarness()
        h.retry = 2
        _, ct = h.client(b"POST /p HTTP/1.1\r\nHost: f\r\nContent-Length: 2\r\n\r\nhi")
        p, _ = h.accept()
        p.connectionLost(Failure(ierror.ConnectionLost("reset")))
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 502 "))
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 502, 0)])

    def test_unanswered_get_goes_elsewhere_once(self) -> None:
        """Closed or reset before any response byte: a bodiless GET is sent elsewhere
        when the caller allows it (``retry_unforwarded`` 2)..."""
        for lost in (ierror.ConnectionDone(), ierror.ConnectionLost("reset")):
            h = ProxyHarness()
            h.retry = 2
            _, ct = h.client(GET)
            p, _ = h.accept()
            p.connectionLost(Failure(lost))
            self.assertEqual(ct.value(), b"")
            self.assertEqual(h.ends, [ExchangeEnd("unanswered", None, 0)])
        # ... but not again, and never a request with a body
        for retry, raw in [(1, GET), (2, b"POST /p HTTP/1.1\r\nHost: f\r\nContent-Length: 2\r\n\r\nhi")]:
            h = ProxyHarness()
            h.retry = retry
            _, ct = h.client(raw)
            p, _ = h.accept()
            p.connectionLost(Failure(ierror.ConnectionDone()))
            self.assertTrue(ct.value().startswith(b"HTTP/1.1 502 "))
            self.assertEqual(h.ends, [ExchangeEnd("backend-error", 502, 0)])

    def test_post_to_a_container_dead_before_it_was_sent_goes_elsewhere(self) -> None:
        """A POST whose backend closed without answering: 502 unless the broker says
        the container's process ended before the request's first byte went out
        (behind docker-proxy a dead app's port still accepts) -- then it was never
        read, and it is handed back ``unforwarded`` like a refused connect."""
        post = b"POST /p HTTP/1.1\r\nHost: f\r\nContent-Length: 2\r\n\r\nhi"
        for dead_before, end in [
            (True, ExchangeEnd("unforwarded", None, 0)),
            (False, ExchangeEnd("backend-error", 502, 0)),
        ]:
            h = ProxyHarness()
            h.retry = 1
            asked: list[tuple[float, Deferred[bool]]] = []

            def died_before(t: float, asked: list[Any] = asked) -> Deferred[bool]:
                asked.append((t, Deferred()))
                return asked[-1][1]

            h.died_before = died_before
            h.clock.advance(100)
            _, ct = h.client(post)
            p, _ = h.accept()
            h.clock.advance(5)
            p.connectionLost(Failure(ierror.ConnectionLost("reset")))
            self.assertEqual(h.ends, [])  # waits for the broker's word
            self.assertEqual(asked[0][0], 100)  # the time the request was sent
            asked[0][1].callback(dead_before)
            self.assertEqual(h.ends, [end])
            self.assertEqual(ct.value().startswith(b"HTTP/1.1 502 "), not dead_before)

    def test_died_before_not_asked_once_an_answer_began(self) -> None:
        h = ProxyHarness()
        h.retry = 1
        h.died_before = lambda t: self.fail("asked")  # type: ignore[func-returns-value]
        h.client(b"POST /p HTTP/1.1\r\nHost: f\r\nContent-Length: 2\r\n\r\nhi")
        p, _ = h.accept()
        p.dataReceived(b"HTTP/1.1 200 O")
        p.connectionLost(Failure(ierror.ConnectionLost("reset")))
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 502, 0)])

    def test_client_gone_while_asking_when_it_died(self) -> None:
        h = ProxyHarness()
        h.retry = 1
        asked: list[Deferred[bool]] = []
        h.died_before = lambda t: asked.append(Deferred()) or asked[-1]
        proto, _ = h.client(b"POST /p HTTP/1.1\r\nHost: f\r\nContent-Length: 2\r\n\r\nhi")
        p, _ = h.accept()
        p.connectionLost(Failure(ierror.ConnectionLost("reset")))
        proto.connectionLost(Failure(ierror.ConnectionDone()))
        asked[0].callback(True)
        self.assertEqual([e.reason for e in h.ends], ["client-gone"])

    def test_once_bytes_came_back_it_is_a_502(self) -> None:
        """Any response byte means the app had the request: never handed back."""
        h = ProxyHarness()
        h.retry = 2
        _, ct = h.client(GET)
        p, _ = h.accept()
        p.dataReceived(b"HTTP/1.1 200 O")
        p.connectionLost(Failure(ierror.ConnectionLost("reset")))
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 502 "))
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 502, 0)])

    def test_close_delimited_body_cut_by_a_reset_is_not_complete(self) -> None:
        """A close-delimited body (HTTP/1.0, CGI) passed on chunked: a reset ends it
        without the terminating chunk (the client sees an error), a FIN ends it."""
        h = ProxyHarness()
        ct, p = h.answer(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nline 1\n")
        self.assertIn(b"Transfer-Encoding: chunked", ct.value())
        p.connectionLost(Failure(ierror.ConnectionLost("reset")))
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 200, 7)])
        self.assertFalse(ct.value().endswith(b"0\r\n\r\n"))
        self.assertTrue(ct.disconnecting)
        h = ProxyHarness()
        ct, p = h.answer(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nline 1\n")
        p.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(h.ends, [ExchangeEnd("finished", 200, 7)])
        self.assertTrue(ct.value().endswith(b"0\r\n\r\n"))

    def test_close_delimited_end_of_a_dead_container_is_cut(self) -> None:
        """A killed container's connection ends with a clean FIN: with
        ``confirm_close`` saying it died, the answer is cut (no terminating chunk)."""
        h = ProxyHarness()
        asked: list[Deferred[bool]] = []
        h.confirm = lambda: asked.append(Deferred()) or asked[-1]
        ct, p = h.answer(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nline 1\n")
        p.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(h.ends, [])  # not complete until the broker says so
        self.assertFalse(ct.value().endswith(b"0\r\n\r\n"))
        asked[0].callback(False)
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 200, 7)])
        self.assertFalse(ct.value().endswith(b"0\r\n\r\n"))
        self.assertTrue(ct.disconnecting)

    def test_close_delimited_end_of_a_live_container_completes(self) -> None:
        h = ProxyHarness()
        h.confirm = lambda: succeed(True)
        ct, p = h.answer(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nline 1\n")
        p.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(h.ends, [ExchangeEnd("finished", 200, 7)])
        self.assertTrue(ct.value().endswith(b"0\r\n\r\n"))

    def test_sized_answers_are_not_confirmed(self) -> None:
        """Only close-delimited answers wait: a sized one is complete by its length."""
        h = ProxyHarness()
        h.confirm = lambda: self.fail("asked")  # type: ignore[func-returns-value]
        h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(h.ends, [ExchangeEnd("finished", 200, 2)])

    def test_cut_close_delimited_answer_to_an_http10_client_is_aborted(self) -> None:
        """Without chunking or a length the client could not tell a cut answer from a
        whole one: its connection is aborted (a reset), not closed."""
        h = ProxyHarness()
        ct, p = h.answer(b"HTTP/1.0 200 OK\r\n\r\npart", request=b"GET / HTTP/1.0\r\nHost: f\r\n\r\n")
        aborted: list[bool] = []
        ct.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        p.connectionLost(Failure(ierror.ConnectionLost("reset")))
        self.assertEqual(aborted, [True])
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 200, 4)])

    def test_backend_error_mid_body_cuts_client(self) -> None:
        h = ProxyHarness()
        ct, p = h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        p.connectionLost(Failure(ierror.ConnectionLost()))
        self.assertTrue(ct.disconnecting)
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 200, 3)])

    def test_whole_answer_needs_no_producer(self) -> None:
        """An answer whose body came with its head is written out at once; one that
        streams registers the exchange as the client's producer (back-pressure)."""
        from twisted.web.http import Request as HTTPRequest

        registered: list[Any] = []
        real = HTTPRequest.registerProducer

        def spy(request: Any, producer: Any, streaming: bool) -> None:
            registered.append(producer)
            real(request, producer, streaming)

        self.patch(HTTPRequest, "registerProducer", spy)
        h = ProxyHarness()
        ct, p = h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        self.assertTrue(ct.value().endswith(b"\r\n\r\nhello"))
        self.assertEqual((registered, h.ends), ([], [ExchangeEnd("finished", 200, 5)]))
        h.client(GET)
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
        self.assertEqual(len(registered), 1)
        p.dataReceived(b"lo")
        self.assertEqual(h.ends[-1], ExchangeEnd("finished", 200, 5))
        self.assertEqual(h.proxy.idle_connections(), 1)

    def test_backend_gone_after_sized_head_is_502(self) -> None:
        """A sized head waits for its body: if the backend goes first, nothing was sent
        and the client gets a clean 502."""
        h = ProxyHarness()
        ct, p = h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-Backend: 1\r\n\r\n")
        p.connectionLost(Failure(ierror.ConnectionLost()))
        line, headers = head_of(ct.value())
        self.assertEqual(line, b"HTTP/1.1 502 Bad Gateway")
        self.assertEqual(values(headers, b"x-backend"), [])  # none of the 200's headers
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 502, 0)])

    def test_http10_client_gets_close_delimited_answer(self) -> None:
        h = ProxyHarness()
        ct, p = h.answer(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
            request=b"GET / HTTP/1.0\r\nHost: f\r\n\r\n",
        )
        line, headers = head_of(ct.value())
        self.assertEqual(line, b"HTTP/1.0 200 OK")
        self.assertEqual(values(headers, b"transfer-encoding"), [])
        p.dataReceived(b"0\r\n\r\n")
        self.assertTrue(ct.value().endswith(b"\r\n\r\nabc"))
        self.assertTrue(ct.disconnecting)  # the end of the body is the end of the connection

    def test_client_connection_close_kept_in_head(self) -> None:
        h = ProxyHarness()
        ct, _ = h.answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok",
            request=b"GET / HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n",
        )
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"connection"), [b"close"])
        self.assertTrue(ct.value().endswith(b"\r\n\r\nok"))
        self.assertTrue(ct.disconnecting)
        self.assertEqual(h.proxy.idle_connections(), 1)  # the backend connection is kept

    def test_header_spelling_and_order_kept(self) -> None:
        h = ProxyHarness()
        ct, _ = h.answer(
            b'HTTP/1.1 200 OK\r\nx-lower: 1\r\nETag: "e"\r\nX-Lower: 2\r\nContent-Length: 0\r\n\r\n'
        )
        head = ct.value().split(b"\r\n\r\n")[0]
        # as the backend sent them: order, spelling, repeats
        self.assertIn(b'\r\nx-lower: 1\r\nETag: "e"\r\nX-Lower: 2\r\nContent-Length: 0\r\n', head)

    def test_refused_is_502(self) -> None:
        h = ProxyHarness()
        _, ct = h.client(GET)
        _, d = h.pending.pop()
        d.errback(Failure(ierror.ConnectionRefusedError()))
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"refused", ct.value())
        self.assertEqual(h.ends, [ExchangeEnd("refused", 502, 0)])

    def test_connect_timeout_is_502(self) -> None:
        h = ProxyHarness(connect_timeout=3.0)
        _, ct = h.client(GET)
        h.clock.advance(2.9)
        self.assertEqual(h.ends, [])
        h.clock.advance(0.2)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"did not accept a connection within 3 s", ct.value())
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 502, 0)])

    def test_location_rewritten(self) -> None:
        h = ProxyHarness()
        h.host_header = b"backend.example"
        _, ct = h.client(GET)
        p, _ = h.accept()
        p.dataReceived(
            b"HTTP/1.1 302 Found\r\nLocation: http://backend.example/next?a=1\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertIn(b"Location: /x:team:app:1:8080/next?a=1\r\n", ct.value())

    def test_route_cookie_on_html_only(self) -> None:
        h = ProxyHarness()
        h.cookie = "x:team:app:1:8080"
        _, ct = h.client(GET)
        p, _ = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 0\r\n\r\n")
        ref = h.proxy.route_cookies.ref("x:team:app:1:8080")
        assert ref is not None
        self.assertIn(b"dsroute=" + ref + b"; Path=/; HttpOnly", ct.value())
        self.assertNotIn(b"team", ref)
        _, ct2 = h.client(GET)
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 0\r\n\r\n")
        self.assertNotIn(b"dsroute", ct2.value())

    def test_route_cookie_is_an_opaque_reference(self) -> None:
        """Issue 12 item 7: the cookie names an env-bearing segment without holding it:
        the proxy's table maps the value back, nothing of the segment is in it."""
        h = ProxyHarness()
        seg = "x:team:app:1:8080:SECRET=hunter22;TOKEN=abc%3Bdef"
        h.cookie = seg
        ct, _ = h.answer(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: 0\r\n\r\n"
        )
        [cookie] = values(head_of(ct.value())[1], b"set-cookie")
        value = cookie.split(b";", 1)[0].removeprefix(b"dsroute=")
        for leak in (b"hunter22", b"SECRET", b"TOKEN", b"abc", b"team", b"x:", b"8080"):
            self.assertNotIn(leak, cookie)
        self.assertEqual(h.proxy.route_cookies.segment(value), seg)
        self.assertNotIn(b"Secure", cookie)  # a plain listener

    def test_route_cookie_secure_on_tls(self) -> None:
        """On a TLS listener the cookie is ``Secure``."""
        h = ProxyHarness()
        h.cookie = "x:team:app:1:8080"
        _, ct = h.client(GET, secure=True)
        p, _ = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 0\r\n\r\n")
        [cookie] = values(head_of(ct.value())[1], b"set-cookie")
        self.assertTrue(cookie.startswith(b"dsroute="), cookie)
        self.assertEqual(cookie.split(b"; ")[1:], [b"Path=/", b"HttpOnly", b"SameSite=Lax", b"Secure"])

    def test_route_cookie_from_the_injected_key(self) -> None:
        """The key is injectable (same key, same reference; another key, another)."""
        from dockerspaces.web.routecookie import RouteCookies

        seg = "x:team:app:1:8080"
        a = Proxy(MemoryReactorClock(), route_cookies=RouteCookies(key=b"k" * 32))
        b = Proxy(MemoryReactorClock(), route_cookies=RouteCookies(key=b"k" * 32))
        c = Proxy(MemoryReactorClock(), route_cookies=RouteCookies(key=b"j" * 32))
        self.assertEqual(a.route_cookies.ref(seg), b.route_cookies.ref(seg))
        self.assertNotEqual(a.route_cookies.ref(seg), c.route_cookies.ref(seg))
        self.assertIsNone(c.route_cookies.segment(a.route_cookies.ref(seg)))

    def test_no_cors_on_the_docker_api(self) -> None:
        """/docker:local (cors=False): neither our CORS headers nor the engine's."""
        h = ProxyHarness(cors=True)
        h.cors_allowed = False
        _, ct = h.client(b"GET / HTTP/1.1\r\nHost: f\r\nOrigin: https://app.example\r\n\r\n")
        p, _ = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: *\r\nContent-Length: 2\r\n\r\n{}")
        _, headers = head_of(ct.value())
        self.assertEqual([k for k, _ in headers if k.startswith(b"access-control-")], [])

    def test_cors_vary_merged_with_the_backends(self) -> None:
        h = ProxyHarness(cors=True)
        _, ct = h.client(b"GET / HTTP/1.1\r\nHost: f\r\nOrigin: https://app.example\r\n\r\n")
        p, _ = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nVary: Accept-Encoding\r\nContent-Length: 2\r\n\r\nok")
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"vary"), [b"Accept-Encoding, Origin"])
        self.assertEqual(values(headers, b"access-control-allow-origin"), [b"https://app.example"])

    def test_cors_vary_merge_keeps_every_token_once(self) -> None:
        """Several backend Vary lines (one folded: the header block is not plain) keep
        every token, with Origin once: added, or already named in any spelling; a
        ``*`` stays alone."""
        h = ProxyHarness(cors=True)
        req = b"GET / HTTP/1.1\r\nHost: f\r\nOrigin: https://app.example\r\n\r\n"

        def tokens(ct: StringTransport) -> list[bytes]:
            return [t.strip() for v in values(head_of(ct.value())[1], b"vary") for t in v.split(b",")]

        ct, _ = h.answer(
            b"HTTP/1.1 200 OK\r\nVary: Accept-Encoding\r\nVary: Cookie,\r\n"
            b" Accept\r\nContent-Length: 2\r\n\r\nok",
            req,
        )
        self.assertEqual(tokens(ct), [b"Accept-Encoding", b"Cookie", b"Accept", b"Origin"])
        self.assertTrue(ct.value().endswith(b"\r\n\r\nok"))
        ct, _ = ProxyHarness(cors=True).answer(
            b"HTTP/1.1 200 OK\r\nVary: Accept-Encoding\r\nVary: origin\r\nContent-Length: 0\r\n\r\n", req
        )
        self.assertEqual(tokens(ct), [b"Accept-Encoding", b"origin"])
        ct, _ = ProxyHarness(cors=True).answer(
            b"HTTP/1.1 200 OK\r\nVary: *\r\nContent-Length: 0\r\n\r\n", req
        )
        self.assertEqual(tokens(ct), [b"*"])

    def test_cors_vary_on_a_streamed_answer(self) -> None:
        """A streamed answer's head goes out before any body byte: the merged Vary
        and our CORS headers are in it."""
        h = ProxyHarness(cors=True)
        ct, _ = h.answer(
            b"HTTP/1.1 200 OK\r\nVary: Accept\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: f\r\nOrigin: https://app.example\r\n\r\n",
        )
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"vary"), [b"Accept, Origin"])
        self.assertEqual(values(headers, b"access-control-allow-origin"), [b"https://app.example"])

    def test_cors_replaces_backend_headers(self) -> None:
        h = ProxyHarness(cors=True)
        _, ct = h.client(b"GET / HTTP/1.1\r\nHost: f\r\nOrigin: https://app.example\r\n\r\n")
        p, _ = h.accept()
        p.dataReceived(
            b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: *\r\n"
            b"Access-Control-Allow-Credentials: true\r\nContent-Length: 0\r\n\r\n"
        )
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"access-control-allow-origin"), [b"https://app.example"])
        self.assertEqual(values(headers, b"access-control-allow-credentials"), [b"true"])
        self.assertEqual(values(headers, b"vary"), [b"Origin"])


class _Backend(Protocol):
    """Answers each request head with BODY in one write (head and body together)."""

    def dataReceived(self, data: bytes) -> None:
        for _ in range(data.count(b"\r\n\r\n")):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY)


BODY = bytes(range(256)) * (3 * 4096 + 7)  # ~3 MiB, not a multiple of any read size


class _Client(Protocol):
    """Sends two keep-alive GETs; pauses reading now and then (partial sends)."""

    def __init__(self, done: Deferred[bytes], reactor: Any):
        self.done, self.reactor = done, reactor
        self.got: list[bytes] = []
        self.size = 0
        self.pauses = 0

    def connectionMade(self) -> None:
        self.transport.write(GET + GET)

    def dataReceived(self, data: bytes) -> None:
        self.got.append(data)
        self.size += len(data)
        if self.size > (self.pauses + 1) * 1_000_000 and self.pauses < 4:
            self.pauses += 1
            self.transport.pauseProducing()
            self.reactor.callLater(0.05, self.transport.resumeProducing)
        if self.size >= 2 * len(BODY) and b"".join(self.got).count(BODY) == 2:
            self.transport.loseConnection()
            self.done.callback(b"".join(self.got))


class LoopbackTests(TestCase):
    """Real sockets: large bodies go straight to the client socket, intact and in order."""

    def test_large_bodies_through_real_sockets(self) -> Deferred[None]:
        from twisted.internet import reactor

        r: Any = reactor
        backend_port = r.listenTCP(0, Factory.forProtocol(_Backend), interface="127.0.0.1")
        self.addCleanup(backend_port.stopListening)
        proxy = Proxy(r)
        self.addCleanup(proxy.close_idle)
        ends: list[ExchangeEnd] = []
        logged: list[int] = []
        backend = Backend.tcp("127.0.0.1", backend_port.getHost().port)

        class Fwd(Resource):
            isLeaf = True

            def render(self, request: Any) -> Any:
                return proxy.forward(
                    request,
                    backend,
                    request.uri,
                    prefix=b"",
                    host_header=None,
                    on_end=ends.append,
                )

        site = make_site(
            Fwd(), r, max_body=1 << 20, on_request_logged=lambda req: logged.append(req.sentLength)
        )
        front = r.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(front.stopListening)
        done: Deferred[bytes] = Deferred()
        client = _Client(done, r)
        ClientCreator(r, lambda: client).connectTCP("127.0.0.1", front.getHost().port)
        self.addCleanup(lambda: client.transport.loseConnection() if client.transport else None)

        def check(raw: bytes) -> None:
            first, _, rest = raw.partition(b"\r\n\r\n")
            self.assertTrue(first.startswith(b"HTTP/1.1 200 OK"))
            self.assertIn(b"Content-Length: %d" % len(BODY), first)
            body1, second = rest[: len(BODY)], rest[len(BODY) :]
            self.assertEqual(body1, BODY)
            head2, _, body2 = second.partition(b"\r\n\r\n")
            self.assertTrue(head2.startswith(b"HTTP/1.1 200 OK"))
            self.assertEqual(body2, BODY)
            self.assertEqual(ends, [ExchangeEnd("finished", 200, len(BODY))] * 2)
            self.assertEqual(logged, [len(BODY)] * 2)
            self.assertGreater(client.pauses, 0)

        return done.addCallback(check).addTimeout(30, r)
