"""The streaming reverse proxy: one request from a twisted.web ``Request`` to a backend.

:class:`Proxy` forwards a request over a pooled, persistent HTTP/1.1 connection with a
lean client protocol of its own (:class:`BackendProtocol`) rather than
``twisted.web.client.Agent``: per request it costs a few method calls, no Deferreds
once a pooled connection exists, and it gives direct control over the backend
transport (pause/resume for back-pressure, abort on client disconnect, ``101`` for
Upgrade tunnelling, see :mod:`dockerspaces.web.tunnel`).

- request bodies are streamed from twisted.web's spool (``request.content``, a file)
  with a push producer on the backend transport, never read into one bytes object;
- responses are streamed: the exchange is registered as the producer of the client
  request, so a paused client transport pauses the backend transport;
- large body chunks for a plain TCP client are sent straight to its socket
  (:func:`send_now`, one ``sendmsg`` with the queued head) rather than queued for the
  next reactor iteration and joined there; an unsent tail stays in the transport's
  buffer as a view and the backend is paused until it drains;
- hop-by-hop headers and those named in ``Connection`` are dropped both ways, repeated
  headers kept, ``X-Forwarded-*`` added, ``Location`` rewritten under the route prefix;
- ``on_end`` fires exactly once per :meth:`Proxy.forward` with an :class:`ExchangeEnd`.

Tested with Twisted 26.10 (the tunnel takeover touches ``HTTPChannel`` internals).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any

from attrs import define, field, frozen
from twisted.internet import error as ierror
from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    UNIXClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import (
    IHalfCloseableProtocol,
    IPushProducer,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES, _ChunkedTransferDecoder
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer  # type: ignore[import-untyped]

from . import routing
from .errors import finish_error
from .site import TOKEN, http_date, on_lost

log = Logger()

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# request headers we always set ourselves (the client's are dropped or merged)
_OWN_REQUEST = frozenset(
    {
        b"host",
        b"content-length",
        b"expect",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
        b"x-forwarded-prefix",
    }
)
_DROP_REQUEST = HOP_BY_HOP | _OWN_REQUEST
_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_MAX_HEAD = 64 * 1024
_CHUNK = 64 * 1024
READ_SIZE = 512 * 1024
_DIRECT_MIN = 16 * 1024  # smaller body writes take twisted.web's ordinary path

Headers = list[tuple[bytes, bytes]]


@frozen
class ExchangeEnd:
    """How one forwarded exchange ended (passed to ``on_end`` exactly once).

    ``reason`` is ``finished``, ``client-gone``, ``backend-error``, ``tunnel-closed``
    or ``refused``; ``status`` the status sent to the client (None if none was);
    ``bytes_out`` the response body bytes written to the client (tunnel: bytes
    from the backend to the client).
    """

    reason: str
    status: int | None
    bytes_out: int


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


# -- headers -------------------------------------------------------------------------


def connection_tokens(values: Sequence[bytes]) -> AbstractSet[bytes]:
    """Lower-cased tokens of ``Connection`` header values (a set not to be changed)."""
    if len(values) == 1:
        known = _COMMON_TOKENS.get(values[0])
        if known is not None:
            return known
    out: set[bytes] = set()
    for v in values:
        known = _COMMON_TOKENS.get(v)
        if known is not None:
            out |= known
            continue
        for t in v.split(b","):
            t = t.strip().lower()
            if t:
                out.add(t)
    return out


# the Connection values nearly every request and response carries
_COMMON_TOKENS = {
    v: frozenset({v.lower()}) for v in (b"keep-alive", b"Keep-Alive", b"close", b"Close",
                                        b"upgrade", b"Upgrade")
}


def drop_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> Headers:
    """Drop hop-by-hop headers and those named in ``Connection``; keep order and repeats.
    One pass; a second only when ``Connection`` names something beyond the hop-by-hop
    set (``keep-alive``/``close``/``upgrade`` do not)."""
    kept: Headers = []
    named: AbstractSet[bytes] | None = None
    for k, v in headers:
        lk = k.lower()
        if lk in HOP_BY_HOP:
            if lk == b"connection":
                tokens = connection_tokens((v,))
                named = tokens if named is None else named | tokens
            continue
        kept.append((k, v))
    if named:
        named -= HOP_BY_HOP
        if named:
            kept = [(k, v) for k, v in kept if k.lower() not in named]
    return kept


@define
class ClientHead:
    """What the proxy needs of the client's request headers, read in one pass:
    the header lines to send on (``kept``, each ending in CRLF), ``Host``,
    ``X-Forwarded-For``, whether a body is announced, the ``Upgrade`` asked for."""

    kept: bytes
    host: bytes | None
    xff: list[bytes]
    has_body: bool
    upgrade: bytes | None


def read_client_head(request: Request) -> ClientHead:
    """One pass over the client's request headers (see :class:`ClientHead`): hop-by-hop
    headers, those named in ``Connection`` and those the proxy sets itself are left
    out of ``kept``."""
    host: bytes | None = None
    xff: list[bytes] = []
    named: AbstractSet[bytes] | None = None
    upgrade: list[bytes] = []
    has_body = False
    kept: list[tuple[bytes, bytes]] = []
    for k, values in request.requestHeaders.getAllRawHeaders():
        lk = k.lower()
        if lk in _DROP_REQUEST:
            if lk == b"host":
                host = values[0]
            elif lk == b"x-forwarded-for":
                xff += values
            elif lk == b"connection":
                tokens = connection_tokens(values)
                named = tokens if named is None else named | tokens
            elif lk == b"upgrade":
                upgrade += values
            elif lk == b"content-length" or lk == b"transfer-encoding":
                has_body = True
            continue
        for v in values:
            kept.append((lk, b"%s: %s\r\n" % (k, v)))
    if named:
        wants = upgrade[0] if upgrade and b"upgrade" in named else None
        named -= _DROP_REQUEST
        if named:
            kept = [item for item in kept if item[0] not in named]
    else:
        wants = None
    return ClientHead(b"".join([line for _, line in kept]), host, xff, has_body, wants)


def _client_ip(request: Request) -> bytes | None:
    addr = request.getClientAddress()
    host = getattr(addr, "host", None)
    return host.encode("ascii") if isinstance(host, str) else None


def request_head(
    request: Request,
    head: ClientHead,
    path: bytes,
    *,
    prefix: bytes,
    host_header: bytes | None,
    backend: Backend,
    body_length: int | None,
    upgrade: bytes | None = None,
) -> bytes:
    """The request head sent to the backend (request line + headers + blank line);
    ``head`` is the client's (:func:`read_client_head`)."""
    host = host_header or head.host or backend.default_host_header()
    out = [request.method, b" ", path or b"/", b" HTTP/1.1\r\nHost: ", host, b"\r\n", head.kept]
    xff = head.xff
    ip = _client_ip(request)
    if ip is not None:
        xff = [*xff, ip]
    if xff:
        out += [b"X-Forwarded-For: ", b", ".join(xff), b"\r\n"]
    if head.host is not None:
        out += [b"X-Forwarded-Host: ", head.host, b"\r\n"]
    out += [b"X-Forwarded-Proto: ", b"https" if request.isSecure() else b"http", b"\r\n"]
    if prefix:
        out += [b"X-Forwarded-Prefix: ", prefix, b"\r\n"]
    if body_length is not None:
        out += [b"Content-Length: %d\r\n" % body_length]
    if upgrade is not None:
        out += [b"Connection: Upgrade\r\nUpgrade: ", upgrade, b"\r\n"]
    out.append(b"\r\n")
    return b"".join(out)


