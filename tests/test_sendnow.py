"""Unit tests for the direct writes (dockerspaces/web/sendnow.py, in the seam): on a
socketpair and on a real tcp.Connection, and a whole answer through the proxy."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.testing import (
    CLIENT,
    FAST_PATH_ONLY,
    GET,
    ProxyHarness,
    drain,
    head_of,
    socket_connection,
    values,
)
from dockerspaces.web.sendnow import (
    can_send_now,
    flush_now,
    send_all_now,
    send_now,
    write_now,
)


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
        self.assertEqual(drain(peer), b"HTTP/1.1 200 OK\r\n\r\n23456789")
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
        self.assertEqual(drain(peer) + bytes(t.dataBuffer), b"head|" + data)
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


class WriteNowTests(SynchronousTestCase):
    """write_now / flush_now on a real tcp.Connection over a socketpair: bytes leave at
    once and the socket is not left registered for writing."""

    def conn(self) -> tuple[tcp.Connection, socket.socket, MemoryReactor]:
        return socket_connection(self, *socket.socketpair(), Protocol())

    def test_write_now_sends_without_the_reactor(self) -> None:
        t, peer, reactor = self.conn()
        write_now(t, b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(drain(peer), b"GET / HTTP/1.1\r\n\r\n")
        self.assertEqual(reactor.getWriters(), [])

    def test_write_now_queues_behind_queued_bytes(self) -> None:
        t, peer, reactor = self.conn()
        t.write(b"first|")
        write_now(t, b"second")
        self.assertEqual(drain(peer), b"")  # order kept: both wait for doWrite
        self.assertEqual(reactor.getWriters(), [t])
        t.doWrite()
        self.assertEqual(drain(peer), b"first|second")

    def test_write_now_keeps_what_the_kernel_refused(self) -> None:
        t, peer, reactor = self.conn()
        t.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(range(256)) * 4096
        write_now(t, data)
        self.assertEqual(reactor.getWriters(), [t])
        got = drain(peer)
        while len(got) < len(data):
            t.doWrite()
            got += drain(peer)
        self.assertEqual(got, data)

    def test_flush_now(self) -> None:
        t, peer, reactor = self.conn()
        t.write(b"HTTP/1.1 200 OK\r\n\r\nhello")
        self.assertEqual(reactor.getWriters(), [t])
        flush_now(t)
        self.assertEqual(drain(peer), b"HTTP/1.1 200 OK\r\n\r\nhello")
        self.assertEqual(reactor.getWriters(), [])
        flush_now(t)  # nothing queued: nothing happens
        self.assertEqual(reactor.getWriters(), [])

    def test_flush_now_leaves_a_paused_producer_to_twisted(self) -> None:
        t, peer, reactor = self.conn()
        t.registerProducer(_Paused(), True)
        t.producerPaused = True
        t.write(b"data")
        flush_now(t)
        self.assertEqual(drain(peer), b"")
        self.assertEqual(reactor.getWriters(), [t])  # doWrite resumes it when drained

    def test_flush_now_not_while_closing(self) -> None:
        t, peer, reactor = self.conn()
        t.write(b"data")
        t.disconnecting = True
        flush_now(t)
        self.assertEqual(drain(peer), b"")
        self.assertEqual(reactor.getWriters(), [t])


class SendAllNowTests(SynchronousTestCase):
    """A whole small answer (head and body known at once) leaves in one sendmsg, the
    client socket never registered for writing."""

    conn = WriteNowTests.conn

    def test_all_sent(self) -> None:
        t, peer, reactor = self.conn()
        send_all_now(t, [b"HTTP/1.1 200 OK\r\n", b"\r\n", memoryview(b"xhello")[1:]])  # type: ignore[list-item]
        self.assertEqual(drain(peer), b"HTTP/1.1 200 OK\r\n\r\nhello")
        self.assertEqual(reactor.getWriters(), [])

    def test_rest_queued(self) -> None:
        t, peer, reactor = self.conn()
        t.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        data = bytes(range(256)) * 4096
        send_all_now(t, [b"head|", data])
        self.assertEqual(reactor.getWriters(), [t])
        got = drain(peer)
        while len(got) < len(data) + 5:
            t.doWrite()
            got += drain(peer)
        self.assertEqual(got, b"head|" + data)

    def test_whole_answer_through_the_proxy(self) -> None:
        """End to end on a real tcp.Connection client: the answer is on the socket
        when the backend's bytes are handled, and no writer is left registered."""
        h = ProxyHarness()
        with socket.create_server(("127.0.0.1", 0)) as server:
            peer = socket.create_connection(server.getsockname())
            a, _ = server.accept()
        channel = h.site.buildProtocol(CLIENT)
        t, peer, reactor = socket_connection(self, a, peer, channel)
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
            got = drain(peer)
            status, headers = head_of(got)
            self.assertEqual(status, b"HTTP/1.1 200 OK")
            self.assertEqual(values(headers, b"etag"), [b"x"])
            self.assertTrue(got.endswith(b"\r\n\r\nhello"), got)
            self.assertEqual(reactor.getWriters(), [])
        self.assertEqual(registered, [])
        self.assertEqual([e.reason for e in h.ends], ["finished", "finished"])

    test_whole_answer_through_the_proxy.skip = FAST_PATH_ONLY  # type: ignore[attr-defined]
