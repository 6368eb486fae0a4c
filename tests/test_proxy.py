"""Unit tests for the proxy data path: no sockets, a fake endpoint and StringTransports.

A real ``Request`` is driven through ``make_site``'s channel over a StringTransport
(the client); the backend is a :class:`BackendProtocol` over another StringTransport.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import error as ierror
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from dockerspaces.web.proxy import (
    Backend,
    BackendProtocol,
    ExchangeEnd,
    Proxy,
    drop_hop_by_hop,
    rewrite_location,
)
from dockerspaces.web.site import make_site

CLIENT = IPv4Address("TCP", "10.1.2.3", 5555)


class FakeEndpoint:
    """Records connection attempts; the test accepts or fails them."""

    def __init__(self, harness: Harness, backend: Backend):
        self.harness, self.backend = harness, backend

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.harness.pending.append((factory, d))
        return d


class Front(Resource):
    isLeaf = True

    def __init__(self, h: Harness):
        super().__init__()
        self.h = h

    def render(self, request: Any) -> Any:
        h = self.h
        return h.proxy.forward(
            request,
            h.backend,
            request.uri,
            prefix=h.prefix,
            host_header=h.host_header,
            on_end=h.ends.append,
            set_route_cookie=h.cookie,
        )


class Harness:
    """A proxy, a site and the fake backend side."""

    def __init__(self, **proxy_kwargs: Any):
        self.clock = MemoryReactorClock()
        self.pending: list[tuple[Any, Deferred[Any]]] = []
        self.ends: list[ExchangeEnd] = []
        self.backend = Backend.tcp("127.0.0.1", 9100)
        self.prefix = b"/x:team:app:1:8080"
        self.host_header: bytes | None = None
        self.cookie: str | None = None
        self.proxy = Proxy(
            self.clock,
            endpoint_factory=lambda b: FakeEndpoint(self, b),
            **proxy_kwargs,
        )
        self.site = make_site(Front(self), self.clock, max_body=1 << 20)

    def client(self, raw: bytes) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(CLIENT)
        t = StringTransport(peerAddress=CLIENT)
        t.protocol = channel  # as a real tcp transport has
        channel.makeConnection(t)
        channel.dataReceived(raw)
        return channel, t

    def accept(self) -> tuple[BackendProtocol, StringTransport]:
        factory, d = self.pending.pop(0)
        p = factory.buildProtocol(None)
        t = StringTransport()
        p.makeConnection(t)
        d.callback(p)
        return p, t


GET = b"GET /path?q=1 HTTP/1.1\r\nHost: front.example\r\n\r\n"


def head_of(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    head = data.split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.append((k.strip().lower(), v.strip()))
    return lines[0], headers


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for k, v in headers if k == name]


class RequestHeadTests(SynchronousTestCase):
    """What the backend receives."""

    def test_forwarded_headers_and_hop_by_hop(self) -> None:
        h = Harness()
        h.client(
            b"GET /a/b?c=d HTTP/1.1\r\nHost: front.example\r\n"
            b"Connection: keep-alive, X-Private\r\nKeep-Alive: timeout=5\r\n"
            b"X-Private: secret\r\nTE: trailers\r\nProxy-Authorization: Basic x\r\n"
            b"X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Host: spoofed\r\n"
            b"Accept: a\r\nAccept: b\r\n\r\n"
        )
        _, bt = h.accept()
        line, headers = head_of(bt.value())
        self.assertEqual(line, b"GET /a/b?c=d HTTP/1.1")
        self.assertEqual(values(headers, b"host"), [b"front.example"])
        for gone in (b"connection", b"keep-alive", b"x-private", b"te", b"proxy-authorization"):
            self.assertEqual(values(headers, gone), [], gone)
        self.assertEqual(values(headers, b"x-forwarded-for"), [b"1.1.1.1, 10.1.2.3"])
        self.assertEqual(values(headers, b"x-forwarded-host"), [b"front.example"])
        self.assertEqual(values(headers, b"x-forwarded-proto"), [b"http"])
        self.assertEqual(values(headers, b"x-forwarded-prefix"), [b"/x:team:app:1:8080"])
        self.assertEqual(values(headers, b"accept"), [b"a", b"b"])
        self.assertEqual(values(headers, b"content-length"), [])

    def test_host_override(self) -> None:
        h = Harness()
        h.host_header = b"backend.example:8080"
        h.client(GET)
        _, bt = h.accept()
        _, headers = head_of(bt.value())
        self.assertEqual(values(headers, b"host"), [b"backend.example:8080"])
        self.assertEqual(values(headers, b"x-forwarded-host"), [b"front.example"])

    def test_body_streamed_with_length(self) -> None:
        h = Harness()
        body = b"0123456789" * 50
        h.client(b"POST /up HTTP/1.1\r\nHost: f\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        _, bt = h.accept()
        head, _, sent = bt.value().partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: 500", head)
        self.assertEqual(sent, body)

    def test_chunked_upload_arrives_intact(self) -> None:
        h = Harness()
        h.client(
            b"POST /up HTTP/1.1\r\nHost: f\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        _, bt = h.accept()
        head, _, sent = bt.value().partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: 11", head)
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertEqual(sent, b"hello world")


class ResponseTests(SynchronousTestCase):
    """What the client receives, and how each exchange ends."""

    def test_headers_and_chunked_body(self) -> None:
        h = Harness()
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

    def test_pooled_connection_reused(self) -> None:
        h = Harness()
        h.client(GET)
        p, bt = h.accept()
        p.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        bt.clear()
        h.client(GET)
        self.assertEqual(h.pending, [])
        self.assertTrue(bt.value().startswith(b"GET /path?q=1 HTTP/1.1"))
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual([e.reason for e in h.ends], ["finished", "finished"])

    def test_backpressure(self) -> None:
        """The backend transport is paused while the client transport is paused."""
        h = Harness()
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

    def test_pooled_while_paused_reads_again(self) -> None:
        """A response that ends while the client has us paused leaves a reading connection."""
        h = Harness()
        channel, _ = h.client(GET)
        p, bt = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        channel.pauseProducing()
        self.assertEqual(bt.producerState, "paused")
        p.dataReceived(b"cd")
        self.assertEqual(h.proxy.idle_connections(), 1)
        self.assertEqual(bt.producerState, "producing")

    def test_client_gone_aborts_backend(self) -> None:
        h = Harness()
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
        h = Harness()
        channel, _ = h.client(GET)
        _, d = h.pending[0]
        channel.connectionLost(Failure(ierror.ConnectionLost()))
        self.assertEqual(h.ends, [ExchangeEnd("client-gone", None, 0)])
        self.assertTrue(d.called)  # the connect attempt was cancelled

    def test_backend_error_before_head_is_502(self) -> None:
        h = Harness()
        _, ct = h.client(GET)
        p, _ = h.accept()
        p.connectionLost(Failure(ierror.ConnectionLost("reset")))
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"127.0.0.1:9100", ct.value())
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 502, 0)])

    def test_backend_error_mid_body_cuts_client(self) -> None:
        h = Harness()
        _, ct = h.client(GET)
        p, _ = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nabc")
        p.connectionLost(Failure(ierror.ConnectionLost()))
        self.assertTrue(ct.disconnecting)
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 200, 3)])

    def test_close_delimited_body(self) -> None:
        h = Harness()
        _, ct = h.client(GET)
        p, bt = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nstream")
        self.assertTrue(bt.disconnecting is False)
        p.dataReceived(b"ing")
        p.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(h.ends, [ExchangeEnd("finished", 200, 9)])
        self.assertEqual(h.proxy.idle_connections(), 0)
        self.assertIn(b"streaming", ct.value().replace(b"\r\n6\r\n", b"").replace(b"\r\n3\r\n", b""))

    def test_refused_is_502(self) -> None:
        h = Harness()
        _, ct = h.client(GET)
        _, d = h.pending.pop()
        d.errback(Failure(ierror.ConnectionRefusedError()))
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"refused", ct.value())
        self.assertEqual(h.ends, [ExchangeEnd("refused", 502, 0)])

    def test_connect_timeout_is_502(self) -> None:
        h = Harness(connect_timeout=3.0)
        _, ct = h.client(GET)
        h.clock.advance(2.9)
        self.assertEqual(h.ends, [])
        h.clock.advance(0.2)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 502 "))
        self.assertIn(b"did not accept a connection within 3 s", ct.value())
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 502, 0)])

    def test_head_response(self) -> None:
        h = Harness()
        _, ct = h.client(b"HEAD / HTTP/1.1\r\nHost: f\r\n\r\n")
        p, _ = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n")
        self.assertIn(b"Content-Length: 1234", ct.value())
        self.assertTrue(ct.value().endswith(b"\r\n\r\n"))
        self.assertEqual(h.ends, [ExchangeEnd("finished", 200, 0)])
        self.assertEqual(h.proxy.idle_connections(), 1)

    def test_stale_pooled_connection_retried(self) -> None:
        h = Harness()
        h.client(GET)
        p, _ = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        h.client(GET)  # reuses p ...
        p.connectionLost(Failure(ierror.ConnectionDone()))  # ... which the backend had closed
        p2, bt2 = h.accept()
        self.assertTrue(bt2.value().startswith(b"GET /path"))
        p2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual([e.reason for e in h.ends], ["finished", "finished"])

    def test_location_rewritten(self) -> None:
        h = Harness()
        h.host_header = b"backend.example"
        _, ct = h.client(GET)
        p, _ = h.accept()
        p.dataReceived(
            b"HTTP/1.1 302 Found\r\nLocation: http://backend.example/next?a=1\r\n"
            b"Content-Length: 0\r\n\r\n"
        )
        self.assertIn(b"Location: /x:team:app:1:8080/next?a=1\r\n", ct.value())

    def test_route_cookie_on_html_only(self) -> None:
        h = Harness()
        h.cookie = "x:team:app:1:8080"
        _, ct = h.client(GET)
        p, _ = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 0\r\n\r\n")
        self.assertIn(b"dsroute=x%3Ateam%3Aapp%3A1%3A8080; Path=/; HttpOnly", ct.value())
        _, ct2 = h.client(GET)
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: 0\r\n\r\n")
        self.assertNotIn(b"dsroute", ct2.value())

    def test_cors_replaces_backend_headers(self) -> None:
        h = Harness(cors=True)
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

    def test_bad_response_is_502(self) -> None:
        h = Harness()
        _, ct = h.client(GET)
        p, bt = h.accept()
        p.dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 502 "))
        self.assertTrue(bt.disconnecting)
        self.assertEqual([e.reason for e in h.ends], ["backend-error"])


class HelperTests(SynchronousTestCase):
    def test_drop_hop_by_hop(self) -> None:
        got = drop_hop_by_hop(
            [
                (b"Connection", b"close, X-A"),
                (b"X-A", b"1"),
                (b"x-b", b"2"),
                (b"Upgrade", b"h2c"),
                (b"x-b", b"3"),
            ]
        )
        self.assertEqual(got, [(b"x-b", b"2"), (b"x-b", b"3")])

    def test_rewrite_location(self) -> None:
        pre = b"/host:b.example:8080"
        cases = {
            b"/a?b": pre + b"/a?b",
            b"http://b.example:8080/a": pre + b"/a",
            b"https://b.example:8080": pre + b"/",
            b"http://other.example/a": b"http://other.example/a",
            b"//b.example:8080/a": b"//b.example:8080/a",
            pre + b"/already": pre + b"/already",
            b"relative/x": b"relative/x",
        }
        for value, want in cases.items():
            self.assertEqual(
                rewrite_location(value, prefix=pre, backend_host=b"b.example:8080"), want, value
            )
        self.assertEqual(
            rewrite_location(b"http://b.example:80/a", prefix=b"/p", backend_host=b"b.example"),
            b"/p/a",
        )

    def test_backend_descriptions(self) -> None:
        self.assertEqual(Backend.tcp("::1", 80).address(), ("::1", 80))
        b = Backend.tls("example.org", 443, address="93.184.216.34")
        self.assertEqual(b.address(), ("93.184.216.34", 443))
        self.assertEqual(b.default_host_header(), b"example.org")
        self.assertTrue(b.is_tls)
        self.assertEqual(Backend.tcp("10.0.0.1", 9100).default_host_header(), b"10.0.0.1:9100")
