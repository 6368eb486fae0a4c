"""Unit tests for the proxy data path: a fake endpoint and StringTransports.

A real ``Request`` is driven through ``make_site``'s channel over a StringTransport
(the client); the backend is a :class:`BackendProtocol` over another StringTransport.
``send_now`` (bodies straight to the client socket) is tested on a socketpair, and
once end to end over loopback sockets with the real reactor.
"""

from __future__ import annotations

import socket
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import error as ierror
from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import ClientCreator, Factory, Protocol
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from zope.interface import directlyProvides  # type: ignore[import-untyped]

from dockerspaces.twistedseam import fast_paths_on
from dockerspaces.web.backend import Backend, BackendProtocol
from dockerspaces.web.headers import (
    BadResponse,
    drop_hop_by_hop,
    drop_lines,
    parse_header_lines,
    parse_response_head,
    rewrite_location,
)
from dockerspaces.web.proxy import ExchangeEnd, Proxy
from dockerspaces.web.sendnow import (
    can_send_now,
    flush_now,
    send_all_now,
    send_now,
    write_now,
)
from dockerspaces.web.site import make_site

CLIENT = IPv4Address("TCP", "10.1.2.3", 5555)
#: the ``skip`` of a test that checks a fast path is taken (not what the answer is)
FAST_PATH_ONLY = None if fast_paths_on() else "checks a fast path: DOCKERSPACES_FAST_PATHS=0"


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
            retry_unforwarded=h.retry,
            confirm_close=h.confirm,
            external=h.external,
            cors=h.cors_allowed,
            died_before=h.died_before,
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
        self.retry = 0  # Proxy.forward's retry_unforwarded
        self.confirm: Any = None  # Proxy.forward's confirm_close
        self.died_before: Any = None  # Proxy.forward's died_before
        self.cors_allowed = True  # Proxy.forward's cors (False: /docker:local)
        self.external = False  # Proxy.forward's external (True: a host: target)
        self.proxy = Proxy(
            self.clock,
            endpoint_factory=lambda b: FakeEndpoint(self, b),
            **proxy_kwargs,
        )
        self.site = make_site(Front(self), self.clock, max_body=1 << 20)

    def client(self, raw: bytes, secure: bool = False) -> tuple[Any, StringTransport]:
        """A client connection sending ``raw`` (``secure``: as on a TLS listener)."""
        channel = self.site.buildProtocol(CLIENT)
        t = StringTransport(peerAddress=CLIENT)
        if secure:
            directlyProvides(t, ISSLTransport)  # (an ITCPTransport as well)
            t.setTcpNoDelay = lambda enabled: None  # type: ignore[attr-defined]
        t.protocol = channel  # as a real tcp transport has
        channel.makeConnection(t)
        channel.dataReceived(raw)
        return channel, t

    def answer(self, response: bytes, request: bytes | None = None
               ) -> tuple[StringTransport, BackendProtocol]:
        """A client sends ``request`` (GET by default), the backend answers ``response``:
        the client's transport and the backend connection."""
        _, ct = self.client(GET if request is None else request)
        p, _ = self.accept()
        p.dataReceived(response)
        return ct, p

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

    def own_credentials_request(self, extra: bytes = b"") -> bytes:
        return (
            b"GET /p HTTP/1.1\r\nHost: f\r\nCookie: a=1; dsroute=AbCd; b=2\r\n"
            b"Cookie: dsroute=EfGh\r\nCookie: c=3\r\nX-Dockerspaces-Token: t0ken\r\n"
            b"x-dockerspaces-token: t1ken\r\nAuthorization: Bearer app-credential\r\n"
            + extra + b"\r\n"
        )

    def test_own_cookies_and_token_never_reach_a_container(self) -> None:
        """Issue 12 item 7: the dsroute cookie (each Cookie line) and X-Dockerspaces-Token
        (any spelling) stay here; the app's own cookies and, for one of our containers,
        Authorization go on."""
        h = Harness()
        h.client(self.own_credentials_request())
        _, bt = h.accept()
        sent = bt.value()
        _, headers = head_of(sent)
        self.assertEqual(values(headers, b"cookie"), [b"a=1; b=2", b"c=3"])
        self.assertEqual(values(headers, b"authorization"), [b"Bearer app-credential"])
        for gone in (b"dsroute", b"AbCd", b"EfGh", b"t0ken", b"t1ken"):
            self.assertNotIn(gone, sent)
        self.assertEqual(values(headers, b"x-dockerspaces-token"), [])

    def test_host_target_gets_no_authorization(self) -> None:
        """A host:/shost: target (``external``) gets neither our cookie and token nor the
        client's Authorization."""
        h = Harness()
        h.external = True
        h.client(self.own_credentials_request())
        _, bt = h.accept()
        sent = bt.value()
        _, headers = head_of(sent)
        self.assertEqual(values(headers, b"cookie"), [b"a=1; b=2", b"c=3"])
        self.assertEqual(values(headers, b"authorization"), [])
        for gone in (b"dsroute", b"app-credential", b"t0ken", b"t1ken"):
            self.assertNotIn(gone, sent)

    def test_upgrade_head_filtered_too(self) -> None:
        """A WebSocket handshake (tunnelled) carries no more of ours than a request."""
        h = Harness()
        h.external = True
        h.client(self.own_credentials_request(
            b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n"
            b"Sec-WebSocket-Version: 13\r\n"))
        _, bt = h.accept()
        sent = bt.value()
        _, headers = head_of(sent)
        self.assertEqual(values(headers, b"upgrade"), [b"websocket"])
        self.assertEqual(values(headers, b"cookie"), [b"a=1; b=2", b"c=3"])
        for gone in (b"dsroute", b"app-credential", b"t0ken", b"t1ken"):
            self.assertNotIn(gone, sent)

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

    def test_streamed_head_sent_before_any_body(self) -> None:
        """A chunked answer (SSE, docker wait/events) shows its head at once."""
        h = Harness()
        ct, _ = h.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
        line, headers = head_of(ct.value())
        self.assertEqual(line, b"HTTP/1.1 200 OK")
        self.assertEqual(values(headers, b"content-type"), [b"text/event-stream"])
        self.assertEqual(h.ends, [])

    def test_repeated_header_in_two_spellings_kept(self) -> None:
        h = Harness()
        ct, _ = h.answer(b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\n"
                         b"Content-Length: 0\r\n\r\n")
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"set-cookie"), [b"a=1", b"b=2"])

    def test_sized_head_waits_for_the_body(self) -> None:
        """With a Content-Length the head goes out together with the first body bytes."""
        h = Harness()
        ct, p = h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
        self.assertEqual(ct.value(), b"")
        p.dataReceived(b"hello")
        self.assertTrue(ct.value().endswith(b"\r\n\r\nhello"))

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

    def test_date_and_server_are_the_backends(self) -> None:
        h = Harness()
        ct, _ = h.answer(b"HTTP/1.1 200 OK\r\nDate: Sun, 06 Nov 1994 08:49:37 GMT\r\n"
                         b"Content-Length: 0\r\n\r\n")
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"date"), [b"Sun, 06 Nov 1994 08:49:37 GMT"])
        self.assertEqual(values(headers, b"server"), [])  # no Server of ours on theirs

    def test_date_added_when_backend_sent_none(self) -> None:
        """RFC 9110 6.6.1: a response forwarded without Date gets one."""
        h = Harness()
        ct, _ = h.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        _, headers = head_of(ct.value())
        (date,) = values(headers, b"date")
        self.assertRegex(date.decode(), r"^\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d GMT$")
        self.assertEqual(values(headers, b"server"), [])

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

    def test_unforwarded_refused(self) -> None:
        """With ``retry_unforwarded`` a refused connect is not answered: the caller
        forwards the request elsewhere."""
        h = Harness()
        h.retry = 1
        _, ct = h.client(GET)
        _, d = h.pending.pop()
        d.errback(Failure(ierror.ConnectionRefusedError()))
        self.assertEqual((ct.value(), ct.disconnecting), (b"", False))
        self.assertEqual(h.ends, [ExchangeEnd("unforwarded", None, 0)])

    def test_reset_after_sending_a_post_is_a_502(self) -> None:
        """A reset before any response byte, after the request went out: its bytes may
        have reached the app, so a request with a body gets its 502."""
        h = Harness()
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
            h = Harness()
            h.retry = 2
            _, ct = h.client(GET)
            p, _ = h.accept()
            p.connectionLost(Failure(lost))
            self.assertEqual(ct.value(), b"")
            self.assertEqual(h.ends, [ExchangeEnd("unanswered", None, 0)])
        # ... but not again, and never a request with a body
        for retry, raw in [(1, GET),
                           (2, b"POST /p HTTP/1.1\r\nHost: f\r\nContent-Length: 2\r\n\r\nhi")]:
            h = Harness()
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
        for dead_before, end in [(True, ExchangeEnd("unforwarded", None, 0)),
                                 (False, ExchangeEnd("backend-error", 502, 0))]:
            h = Harness()
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
        h = Harness()
        h.retry = 1
        h.died_before = lambda t: self.fail("asked")  # type: ignore[func-returns-value]
        h.client(b"POST /p HTTP/1.1\r\nHost: f\r\nContent-Length: 2\r\n\r\nhi")
        p, _ = h.accept()
        p.dataReceived(b"HTTP/1.1 200 O")
        p.connectionLost(Failure(ierror.ConnectionLost("reset")))
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 502, 0)])

    def test_client_gone_while_asking_when_it_died(self) -> None:
        h = Harness()
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
        h = Harness()
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
        h = Harness()
        ct, p = h.answer(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nline 1\n")
        self.assertIn(b"Transfer-Encoding: chunked", ct.value())
        p.connectionLost(Failure(ierror.ConnectionLost("reset")))
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 200, 7)])
        self.assertFalse(ct.value().endswith(b"0\r\n\r\n"))
        self.assertTrue(ct.disconnecting)
        h = Harness()
        ct, p = h.answer(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nline 1\n")
        p.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(h.ends, [ExchangeEnd("finished", 200, 7)])
        self.assertTrue(ct.value().endswith(b"0\r\n\r\n"))

    def test_close_delimited_end_of_a_dead_container_is_cut(self) -> None:
        """A killed container's connection ends with a clean FIN: with
        ``confirm_close`` saying it died, the answer is cut (no terminating chunk)."""
        h = Harness()
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
        h = Harness()
        h.confirm = lambda: succeed(True)
        ct, p = h.answer(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nline 1\n")
        p.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(h.ends, [ExchangeEnd("finished", 200, 7)])
        self.assertTrue(ct.value().endswith(b"0\r\n\r\n"))

    def test_sized_answers_are_not_confirmed(self) -> None:
        """Only close-delimited answers wait: a sized one is complete by its length."""
        h = Harness()
        h.confirm = lambda: self.fail("asked")  # type: ignore[func-returns-value]
        h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual(h.ends, [ExchangeEnd("finished", 200, 2)])

    def test_cut_close_delimited_answer_to_an_http10_client_is_aborted(self) -> None:
        """Without chunking or a length the client could not tell a cut answer from a
        whole one: its connection is aborted (a reset), not closed."""
        h = Harness()
        ct, p = h.answer(b"HTTP/1.0 200 OK\r\n\r\npart",
                         request=b"GET / HTTP/1.0\r\nHost: f\r\n\r\n")
        aborted: list[bool] = []
        ct.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        p.connectionLost(Failure(ierror.ConnectionLost("reset")))
        self.assertEqual(aborted, [True])
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 200, 4)])

    def test_backend_error_mid_body_cuts_client(self) -> None:
        h = Harness()
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
        h = Harness()
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
        h = Harness()
        ct, p = h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nX-Backend: 1\r\n\r\n")
        p.connectionLost(Failure(ierror.ConnectionLost()))
        line, headers = head_of(ct.value())
        self.assertEqual(line, b"HTTP/1.1 502 Bad Gateway")
        self.assertEqual(values(headers, b"x-backend"), [])  # none of the 200's headers
        self.assertEqual(h.ends, [ExchangeEnd("backend-error", 502, 0)])

    def test_http10_client_gets_close_delimited_answer(self) -> None:
        h = Harness()
        ct, p = h.answer(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
                         request=b"GET / HTTP/1.0\r\nHost: f\r\n\r\n")
        line, headers = head_of(ct.value())
        self.assertEqual(line, b"HTTP/1.0 200 OK")
        self.assertEqual(values(headers, b"transfer-encoding"), [])
        p.dataReceived(b"0\r\n\r\n")
        self.assertTrue(ct.value().endswith(b"\r\n\r\nabc"))
        self.assertTrue(ct.disconnecting)  # the end of the body is the end of the connection

    def test_client_connection_close_kept_in_head(self) -> None:
        h = Harness()
        ct, _ = h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n"
                         b"\r\nok",
                         request=b"GET / HTTP/1.1\r\nHost: f\r\nConnection: close\r\n\r\n")
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"connection"), [b"close"])
        self.assertTrue(ct.value().endswith(b"\r\n\r\nok"))
        self.assertTrue(ct.disconnecting)
        self.assertEqual(h.proxy.idle_connections(), 1)  # the backend connection is kept

    def test_no_body_statuses(self) -> None:
        for status in (b"204 No Content", b"304 Not Modified"):
            h = Harness()
            _, ct = h.client(GET)
            p, _ = h.accept()
            p.dataReceived(b"HTTP/1.1 " + status + b"\r\nETag: \"x\"\r\n\r\n")
            line, headers = head_of(ct.value())
            self.assertEqual(line, b"HTTP/1.1 " + status)
            self.assertEqual(values(headers, b"transfer-encoding"), [])
            self.assertEqual(values(headers, b"etag"), [b'"x"'])
            self.assertTrue(ct.value().endswith(b"\r\n\r\n"))
            self.assertEqual(h.proxy.idle_connections(), 1)

    def test_header_spelling_and_order_kept(self) -> None:
        h = Harness()
        ct, _ = h.answer(b"HTTP/1.1 200 OK\r\nx-lower: 1\r\nETag: \"e\"\r\nX-Lower: 2\r\n"
                         b"Content-Length: 0\r\n\r\n")
        head = ct.value().split(b"\r\n\r\n")[0]
        # as the backend sent them: order, spelling, repeats
        self.assertIn(b"\r\nx-lower: 1\r\nETag: \"e\"\r\nX-Lower: 2\r\nContent-Length: 0\r\n",
                      head)

    def test_length_beside_chunked_not_passed_on(self) -> None:
        h = Harness()
        ct, _ = h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n")
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"content-length"), [])
        self.assertEqual(values(headers, b"transfer-encoding"), [b"chunked"])
        self.assertTrue(ct.value().endswith(b"2\r\nok\r\n0\r\n\r\n"))

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
        ct, _ = h.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n",
                         request=b"HEAD / HTTP/1.1\r\nHost: f\r\n\r\n")
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
        h = Harness()
        seg = "x:team:app:1:8080:SECRET=hunter22;TOKEN=abc%3Bdef"
        h.cookie = seg
        ct, _ = h.answer(b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                         b"Content-Length: 0\r\n\r\n")
        [cookie] = values(head_of(ct.value())[1], b"set-cookie")
        value = cookie.split(b";", 1)[0].removeprefix(b"dsroute=")
        for leak in (b"hunter22", b"SECRET", b"TOKEN", b"abc", b"team", b"x:", b"8080"):
            self.assertNotIn(leak, cookie)
        self.assertEqual(h.proxy.route_cookies.segment(value), seg)
        self.assertNotIn(b"Secure", cookie)  # a plain listener

    def test_route_cookie_secure_on_tls(self) -> None:
        """On a TLS listener the cookie is ``Secure``."""
        h = Harness()
        h.cookie = "x:team:app:1:8080"
        _, ct = h.client(GET, secure=True)
        p, _ = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 0\r\n\r\n")
        [cookie] = values(head_of(ct.value())[1], b"set-cookie")
        self.assertTrue(cookie.startswith(b"dsroute="), cookie)
        self.assertEqual(cookie.split(b"; ")[1:], [b"Path=/", b"HttpOnly", b"SameSite=Lax",
                                                    b"Secure"])

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
        h = Harness(cors=True)
        h.cors_allowed = False
        _, ct = h.client(b"GET / HTTP/1.1\r\nHost: f\r\nOrigin: https://app.example\r\n\r\n")
        p, _ = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: *\r\n"
                       b"Content-Length: 2\r\n\r\n{}")
        _, headers = head_of(ct.value())
        self.assertEqual([k for k, _ in headers if k.startswith(b"access-control-")], [])

    def test_cors_vary_merged_with_the_backends(self) -> None:
        h = Harness(cors=True)
        _, ct = h.client(b"GET / HTTP/1.1\r\nHost: f\r\nOrigin: https://app.example\r\n\r\n")
        p, _ = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nVary: Accept-Encoding\r\n"
                       b"Content-Length: 2\r\n\r\nok")
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"vary"), [b"Accept-Encoding, Origin"])
        self.assertEqual(values(headers, b"access-control-allow-origin"),
                         [b"https://app.example"])

    def test_cors_vary_merge_keeps_every_token_once(self) -> None:
        """Several backend Vary lines (one folded: the header block is not plain) keep
        every token, with Origin once: added, or already named in any spelling; a
        ``*`` stays alone."""
        h = Harness(cors=True)
        req = b"GET / HTTP/1.1\r\nHost: f\r\nOrigin: https://app.example\r\n\r\n"

        def tokens(ct: StringTransport) -> list[bytes]:
            return [t.strip() for v in values(head_of(ct.value())[1], b"vary")
                    for t in v.split(b",")]

        ct, _ = h.answer(b"HTTP/1.1 200 OK\r\nVary: Accept-Encoding\r\nVary: Cookie,\r\n"
                         b" Accept\r\nContent-Length: 2\r\n\r\nok", req)
        self.assertEqual(tokens(ct), [b"Accept-Encoding", b"Cookie", b"Accept", b"Origin"])
        self.assertTrue(ct.value().endswith(b"\r\n\r\nok"))
        ct, _ = Harness(cors=True).answer(
            b"HTTP/1.1 200 OK\r\nVary: Accept-Encoding\r\nVary: origin\r\n"
            b"Content-Length: 0\r\n\r\n", req)
        self.assertEqual(tokens(ct), [b"Accept-Encoding", b"origin"])
        ct, _ = Harness(cors=True).answer(
            b"HTTP/1.1 200 OK\r\nVary: *\r\nContent-Length: 0\r\n\r\n", req)
        self.assertEqual(tokens(ct), [b"*"])

    def test_cors_vary_on_a_streamed_answer(self) -> None:
        """A streamed answer's head goes out before any body byte: the merged Vary
        and our CORS headers are in it."""
        h = Harness(cors=True)
        ct, _ = h.answer(b"HTTP/1.1 200 OK\r\nVary: Accept\r\nTransfer-Encoding: chunked\r\n\r\n",
                         b"GET / HTTP/1.1\r\nHost: f\r\nOrigin: https://app.example\r\n\r\n")
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"vary"), [b"Accept, Origin"])
        self.assertEqual(values(headers, b"access-control-allow-origin"), [b"https://app.example"])

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


