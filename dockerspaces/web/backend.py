"""The proxy's backend side: where a request goes (:class:`Backend`, an endpoint
description), the lean HTTP/1.1 client protocol that sends it and reads the answer
(:class:`BackendProtocol`), and the pool of idle persistent connections.

The protocol hands the answer to its *sink* (a
:class:`~dockerspaces.web.sink.ResponseSink`, the proxy's exchange) as it comes:
``response_head``, ``response_data``, ``response_done``, ``response_closed``,
``backend_failed``, ``response_upgraded`` (a ``101`` to an ``Upgrade`` request, for
the tunnel, which then takes the connection with :meth:`BackendProtocol.hand_over`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any, BinaryIO, Protocol

from attrs import define, field, frozen
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IPushProducer,
)
from twisted.internet.protocol import Factory
from twisted.internet.protocol import Protocol as TwistedProtocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.python.failure import Failure
from zope.interface import implementer  # type: ignore[import-untyped]

from ..twistedseam import ChunkedDecoder, when_switched
from .headers import (
    BadResponse,
    Headers,
    connection_tokens,
    group_headers,
    parse_response_head,
)
from .sendnow import write_now
from .sink import ResponseSink, TunnelEnd


def _queue(t: Any, data: bytes) -> None:
    t.write(data)


#: how a request head goes to the backend: at once (:func:`write_now`, a fast path of
#: the seam), or queued by the transport's ``write`` with the fast paths off
_write_head: Callable[[Any, bytes], None] = write_now


@when_switched
def _use_fast_paths(on: bool) -> None:
    global _write_head  # noqa: PLW0603 - bound once by the seam's switch, not tested per request
    _write_head = write_now if on else _queue


_MAX_HEAD = 64 * 1024
_CHUNK = 64 * 1024
#: bytes read per recv from a backend (Twisted's default is 64 KiB): fewer trips
READ_SIZE = 512 * 1024


@frozen(cache_hash=True)
class Backend:
    """Where to send a request: an endpoint description (+ the TLS name to verify).

    ``description`` is ``tcp:HOST:PORT``, ``tls:HOST:PORT`` or ``unix:PATH`` (an IPv6
    HOST may be written in brackets). With ``tls:``, the certificate is verified for
    ``tls_name`` when given (connect to a resolved address, verify for the name),
    else for HOST. The pool keys on the whole value.
    """

    description: str
    tls_name: str | None = None

    @classmethod
    def tcp(cls, host: str, port: int) -> Backend:
        """Plain TCP to HOST:PORT."""
        return cls(f"tcp:{_bracket(host)}:{port}")

    @classmethod
    def tls(cls, name: str, port: int, address: str | None = None) -> Backend:
        """TLS to ``address`` (default ``name``) on PORT, certificate verified for ``name``."""
        return cls(f"tls:{_bracket(address or name)}:{port}", tls_name=name)

    @classmethod
    def unix(cls, path: str) -> Backend:
        """A UNIX socket."""
        return cls(f"unix:{path}")

    @property
    def kind(self) -> str:
        """``tcp``, ``tls`` or ``unix``."""
        return self.description.partition(":")[0]

    @property
    def is_tls(self) -> bool:
        """True when the connection is wrapped in TLS."""
        return self.kind == "tls"

    def address(self) -> tuple[str, int]:
        """HOST and PORT of a ``tcp:``/``tls:`` description (brackets removed)."""
        rest = self.description.partition(":")[2]
        host, _, port = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host or not port.isdigit():
            raise ValueError(f"bad backend description {self.description!r}")
        return host, int(port)

    def default_host_header(self) -> bytes:
        """A ``Host`` value for clients that sent none."""
        if self.kind == "unix":
            return b"localhost"
        host, port = self.address()
        name = self.tls_name or host
        default = 443 if self.is_tls else 80
        text = _bracket(name) if port == default else f"{_bracket(name)}:{port}"
        return text.encode("idna") if not _is_ip(name) else text.encode("ascii")

    def endpoint(self, reactor: Any, timeout: float, trust: Any = None) -> Any:
        """The client endpoint for this backend."""
        kind = self.kind
        if kind == "unix":
            return UNIXClientEndpoint(reactor, self.description[5:], timeout=timeout)
        if kind not in ("tcp", "tls"):
            raise ValueError(f"unsupported backend {self.description!r}")
        host, port = self.address()
        base: Any
        if _is_ip(host):
            cls = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
            base = cls(reactor, host, port, timeout=timeout)
        else:
            base = HostnameEndpoint(reactor, host.encode("idna"), port, timeout=timeout)
        if kind == "tls":
            opts = optionsForClientTLS(self.tls_name or host, trustRoot=trust)
            return wrapClientTLS(opts, base)
        return base

    def __str__(self) -> str:
        return self.description + (f" (TLS name {self.tls_name})" if self.tls_name else "")


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


_HEAD, _BODY_LEN, _BODY_CHUNKED, _BODY_CLOSE, _IDLE, _TUNNEL, _DONE = range(7)


class BackendGone(Exception):
    """The backend connection ended before the response was complete."""


@implementer(IPushProducer)
class _BodySender:
    """Streams a request body from a file to the backend transport, pausing with it."""

    def __init__(self, f: BinaryIO, transport: Any, length: int, done: Callable[[], None]) -> None:
        self.f, self.transport, self.left, self.done = f, transport, length, done
        self.paused = False
        self.stopped = False

    def start(self) -> None:
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and not self.stopped:
            if self.left <= 0:
                self._finish()
                return
            chunk = self.f.read(min(_CHUNK, self.left))
            if not chunk:
                # spool shorter than announced: the backend would wait forever
                self.stopped = True
                self.transport.unregisterProducer()
                self.transport.loseConnection()
                return
            self.left -= len(chunk)
            self.transport.write(chunk)

    def stopProducing(self) -> None:
        self.stopped = True

    def _finish(self) -> None:
        self.stopped = True
        self.transport.unregisterProducer()
        self.done()


@implementer(IHalfCloseableProtocol)
class BackendProtocol(TwistedProtocol):
    """A lean HTTP/1.1 client connection: one exchange at a time, reusable when clean.

    The exchange (``sink``, a :class:`~dockerspaces.web.sink.ResponseSink`) receives
    the answer; in tunnel mode bytes go to ``tunnel`` (:meth:`hand_over`) instead.

    ``sink`` is set in the ``_HEAD`` and ``_BODY_*`` states (:meth:`send` sets it
    with the state) and ``tunnel`` in ``_TUNNEL``: the ``union-attr`` ignores below
    stand for those invariants, which mypy cannot see, rather than a check per read.
    """

    transport: Any

    def __init__(self, pool: ConnectionPool | None, backend: Backend):
        self.pool = pool
        self.backend = backend
        self.sink: ResponseSink | None = None  # the exchange being served
        self.state = _IDLE
        self.buf = b""
        self.left = 0
        self.keep_alive = True
        self.body_sent = True
        self.connected = False
        self.served = 0
        self.got_bytes = False
        self.paused = False
        self.head_request = False
        self.expect_upgrade = False
        self.tunnel: TunnelEnd | None = None
        self._decoder: Any = None
        self.on_lost: list[Deferred[None]] = []

    # transport events
    def connectionMade(self) -> None:
        """Connected: ready for :meth:`send`."""
        self.connected = True
        # read up to READ_SIZE per recv (Twisted's default is 64 KiB): fewer trips
        # through Python per megabyte of a large response
        if hasattr(self.transport, "bufferSize") and not hasattr(self.transport, "wrappedProtocol"):
            self.transport.bufferSize = READ_SIZE

    def send(self, sink: ResponseSink, head: bytes, body: BinaryIO | None, length: int) -> None:
        """Write a request (``length`` bytes of ``body`` after ``head``); the response
        goes to ``sink``."""
        self.sink = sink
        self.state = _HEAD
        self.buf = b""
        self.keep_alive = True
        self.got_bytes = False
        self.head_request = sink.request.method == b"HEAD"
        self.expect_upgrade = sink.upgrade is not None
        _write_head(self.transport, head)
        if length > 0 and body is not None:
            self.body_sent = False
            _BodySender(body, self.transport, length, self._body_done).start()
        else:
            self.body_sent = True

    def _body_done(self) -> None:
        self.body_sent = True
        if self.state == _IDLE and self.sink is None:
            self._release()

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the backend (a memoryview for the body bytes read with the head).

        Response body bytes go to ``sink.response_data`` as bytes or memoryview.
        """
        state = self.state
        if state == _BODY_LEN:
            left = self.left
            if len(data) < left:
                self.left = left - len(data)
                self.sink.response_data(data)  # type: ignore[union-attr]
                return
            self.left = 0
            if left:
                self.sink.response_data(  # type: ignore[union-attr]
                    data if len(data) == left else memoryview(data)[:left]
                )
            if len(data) > left:
                self.keep_alive = False
            self._complete()
            return
        if state == _TUNNEL:
            self.tunnel.dataReceived(data)  # type: ignore[union-attr]
            return
        if state == _BODY_CHUNKED:
            try:
                self._decoder.dataReceived(data)
            except Exception as e:  # noqa: BLE001 - any decoder error is a bad response
                self._fail(BadResponse(f"bad chunked encoding: {e}"))
            return
        if state == _BODY_CLOSE:
            self.sink.response_data(data)  # type: ignore[union-attr]
            return
        if state == _HEAD:
            self.got_bytes = True
            self.buf = self.buf + data if self.buf else data
            self._parse_head()
            return
        # bytes while idle: the connection is no longer in a known state
        self.keep_alive = False
        self.transport.loseConnection()

    def _parse_head(self) -> None:
        while self.state == _HEAD:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > _MAX_HEAD:
                    self._fail(BadResponse("response head too large"))
                return
            # the body bytes that came with the head: a view, not a copy (the first
            # read of a large response is mostly body)
            head, rest = buf[:end], memoryview(buf)[end + 4 :]
            self.buf = b""
            try:
                version, status, reason, headers, raw = parse_response_head(head)
            except BadResponse as e:
                self._fail(e)
                return
            if 100 <= status < 200:
                if status == 101 and self.expect_upgrade:
                    self.state = _TUNNEL
                    self.keep_alive = False
                    self.sink.response_upgraded(  # type: ignore[union-attr]
                        self, status, reason, headers, bytes(rest)
                    )
                    return
                if status == 101:
                    self._fail(BadResponse("101 Switching Protocols without an Upgrade request"))
                    return
                self.buf = bytes(rest)  # 100 Continue / 103 Early Hints: skip
                continue
            self._start_body(version, status, reason, headers, rest, raw)

    def _start_body(
        self,
        version: bytes,
        status: int,
        reason: bytes,
        headers: Headers,
        rest: memoryview,
        raw: bytes | None = None,
    ) -> None:
        grouped = group_headers(headers)
        length: int | None = None
        for v in grouped.get(b"content-length", ()):
            try:
                length = int(v.strip())
            except ValueError:
                self._fail(BadResponse(f"bad Content-Length {v!r}"))
                return
        conn = grouped.get(b"connection")
        if version != b"HTTP/1.1" or (conn is not None and b"close" in connection_tokens(conn)):
            self.keep_alive = False
        no_body = self.head_request or status in (204, 304)
        te = grouped.get(b"transfer-encoding")
        chunked = te is not None and b"chunked" in te[-1].lower()
        if chunked and grouped.pop(b"content-length", None) is not None:
            # a length beside chunked framing is not passed on (RFC 9112 6.3)
            headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
            raw = None
        # the whole answer came with its head (the common small response): no streaming,
        # so the exchange needs not register as the client's producer
        whole = no_body or (length is not None and not chunked and len(rest) == length)
        self.sink.response_head(  # type: ignore[union-attr]
            status, reason, grouped, headers, raw, whole=whole
        )
        if self.sink is None or self.state != _HEAD:
            return  # the exchange ended while handling the head
        if whole and not no_body:
            self.state = _BODY_LEN
            self.left = 0
            if length:
                self.sink.response_data(rest)
            if self.sink is not None:
                self._complete()
        elif no_body:
            if rest:
                self.keep_alive = False
            self._complete()
        elif chunked:
            self.state = _BODY_CHUNKED
            self._decoder = ChunkedDecoder(self._chunk_data, self._chunks_done)
            if rest:
                self.dataReceived(bytes(rest))
        elif length is not None:
            self.state = _BODY_LEN
            self.left = length
            if rest or length == 0:
                self.dataReceived(rest)  # type: ignore[arg-type]
        else:
            self.state = _BODY_CLOSE
            self.keep_alive = False
            if rest:
                self.sink.response_data(rest)

    def _chunk_data(self, data: bytes) -> None:
        if self.sink is not None:
            self.sink.response_data(data)

    def _chunks_done(self, extra: bytes) -> None:
        if extra:
            self.keep_alive = False
        self._complete()

    def _complete(self) -> None:
        sink = self.sink
        self.state = _IDLE
        self._decoder = None
        self.sink = None
        self.served += 1
        # the response may end while the client had us paused: an idle connection
        # must read (to notice the backend closing it, and to get the next response)
        self.resume()
        if sink is not None:
            sink.response_done()
        if self.body_sent:
            self._release()

    def _release(self) -> None:
        if self.keep_alive and self.pool is not None and self.connected:
            self.pool.put(self)
        else:
            self.transport.loseConnection()

    def _fail(self, exc: Exception) -> None:
        sink, self.sink = self.sink, None
        self.state = _DONE
        self.keep_alive = False
        self.transport.loseConnection()
        if sink is not None:
            sink.backend_failed(Failure(exc), self)

    def hand_over(self, end: TunnelEnd) -> None:
        """After a ``101``: the backend's bytes and close events go to ``end`` (the
        tunnel's splice) from now on."""
        self.tunnel = end

    def abort(self) -> None:
        """Drop the connection now (the client went away); never back to the pool."""
        self.sink = None
        self.keep_alive = False
        self.state = _DONE
        if self.connected:
            self.transport.abortConnection()

    def pause(self) -> None:
        """Stop reading from the backend (client is slow)."""
        if self.connected and not self.paused:
            self.paused = True
            self.transport.pauseProducing()

    def resume(self) -> None:
        """Read from the backend again."""
        if self.connected and self.paused:
            self.paused = False
            self.transport.resumeProducing()

    def readConnectionLost(self) -> None:  # IHalfCloseableProtocol (tunnel use)
        """The backend closed its side: passed on in a tunnel, else the connection closes."""
        if self.state == _TUNNEL:
            self.tunnel.readConnectionLost()  # type: ignore[union-attr]
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # IHalfCloseableProtocol (tunnel use)
        """Our side was closed for writing (a tunnel's half-close)."""
        if self.state == _TUNNEL:
            self.tunnel.writeConnectionLost()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        """Gone: out of the pool; an answer in progress ends (close-delimited) or fails."""
        self.connected = False
        if self.pool is not None:
            self.pool.forget(self)
        waiters, self.on_lost = self.on_lost, []
        for d in waiters:
            d.callback(None)
        state, self.state = self.state, _DONE
        if state == _TUNNEL:
            self.tunnel.connectionLost(reason)  # type: ignore[union-attr]
            return
        sink, self.sink = self.sink, None
        if sink is None:
            return
        reset = reason is not None and not reason.check(ConnectionDone)
        if state == _BODY_CLOSE and not reset:
            # a close-delimited body ends with the backend's FIN -- as does a killed
            # container's connection: the sink tells them apart
            sink.response_closed(self)
        else:
            sink.backend_failed(Failure(BackendGone(reason_text(reason))), self)


