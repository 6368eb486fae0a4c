"""Test doubles for code built on dockerspaces (as ``treq.testing`` is for treq).

- :class:`FakeEngine` / :class:`FakeContainer`: an in-memory engine on an injected
  clock (from :mod:`dockerspaces.engine.fake`);
- :class:`ProxyHarness`: a :class:`~dockerspaces.web.proxy.Proxy` behind the real
  site, with every backend connection held for the test to accept
  (:meth:`ProxyHarness.accept`) or fail; clients and backends either on
  ``StringTransport`` (:meth:`ProxyHarness.client`: every write and transport state
  can be looked at) or connected to real protocols with ``twisted.test.iosim``
  pumps (:meth:`ProxyHarness.round_trip`);
- :func:`head_of` / :func:`values`: a raw HTTP head read back;
- :data:`FAST_PATH_ONLY`: the ``skip`` of a test that checks a fast path is taken;
- :func:`socket_connection` / :func:`drain`: a real ``tcp.Connection`` on a socketpair
  with a ``MemoryReactor`` (the seam's direct writes need a real socket).

Nothing in dockerspaces imports this module.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import directlyProvides  # type: ignore[import-untyped]

from .engine.fake import FakeContainer, FakeEngine
from .twistedseam import fast_paths_on
from .web.backend import Backend, BackendFactory, BackendProtocol
from .web.proxy import ExchangeEnd, Proxy
from .web.site import ProxySite, make_site

__all__ = [
    "CLIENT",
    "FAST_PATH_ONLY",
    "GET",
    "FakeContainer",
    "FakeEndpoint",
    "FakeEngine",
    "ProxyHarness",
    "drain",
    "head_of",
    "socket_connection",
    "values",
]

#: the client address of the harness's connections
CLIENT = IPv4Address("TCP", "10.1.2.3", 5555)
#: a plain GET, the harness's default request
GET = b"GET /path?q=1 HTTP/1.1\r\nHost: front.example\r\n\r\n"
#: the ``skip`` of a test that checks a fast path is taken (not what the answer is)
FAST_PATH_ONLY = None if fast_paths_on() else "checks a fast path: DOCKERSPACES_FAST_PATHS=0"


class FakeEndpoint:
    """A client endpoint that records each connection attempt for the test to settle."""

    def __init__(self, harness: ProxyHarness, backend: Backend):
        self.harness, self.backend = harness, backend

    def connect(self, factory: BackendFactory) -> Deferred[BackendProtocol]:
        """Queue the attempt on the harness (``pending``); fires when the test does."""
        d: Deferred[BackendProtocol] = Deferred()
        self.harness.pending.append((factory, d))
        return d


class _Front(Resource):
    """Forwards every request with the harness's current settings."""

    isLeaf = True

    def __init__(self, h: ProxyHarness):
        super().__init__()
        self.h = h

    def render(self, request: Request) -> Any:
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