_NAME = st.text(alphabet="!#$%&'*+-.^_`|~" + "AZaz09Xx-", min_size=1, max_size=8)
_VALUE = st.binary(max_size=12).filter(lambda v: b"\r\n" not in v)


class HeadParserTests(SynchronousTestCase):
    """The regex fast path reads every header block it accepts as the line-by-line
    parser does."""

    @settings(max_examples=1500, deadline=None)
    @given(st.lists(st.tuples(_NAME, st.sampled_from([b"", b" ", b"\t", b"  "]), _VALUE,
                              st.sampled_from([b"", b" ", b"\t "])), max_size=6))
    def test_fast_path_agrees(self, lines: list[tuple[str, bytes, bytes, bytes]]) -> None:
        block = b"".join(k.encode() + b":" + pre + v + post + b"\r\n"
                         for k, pre, v, post in lines)
        try:
            slow: Any = parse_header_lines(block) if block else []
        except Exception as e:  # noqa: BLE001 - compared below
            slow = type(e)
        try:
            head = b"HTTP/1.1 200 OK" + (b"\r\n" + block[:-2] if block else b"")
            fast: Any = parse_response_head(head)[3]
        except Exception as e:  # noqa: BLE001
            fast = type(e)
        self.assertEqual(fast, slow)

    @settings(max_examples=1000, deadline=None)
    @given(st.lists(st.tuples(
        st.sampled_from(["Connection", "connection", "TE", "te", "Test", "Keep-Alive",
                         "Connection-X", "X-Connection", "Upgrade", "A"]),
        st.sampled_from([b"", b" x", b"connection:", b"\nTE: y"[1:], b"te:"]),
    ), max_size=6), st.sets(st.sampled_from([b"connection", b"te", b"keep-alive", b"upgrade"])))
    def test_drop_lines(self, lines: list[tuple[str, bytes]], names: set[bytes]) -> None:
        """drop_lines keeps exactly the lines whose name (any case) is not in names."""
        block = b"".join(k.encode() + b":" + v + b"\r\n" for k, v in lines)
        expected = b"".join(k.encode() + b":" + v + b"\r\n" for k, v in lines
                            if k.lower().encode() not in names)
        self.assertEqual(drop_lines(block, frozenset(names)), expected)

    def test_folded_and_odd_lines_take_the_slow_path(self) -> None:
        head = (b"HTTP/1.1 200 OK\r\nX-A: one\r\n  two\r\nX-B:\x0bv\x0c\r\nX C: d\r\n"
                b"X-D: a\nb\rc")
        # a name that is not a token is dropped, CR/LF inside a value become spaces
        self.assertEqual(parse_response_head(head)[3],
                         [(b"X-A", b"one two"), (b"X-B", b"v"), (b"X-D", b"a b c")])
        self.assertRaises(BadResponse, parse_response_head, b"HTTP/1.1 200 OK\r\n X: y")
        self.assertRaises(BadResponse, parse_response_head, b"HTTP/1.1 200 OK\r\nno colon")

    def test_invalid_header_name_dropped(self) -> None:
        h = Harness()
        ct, _ = h.answer(b"HTTP/1.1 200 OK\r\nX C: d\r\nX-Ok: 1\r\nContent-Length: 2\r\n\r\nhi")
        line, headers = head_of(ct.value())
        self.assertEqual(line, b"HTTP/1.1 200 OK")
        self.assertEqual(values(headers, b"x-ok"), [b"1"])
        self.assertEqual(values(headers, b"x c"), [])
        self.assertTrue(ct.value().endswith(b"hi"))
        self.assertEqual(h.ends, [ExchangeEnd("finished", 200, 2)])