def rewrite_location(value: bytes, *, prefix: bytes, backend_host: bytes) -> bytes:
    """``Location`` under the route prefix: root-relative, or on the backend's own origin.

    ``backend_host`` is the ``Host`` sent to the backend. A value already under the
    prefix (a backend honouring ``X-Forwarded-Prefix``) is left alone, as is any
    other origin.
    """
    if not prefix:
        prefix = b""
    path: bytes | None = None
    if value.startswith(b"/") and not value.startswith(b"//"):
        path = value
    else:
        low = value.lower()
        for scheme in (b"http://", b"https://"):
            if low.startswith(scheme):
                rest = value[len(scheme) :]
                cut = min((i for i in (rest.find(b"/"), rest.find(b"?"), rest.find(b"#")) if i >= 0),
                          default=len(rest))
                authority, path_part = rest[:cut], rest[cut:]
                if authority.lower() == backend_host.lower() or (
                    scheme == b"http://" and authority.lower() == backend_host.lower() + b":80"
                ) or (
                    scheme == b"https://" and authority.lower() == backend_host.lower() + b":443"
                ):
                    path = path_part if path_part.startswith(b"/") else b"/" + path_part
                break
    if path is None:
        return value
    if prefix and (path == prefix or path.startswith((prefix + b"/", prefix + b"?"))):
        return path
    return prefix + path


# -- the backend client protocol -----------------------------------------------------

_HEAD, _BODY_LEN, _BODY_CHUNKED, _BODY_CLOSE, _IDLE, _TUNNEL, _DONE = range(7)


class BackendGone(Exception):
    """The backend connection ended before the response was complete."""


class BadResponse(Exception):
    """The backend sent something that is not an HTTP/1.x response."""