def reason_text(reason: Failure | BaseException | None) -> str:
    """A short text for why a connection ended or failed (for messages and logs)."""
    if isinstance(reason, Failure):
        reason = reason.value
    if reason is None:
        return "connection closed"
    text = str(reason).strip()
    return text or type(reason).__name__


# -- the pool ------------------------------------------------------------------------


@define
class ConnectionPool:
    """Idle persistent connections per backend (at most ``size`` each)."""

    size: int
    idle: dict[Backend, list[BackendProtocol]] = field(factory=dict)

    def take(self, backend: Backend) -> BackendProtocol | None:
        """An idle connection to ``backend`` still connected, or None."""
        conns = self.idle.get(backend)
        while conns:
            p = conns.pop()
            if p.connected:
                return p
        return None

    def put(self, p: BackendProtocol) -> None:
        """Keep ``p`` idle for the next request (closed when the pool is full)."""
        conns = self.idle.setdefault(p.backend, [])
        if len(conns) >= self.size:
            p.transport.loseConnection()
            return
        conns.append(p)

    def forget(self, p: BackendProtocol) -> None:
        """Take ``p`` out of the pool (it is closing)."""
        conns = self.idle.get(p.backend)
        if conns and p in conns:
            conns.remove(p)
            if not conns:
                del self.idle[p.backend]

    def count(self) -> int:
        """Idle connections, all backends together."""
        return sum(len(c) for c in self.idle.values())


class BackendFactory(Factory):
    """Builds the :class:`BackendProtocol` of one connection to ``backend``."""

    noisy = False  # one connection per backend request: no start/stop log lines

    def __init__(self, pool: ConnectionPool | None, backend: Backend):
        self.pool, self.backend = pool, backend

    def buildProtocol(self, addr: Any) -> BackendProtocol:
        """A protocol for this backend, returning to ``pool`` when idle."""
        return BackendProtocol(self.pool, self.backend)


class ClientEndpoint(Protocol):
    """What the proxy needs of a backend's client endpoint (a Twisted
    ``IStreamClientEndpoint``, or a test's double)."""

    def connect(self, factory: BackendFactory, /) -> Deferred[BackendProtocol]:
        """Connect, building the connection's protocol with ``factory``."""
        ...