_HOP = ["Connection", "Keep-Alive", "TE", "Trailer", "Upgrade", "Proxy-Connection"]


class ForwardedHeadTests(SynchronousTestCase):
    """What reaches the client is the backend's header list less the hop-by-hop ones
    (and those named in Connection), values trimmed, order kept, whichever way the
    head was built."""

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(
        st.one_of(st.sampled_from(_HOP + ["X-A", "x-a", "ETag", "Vary", "X-Named"]),
                  st.text(alphabet="abcXYZ-_", min_size=1, max_size=5)),
        st.sampled_from([b"1", b" padded ", b"a, b", b"close", b"keep-alive", b"X-Named",
                         b"\tt\t", b""]),
    ), max_size=6), st.booleans())
    def test_client_sees_end_to_end_headers(self, lines: list[tuple[str, bytes]],
                                            plain: bool) -> None:
        block = b"".join(k.encode() + (b": " if plain else b":") + v + b"\r\n"
                         for k, v in lines)
        h = Harness()
        ct, _ = h.answer(b"HTTP/1.1 200 OK\r\n" + block + b"Content-Length: 0\r\n\r\n")
        named = {t.strip().lower() for k, v in lines if k.lower() == "connection"
                 for t in v.decode().split(",")}
        dropped = {x.lower() for x in _HOP} | named
        expected = [(k.lower().encode(), v.strip()) for k, v in lines
                    if k.lower() not in dropped and k.lower() != "content-length"]
        got = [(k, v) for k, v in head_of(ct.value())[1]
               if k not in (b"date", b"content-length")]
        if "content-length" not in dropped:
            self.assertIn((b"content-length", b"0"), head_of(ct.value())[1])
        self.assertEqual(got, [kv for kv in expected if kv[0] != b"date"])


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


