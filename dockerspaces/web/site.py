"""The twisted.web ``Site`` dockerspaces listens with.

:func:`make_site` builds a :class:`ProxySite` whose channel and request add:

- a body limit: a ``Content-Length`` over ``max_body`` is answered ``413`` before
  anything is spooled, and a chunked body growing past it likewise, then the
  connection is closed;
- a request-head deadline (slowloris): a client that has not completed its request
  head within ``head_timeout`` seconds of the connection start (or of the end of its
  previous request) is disconnected — ``HTTPChannel.timeOut`` is only an idle timeout
  that every byte resets;
- HTTP/1.1 only: the channel is a plain ``HTTPChannel`` (no HTTP/2 negotiation);
- no access log by default: :meth:`ProxySite.log` calls ``on_request_logged``, and
  ``on_refused`` hears of the answers the channel gives itself (400 for a malformed
  head, 413, and 414/431 where twisted.web would only close the connection);
- no form parsing: a POST body is never read into ``request.args`` (twisted.web reads
  a whole ``multipart/form-data`` upload into memory to parse it); it stays in the
  spool for the proxy to stream;
- ``Server`` and ``Date`` added when the head goes out, not up front (a proxied
  response's head is written by the proxy: the backend's ``Server``, and ``Date``
  only when the backend sent none); our own pages get both;
- the connection's own address asked once per connection, not per request;
- the request line checked by two regular expressions instead of twisted.web's loop
  over every byte of the URI in Python (:func:`parse_request_line`, installed into
  ``twisted.web.http`` by :func:`make_site`; same answers, tested against Twisted's).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web import http as _http
from twisted.web import http_headers as _http_headers
from twisted.web import resource as _resource
from twisted.web.http import HTTPChannel, datetimeToString
from twisted.web.http import parse_qs as _parse_qs
from twisted.web.iweb import INonQueuedRequestFactory
from twisted.web.resource import IResource
from twisted.web.server import Request, Site, version

_BODY_413 = "request body of {size} exceeds the limit of {limit} bytes (--max-body)\n"


def _too_large(size: str, limit: int) -> bytes:
    body = ("413 Payload Too Large: " + _BODY_413.format(size=size, limit=limit)).encode()
    return (
        b"HTTP/1.1 413 Payload Too Large\r\n"
        b"Content-Type: text/plain; charset=utf-8\r\n"
        b"Connection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(body)
    ) + body


class _NullSpool:
    """Swallows the body of a rejected request."""

    def write(self, data: bytes) -> None:
        pass

    def seek(self, *args: Any) -> int:
        return 0

    def tell(self) -> int:
        return 0

    def read(self, *args: Any) -> bytes:
        return b""

    def close(self) -> None:
        pass


#: an HTTP token (RFC 9110 5.6.2), as a regular-expression fragment
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN = re.compile(TOKEN)
_BAD_TARGET = re.compile(rb"[\x00-\x20\xb1-\xff]")

#: twisted.web's own parser (what :func:`parse_request_line` must agree with)
TWISTED_PARSE_REQUEST_LINE = _http._parseRequestLine


def parse_request_line(line: bytes) -> tuple[bytes, bytes, bytes]:
    """``twisted.web.http._parseRequestLine``, its per-byte Python loops (the method a
    token, the target printable) done by regular expressions: same result, same
    ``ValueError``; twisted.web's loop cost more than the rest of routing a request
    with a 20-byte URI, and grows with the URI."""
    method, target, version = line.split(b" ")
    if _TOKEN.fullmatch(method) is None:
        raise ValueError("Invalid method")
    if _BAD_TARGET.search(target) is not None:
        raise ValueError("Invalid request-target")
    if target == b"":
        raise ValueError("Empty request-target")
    if version not in {b"HTTP/1.1", b"HTTP/1.0"}:
        raise ValueError("Invalid version")
    return method, target, version


def install_request_line_parser() -> None:
    """Make twisted.web's HTTP channel use :func:`parse_request_line` (idempotent)."""
    if getattr(_http, "_parseRequestLine", None) is TWISTED_PARSE_REQUEST_LINE:
        _http._parseRequestLine = parse_request_line


_date_cache: list[Any] = [None, b""]


def http_date() -> bytes:
    """The ``Date`` header value for now, formatted once per second."""
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache[0] = second
        _date_cache[1] = datetimeToString(second)
    return _date_cache[1]  # type: ignore[no-any-return]


