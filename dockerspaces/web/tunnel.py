"""Upgrade tunnelling: take the client connection over from twisted.web and splice it.

When a backend answers an ``Upgrade`` request (WebSocket, ``docker attach``…) with
``101``, :func:`start_tunnel` writes the 101 head to the client, takes the client
transport away from its ``HTTPChannel`` (:func:`take_over`) and joins it to the
backend connection with a :class:`Splice`: bytes both ways with flow control (each
transport is the other's registered producer), half-close honoured where both ends
are plain sockets (``tcp:``/``unix:``), a full close otherwise (TLS).

Pin awareness: :func:`take_over` needs ``HTTPChannel`` internals (the bytes it
buffered past the request, and that it parses nothing more:
:func:`~dockerspaces.twistedseam.detach_channel`; which wrapper holds the channel:
:func:`~dockerspaces.twistedseam.holds_channel`) and the transport's ``protocol`` / a
TLS wrapper's ``wrappedProtocol``; setup.cfg bounds Twisted below its next major --
re-run ``tests/test_tunnel.py`` and ``tests/integration/test_proxy.py`` before lifting
it. Relaying straight to a plain TCP socket is a fast path of the seam (off with the
others: then every byte goes through the transport's ``write``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from zope.interface import implementer  # type: ignore[import-untyped]

from ..twistedseam import detach_channel, holds_channel
from .headers import Headers, drop_hop_by_hop
from .sendnow import can_send_now, is_plain_tcp, relay_now
from .sink import BackendConnection, TunnelledExchange

log = Logger()


class TakeoverError(Exception):
    """The client transport could not be detached from its HTTP channel."""


def can_half_close(transport: Any) -> bool:
    """True for a plain socket transport (TLS and other wrappers close fully)."""
    return not isinstance(transport, ProtocolWrapper) and hasattr(type(transport), "loseWriteConnection")


def _slot(transport: Any, channel: HTTPChannel) -> str:
    """Which attribute of ``transport`` holds the channel (or its generic wrapper)."""
    attrs = vars(transport)  # not getattr: ProtocolWrapper delegates unknown names
    for name in ("wrappedProtocol", "protocol"):
        cur = attrs.get(name)
        if cur is not None and holds_channel(cur, channel):
            return name
    raise TakeoverError(f"cannot find the HTTP channel on {type(transport).__name__}")


def take_over(channel: HTTPChannel, protocol: Protocol) -> bytes:
    """Detach the transport from ``channel``, attach ``protocol``; return buffered bytes.

    The channel stops being the transport's producer, its timeouts are cancelled and
    the bytes it read past the request (kept for pipelining) are returned for the
    caller to pass on. The transport's reading is resumed.
    """
    transport: Any = channel.transport
    if transport is None:
        raise TakeoverError("the client connection is gone")
    slot = _slot(transport, channel)
    channel.setTimeout(None)
    stop_deadline = getattr(channel, "stop_deadline", None)  # site.HeadDeadlineChannel
    if stop_deadline is not None:
        stop_deadline()
    transport.unregisterProducer()
    buffered = detach_channel(channel)  # and it never parses anything again
    setattr(transport, slot, protocol)
    protocol.makeConnection(transport)
    resume = getattr(transport, "resumeProducing", None)
    if resume is not None:
        resume()
    return buffered


@implementer(IHalfCloseableProtocol)
class _Side(Protocol):
    """One end of a splice: what it reads goes to the other end's transport."""

    peer: _Side
    transport: Any

    def __init__(self, splice: Splice, name: str):
        self.splice = splice
        self.name = name
        self.read_eof = False
        self.write_closed = False
        self.lost = False
        self.bytes_in = 0
        self.direct = False  # set by Splice.join: the transport is plain TCP

    def dataReceived(self, data: bytes) -> None:
        self.bytes_in += len(data)
        peer = self.peer
        if peer.lost:
            return
        t = peer.transport
        if peer.direct and can_send_now(t):
            # straight to the socket, not on the next reactor iteration: one hop of
            # latency less per message; Twisted sends any unsent tail, and pauses
            # us as its own write would
            relay_now(t, data)
            return
        t.write(data)

    def readConnectionLost(self) -> None:
        self.read_eof = True
        peer = self.peer
        if peer.lost:
            self.transport.loseConnection()
        elif can_half_close(peer.transport):
            peer.transport.loseWriteConnection()
        else:
            self.splice.close()
        self._maybe_done()

    def writeConnectionLost(self) -> None:
        self.write_closed = True
        self._maybe_done()

    def _maybe_done(self) -> None:
        if self.read_eof and self.write_closed and not self.lost:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.lost = True
        self.splice.side_lost(self)