class _Sock:
    """The part of a tcp.Connection that send_now touches, over one end of a socketpair."""

    def __init__(self, sock: socket.socket):
        self.socket = sock
        self.dataBuffer: bytes | memoryview = b""
        self.offset = 0
        self._tempDataBuffer: list[bytes] = []
        self._tempDataLen = 0
        self.connected = 1
        self.disconnecting = False
        self._writeDisconnecting = False
        self._writeDisconnected = False
        self.writing = False

    def queue(self, data: bytes) -> None:
        self._tempDataBuffer.append(data)
        self._tempDataLen += len(data)

    def startWriting(self) -> None:
        self.writing = True


def _pair(sndbuf: int | None = None) -> tuple[_Sock, socket.socket]:
    a, b = socket.socketpair()
    if sndbuf is not None:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    a.setblocking(False)
    b.setblocking(False)
    return _Sock(a), b


def _drain(s: socket.socket) -> bytes:
    out = []
    while True:
        try:
            chunk = s.recv(1 << 20)
        except BlockingIOError:
            return b"".join(out)
        if not chunk:
            return b"".join(out)
        out.append(chunk)


class SendNowTests(SynchronousTestCase):
    """send_now: the queued pieces and the data in one sendmsg, the unsent tail kept."""

    def test_all_sent_after_queued_head(self) -> None:
        t, peer = _pair()
        self.addCleanup(t.socket.close)
        self.addCleanup(peer.close)
        t.queue(b"HTTP/1.1 200 OK\r\n")
        t.queue(b"\r\n")
        self.assertTrue(can_send_now(t))
        self.assertTrue(send_now(t, memoryview(b"0123456789")[2:]))
        self.assertEqual(_drain(peer), b"HTTP/1.1 200 OK\r\n\r\n23456789")
        self.assertEqual((t.dataBuffer, t.offset, t._tempDataBuffer, t._tempDataLen), (b"", 0, [], 0))
        self.assertFalse(t.writing)

    def test_partial_keeps_a_view_of_the_tail(self) -> None:
        t, peer = _pair(sndbuf=4096)
        self.addCleanup(t.socket.close)
        self.addCleanup(peer.close)
        data = bytes(range(256)) * 4096  # 1 MiB: more than the socket takes
        t.queue(b"head|")
        self.assertFalse(send_now(t, data))
        self.assertTrue(t.writing)
        self.assertIsInstance(t.dataBuffer, memoryview)  # no copy of the tail
        self.assertEqual(t._tempDataBuffer, [])
        self.assertEqual(_drain(peer) + bytes(t.dataBuffer), b"head|" + data)
        self.assertFalse(can_send_now(t))  # Twisted's buffer is not drained

    def test_nothing_sent(self) -> None:
        t, peer = _pair(sndbuf=4096)
        self.addCleanup(t.socket.close)
        self.addCleanup(peer.close)
        while True:  # fill the socket
            try:
                t.socket.send(b"f" * 65536)
            except BlockingIOError:
                break
        t.queue(b"head|")
        self.assertFalse(send_now(t, b"body"))
        self.assertEqual(bytes(t.dataBuffer), b"head|body")
        self.assertEqual((t.offset, t._tempDataLen), (0, 0))

    def test_broken_socket_left_to_twisted(self) -> None:
        t, peer = _pair()
        peer.close()
        t.socket.close()  # send raises: the bytes stay queued for doWrite to fail on
        self.assertFalse(send_now(t, b"body"))
        self.assertEqual(bytes(t.dataBuffer), b"body")

    def test_can_send_now(self) -> None:
        t, peer = _pair()
        self.addCleanup(t.socket.close)
        self.addCleanup(peer.close)
        self.assertTrue(can_send_now(t))
        for name in ("disconnecting", "_writeDisconnecting", "_writeDisconnected"):
            setattr(t, name, True)
            self.assertFalse(can_send_now(t), name)
            setattr(t, name, False)
        t.connected = 0
        self.assertFalse(can_send_now(t))