class LimitedRequest(Request):
    """A ``Request`` that refuses bodies over the site's ``max_body`` with ``413``
    (and the other changes of the module docstring)."""

    rejected = False
    _args: dict[bytes, list[bytes]] | None = None
    _received = 0
    _lost_hooks: list[Callable[[Any], object]] | None = None

    def process(self) -> None:
        """``server.Request.process`` without setting ``Server``/``Date`` up front
        (:meth:`write` adds them when the head goes out)."""
        self.site = self.channel.site  # type: ignore[attr-defined]
        self.prepath = []
        self.postpath = [unquote_to_bytes(p) if b"%" in p else p
                         for p in self.path[1:].split(b"/")]
        if self.path == b"*":
            self._handleStar()  # type: ignore[attr-defined]
            return
        try:
            resrc = self.site.getResourceFor(self)
            if _resource._IEncodingResource.providedBy(resrc):  # type: ignore[attr-defined]
                encoder = resrc.getEncoder(self)
                if encoder is not None:
                    self._encoder = encoder
            self.render(resrc)
        except BaseException:  # noqa: BLE001 - as twisted.web: any error is a 500
            self.processingFailed(Failure())

    def write(self, data: bytes) -> None:
        """Add the default headers with the head, then write as usual."""
        if not self.startedWriting:
            headers = self.responseHeaders
            if not headers.hasHeader(b"server"):
                headers.setRawHeaders(b"server", [version])
            if not headers.hasHeader(b"date"):
                headers.setRawHeaders(b"date", [http_date()])
        super().write(data)

    def on_connection_lost(self, hook: Callable[[Any], object]) -> None:
        """Call ``hook(reason)`` if the connection is lost before this request is done.

        What ``notifyFinish().addErrback(hook)`` does, without a Deferred per caller
        (the access log and the proxy each want it on every request); hooks run
        in the order added, after the request's own ``connectionLost`` handling.
        """
        if self._lost_hooks is None:
            self._lost_hooks = [hook]
        else:
            self._lost_hooks.append(hook)

    def connectionLost(self, reason: Any) -> None:
        """The connection went before the request was done: errbacks, the hooks, then
        the site's ``on_request_lost``."""
        hooks, self._lost_hooks = self._lost_hooks, None
        super().connectionLost(reason)
        for hook in hooks or ():
            hook(reason)
        lost = getattr(getattr(self, "site", None), "on_request_lost", None)
        if lost is not None:
            lost(self)

    def _limit(self) -> int | None:
        site = getattr(self.channel, "site", None)
        return getattr(site, "max_body", None)

    def gotLength(self, length: int | None) -> None:
        """Refuse a declared length over the limit before spooling anything."""
        limit = self._limit()
        if length is not None and limit is not None and length > limit:
            self._reject(f"{length} bytes", limit)
            return
        super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        """Spool a body chunk, refusing a (chunked) body that grows past the limit."""
        if self.rejected:
            return
        self._received += len(data)
        limit = self._limit()
        if limit is not None and self._received > limit:
            self._reject(f"more than {limit} bytes", limit)
            return
        super().handleContentChunk(data)

    def _reject(self, size: str, limit: int) -> None:
        self.rejected = True
        if self.content is not None and not isinstance(self.content, _NullSpool):
            self.content.close()
        self.content = _NullSpool()  # type: ignore[assignment]
        channel: Any = self.channel
        channel.persistent = False
        # drop whatever else the client sends on this connection
        channel.rawDataReceived = lambda data: None
        channel.lineReceived = lambda line: None
        channel.transport.write(_too_large(size, limit))
        channel.transport.loseConnection()
        refused(channel, 413, getattr(channel, "_command", b""),
                getattr(channel, "_path", b"")[:_LOGGED_URI], "body-too-large")

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        """Process the request unless it was refused for its size.

        ``http.Request.requestReceived`` without what a proxy never uses up front: the
        query is parsed into ``args`` only when something reads them, and a POST body
        is never parsed (the site has ``parsePOSTFormSubmission=False``)."""
        if self.rejected:
            return
        if self.content is not None:
            self.content.seek(0, 0)
        self.method, self.uri, self.clientproto = command, path, version
        self.path = path.split(b"?", 1)[0]
        self._args = None
        self.process()

    @property  # type: ignore[override]
    def args(self) -> dict[bytes, list[bytes]]:
        """The query arguments (``parse_qs`` of the query, as twisted.web's), parsed
        when first read."""
        args = self._args
        if args is None:
            _, sep, query = self.uri.partition(b"?")
            args = self._args = _parse_qs(query, 1) if sep else {}
        return args

    @args.setter
    def args(self, value: dict[bytes, list[bytes]]) -> None:
        self._args = value