class ProxyHarness:
    """A proxy and the site in front of it; the backend side is the test's.

    Every request is forwarded to :attr:`backend` with the settings below (the
    arguments of :meth:`Proxy.forward`, changeable between requests); each ending
    lands in :attr:`ends`; each backend connection attempt waits in :attr:`pending`.
    """

    def __init__(self, **proxy_kwargs: Any):
        self.clock = MemoryReactorClock()
        self.pending: list[tuple[BackendFactory, Deferred[BackendProtocol]]] = []
        self.ends: list[ExchangeEnd] = []
        self.backend = Backend.tcp("127.0.0.1", 9100)
        self.prefix = b"/x:team:app:1:8080"
        self.host_header: bytes | None = None
        self.cookie: str | None = None
        self.retry = 0  # Proxy.forward's retry_unforwarded
        self.confirm: Callable[[], Deferred[bool]] | None = None  # its confirm_close
        self.died_before: Callable[[float], Deferred[bool]] | None = None  # its died_before
        self.cors_allowed = True  # its cors (False: /docker:local)
        self.external = False  # its external (True: a host: target)
        self.proxy = Proxy(
            self.clock,
            endpoint_factory=lambda b: FakeEndpoint(self, b),
            **proxy_kwargs,
        )
        self.site: ProxySite = make_site(_Front(self), self.clock, max_body=1 << 20)

    def client(self, raw: bytes, secure: bool = False) -> tuple[HTTPChannel, StringTransport]:
        """A client connection sending ``raw`` (``secure``: as on a TLS listener)."""
        channel: HTTPChannel = self.site.buildProtocol(CLIENT)
        t = StringTransport(peerAddress=CLIENT)
        if secure:
            directlyProvides(t, ISSLTransport)  # (an ITCPTransport as well)
            t.setTcpNoDelay = lambda enabled: None  # type: ignore[attr-defined]
        t.protocol = channel  # type: ignore[attr-defined]  # as a real tcp transport has
        channel.makeConnection(t)
        channel.dataReceived(raw)
        return channel, t

    def answer(
        self, response: bytes, request: bytes | None = None
    ) -> tuple[StringTransport, BackendProtocol]:
        """A client sends ``request`` (GET by default), the backend answers ``response``:
        the client's transport and the backend connection."""
        _, ct = self.client(GET if request is None else request)
        p, _ = self.accept()
        p.dataReceived(response)
        return ct, p

    def accept(self) -> tuple[BackendProtocol, StringTransport]:
        """Accept the oldest pending backend connection, on a StringTransport."""
        factory, d = self.pending.pop(0)
        p = factory.buildProtocol(None)
        t = StringTransport()
        p.makeConnection(t)
        d.callback(p)
        return p, t

    def round_trip(self, raw: bytes, backend: Callable[[], Protocol]) -> bytes:
        """Send ``raw`` from a client connected to the site with ``twisted.test.iosim``
        pumps, serve each backend connection the proxy opens with a new
        ``backend()`` protocol (pumped likewise), move bytes until nothing moves; the
        bytes the client received (its connection stays open)."""
        client = _Collector()
        server = self.site.buildProtocol(CLIENT)
        pumps = [_pump(server, client, peer=CLIENT)]
        client.transport.write(raw)  # type: ignore[union-attr]
        moved = True
        while moved:
            moved = False
            for pump in pumps:
                moved = pump.pump() or moved
            while self.pending:
                factory, d = self.pending.pop(0)
                p = factory.buildProtocol(None)
                pumps.append(_pump(backend(), p))
                d.callback(p)
                moved = True
        return b"".join(client.received)


class _Collector(Protocol):
    """A client keeping what it receives."""

    def __init__(self) -> None:
        self.received: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)


def _pump(server: Protocol, client: Protocol, peer: IPv4Address | None = None) -> IOPump:
    """Connect ``server`` and ``client`` over iosim FakeTransports (``peer``: the
    client's address as the server sees it)."""
    return connect(
        server,
        FakeTransport(server, isServer=True, peerAddress=peer),
        client,
        FakeTransport(client, isServer=False),
        greet=True,
    )


def head_of(data: bytes) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The first line of an HTTP message and its headers (names lower-cased, values
    stripped), in order."""
    head = data.split(b"\r\n\r\n", 1)[0]
    lines = head.split(b"\r\n")
    headers = []
    for line in lines[1:]:
        k, _, v = line.partition(b":")
        headers.append((k.strip().lower(), v.strip()))
    return lines[0], headers


def values(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """The values of header ``name`` (lower-case) in :func:`head_of`'s list."""
    return [v for k, v in headers if k == name]


def socket_connection(
    test: SynchronousTestCase, a: socket.socket, b: socket.socket, protocol: Protocol
) -> tuple[tcp.Connection, socket.socket, MemoryReactor]:
    """A tcp.Connection for ``protocol`` on socket ``a`` (``b``: its peer), on a
    MemoryReactor, both sockets non-blocking and closed after the test."""
    for sock in (a, b):
        sock.setblocking(False)
        test.addCleanup(sock.close)
    reactor = MemoryReactor()
    t = tcp.Connection(a, protocol, reactor)
    t.connected = 1
    return t, b, reactor


def drain(s: socket.socket) -> bytes:
    """Every byte waiting on the non-blocking socket ``s``."""
    out: list[bytes] = []
    while True:
        try:
            chunk = s.recv(1 << 20)
        except BlockingIOError:
            return b"".join(out)
        if not chunk:
            return b"".join(out)
        out.append(chunk)