@implementer(IPushProducer)
class _BodySender:
    """Streams a request body from a file to the backend transport, pausing with it."""

    def __init__(self, f: Any, transport: Any, length: int, done: Callable[[], None]) -> None:
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
class BackendProtocol(Protocol):
    """A lean HTTP/1.1 client connection: one exchange at a time, reusable when clean.

    The exchange (``sink``) receives ``response_head``, ``response_data``,
    ``response_done`` and ``backend_failed`` calls; in tunnel mode bytes go to
    ``tunnel`` instead.
    """

    transport: Any

    def __init__(self, pool: _Pool | None, backend: Backend):
        self.pool = pool
        self.backend = backend
        self.sink: Any = None  # the _Exchange being served
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
        self.tunnel: Any = None
        self._decoder: Any = None
        self.on_lost: list[Deferred[None]] = []

    # transport events
    def connectionMade(self) -> None:
        self.connected = True
        # read up to READ_SIZE per recv (Twisted's default is 64 KiB): fewer trips
        # through Python per megabyte of a large response
        if hasattr(self.transport, "bufferSize") and not hasattr(self.transport, "wrappedProtocol"):
            self.transport.bufferSize = READ_SIZE

    def send(self, sink: _Exchange, head: bytes, body: Any, length: int) -> None:
        """Write a request; the response goes to ``sink``."""
        self.sink = sink
        self.state = _HEAD
        self.buf = b""
        self.keep_alive = True
        self.got_bytes = False
        self.head_request = sink.request.method == b"HEAD"
        self.expect_upgrade = sink.upgrade is not None
        write_now(self.transport, head)
        if length > 0:
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
                self.sink.response_data(data)
                return
            self.left = 0
            if left:
                self.sink.response_data(data if len(data) == left else memoryview(data)[:left])
            if len(data) > left:
                self.keep_alive = False
            self._complete()
            return
        if state == _TUNNEL:
            self.tunnel.dataReceived(data)
            return
        if state == _BODY_CHUNKED:
            try:
                self._decoder.dataReceived(data)
            except Exception as e:  # noqa: BLE001 - any decoder error is a bad response
                self._fail(BadResponse(f"bad chunked encoding: {e}"))
            return
        if state == _BODY_CLOSE:
            self.sink.response_data(data)
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
                version, status, reason, headers, raw = _parse_response_head(head)
            except BadResponse as e:
                self._fail(e)
                return
            if 100 <= status < 200:
                if status == 101 and self.expect_upgrade:
                    self.state = _TUNNEL
                    self.keep_alive = False
                    self.sink.response_upgraded(self, status, reason, headers, bytes(rest))
                    return
                if status == 101:
                    self._fail(BadResponse("101 Switching Protocols without an Upgrade request"))
                    return
                self.buf = bytes(rest)  # 100 Continue / 103 Early Hints: skip
                continue
            self._start_body(version, status, reason, headers, rest, raw)

    def _start_body(
        self, version: bytes, status: int, reason: bytes, headers: Headers, rest: memoryview,
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
        self.sink.response_head(status, reason, grouped, headers, raw, whole=whole)
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
            self._decoder = _ChunkedTransferDecoder(self._chunk_data, self._chunks_done)
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
        if self.state == _TUNNEL:
            self.tunnel.readConnectionLost()
        else:
            self.transport.loseConnection()

    def writeConnectionLost(self) -> None:  # IHalfCloseableProtocol (tunnel use)
        if self.state == _TUNNEL:
            self.tunnel.writeConnectionLost()

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        self.connected = False
        if self.pool is not None:
            self.pool.forget(self)
        waiters, self.on_lost = self.on_lost, []
        for d in waiters:
            d.callback(None)
        state, self.state = self.state, _DONE
        if state == _TUNNEL:
            self.tunnel.connectionLost(reason)
            return
        sink, self.sink = self.sink, None
        if sink is None:
            return
        if state == _BODY_CLOSE:
            sink.response_done()
        else:
            sink.backend_failed(Failure(BackendGone(_reason_text(reason))), self)


def is_plain_tcp(transport: Any) -> bool:
    """True for Twisted's own TCP transport without TLS (:func:`send_now` may be used)."""
    return isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False)


def can_send_now(t: Any) -> bool:
    """True when :func:`send_now` may write on ``t`` (a :func:`is_plain_tcp` transport):
    connected, not closing, and Twisted's own buffer drained (no earlier send pending).
    """
    return bool(
        t.connected
        and not t.disconnecting
        and not t._writeDisconnecting
        and not t._writeDisconnected
        and t.offset >= len(t.dataBuffer)
    )


