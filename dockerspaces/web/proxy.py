"""The streaming reverse proxy: one request from a twisted.web ``Request`` to a backend.

:class:`Proxy` forwards a request over a pooled, persistent HTTP/1.1 connection with a
lean client protocol of its own (:class:`~dockerspaces.web.backend.BackendProtocol`)
rather than ``twisted.web.client.Agent``: per request it costs a few method calls, no
Deferreds once a pooled connection exists, and it gives direct control over the
backend transport (pause/resume for back-pressure, abort on client disconnect, ``101``
for Upgrade tunnelling, see :mod:`dockerspaces.web.tunnel`). One forwarded request is
an ``_Exchange``, the :class:`~dockerspaces.web.sink.ResponseSink` of the backend
protocol's events.

- request bodies are streamed from twisted.web's spool (``request.content``, a file)
  with a push producer on the backend transport, never read into one bytes object;
- responses are streamed: the exchange is registered as the producer of the client
  request, so a paused client transport pauses the backend transport;
- a whole small answer leaves in one ``sendmsg``, large body chunks for a plain TCP
  client go straight to its socket (:mod:`dockerspaces.web.sendnow`); an unsent tail
  stays in the transport's buffer as a view and the backend is paused until it drains;
- hop-by-hop headers and those named in ``Connection`` are dropped both ways, repeated
  headers kept, ``X-Forwarded-*`` added, ``Location`` rewritten under the route prefix
  (:mod:`dockerspaces.web.headers`);
- ``on_end`` fires exactly once per :meth:`Proxy.forward` with an :class:`ExchangeEnd`.

Private Twisted names (the tunnel takeover, the direct writes) are reached only
through :mod:`dockerspaces.twistedseam`.

The module is longer than the house's ~600 lines on purpose: one exchange is one
state machine (``_Exchange``, most of the module) whose events -- backend reads,
client pauses, errors, the ending -- all read and change the same state; split in
two, each half would need the other's.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Set as AbstractSet
from typing import Any

from attrs import frozen
from twisted.internet import error as ierror
from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.defer import TimeoutError as DeferTimeoutError
from twisted.internet.interfaces import (
    IPushProducer,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import NO_BODY_CODES
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer  # type: ignore[import-untyped]

from . import routing
from .backend import (
    READ_SIZE,
    Backend,
    BackendFactory,
    BackendGone,
    BackendProtocol,
    ClientEndpoint,
    ConnectionPool,
    reason_text,
)
from .errors import finish_error
from .headers import (
    HOP_BY_HOP,
    Headers,
    connection_tokens,
    drop_lines,
    read_client_head,
    request_head,
    rewrite_cookie_path,
    rewrite_location,
)
from .routecookie import RouteCookies
from .sendnow import (
    can_send_now,
    can_write_now,
    flush_now,
    is_plain_tcp,
    send_all_now,
    send_now,
)
from .sink import BackendConnection
from .site import http_date, on_lost
from .tunnel import start_tunnel

log = Logger()

_IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
_DIRECT_MIN = 16 * 1024  # smaller body writes take twisted.web's ordinary path


@frozen
class ExchangeEnd:
    """How one forwarded exchange ended (passed to ``on_end`` exactly once).

    ``reason`` is ``finished``, ``client-gone``, ``backend-error``, ``tunnel-closed``,
    ``refused``, or -- only with ``retry_unforwarded``, nothing answered, the caller
    must answer it, e.g. by forwarding it elsewhere -- ``unforwarded`` (the connection
    could not be made: the request never left) or ``unanswered`` (a bodiless GET/HEAD
    whose backend closed or reset the connection before any byte of an answer);
    ``status`` the status sent to the client (None if none was);
    ``bytes_out`` the response body bytes written to the client (tunnel: bytes
    from the backend to the client).
    """

    reason: str
    status: int | None
    bytes_out: int


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
    sent_at: float | None = None  # when the request's first byte went (with died_before)
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
        retry_unforwarded: int = 0,
        confirm_close: Callable[[], Deferred[bool]] | None = None,
        external: bool = False,
        cors: bool = True,
        died_before: Callable[[float], Deferred[bool]] | None = None,
        cookie_paths: bool = True,
    ):
        self.proxy = proxy
        # the prefix the backend's Set-Cookie paths are put under (b"": as sent)
        self.cookie_prefix = prefix if cookie_paths else b""
        self.cors = cors
        self.retry_unforwarded = retry_unforwarded
        self.confirm_close = confirm_close
        self.died_before = died_before
        self.request = request
        self.backend = backend
        self.prefix = prefix
        self.on_end = on_end
        self.route_cookie = set_route_cookie
        head = read_client_head(request, external)
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
            host=self.backend_host,
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
        d = ep.connect(BackendFactory(pool, self.backend))
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
        if self.retry_unforwarded:
            # nothing was sent: the request can go elsewhere
            self._unforwarded(f"cannot connect to backend {b}: {reason_text(f)}")
            return
        if f.check(CancelledError, ierror.TimeoutError, DeferTimeoutError):
            msg = f"backend {b} did not accept a connection within {self.proxy.connect_timeout:g} s"
            reason = "backend-error"
        elif f.check(ierror.ConnectionRefusedError, ierror.ConnectError):
            msg = f"backend {b} refused the connection ({reason_text(f)})"
            reason = "refused"
        else:
            msg = f"cannot connect to backend {b}: {reason_text(f)}"
            reason = "backend-error"
        self._error(502, msg, reason)

    def _send(self, conn: BackendProtocol) -> None:
        self.conn = conn
        if self.died_before is not None and self.sent_at is None:
            self.sent_at = self.proxy.reactor.seconds()
        if self.body is not None:
            self.body.seek(0, 0)
        conn.send(self, self.head, self.body, self.length)

    # -- backend events ------------------------------------------------------------
    def response_head(
        self,
        status: int,
        reason: bytes,
        grouped: dict[bytes, list[bytes]],
        headers: Headers,
        raw: bytes | None = None,
        whole: bool = False,
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
        cors = self.proxy.cors and self.cors
        if cors or not self.cors:
            # ours replace the backend's; where CORS is refused (/docker:local) none go
            drop = drop | {lk for lk in grouped if lk.startswith(b"access-control-")}
            if cors and b"vary" in grouped:  # merged with ours below
                drop = drop | {b"vary"}
        cookie_prefix = self.cookie_prefix
        if (
            raw is not None
            and len(drop) == len(HOP_BY_HOP)
            and b"location" not in grouped
            and not (cookie_prefix and b"set-cookie" in grouped)
        ):
            # nothing to rewrite, only the standard hop-by-hop lines to leave out:
            # the block as received, less those lines
            hop = grouped.keys() & HOP_BY_HOP
            lines = [drop_lines(raw, hop) if hop else raw]
        else:
            if b"location" in grouped:
                headers = [
                    (k, rewrite_location(v, prefix=self.prefix, backend_host=self.backend_host))
                    if k.lower() == b"location"
                    else (k, v)
                    for k, v in headers
                ]
            if cookie_prefix and b"set-cookie" in grouped:  # the app's cookies under its prefix
                headers = [
                    (k, rewrite_cookie_path(v, prefix=cookie_prefix) if k.lower() == b"set-cookie" else v)
                    for k, v in headers
                ]
            lines = [b"%s: %s\r\n" % kv for kv in headers if kv[0].lower() not in drop]
        content_type = grouped.get(b"content-type")
        if content_type is not None and self.route_cookie and content_type[-1][:9].lower() == b"text/html":
            cookie = self.proxy.route_cookies.header(self.route_cookie, request.isSecure())
            if cookie is not None:
                lines.append(b"Set-Cookie: %s\r\n" % cookie)
        if cors:
            vary = grouped.get(b"vary")
            if vary is not None:  # the backend's Vary, then Origin added to it
                request.responseHeaders.setRawHeaders(b"vary", vary)
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
            if lk in kept or lk in {b"server", b"date"}:
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
                and can_write_now(t)
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
        self.detach()
        if self.status is None:
            # close-delimited body with no head cannot happen; be safe
            self._error(502, f"backend {self.backend} sent no response", "backend-error")
            return
        self._end("finished")
        if not request.startedWriting and request.channel is not None:  # (None: client gone)
            self._write_head()
        request.finish()
        if self.direct is not None:
            flush_now(self.direct)

    def response_closed(self, conn: BackendConnection) -> None:
        """A close-delimited body ended with the backend's FIN: complete it, unless
        ``confirm_close`` says the backend died (then the answer is cut, not ended)."""
        if self.ended:
            return
        confirm = self.confirm_close
        if confirm is None:
            self.response_done()
            return
        self.conn = None

        def decided(alive: bool) -> None:
            if self.ended:
                return
            if alive:
                self.response_done()
            else:
                self.backend_failed(
                    Failure(BackendGone("the container died before its answer was complete")), conn
                )

        confirm().addCallback(decided).addErrback(
            lambda f: log.failure("confirming a close-delimited answer failed", f)
        )

    def backend_failed(self, f: Failure, conn: BackendConnection) -> None:
        """The backend connection failed or ended before the answer was complete."""
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
        if self.status is None and not conn.got_bytes and self._may_go_elsewhere(f):
            self._unforwarded(
                f"backend {self.backend} closed the connection without answering ({reason_text(f)})",
                "unanswered",
            )
            return
        msg = f"backend {self.backend} failed: {reason_text(f)}"
        if (
            self.status is None
            and not conn.got_bytes
            and self.retry_unforwarded
            and self.died_before is not None
            and self.sent_at is not None
            and self.upgrade is None
        ):
            self._unless_unread(msg, self.died_before, self.sent_at)
            return
        if self.status is None or not self.request.startedWriting:
            # nothing sent yet (a sized head waits for its body): still a clean 502
            self._error(502, msg, "backend-error")
            return
        # headers are out: cut the response short so the client sees the truncation --
        # no terminating chunk; where neither chunking nor a length would tell the
        # client, the connection is aborted rather than closed
        self.detach()
        self._end("backend-error")
        request = self.request
        channel = request.channel
        if channel is None:
            return
        transport: Any = channel.transport
        if request.chunked or b"content-length" in self.head_names or transport is None:
            channel.loseConnection()
        else:
            transport.abortConnection()

    def _unless_unread(
        self, msg: str, died_before: Callable[[float], Deferred[bool]], sent_at: float
    ) -> None:
        """Nothing answered a request that may have been read: 502 -- unless its
        container's process had ended before the first byte was sent (``died_before``:
        behind docker-proxy a dead app's port still accepts, then closes), and then the
        request provably never reached the app and goes elsewhere, whatever its method."""

        def decided(unread: bool) -> None:
            if self.ended:
                return
            if unread:
                self._unforwarded(msg + " after its container had exited")
            else:
                self._error(502, msg, "backend-error")

        def failed(f: Failure) -> None:
            log.failure("asking when a backend died failed", f)
            decided(False)

        died_before(sent_at).addCallback(decided).addErrback(failed)

    def _may_go_elsewhere(self, f: Failure) -> bool:
        """Whether a request sent to a backend whose connection then ended (closed or
        reset) before any response byte may be handed back to the caller: only once
        (``retry_unforwarded`` 2) and only a bodiless GET/HEAD -- its bytes may have
        reached the app, so anything else gets its 502."""
        if self.retry_unforwarded < 2 or self.upgrade is not None:
            return False
        return self.length == 0 and self.request.method in (b"GET", b"HEAD")

    def _unforwarded(self, message: str, reason: str = "unforwarded") -> None:
        """End without answering (``unforwarded``: nothing was sent; ``unanswered``: a
        bodiless GET/HEAD got no answer): the caller forwards the request elsewhere."""
        log.info("proxy: {message}; the request goes elsewhere", message=message)
        self.detach()
        self._end(reason, status=None)

    def response_upgraded(
        self, conn: BackendConnection, status: int, reason: bytes, headers: Headers, rest: bytes
    ) -> None:
        """``101``: the tunnel takes the client connection and this one over."""
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
            and request.channel is not None  # (None once the client is gone)
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
    def detach(self) -> None:
        """Stop being the client request's producer (the answer is over, or the
        tunnel takes the connection over)."""
        if self.producing:
            self.producing = False
            if self.request.channel is not None:
                self.request.unregisterProducer()

    def _error(self, status: int, message: str, reason: str) -> None:
        if self.ended:
            return
        log.info("proxy: {message}", message=message)
        self.detach()
        request = self.request
        sent = None if request.startedWriting else status
        self._end(reason, status=sent)
        if request.channel is not None:  # (None once the client is gone)
            self.proxy.error_page(request, status, message)

    def end(self, reason: str, bytes_out: int | None = None) -> None:
        """Report how the exchange ended, once (the tunnel's way to end it);
        ``bytes_out``, the bytes that went to the client when not counted here."""
        if bytes_out is not None and not self.ended:
            self.bytes_out = bytes_out
        self._end(reason)

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
    closes the surplus and the next one reconnects.
    """

    def __init__(
        self,
        reactor: Any,
        *,
        connect_timeout: float = 10.0,
        pool_size: int = 64,
        tls_trust: Any = None,
        endpoint_factory: Callable[[Backend], ClientEndpoint] | None = None,
        error_page: Callable[[Request, int, str], None] | None = None,
        cors: bool = False,
        route_cookies: RouteCookies | None = None,
    ):
        self.reactor = reactor
        #: the ``dsroute`` references this proxy hands out (the root reads them back)
        self.route_cookies = route_cookies if route_cookies is not None else RouteCookies()
        self.connect_timeout = connect_timeout
        self.tls_trust = tls_trust
        self.cors = cors
        self._pool = ConnectionPool(size=pool_size)
        self._endpoint_factory = endpoint_factory
        self.error_page = error_page or finish_error

    def _endpoint_for(self, backend: Backend) -> ClientEndpoint:
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
        retry_unforwarded: int = 0,
        confirm_close: Callable[[], Deferred[bool]] | None = None,
        external: bool = False,
        cors: bool = True,
        died_before: Callable[[float], Deferred[bool]] | None = None,
        cookie_paths: bool = True,
    ) -> int:
        """Forward ``request`` to ``backend`` as ``path``; returns ``NOT_DONE_YET``.

        ``prefix`` is the route prefix (``X-Forwarded-Prefix``, Location rewriting);
        ``host_header`` None forwards the client's Host; ``set_route_cookie`` adds the
        ``dsroute`` cookie naming that segment to HTML responses. With
        ``retry_unforwarded`` 1 a request that provably never reached the backend (the
        connect failed) is not answered: ``on_end`` gets reason ``unforwarded`` and the
        caller answers it; with 2, also a bodiless GET/HEAD whose backend closed or
        reset the connection before any byte of an answer (reason ``unanswered``).
        ``confirm_close`` is asked before a close-delimited answer is completed (the
        backend's FIN ends it, but a killed container's FIN looks the same): False
        cuts the answer as a backend failure would. ``died_before(t)`` (with
        ``retry_unforwarded``) is asked when the backend ended the connection before
        any answer byte of a request that may have been read (one with a body): True
        -- the backend's process had ended before the request's first byte went at
        ``t`` -- makes it ``unforwarded`` too. ``external`` (a ``host:``
        target) keeps the client's ``Authorization`` from the backend; dockerspaces'
        own cookies and token never reach any backend. ``cors`` False (the Docker
        API) sends no CORS headers at all, neither ours (``--cors``) nor the backend's.
        ``cookie_paths`` (with a ``prefix``) puts the ``Path`` of the backend's
        ``Set-Cookie`` answers under the prefix; False passes them as sent.
        """
        _Exchange(
            self,
            request,
            backend,
            path,
            prefix,
            host_header,
            on_end,
            set_route_cookie,
            retry_unforwarded,
            confirm_close,
            external,
            cors,
            died_before,
            cookie_paths,
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