class _Paused:
    """A streaming producer the transport has paused."""

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


def _connection(test: SynchronousTestCase, a: socket.socket, b: socket.socket,
                protocol: Any) -> tuple[tcp.Connection, socket.socket, MemoryReactor]:
    """A tcp.Connection for ``protocol`` on socket ``a`` (``b``: its peer), on a
    MemoryReactor, both sockets non-blocking and closed after the test."""
    for sock in (a, b):
        sock.setblocking(False)
        test.addCleanup(sock.close)
    reactor = MemoryReactor()
    t = tcp.Connection(a, protocol, reactor)
    t.connected = 1
    return t, b, reactor


class WriteNowTests(SynchronousTestCase):
    """write_now / flush_now on a real tcp.Connection over a socketpair: bytes leave at
    once and the socket is not left registered for writing."""

    def conn(self) -> tuple[tcp.Connection, socket.socket, MemoryReactor]:
        return _connection(self, *socket.socketpair(), Protocol())

    def test_write_now_sends_without_the_reactor(self) -> None:
        t, peer, reactor = self.conn()
        write_now(t, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(_drain(peer), b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(reactor.getWriters(), [])

    def test_write_now_queues_behind_queued_bytes(self) -> None:
        t, peer, reactor = self.conn()
        t.write(b"first|")
        write_now(t, b"second")
        self.assertEqual(_drain(peer), b"")  # order kept: both wait for doWrite
        self.assertEqual(reactor.getWriters(), [t])
        t.doWrite()
        self.assertEqual(_drain(peer), b"first|second")

    def test_write_now_keeps_what_the_kernel_refused(self) -> None:
        t, peer, reactor = self.conn()
        t.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(range(256)) * 4096
        write_now(t, data)
        self.assertEqual(reactor.getWriters(), [t])
        got = _drain(peer)
        while len(got) < len(data):
            t.doWrite()
            got += _drain(peer)
        self.assertEqual(got, data)

    def test_flush_now(self) -> None:
        t, peer, reactor = self.conn()
        t.write(b"HTTP/1.1 200 OK\r\n\r\nhello")
        self.assertEqual(reactor.getWriters(), [t])
        flush_now(t)
        self.assertEqual(_drain(peer), b"HTTP/1.1 200 OK\r\n\r\nhello")
        self.assertEqual(reactor.getWriters(), [])
        flush_now(t)  # nothing queued: nothing happens
        self.assertEqual(reactor.getWriters(), [])

    def test_flush_now_leaves_a_paused_producer_to_twisted(self) -> None:
        t, peer, reactor = self.conn()
        t.registerProducer(_Paused(), True)
        t.producerPaused = True
        t.write(b"data")
        flush_now(t)
        self.assertEqual(_drain(peer), b"")
        self.assertEqual(reactor.getWriters(), [t])  # doWrite resumes it when drained

    def test_flush_now_not_while_closing(self) -> None:
        t, peer, reactor = self.conn()
        t.write(b"data")
        t.disconnecting = True
        flush_now(t)
        self.assertEqual(_drain(peer), b"")
        self.assertEqual(reactor.getWriters(), [t])


class SendAllNowTests(SynchronousTestCase):
    """A whole small answer (head and body known at once) leaves in one sendmsg, the
    client socket never registered for writing."""

    conn = WriteNowTests.conn

    def test_all_sent(self) -> None:
        t, peer, reactor = self.conn()
        send_all_now(t, [b"HTTP/1.1 200 OK\r\n", b"\r\n", memoryview(b"xhello")[1:]])  # type: ignore[list-item]
        self.assertEqual(_drain(peer), b"HTTP/1.1 200 OK\r\n\r\nhello")
        self.assertEqual(reactor.getWriters(), [])

    def test_rest_queued(self) -> None:
        t, peer, reactor = self.conn()
        t.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(range(256)) * 4096
        send_all_now(t, [b"head|", data])
        self.assertEqual(reactor.getWriters(), [t])
        got = _drain(peer)
        while len(got) < len(data) + 5:
            t.doWrite()
            got += _drain(peer)
        self.assertEqual(got, b"head|" + data)

    def test_whole_answer_through_the_proxy(self) -> None:
        """End to end on a real tcp.Connection client: the answer is on the socket
        when the backend's bytes are handled, and no writer is left registered."""
        h = Harness()
        with socket.create_server(("127.0.0.1", 0)) as server:
            peer = socket.create_connection(server.getsockname())
            a, _ = server.accept()
        channel = h.site.buildProtocol(CLIENT)
        t, peer, reactor = _connection(self, a, peer, channel)
        registered: list[Any] = []  # every addWriter: each one an epoll_ctl on a real reactor
        add_writer = reactor.addWriter
        reactor.addWriter = lambda w: (registered.append(w), add_writer(w))  # type: ignore[method-assign]
        t.getPeer = lambda: CLIENT  # type: ignore[method-assign]
        t.getHost = lambda: IPv4Address("TCP", "127.0.0.1", 8000)  # type: ignore[method-assign]
        channel.makeConnection(t)
        for _ in range(2):  # twice on one keep-alive connection (the second pooled)
            channel.dataReceived(GET)
            if h.pending:
                p, bt = h.accept()
            bt.clear()
            p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: x\r\n\r\nhello")
            got = _drain(peer)
            status, headers = head_of(got)
            self.assertEqual(status, b"HTTP/1.1 200 OK")
            self.assertEqual(values(headers, b"etag"), [b"x"])
            self.assertTrue(got.endswith(b"\r\n\r\nhello"), got)
            self.assertEqual(reactor.getWriters(), [])
        self.assertEqual(registered, [])
        self.assertEqual([e.reason for e in h.ends], ["finished", "finished"])

    test_whole_answer_through_the_proxy.skip = FAST_PATH_ONLY  # type: ignore[attr-defined]


class _Backend(Protocol):
    """Answers each request head with BODY in one write (head and body together)."""

    def dataReceived(self, data: bytes) -> None:
        for _ in range(data.count(b"\r\n\r\n")):
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
            )


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
                    request, backend, request.uri, prefix=b"", host_header=None,
                    on_end=ends.append,
                )

        site = make_site(Fwd(), r, max_body=1 << 20,
                         on_request_logged=lambda req: logged.append(req.sentLength))
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
