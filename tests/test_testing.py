"""Unit tests for the public test doubles (dockerspaces/testing.py)."""

from __future__ import annotations

import socket

from twisted.internet import error as ierror
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces import testing
from dockerspaces.config import HostConfig
from dockerspaces.engine import fake
from dockerspaces.testing import (
    GET,
    FakeEngine,
    ProxyHarness,
    drain,
    head_of,
    socket_connection,
    values,
)
from dockerspaces.web.proxy import ExchangeEnd


class _Hello(Protocol):
    """A backend answering each request head with ``hello``."""

    def dataReceived(self, data: bytes) -> None:
        for _ in range(data.count(b"\r\n\r\n")):
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-B: 1\r\n\r\nhello")


class ProxyHarnessTests(SynchronousTestCase):
    def test_round_trip_over_pumps(self) -> None:
        """A client and a backend on iosim pumps: the answer comes back whole, the
        exchange ends ``finished`` and the connection is pooled."""
        h = ProxyHarness()
        got = h.round_trip(GET, _Hello)
        line, headers = head_of(got)
        self.assertEqual(line, b"HTTP/1.1 200 OK")
        self.assertEqual(values(headers, b"x-b"), [b"1"])
        self.assertTrue(got.endswith(b"\r\n\r\nhello"))
        self.assertEqual(h.ends, [ExchangeEnd("finished", 200, 5)])
        self.assertEqual(h.proxy.idle_connections(), 1)
        self.assertEqual(h.pending, [])

    def test_refused_connection_is_a_502(self) -> None:
        """The StringTransport side: the test settles each connection attempt."""
        h = ProxyHarness()
        _, ct = h.client(GET)
        ((_, d),) = h.pending
        d.errback(ierror.ConnectionRefusedError())
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 502 "))
        self.assertEqual([e.reason for e in h.ends], ["refused"])

    def test_accept_and_answer(self) -> None:
        h = ProxyHarness()
        ct, p = h.answer(b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(head_of(ct.value())[0], b"HTTP/1.1 204 No Content")
        self.assertTrue(p.connected)
        self.assertEqual(h.ends, [ExchangeEnd("finished", 204, 0)])


class ExportsTests(SynchronousTestCase):
    def test_fake_engine_is_the_engines(self) -> None:
        self.assertIs(FakeEngine, fake.FakeEngine)
        self.assertIs(testing.FakeContainer, fake.FakeContainer)
        engine = FakeEngine(Clock(), HostConfig("local", "unix:///x", 9100, 1))
        self.assertEqual(engine.host.name, "local")

    def test_every_export_exists(self) -> None:
        for name in testing.__all__:
            self.assertTrue(hasattr(testing, name), name)

    def test_socket_connection_and_drain(self) -> None:
        t, peer, reactor = socket_connection(self, *socket.socketpair(), Protocol())
        t.write(b"queued")
        self.assertEqual(drain(peer), b"")
        self.assertEqual(reactor.getWriters(), [t])
        t.doWrite()
        self.assertEqual(drain(peer), b"queued")