#: at most this much of a refused request's URI reaches the log
_LOGGED_URI = 200
#: the channel's own answers (twisted.web's ``RESPONSES`` has no 431)
_REFUSALS = {400: b"Bad Request", 414: b"URI Too Long",
             431: b"Request Header Fields Too Large"}


def refused(channel: Any, code: int, method: bytes, uri: bytes, reason: str) -> None:
    """Tell the channel's site (its ``on_refused``, if any) about an answer given
    without a request being processed: ``code`` (400, 413, 414, 431), what is known of
    the request line, and the client's address."""
    site = getattr(channel, "site", None)
    hook = getattr(site, "on_refused", None)
    if hook is None:
        return
    transport = getattr(channel, "transport", None)
    client = transport.getPeer() if transport is not None else None
    hook(code, method, uri, client, reason)


def on_lost(request: Request, hook: Callable[[Any], object]) -> None:
    """Call ``hook(reason)`` if the client goes before ``request`` is done: the cheap
    :meth:`LimitedRequest.on_connection_lost` when the request has it, else a
    ``notifyFinish`` errback (other ``Request`` classes, test doubles)."""
    add = getattr(request, "on_connection_lost", None)
    if add is not None:
        add(hook)
    else:
        request.notifyFinish().addErrback(hook)


#: A whole request head without a body is read by two regexes: the request line, then
#: every header line at once -- a token name, a value without NUL/CR/LF (SP/HTAB at its
#: edges stripped, as twisted.web does) -- anchored at line starts, so that the head is
#: simple exactly when each of its CRLFs ends a matched line and it has no bare CR or
#: LF (what twisted.web's line parser accepts, narrowed). No lazy quantifiers: they
#: retried the rest of a pattern at every byte.
_REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") ([\x21-\xb0]+) (HTTP/1\.[01])\r\n")
_HEADER_LINE = re.compile(
    rb"(?m)^(" + TOKEN + rb"):[ \t]*((?:[^\x00\r\n]*[^ \t\x00\r\n])?)[ \t]*\r\n"
)
#: request headers that announce a body (such heads take twisted.web's parser)
_BODY_HEADERS = frozenset({b"content-length", b"transfer-encoding"})


def simple_head(data: bytes) -> tuple[Any, list[tuple[bytes, bytes]]] | None:
    """The request line match and the header (name, value) pairs of ``data``, a whole
    request head ending in its blank line, when it is simple and announces no body;
    else None (twisted.web's parser reads it)."""
    m = _REQUEST_LINE.match(data)
    if m is None:
        return None
    block = data[m.end() : -2]
    pairs = _HEADER_LINE.findall(block)
    n = block.count(b"\r\n")
    if len(pairs) != n or block.count(b"\n") != n or block.count(b"\r") != n:
        return None
    for name, _ in pairs:
        if name.lower() in _BODY_HEADERS:
            return None
    return m, pairs


# The HTTPChannel state the fast path below reads and sets (twisted.web 24.7-26.x;
# ``_handlingRequest`` is set in ``__init__``): if this Twisted has no such class
# attributes, every request takes twisted.web's parser.
_FAST_HEAD_OK = all(
    hasattr(HTTPChannel, name)
    for name in ("_HTTPChannel__first_line", "_HTTPChannel__header", "_receivedHeaderCount",
                 "_receivedHeaderSize", "maxHeaders", "totalHeadersSize", "line_mode",
                 "paused", "_buffer", "_busyReceiving", "length", "persistent",
                 "allHeadersReceived", "allContentReceived", "requestFactory")
) and isinstance(getattr(_http_headers.Headers(), "_rawHeaders", None), dict) and hasattr(
    _http_headers, "_nameEncoder"
)