def send_now(t: Any, data: bytes | memoryview) -> bool:
    """Send ``data`` on the TCP transport ``t`` now, after what it has queued but not
    yet tried to send; True when the kernel took it all. Only when :func:`can_send_now`.

    Twisted's ``write`` queues every piece until the next reactor iteration and then
    joins the pieces into one bytes object (a copy of each large response chunk);
    this sends the queued pieces and ``data`` in one ``sendmsg`` and leaves only the
    unsent tail — a view into ``data``, not a copy — in the transport's buffer, for
    its ``doWrite`` to send when the socket is writable (touches ``FileDescriptor``
    internals: ``dataBuffer``, ``offset``, ``_tempDataBuffer``, ``_tempDataLen``).
    """
    pending: list[bytes] = t._tempDataBuffer
    queued = t._tempDataLen
    try:
        sent = t.socket.sendmsg([*pending, data]) if pending else t.socket.send(data)
    except OSError:
        # would block, or the connection broke: doWrite meets the error and
        # closes the transport the usual way
        sent = 0
    t._tempDataBuffer = []
    t._tempDataLen = 0
    t.offset = 0
    if sent >= queued + len(data):
        t.dataBuffer = b""
        return True
    if sent >= queued:
        t.dataBuffer = memoryview(data)[sent - queued :]
    else:  # not even the queued head went out (rare): one copy
        t.dataBuffer = b"".join([*pending, data])[sent:]
    t.startWriting()
    return False


def _idle_producer(t: Any) -> bool:
    # what FileDescriptor.doWrite would do once the buffer is empty: nothing, unless a
    # producer waits to be resumed (paused by the buffer, or a pull producer)
    return t.producer is None or (t.streamingProducer and not t.producerPaused)


def write_now(t: Any, data: bytes) -> None:
    """``t.write(data)``, sent at once when ``t`` is plain TCP with nothing queued.

    Twisted's ``write`` queues and registers the socket for writing; the bytes go out
    on the next reactor iteration, one more epoll wake-up and ``doWrite`` per request
    head sent to a backend. What the kernel does not take now is queued as usual.
    """
    if not (is_plain_tcp(t) and can_send_now(t) and not t._tempDataLen and _idle_producer(t)):
        t.write(data)
        return
    try:
        sent = t.socket.send(data)
    except OSError:
        sent = 0  # would block, or broken: the ordinary path finds out
    if sent < len(data):
        t.write(data[sent:])


def send_all_now(t: Any, pieces: list[bytes]) -> None:
    """Send ``pieces`` on the plain TCP transport ``t`` with one ``sendmsg`` (only when
    :func:`can_send_now`, with nothing queued and no producer waiting); what the kernel
    does not take is queued with ``t.write`` as usual."""
    try:
        sent = t.socket.sendmsg(pieces)
    except OSError:
        sent = 0  # would block, or broken: the ordinary path finds out
    if sent < sum(map(len, pieces)):
        t.write(b"".join(pieces)[sent:])


def flush_now(t: Any) -> None:
    """Send what the plain TCP transport ``t`` has queued now, not on its next writable
    event (a finished small response: saves the reactor a wake-up and a ``doWrite``)."""
    if (
        t._tempDataLen
        and can_send_now(t)
        and _idle_producer(t)
        and send_now(t, b"")
    ):
        t.stopWriting()


def _reason_text(reason: Failure | BaseException | None) -> str:
    if isinstance(reason, Failure):
        reason = reason.value
    if reason is None:
        return "connection closed"
    text = str(reason).strip()
    return text or type(reason).__name__


#: One ``token ":" value`` line with no byte in the value that ``bytes.strip`` would
#: remove but SP/HTAB, the value without the SP/HTAB at its edges; anchored at line
#: starts. A header block is plain (parsed by this one regex, passed on as received)
#: when each of its CRLFs ends a matched line and it has no bare CR or LF. No lazy
#: quantifier: ``[^\r\n]*?`` retried the rest of the pattern at every byte.
_PLAIN_LINE = re.compile(
    rb"(?m)^(" + TOKEN + rb"):[ \t]*((?:[^\r\n\x0b\x0c]*[^ \t\r\n\x0b\x0c])?)[ \t]*\r\n"
)
_TOKEN = re.compile(TOKEN)


def drop_lines(block: bytes, names: AbstractSet[bytes]) -> bytes:
    """``block`` (header lines, each ending in CRLF) without the lines whose lower-cased
    name is in ``names`` (found with ``bytes.find`` in a lower-cased copy: a
    case-insensitive regex over the block cost twice as much)."""
    low = b"\n" + block.lower()  # low[i + 1] is block[i]; every line starts after a LF
    cuts = []
    for name in names:
        needle = b"\n" + name + b":"
        i = low.find(needle)
        while i >= 0:
            j = low.find(b"\n", i + 1)  # the line's own LF is block[j - 1]
            if j < 0:
                j = len(low)
            cuts.append((i, j))
            i = low.find(needle, j - 1)
    if not cuts:
        return block
    if len(cuts) == 1:
        i, j = cuts[0]
        return block[:i] + block[j:]
    cuts.sort()
    out = []
    pos = 0
    for i, j in cuts:
        out.append(block[pos:i])
        pos = j
    out.append(block[pos:])
    return b"".join(out)


