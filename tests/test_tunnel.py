"""Unit tests for the Upgrade takeover and splice (StringTransports, no sockets)."""

from __future__ import annotations

from typing import Any

from twisted.internet import error as ierror
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from dockerspaces.testing import ProxyHarness, head_of, values
from dockerspaces.web.proxy import ExchangeEnd
from dockerspaces.web.site import make_site
from dockerspaces.web.tunnel import (
    Splice,
    TakeoverError,
    _slot,
    can_half_close,
    start_tunnel,
    switching_head,
)

UPGRADE = (
    b"GET /ws HTTP/1.1\r\nHost: front.example\r\nConnection: keep-alive, Upgrade\r\n"
    b"Upgrade: websocket\r\nSec-WebSocket-Key: abc\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: xyz\r\nKeep-Alive: 5\r\n\r\n"
)


class TakeoverTests(SynchronousTestCase):
    def upgraded(self) -> tuple[ProxyHarness, Any, Any, Any, Any]:
        h = ProxyHarness()
        channel, ct = h.client(UPGRADE + b"early-bytes")
        p, bt = h.accept()
        return h, channel, ct, p, bt

    def test_upgrade_request_head(self) -> None:
        """The Upgrade request keeps Upgrade/Connection and uses a fresh connection."""
        _, _, _, p, bt = self.upgraded()
        _, headers = head_of(bt.value())
        self.assertEqual(values(headers, b"upgrade"), [b"websocket"])
        self.assertEqual(values(headers, b"connection"), [b"Upgrade"])
        self.assertEqual(values(headers, b"sec-websocket-key"), [b"abc"])
        self.assertIsNone(p.pool)

    def test_takeover_and_splice(self) -> None:
        h, channel, ct, p, bt = self.upgraded()
        bt.clear()
        p.dataReceived(SWITCH + b"server-hello")
        line, headers = head_of(ct.value())
        self.assertEqual(line, b"HTTP/1.1 101 Switching Protocols")
        self.assertEqual(values(headers, b"sec-websocket-accept"), [b"xyz"])
        self.assertEqual(values(headers, b"keep-alive"), [])
        self.assertTrue(ct.value().endswith(b"\r\n\r\nserver-hello"))
        # bytes the channel buffered past the request reach the backend
        self.assertEqual(bt.value(), b"early-bytes")
        side = ct.protocol
        self.assertIsNot(side, channel)
        # both ways, each transport the other's producer
        self.assertIs(ct.producer, bt)
        self.assertIs(bt.producer, ct)
        side.dataReceived(b"from-client")
        self.assertTrue(bt.value().endswith(b"from-client"))
        ct.clear()
        p.dataReceived(b"from-backend")
        self.assertEqual(ct.value(), b"from-backend")
        self.assertEqual(h.ends, [])
        # StringTransports cannot half-close: an EOF is a full close
        side.readConnectionLost()
        self.assertTrue(bt.disconnecting)
        p.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertTrue(ct.disconnecting)
        side.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(h.ends, [ExchangeEnd("tunnel-closed", 101, len(b"server-hellofrom-backend"))])
        # the HTTP channel never sees anything again
        self.assertEqual(channel._dataBuffer, [])

    def test_logged_once_when_the_tunnel_closes(self) -> None:
        """A tunnelled request reaches the site's request log (and so the access log
        and metrics) once, when the tunnel closes: status 101, the bytes relayed."""
        logged: list[Any] = []
        h = ProxyHarness()
        h.site.on_request_logged = logged.append
        _, ct = h.client(UPGRADE)
        p, _ = h.accept()
        p.dataReceived(SWITCH + b"hello")
        self.assertEqual(logged, [])  # open: not over yet
        side = ct.protocol
        p.connectionLost(Failure(ierror.ConnectionDone()))
        side.connectionLost(Failure(ierror.ConnectionDone()))
        (request,) = logged
        self.assertEqual((request.code, request.sentLength), (101, len(b"hello")))
        self.assertEqual(request.uri, UPGRADE.split(b" ")[1])

    def test_refused_upgrade_passed_back(self) -> None:
        h, _, ct, p, bt = self.upgraded()
        p.dataReceived(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 2\r\n\r\nno")
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 403 Forbidden"))
        self.assertTrue(ct.value().endswith(b"no"))
        self.assertEqual(h.ends, [ExchangeEnd("finished", 403, 2)])
        self.assertTrue(bt.disconnecting)  # not pooled

    def test_client_gone_before_101(self) -> None:
        h, channel, _, _, bt = self.upgraded()
        channel.connectionLost(Failure(ierror.ConnectionLost()))
        self.assertTrue(bt.disconnected)
        self.assertEqual(h.ends, [ExchangeEnd("client-gone", None, 0)])

    def test_unexpected_101_is_502(self) -> None:
        h = ProxyHarness()
        _, ct = h.client(b"GET / HTTP/1.1\r\nHost: f\r\n\r\n")
        p, _ = h.accept()
        p.dataReceived(SWITCH)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 502 "))
        self.assertEqual([e.reason for e in h.ends], ["backend-error"])


class HalfCloseTests(SynchronousTestCase):
    """The splice on transports that can half-close."""

    def test_half_close_both_ways(self) -> None:
        from twisted.internet.testing import StringTransport

        class HalfTransport(StringTransport):
            write_closed = False

            def loseWriteConnection(self) -> None:
                self.write_closed = True

        ends: list[Splice] = []
        s = Splice(ends.append)
        ct, bt = HalfTransport(), HalfTransport()
        s.client.makeConnection(ct)
        s.backend.makeConnection(bt)
        s.join()
        s.client.readConnectionLost()  # client shut its write side
        self.assertTrue(bt.write_closed)
        self.assertFalse(bt.disconnecting)
        s.backend.dataReceived(b"last words")
        self.assertEqual(ct.value(), b"last words")
        s.backend.readConnectionLost()
        self.assertTrue(ct.write_closed)
        s.client.writeConnectionLost()
        s.backend.writeConnectionLost()
        self.assertTrue(ct.disconnecting and bt.disconnecting)
        self.assertEqual(ends, [])
        s.client.connectionLost(None)
        s.backend.connectionLost(None)
        self.assertEqual(ends, [s])

    def test_can_half_close(self) -> None:
        class Sock:
            def loseWriteConnection(self) -> None:
                pass

        self.assertTrue(can_half_close(Sock()))
        self.assertFalse(can_half_close(ProtocolWrapper(None, None)))
        self.assertFalse(can_half_close(object()))


class HelperTests(SynchronousTestCase):
    def test_slot(self) -> None:
        class Channel:
            pass

        class Wrapper:
            pass

        channel = Channel()
        t: Any = Wrapper()
        t.wrappedProtocol = channel
        self.assertEqual(_slot(t, channel), "wrappedProtocol")  # type: ignore[arg-type]
        generic: Any = Wrapper()
        generic._channel = channel
        t2: Any = Wrapper()
        t2.protocol = generic
        self.assertEqual(_slot(t2, channel), "protocol")  # type: ignore[arg-type]
        self.assertRaises(TakeoverError, _slot, Wrapper(), channel)

    def test_switching_head(self) -> None:
        head = switching_head(
            b"Switching Protocols",
            [
                (b"Upgrade", b"websocket"),
                (b"Connection", b"Upgrade, X-A"),
                (b"X-A", b"1"),
                (b"Sec-WebSocket-Accept", b"k"),
            ],
            b"websocket",
        )
        self.assertEqual(
            head,
            b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: k\r\n"
            b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )


class _TunnelledExchange:
    """A :class:`~dockerspaces.web.sink.TunnelledExchange` double."""

    upgrade = b"websocket"

    def __init__(self, request: Any):
        self.request = request
        self.detached = 0
        self.ends: list[tuple[str, int | None]] = []

    def detach(self) -> None:
        self.detached += 1

    def end(self, reason: str, bytes_out: int | None = None) -> None:
        self.ends.append((reason, bytes_out))


class _Connection:
    """A :class:`~dockerspaces.web.sink.BackendConnection` double."""

    served = 0
    got_bytes = True

    def __init__(self) -> None:
        self.transport = StringTransport()
        self.aborted = False
        self.tunnel: Any = None

    def abort(self) -> None:
        self.aborted = True

    def hand_over(self, end: Any) -> None:
        self.tunnel = end


class StartTunnelTests(SynchronousTestCase):
    """start_tunnel needs nothing of the proxy but the protocols of web/sink.py."""

    def held_request(self) -> tuple[Any, StringTransport]:
        held: list[Any] = []

        class Hold(Resource):
            isLeaf = True

            def render(self, request: Any) -> Any:
                held.append(request)
                return NOT_DONE_YET

        channel = make_site(Hold(), MemoryReactorClock(), max_body=10).buildProtocol(None)
        t = StringTransport()
        t.protocol = channel  # type: ignore[attr-defined]  # as a real tcp transport has
        channel.makeConnection(t)
        channel.dataReceived(UPGRADE + b"early")
        return held[0], t

    def test_splice_through_the_protocols(self) -> None:
        request, ct = self.held_request()
        ex, conn = _TunnelledExchange(request), _Connection()
        start_tunnel(ex, conn, 101, b"Switching Protocols", [(b"Upgrade", b"websocket")], b"hi")
        self.assertEqual(ex.detached, 1)
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 101 Switching Protocols\r\n"))
        self.assertTrue(ct.value().endswith(b"\r\n\r\nhi"))
        self.assertEqual(conn.transport.value(), b"early")  # the channel's buffered bytes
        conn.tunnel.dataReceived(b"!")
        self.assertTrue(ct.value().endswith(b"hi!"))
        conn.tunnel.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertTrue(ct.disconnecting)
        ct.protocol.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(ex.ends, [("tunnel-closed", 3)])
        self.assertFalse(conn.aborted)

    def test_client_already_gone(self) -> None:
        request, _ = self.held_request()
        request.connectionLost(Failure(ierror.ConnectionLost()))
        ex, conn = _TunnelledExchange(request), _Connection()
        start_tunnel(ex, conn, 101, b"", [], b"")
        self.assertTrue(conn.aborted)
        self.assertIsNone(conn.tunnel)
        self.assertEqual((ex.detached, ex.ends), (0, [("client-gone", None)]))