class HeadDeadlineChannel(HTTPChannel):
    """An ``HTTPChannel`` that drops clients too slow to send a request head, and reads
    a bodiless request head that arrives whole at once with two regexes."""

    head_timeout: float | None = 30.0
    _head_call: Any = None
    _head_armed = False
    _nonqueued: bool | None = None

    def dataReceived(self, data: bytes) -> None:
        """A whole request head without a body, alone in ``data`` and with nothing
        pending: parsed at once (the state twisted.web's line parser would leave, the
        same ``allHeadersReceived``/``allContentReceived`` calls); anything else —
        bodies, pipelined requests, partial heads, odd bytes, over-long heads — goes
        through twisted.web's line parser, which also answers every malformed one."""
        if (
            _FAST_HEAD_OK
            and data[-4:] == b"\r\n\r\n"
            and self.line_mode
            and self.persistent
            and not self._buffer
            and not self._busyReceiving
            and not self.paused
            and not self._handlingRequest
            and self._HTTPChannel__first_line == 1  # type: ignore[attr-defined]
            and not self._HTTPChannel__header  # type: ignore[attr-defined]
            and len(data) <= self.totalHeadersSize
        ):
            simple = simple_head(data)
            if simple is not None and len(simple[1]) <= self.maxHeaders:
                self._fast_head(*simple)
                return
        super().dataReceived(data)

    def _fast_head(self, m: Any, pairs: list[tuple[bytes, bytes]]) -> None:
        self.resetTimeout()
        self._busyReceiving = True
        try:
            factory = self.requestFactory
            nonqueued = self._nonqueued
            if nonqueued is None:
                nonqueued = self._nonqueued = bool(INonQueuedRequestFactory.providedBy(factory))
            request = factory(self) if nonqueued else factory(self, len(self.requests))
            self.requests.append(request)
            self._HTTPChannel__first_line = 0
            # Headers.addRawHeader per line, without its checks: the regex admitted
            # token names and values without CR/LF only
            raw = request.requestHeaders._rawHeaders
            encode = _http_headers._nameEncoder.encode  # canonical spelling, cached
            for name, value in pairs:
                key = encode(name)
                values = raw.get(key)
                if values is None:
                    raw[key] = [value]
                else:
                    values.append(value)
            self._receivedHeaderCount = len(pairs)
            self._command, self._path, self._version = m.group(1, 2, 3)
            self.allHeadersReceived()
            if self.length == 0:
                self.allContentReceived()
        finally:
            self._busyReceiving = False
        if self._buffer:  # bytes handed back while the request was handled
            LineReceiver.dataReceived(self, b"")

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line or header line over ``MAX_LENGTH``: 414 for the request
        line (a URI too long), 431 for a header line -- twisted.web only closes."""
        if self._HTTPChannel__first_line:  # type: ignore[attr-defined]
            self._refuse(414, "uri-too-long", line)
        else:
            self._refuse(431, "head-too-large")

    def _respondToBadRequestAndDisconnect(self) -> None:
        """twisted.web's 400-and-close, but 414 when the request line alone is over
        ``totalHeadersSize``, 431 when the head is or has more than ``maxHeaders``
        lines."""
        if self._receivedHeaderSize > self.totalHeadersSize:
            if self._HTTPChannel__first_line:  # type: ignore[attr-defined]
                self._refuse(414, "uri-too-long")
            else:
                self._refuse(431, "head-too-large")
        elif self._receivedHeaderCount > self.maxHeaders:
            self._refuse(431, "head-too-large")
        else:
            self._refuse(400, "bad-request")

    def _refuse(self, code: int, reason: str, line: bytes | None = None) -> None:
        """Answer ``code`` with no body, close, tell the site (``on_refused``)."""
        if self.transport is None or getattr(self, "_refused", False):
            return
        self._refused = True
        self.transport.write(b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n" % (code, _REFUSALS[code]))
        self.loseConnection()
        # no more parsing of what the client sends after the refused head
        self.dataReceived = self.lineReceived = lambda *a: None  # type: ignore[method-assign]
        if line is not None:  # the request line itself: what of it can be read
            method, _, rest = line[:_LOGGED_URI].partition(b" ")
            uri = rest.partition(b" ")[0]
        elif self._HTTPChannel__first_line:  # type: ignore[attr-defined]
            method = uri = b""
        else:
            method = getattr(self, "_command", b"")
            uri = getattr(self, "_path", b"")[:_LOGGED_URI]
        refused(self, code, method, uri, reason)

    # One DelayedCall per connection, moved rather than replaced: disarming only clears
    # the flag (a timer that fires disarmed does nothing), re-arming resets the pending
    # call -- a new callLater plus a cancel per request cost more than the deadline.
    def _arm(self) -> None:
        if not self.head_timeout:
            return
        self._head_armed = True
        call = self._head_call
        if call is not None and call.active():
            call.reset(self.head_timeout)
        else:
            self._head_call = self.callLater(self.head_timeout, self._head_expired)

    def _disarm(self) -> None:
        self._head_armed = False

    def _head_expired(self) -> None:
        self._head_call = None
        if self._head_armed and self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]

    _host: Any = None

    def getHost(self) -> Any:
        """This end's address, asked once per connection (Request asks per request)."""
        host = self._host
        if host is None:
            host = super().getHost()
            if self.transport is not None:
                self._host = host
        return host

    _secure: bool | None = None

    def isSecure(self) -> bool:
        """Whether the transport is TLS: adapted once per connection (it cannot change),
        not per request (the proxy asks for every ``X-Forwarded-Proto``)."""
        secure = self._secure
        if secure is None:
            secure = bool(super().isSecure())
            if self.transport is not None:
                self._secure = secure
        return secure

    def connectionMade(self) -> None:
        """Start the head deadline with the connection."""
        super().connectionMade()
        self._arm()

    def allHeadersReceived(self) -> None:
        """The head is complete: stop the deadline."""
        self._disarm()
        super().allHeadersReceived()

    def requestDone(self, request: Request) -> None:
        """Restart the deadline for the next request on a persistent connection."""
        if self.persistent:
            self._arm()
        super().requestDone(request)

    def stop_deadline(self) -> None:
        """Cancel the deadline for good (connection lost, or taken over by a tunnel)."""
        self._head_armed = False
        call, self._head_call = self._head_call, None
        if call is not None and call.active():
            call.cancel()

    def connectionLost(self, reason: Any = None) -> None:
        """Stop the deadline."""
        self.stop_deadline()
        super().connectionLost(reason)