def _parse_response_head(head: bytes) -> tuple[bytes, int, bytes, Headers, bytes | None]:
    """Status line and header lines (``head`` without its blank line) of a response,
    and the header block as received when it is plain enough to pass on as it is."""
    status_line, sep, block = head.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise BadResponse(f"not an HTTP/1.x response: {status_line[:80]!r}")
    try:
        status = int(parts[1])
    except ValueError:
        raise BadResponse(f"bad status line {status_line[:80]!r}") from None
    if not 100 <= status <= 999:
        raise BadResponse(f"bad status {status}")
    reason = parts[2] if len(parts) > 2 else b""
    if not sep:
        return parts[0], status, reason, [], b""
    block += b"\r\n"
    headers = _PLAIN_LINE.findall(block)
    n = block.count(b"\r\n")
    if len(headers) == n and block.count(b"\n") == n and block.count(b"\r") == n:
        return parts[0], status, reason, headers, block
    return parts[0], status, reason, parse_header_lines(block), None


def parse_header_lines(block: bytes) -> Headers:
    """Header lines (each ending in CRLF), one at a time: folded continuation lines
    joined, names with whitespace at their edges refused, values stripped. What may
    not be sent on is dropped: a header whose name is not a token; CR or LF inside a
    value becomes a space."""
    headers: Headers = []
    for line in block[:-2].split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and headers:
            k, v = headers[-1]
            headers[-1] = (k, v + b" " + line.strip())
            continue
        k, sep, v = line.partition(b":")
        if not sep or not k or k != k.strip():
            raise BadResponse(f"bad header line {line[:80]!r}")
        headers.append((k, v.strip()))
    return [
        (k, b" ".join(v.splitlines()) if b"\r" in v or b"\n" in v else v)
        for k, v in headers
        if _TOKEN.fullmatch(k) is not None
    ]


def group_headers(headers: Headers) -> dict[bytes, list[bytes]]:
    """Header values per lower-cased name, in order (repeats kept, any spelling)."""
    grouped = {k.lower(): [v] for k, v in headers}
    if len(grouped) == len(headers):  # no name twice: done in one comprehension
        return grouped
    grouped = {}
    for k, v in headers:
        lk = k.lower()
        values = grouped.get(lk)
        if values is None:
            grouped[lk] = [v]
        else:
            values.append(v)
    return grouped


# -- the pool ------------------------------------------------------------------------


@define
class _Pool:
    """Idle persistent connections per backend (at most ``size`` each)."""

    size: int
    idle: dict[Backend, list[BackendProtocol]] = field(factory=dict)

    def take(self, backend: Backend) -> BackendProtocol | None:
        conns = self.idle.get(backend)
        while conns:
            p = conns.pop()
            if p.connected:
                return p
        return None

    def put(self, p: BackendProtocol) -> None:
        conns = self.idle.setdefault(p.backend, [])
        if len(conns) >= self.size:
            p.transport.loseConnection()
            return
        conns.append(p)

    def forget(self, p: BackendProtocol) -> None:
        conns = self.idle.get(p.backend)
        if conns and p in conns:
            conns.remove(p)
            if not conns:
                del self.idle[p.backend]

    def count(self) -> int:
        return sum(len(c) for c in self.idle.values())


class _BackendFactory(Factory):
    noisy = False  # one connection per backend request: no start/stop log lines

    def __init__(self, pool: _Pool | None, backend: Backend):
        self.pool, self.backend = pool, backend

    def buildProtocol(self, addr: Any) -> BackendProtocol:
        return BackendProtocol(self.pool, self.backend)


# -- one exchange --------------------------------------------------------------------