class Splice:
    """Joins a client transport and a backend connection, both ways, with flow control."""

    def __init__(self, on_close: Callable[[Splice], None]):
        self.client = _Side(self, "client")
        self.backend = _Side(self, "backend")
        self.client.peer, self.backend.peer = self.backend, self.client
        self.on_close = on_close
        self.closed = False

    def join(self) -> None:
        """Register each transport as the other's producer (call once both are attached)."""
        ct, bt = self.client.transport, self.backend.transport
        self.client.direct, self.backend.direct = is_plain_tcp(ct), is_plain_tcp(bt)
        for consumer, producer in ((ct, bt), (bt, ct)):
            if getattr(consumer, "producer", None) is not None:
                consumer.unregisterProducer()
            consumer.registerProducer(producer, True)

    @property
    def bytes_to_client(self) -> int:
        """Bytes read from the backend (and written to the client)."""
        return self.backend.bytes_in

    def close(self) -> None:
        """Close both ends (after flushing what is queued)."""
        for side in (self.client, self.backend):
            if not side.lost and side.transport is not None:
                side.transport.loseConnection()

    def side_lost(self, side: _Side) -> None:
        """One end is gone: close the other; report once both are gone."""
        if not side.peer.lost:
            side.peer.transport.loseConnection()
            return
        if not self.closed:
            self.closed = True
            self.on_close(self)


class _BackendEnd:
    """Adapts a backend connection in tunnel mode to a splice side (a
    :class:`~dockerspaces.web.sink.TunnelEnd`)."""

    def __init__(self, side: _Side, conn: BackendConnection):
        self.side = side
        side.transport = conn.transport
        side.connected = 1

    def dataReceived(self, data: bytes) -> None:
        self.side.dataReceived(data)

    def readConnectionLost(self) -> None:
        self.side.readConnectionLost()

    def writeConnectionLost(self) -> None:
        self.side.writeConnectionLost()

    def connectionLost(self, reason: Failure | None) -> None:
        self.side.connectionLost(reason)


def switching_head(reason: bytes, headers: Headers, upgrade: bytes) -> bytes:
    """The 101 head for the client: the backend's headers minus hop-by-hop ones."""
    ups = [v for k, v in headers if k.lower() == b"upgrade"]
    out = [b"HTTP/1.1 101 ", reason or b"Switching Protocols", b"\r\n"]
    for k, v in drop_hop_by_hop(headers):
        out += [k, b": ", v, b"\r\n"]
    out += [b"Connection: Upgrade\r\nUpgrade: ", ups[-1] if ups else upgrade, b"\r\n\r\n"]
    return b"".join(out)


def logged(request: Any, status: int, sent: int) -> None:
    """A tunnelled request is over: hand it to the site's request log as twisted.web
    does for a finished one (its HTTP channel, taken over, never finishes it), with
    the switching status and the bytes that went to the client."""
    request.code = status
    request.sentLength = sent
    site = getattr(request, "site", None)
    if site is not None:
        site.log(request)


def start_tunnel(
    ex: TunnelledExchange,
    conn: BackendConnection,
    status: int,
    reason: bytes,
    headers: Headers,
    rest: bytes,
) -> None:
    """The backend said 101: answer the client, take its connection over, splice."""
    request = ex.request
    channel = request.channel
    if channel is None:  # (a request's channel is None once its connection is lost)
        conn.abort()
        ex.end("client-gone")
        return
    ex.detach()

    def closed(splice: Splice) -> None:
        ex.end("tunnel-closed", bytes_out=splice.bytes_to_client)
        logged(request, status, splice.bytes_to_client)

    transport: Any = channel.transport
    if transport is None:  # the client went while the backend answered
        conn.abort()
        ex.end("client-gone")
        return
    splice = Splice(closed)
    conn.hand_over(_BackendEnd(splice.backend, conn))
    transport.write(switching_head(reason, headers, ex.upgrade or b"websocket"))
    try:
        buffered = take_over(channel, splice.client)
    except TakeoverError as e:
        conn.abort()
        transport.loseConnection()
        ex.end("backend-error")
        log.info("tunnel: {error}", error=str(e))
        return
    splice.join()
    if rest:
        splice.backend.dataReceived(rest)
    if buffered:
        splice.client.dataReceived(buffered)