class ProxySite(Site):
    """``Site`` with a body limit, a head deadline, HTTP/1.1 only and a log hook."""

    protocol = HeadDeadlineChannel  # type: ignore[assignment]
    requestFactory = LimitedRequest
    noisy = False

    def __init__(
        self,
        resource: IResource,
        reactor: Any,
        *,
        max_body: int,
        head_timeout: float = 30.0,
        on_request_logged: Callable[[Request], None] | None = None,
        on_request_lost: Callable[[Request], None] | None = None,
        on_refused: Callable[[int, bytes, bytes, Any, str], None] | None = None,
    ):
        # No twisted.web idle timeout: the head deadline already closes connections that
        # idle between requests, and a response may take as long as it takes; the idle
        # timer cost a DelayedCall reset on every read.
        super().__init__(resource, reactor=reactor, timeout=None, parsePOSTFormSubmission=False)
        self.max_body = max_body
        self.head_timeout = head_timeout
        self.on_request_logged = on_request_logged
        #: called with a request whose client went before it was done
        self.on_request_lost = on_request_lost
        #: called as ``(status, method, uri, client address, reason)`` for an answer
        #: the channel gave itself, no request processed (400, 413, 414, 431)
        self.on_refused = on_refused

    def buildProtocol(self, addr: Any) -> Any:
        """A channel with this site's head deadline."""
        channel = super().buildProtocol(addr)
        if channel is not None:
            channel.head_timeout = self.head_timeout
        return channel

    def getResourceFor(self, request: Any) -> IResource:
        """``Site.getResourceFor`` for a request fresh from :meth:`LimitedRequest.process`
        (its ``prepath`` is still empty: no ``copy.copy`` of it for ``sitepath``)."""
        request.site = self
        request.sitepath = list(request.prepath)
        return _resource.getChildForRequest(self.resource, request)  # type: ignore[no-any-return]

    def log(self, request: Any) -> None:
        """Hand the finished request to ``on_request_logged`` (no log by default)."""
        if self.on_request_logged is not None:
            self.on_request_logged(request)


def make_site(resource: IResource, reactor: Any, **options: Any) -> ProxySite:
    """The site dockerspaces listens with (see the module docstring); ``options`` are
    :class:`ProxySite`'s (``max_body``, ``head_timeout``, ``on_request_logged``,
    ``on_request_lost``, ``on_refused``)."""
    install_request_line_parser()
    return ProxySite(resource, reactor, **options)