@implementer(IPushProducer)
class _Exchange:
    """One forwarded request: connects, sends, streams the answer, reports the end."""

    # state every exchange starts with (class-level: set on the instance when it changes)
    conn: BackendProtocol | None = None
    bytes_out = 0
    status: int | None = None
    ended = False
    paused = False
    producing = False
    retried = False
    connecting: Deferred[Any] | None = None
    direct: Any = None  # the client's tcp.Connection, when plain TCP
    head_lines: list[bytes] = []  # noqa: RUF012 - replaced, never mutated: the backend's header lines
    head_names: AbstractSet[bytes] = frozenset()  # their lower-cased names

    def __init__(
        self,
        proxy: Proxy,
        request: Request,
        backend: Backend,
        path: bytes,
        prefix: bytes,
        host_header: bytes | None,
        on_end: Callable[[ExchangeEnd], None] | None,
        set_route_cookie: str | None,
    ):
        self.proxy = proxy
        self.request = request
        self.backend = backend
        self.prefix = prefix
        self.on_end = on_end
        self.route_cookie = set_route_cookie
        head = read_client_head(request)
        self.upgrade = head.upgrade
        content = request.content
        length = 0
        if content is not None:
            content.seek(0, 2)
            length = content.tell()
            content.seek(0, 0)
        self.body, self.length = content, length
        has_body = length > 0 or head.has_body
        self.backend_host = host_header or head.host or backend.default_host_header()
        self.head = request_head(
            request,
            head,
            path,
            prefix=prefix,
            host_header=host_header,
            backend=backend,
            body_length=length if has_body else None,
            upgrade=self.upgrade,
        )

    # -- start ---------------------------------------------------------------------
    def start(self) -> None:
        request = self.request
        on_lost(request, self._client_gone)
        request.defaultContentType = None
        # let the client transport hold one backend read before it pauses us
        transport: Any = request.channel.transport if request.channel is not None else None
        if getattr(transport, "bufferSize", READ_SIZE) < READ_SIZE and not hasattr(
            transport, "wrappedProtocol"
        ):
            transport.bufferSize = READ_SIZE
        # a plain TCP client connection: body bytes can go straight to its socket
        self.direct = transport if is_plain_tcp(transport) else None
        conn = None if self.upgrade is not None else self.proxy._pool.take(self.backend)
        if conn is not None:
            self._send(conn)
            return
        self._connect()

    def _connect(self) -> None:
        proxy = self.proxy
        pool = None if self.upgrade is not None else proxy._pool
        try:
            ep = proxy._endpoint_for(self.backend)
        except Exception as e:  # noqa: BLE001 - a bad description is a 502, not a crash
            self._error(502, f"cannot reach backend {self.backend}: {e}", "backend-error")
            return
        d = ep.connect(_BackendFactory(pool, self.backend))
        d.addTimeout(proxy.connect_timeout, proxy.reactor)
        self.connecting = d
        d.addCallbacks(self._connected, self._connect_failed)

    def _connected(self, conn: BackendProtocol) -> None:
        self.connecting = None
        if self.ended:
            conn.transport.loseConnection()
            return
        self._send(conn)

    def _connect_failed(self, f: Failure) -> None:
        self.connecting = None
        if self.ended:
            return
        b = self.backend
        if f.check(CancelledError, ierror.TimeoutError, DeferTimeoutError):
            msg = (
                f"backend {b} did not accept a connection within "
                f"{self.proxy.connect_timeout:g} s"
            )
            reason = "backend-error"
        elif f.check(ierror.ConnectionRefusedError, ierror.ConnectError):
            msg = f"backend {b} refused the connection ({_reason_text(f)})"
            reason = "refused"
        else:
            msg = f"cannot connect to backend {b}: {_reason_text(f)}"
            reason = "backend-error"
        self._error(502, msg, reason)

    def _send(self, conn: BackendProtocol) -> None:
        self.conn = conn
        if self.body is not None:
            self.body.seek(0, 0)
        conn.send(self, self.head, self.body, self.length)

    # -- backend events ------------------------------------------------------------
    def response_head(
        self, status: int, reason: bytes, grouped: dict[bytes, list[bytes]], headers: Headers,
        raw: bytes | None = None, whole: bool = False,
    ) -> None:
        """The backend's head (``headers`` as sent, ``grouped`` by lower-cased name;
        ``raw``, the header block as received when plain) is made the client's: its
        header lines are prepared here, in the backend's order and spelling, and sent
        with the first body bytes (or now, for a streamed answer) by
        :meth:`_write_head`."""
        request = self.request
        self.status = status
        request.setResponseCode(status, reason or None)
        conn = grouped.get(b"connection")
        drop = HOP_BY_HOP
        if conn is not None:
            tokens = connection_tokens(conn)
            if not tokens <= HOP_BY_HOP:
                drop = HOP_BY_HOP | tokens
        cors = self.proxy.cors
        if cors:  # ours replace the backend's
            drop = drop | {lk for lk in grouped if lk.startswith(b"access-control-")}
        if raw is not None and not cors and len(drop) == len(HOP_BY_HOP) and (
            b"location" not in grouped
        ):
            # nothing to rewrite, only the standard hop-by-hop lines to leave out:
            # the block as received, less those lines
            hop = grouped.keys() & HOP_BY_HOP
            lines = [drop_lines(raw, hop) if hop else raw]
        else:
            if b"location" in grouped:
                headers = [
                    (k, rewrite_location(v, prefix=self.prefix, backend_host=self.backend_host))
                    if k.lower() == b"location" else (k, v)
                    for k, v in headers
                ]
            lines = [b"%s: %s\r\n" % kv for kv in headers if kv[0].lower() not in drop]
        content_type = grouped.get(b"content-type")
        if (content_type is not None and self.route_cookie
                and content_type[-1][:9].lower() == b"text/html"):
            lines.append(b"Set-Cookie: %s\r\n"
                         % routing.route_cookie_header(self.route_cookie))
        if cors:
            routing.cors_headers(request)  # onto responseHeaders, sent with the head
        self.head_lines = lines
        self.head_names = grouped.keys() - drop
        if not self.ended and not whole:  # (a whole answer is written out at once)
            request.registerProducer(self, True)
            self.producing = True
            if b"content-length" not in self.head_names and request.method != b"HEAD":
                # A streamed answer (chunked or close-delimited: SSE, long polls,
                # ``docker wait``/``events``/``logs -f``) may send its first body byte
                # much later: the client must see the head now, not with that byte.
                self._write_head()

    def _write_head(self) -> None:
        """Send the response head: what twisted.web's ``Request.write`` does the first
        time, without copying every backend header into ``responseHeaders`` (which
        canonicalizes and sanitizes each name and value again)."""
        self.request.channel.writeSequence(self._head_out())

    def _head_out(self) -> list[bytes]:
        """The response head's pieces (see :meth:`_write_head`); the request is marked
        as having started writing."""
        request = self.request
        request.startedWriting = 1
        version = request.clientproto
        code = request.code
        out = [version, b" %d " % code, request.code_message, b"\r\n"]
        kept = self.head_names
        have_length = b"content-length" in kept
        have_date = b"date" in kept
        # what twisted.web and we set on the request (Connection: close, CORS); the
        # backend's own headers of the same name win, no Server/Date of ours
        for name, values in request.responseHeaders.getAllRawHeaders():
            lk = name.lower()
            if lk in kept or lk == b"server" or lk == b"date":
                continue
            have_length = have_length or lk == b"content-length"
            for v in values:
                out += (name, b": ", v, b"\r\n")
        out += self.head_lines
        if not have_date:  # RFC 9110 6.6.1: a forwarded response without Date gets one
            out += (b"Date: ", http_date(), b"\r\n")
        no_body = request.method == b"HEAD" or code in NO_BODY_CODES
        if version == b"HTTP/1.1" and not have_length and not no_body:
            out.append(b"Transfer-Encoding: chunked\r\n")
            request.chunked = 1
        for cookie in request.cookies:
            out += (b"Set-Cookie: ", cookie, b"\r\n")
        out.append(b"\r\n")
        if no_body:  # as twisted.web does: nothing of a body goes out
            request.write = lambda data: None  # type: ignore[method-assign]
        return out

    def response_data(self, data: bytes | memoryview) -> None:
        if self.ended:
            return
        self.bytes_out += len(data)
        request = self.request
        if not request.startedWriting:
            out = self._head_out()
            t = self.direct
            if (
                not self.producing  # a whole answer: head and body in one send
                and t is not None
                and not request.chunked
                and request.method != b"HEAD"
                and can_send_now(t)
                and not t._tempDataLen
                and _idle_producer(t)
            ):
                # Twisted's write would register the socket for writing and our flush
                # at the end take it off again: two epoll_ctl calls per small answer
                request.sentLength += len(data)
                out.append(data)  # type: ignore[arg-type]
                send_all_now(t, out)
                return
            request.channel.writeSequence(out)  # sent with the data
        self._write(data)

    def response_done(self) -> None:
        if self.ended:
            return
        self.conn = None
        request = self.request
        self._unregister()
        if self.status is None:
            # close-delimited body with no head cannot happen; be safe
            self._error(502, f"backend {self.backend} sent no response", "backend-error")
            return
        self._end("finished")
        if not request.startedWriting and not request._disconnected:
            self._write_head()
        request.finish()
        if self.direct is not None:
            flush_now(self.direct)

    def backend_failed(self, f: Failure, conn: BackendProtocol) -> None:
        if self.ended:
            return
        self.conn = None
        if (
            self.status is None
            and conn.served > 0
            and not conn.got_bytes
            and not self.retried
            and self.request.method in _IDEMPOTENT
        ):
            # a reused connection the backend had closed: try once on a fresh one
            self.retried = True
            self._connect()
            return
        msg = f"backend {self.backend} failed: {_reason_text(f)}"
        if self.status is None or not self.request.startedWriting:
            # nothing sent yet (a sized head waits for its body): still a clean 502
            self._error(502, msg, "backend-error")
            return
        # headers are out: cut the response short so the client sees the truncation
        self._unregister()
        self._end("backend-error")
        request = self.request
        if request.channel is not None:
            request.channel.loseConnection()

    def response_upgraded(
        self, conn: BackendProtocol, status: int, reason: bytes, headers: Headers, rest: bytes
    ) -> None:
        from .tunnel import start_tunnel

        self.status = status
        self.conn = None
        start_tunnel(self, conn, status, reason, headers, rest)

    # -- client events ----------------------------------------------------------------
    def _client_gone(self, f: Failure) -> None:
        if self.ended:
            return
        conn, self.conn = self.conn, None
        self.producing = False
        self._end("client-gone")
        if conn is not None:
            conn.abort()
        if self.connecting is not None:
            self.connecting.cancel()

    # IPushProducer (registered on the client request)
    def pauseProducing(self) -> None:
        self.paused = True
        if self.conn is not None:
            self.conn.pause()

    def resumeProducing(self) -> None:
        self.paused = False
        if self.conn is not None:
            self.conn.resume()

    def stopProducing(self) -> None:
        self._client_gone(Failure(ierror.ConnectionDone("client stopped the response")))

    def _write(self, data: bytes | memoryview) -> None:
        """Write body bytes to the client: straight to its socket when we can."""
        request = self.request
        t = self.direct
        if (
            t is not None
            and len(data) >= _DIRECT_MIN
            and request.startedWriting
            and not request.chunked
            and request.method != b"HEAD"
            and request.code not in NO_BODY_CODES
            and not request._disconnected
            and can_send_now(t)
        ):
            request.sentLength += len(data)
            if not send_now(t, data) and t.producer is not None and t.streamingProducer:
                # the kernel took only part: Twisted sends the rest when the socket
                # is writable and resumes us (and so the backend) once it is out
                t.producerPaused = True
                t.producer.pauseProducing()
            return
        request.write(data if isinstance(data, bytes) else bytes(data))

    # -- ending ------------------------------------------------------------------------
    def _unregister(self) -> None:
        if self.producing:
            self.producing = False
            if self.request.channel is not None:
                self.request.unregisterProducer()

    def _error(self, status: int, message: str, reason: str) -> None:
        if self.ended:
            return
        log.info("proxy: {message}", message=message)
        self._unregister()
        request = self.request
        sent = None if request.startedWriting else status
        self._end(reason, status=sent)
        if not getattr(request, "_disconnected", False) and request.channel is not None:
            self.proxy.error_page(request, status, message)

    def _end(self, reason: str, status: int | None = -1) -> None:
        if self.ended:
            return
        self.ended = True
        st = self.status if status == -1 else status
        if self.on_end is not None:
            try:
                self.on_end(ExchangeEnd(reason=reason, status=st, bytes_out=self.bytes_out))
            except Exception:  # noqa: BLE001 - a broken callback must not break the proxy
                log.failure("on_end callback failed")


# -- the public entry point ----------------------------------------------------------


class Proxy:
    """Forwards requests to backends over pooled persistent HTTP/1.1 connections.

    ``endpoint_factory`` (Backend → client endpoint) replaces the default
    (:meth:`Backend.endpoint`), e.g. in tests. ``error_page(request, status, message)``
    answers errors (default :func:`dockerspaces.web.errors.finish_error`). With
    ``cors`` the backend's ``Access-Control-*`` headers are replaced by
    :func:`routing.cors_headers`. ``pool_size`` caps the idle connections kept per
    backend: below the number of concurrent requests to one backend, every burst
    closes the surplus and the next one reconnects (at 32 with 50 busy clients, ~4 %
    of requests paid a new backend connection).
    """

    def __init__(
        self,
        reactor: Any,
        *,
        connect_timeout: float = 10.0,
        pool_size: int = 64,
        tls_trust: Any = None,
        endpoint_factory: Callable[[Backend], IStreamClientEndpoint] | None = None,
        error_page: Callable[[Request, int, str], None] | None = None,
        cors: bool = False,
    ):
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.tls_trust = tls_trust
        self.cors = cors
        self._pool = _Pool(size=pool_size)
        self._endpoint_factory = endpoint_factory
        self.error_page = error_page or finish_error

    def _endpoint_for(self, backend: Backend) -> Any:
        if self._endpoint_factory is not None:
            return self._endpoint_factory(backend)
        return backend.endpoint(self.reactor, self.connect_timeout, self.tls_trust)

    def forward(
        self,
        request: Request,
        backend: Backend,
        path: bytes,
        *,
        prefix: bytes,
        host_header: bytes | None,
        on_end: Callable[[ExchangeEnd], None] | None = None,
        set_route_cookie: str | None = None,
    ) -> Any:
        """Forward ``request`` to ``backend`` as ``path``; returns ``NOT_DONE_YET``.

        ``prefix`` is the route prefix (``X-Forwarded-Prefix``, Location rewriting);
        ``host_header`` None forwards the client's Host; ``set_route_cookie`` adds the
        ``dsroute`` cookie naming that segment to HTML responses.
        """
        _Exchange(
            self, request, backend, path, prefix, host_header, on_end, set_route_cookie
        ).start()
        return NOT_DONE_YET

    def idle_connections(self, backend: Backend | None = None) -> int:
        """Idle pooled connections (to ``backend``, or in all)."""
        if backend is None:
            return self._pool.count()
        return len(self._pool.idle.get(backend, []))

    def close_idle(self) -> Deferred[None]:
        """Close every idle pooled connection (shutdown); fires once they are all gone."""
        waits = []
        for conns in list(self._pool.idle.values()):
            for p in list(conns):
                d: Deferred[None] = Deferred()
                p.on_lost.append(d)
                waits.append(d)
                p.transport.loseConnection()
        self._pool.idle.clear()
        return DeferredList(waits).addCallback(lambda _: None)
