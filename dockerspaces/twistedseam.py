"""The one seam to Twisted's internals: every private Twisted name dockerspaces uses.

Two kinds of use live here, and nowhere else (docs/architecture.md, "The seam to
other people's internals"):

- **Fast paths**: narrower roads than twisted.web's own for the hot cases, each with
  Twisted's public road beside it:

  * :class:`SeamChannel` reads a whole bodiless request head that arrives at once
    with two regexes (``_fast_head``), else Twisted's line parser;
  * :func:`parse_request_line` replaces ``twisted.web.http._parseRequestLine`` (a
    Python loop over every byte of the URI) once :func:`install_request_line_parser`
    asks for it;
  * :class:`SeamRequest` processes a request without setting ``Server``/``Date`` up
    front and parses the query only when read, else ``server.Request``'s own;
  * :func:`write_now`, :func:`send_now`, :func:`send_all_now`, :func:`flush_now` and
    :func:`relay_now` write to a plain TCP socket without waiting a reactor
    iteration; the proxy and the tunnel use them where :func:`is_plain_tcp` says yes,
    which it never does with the fast paths off, and the backend binds
    :func:`write_now` only while they are on.

  They are on or off together, decided once, when this module is imported
  (:func:`decide`): off when ``DOCKERSPACES_FAST_PATHS=0``, when a private name is
  missing (:func:`missing_names`), or when :func:`self_test` finds that one behaves
  otherwise than Twisted's own code here; one log line says why. The choice is bound
  into classes and module globals (:func:`when_switched`), not tested per call.

- **Internals with no public road**, used whatever the switch: the parser state behind
  the 414/431 answers (:func:`reading_request_line`, :func:`head_received`,
  :func:`request_line_seen`, :meth:`SeamChannel.bad_head`), the Upgrade takeover
  (:func:`detach_channel`, :func:`holds_channel`), the chunked decoder of backend answers
  (:class:`ChunkedDecoder`), Twisted's resolver for tests (:func:`gai_resolver`).

setup.cfg bounds Twisted below the next major for these; :func:`missing_names` and
:func:`self_test` are what to run first on a new Twisted.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any
from urllib.parse import unquote_to_bytes

from twisted.internet import abstract, tcp
from twisted.logger import Logger
from twisted.protocols.basic import LineReceiver
from twisted.python.failure import Failure
from twisted.web import http, http_headers, resource, server
from twisted.web.http import HTTPChannel
from twisted.web.http import parse_qs as _parse_qs
from twisted.web.iweb import INonQueuedRequestFactory

log = Logger()

#: ``DOCKERSPACES_FAST_PATHS=0`` (or ``off``/``no``/``false``) turns every fast path off
ENV = "DOCKERSPACES_FAST_PATHS"
_OFF_VALUES = frozenset({"0", "off", "no", "false"})

#: twisted.web's own request-line parser (what :func:`parse_request_line` must agree with)
TWISTED_PARSE_REQUEST_LINE: Any = getattr(http, "_parseRequestLine", None)
#: twisted.web's chunked ``Transfer-Encoding`` decoder, ``(data_cb, finish_cb)``; its
#: ``dataReceived`` raises on malformed input and ``finish_cb`` gets the bytes after
ChunkedDecoder: Any = getattr(http, "_ChunkedTransferDecoder", None)


# -- the request line and head, read by regexes -------------------------------------------

#: an HTTP token (RFC 9110 5.6.2), as a regular-expression fragment
TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_TOKEN = re.compile(TOKEN)
_BAD_TARGET = re.compile(rb"[\x00-\x20\xb1-\xff]")


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


_parser_wanted = False


def install_request_line_parser() -> None:
    """Make twisted.web's HTTP channel use :func:`parse_request_line` while the fast
    paths are on (idempotent; taken back if they are switched off)."""
    global _parser_wanted  # noqa: PLW0603 - remembered for a later switch back on
    _parser_wanted = True
    if _on and getattr(http, "_parseRequestLine", None) is TWISTED_PARSE_REQUEST_LINE:
        http._parseRequestLine = parse_request_line


def _uninstall_request_line_parser() -> None:
    if TWISTED_PARSE_REQUEST_LINE is not None and http._parseRequestLine is not (TWISTED_PARSE_REQUEST_LINE):
        http._parseRequestLine = TWISTED_PARSE_REQUEST_LINE


#: A whole request head without a body is read by two regexes: the request line, then
#: every header line at once -- a token name, a value without NUL/CR/LF (SP/HTAB at its
#: edges stripped, as twisted.web does) -- anchored at line starts, so that the head is
#: simple exactly when each of its CRLFs ends a matched line and it has no bare CR or
#: LF (what twisted.web's line parser accepts, narrowed). No lazy quantifiers: they
#: retried the rest of a pattern at every byte.
_REQUEST_LINE = re.compile(rb"(" + TOKEN + rb") ([\x21-\xb0]+) (HTTP/1\.[01])\r\n")
_HEADER_LINE = re.compile(rb"(?m)^(" + TOKEN + rb"):[ \t]*((?:[^\x00\r\n]*[^ \t\x00\r\n])?)[ \t]*\r\n")
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


class SeamChannel(HTTPChannel):
    """An ``HTTPChannel`` that reads a bodiless request head arriving whole at once
    with two regexes (fast paths on), and lets a subclass answer a bad head
    (:meth:`bad_head`)."""

    _nonqueued: bool | None = None

    def _fast_data_received(self, data: bytes) -> None:
        """A whole request head without a body, alone in ``data`` and with nothing
        pending: parsed at once (the state twisted.web's line parser would leave, the
        same ``allHeadersReceived``/``allContentReceived`` calls); anything else --
        bodies, pipelined requests, partial heads, odd bytes, over-long heads -- goes
        through twisted.web's line parser, which also answers every malformed one."""
        if (
            data[-4:] == b"\r\n\r\n"
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
        HTTPChannel.dataReceived(self, data)

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
            encode = http_headers._nameEncoder.encode  # canonical spelling, cached
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

    def bad_head(self) -> None:
        """A malformed or over-large request head: twisted.web's ``400`` and close
        (subclasses answer otherwise)."""
        HTTPChannel._respondToBadRequestAndDisconnect(self)

    def _respondToBadRequestAndDisconnect(self) -> None:
        self.bad_head()


def reading_request_line(channel: HTTPChannel) -> bool:
    """True while ``channel`` has not yet read a whole request line."""
    return bool(getattr(channel, "_HTTPChannel__first_line", False))


def head_received(channel: HTTPChannel) -> tuple[int, int]:
    """Bytes and header lines of the request head ``channel`` is reading."""
    return (getattr(channel, "_receivedHeaderSize", 0), getattr(channel, "_receivedHeaderCount", 0))


def request_line_seen(channel: HTTPChannel) -> tuple[bytes, bytes]:
    """The method and URI of the request line ``channel`` read, or empty."""
    return getattr(channel, "_command", b""), getattr(channel, "_path", b"")


def holds_channel(protocol: object, channel: HTTPChannel) -> bool:
    """Whether a transport's ``protocol`` is ``channel``, or twisted.web's generic
    HTTP/1.1-or-2 wrapper around it (its private ``_channel``; dockerspaces' own site
    serves HTTP/1.1 alone, but the takeover should not depend on that)."""
    return protocol is channel or getattr(protocol, "_channel", None) is channel


def detach_channel(channel: HTTPChannel) -> bytes:
    """The bytes ``channel`` read past its request (kept for pipelining), taken from
    it; the channel will never parse anything again (Upgrade takeover)."""
    buffered = b"".join(channel._dataBuffer)
    channel._dataBuffer = []
    channel._handlingRequest = True
    return buffered


# -- the request ----------------------------------------------------------------------------


def process_request(request: server.Request) -> None:
    """``server.Request.process`` without setting ``Server``/``Date`` up front (the
    request adds them when the head goes out, or the proxy sends the backend's);
    ``postpath`` unquoted only where a segment has a ``%``."""
    request.site = request.channel.site  # type: ignore[attr-defined]
    request.prepath = []
    request.postpath = [unquote_to_bytes(p) if b"%" in p else p for p in request.path[1:].split(b"/")]
    if request.path == b"*":
        request._handleStar()  # type: ignore[attr-defined]
        return
    try:
        resrc = request.site.getResourceFor(request)
        if resource._IEncodingResource.providedBy(resrc):  # type: ignore[attr-defined]
            encoder = resrc.getEncoder(request)
            if encoder is not None:
                request._encoder = encoder
        request.render(resrc)
    except BaseException:  # noqa: BLE001 - as twisted.web: any error is a 500
        request.processingFailed(Failure())


def receive_request(request: SeamRequest, command: bytes, path: bytes, version: bytes) -> None:
    """``http.Request.requestReceived`` without what a proxy never uses up front: the
    query is parsed into ``args`` only when something reads them, and a POST body is
    never parsed (sites here have ``parsePOSTFormSubmission=False``)."""
    if request.content is not None:
        request.content.seek(0, 0)
    request.method, request.uri, request.clientproto = command, path, version
    request.path = path.split(b"?", 1)[0]
    request._args = None
    request.process()


class SeamRequest(server.Request):
    """``server.Request`` whose ``process``/``requestReceived`` are the fast ones while
    the fast paths are on (:func:`process_request`, :func:`receive_request`)."""

    _args: dict[bytes, list[bytes]] | None = None

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


# -- writing to a plain TCP socket now ----------------------------------------------------
#
# FileDescriptor keeps what ``write`` was given in ``_tempDataBuffer``/``_tempDataLen``
# and what doWrite is sending in ``dataBuffer`` from ``offset``; these functions send
# at once and leave it in the state its own doWrite would.

_TCP: tuple[type[tcp.Connection], ...] = (tcp.Connection,)
#: the transports :func:`is_plain_tcp` says yes to: none with the fast paths off
_DIRECT: tuple[type[tcp.Connection], ...] = _TCP


def is_plain_tcp(transport: Any) -> bool:
    """True for Twisted's own TCP transport without TLS while the fast paths are on:
    the functions below may be used on it."""
    return isinstance(transport, _DIRECT) and not getattr(transport, "TLS", False)


def can_send_now(t: Any) -> bool:
    """True when :func:`send_now` may write on ``t`` (a plain TCP transport):
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
    unsent tail -- a view into ``data``, not a copy -- in the transport's buffer, for
    its ``doWrite`` to send when the socket is writable.
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


def relay_now(t: Any, data: bytes | memoryview) -> None:
    """:func:`send_now`, then pause ``t``'s producer as Twisted's own ``write`` would
    when what is left fills the buffer (a splice relaying bytes)."""
    if not send_now(t, data):
        t._maybePauseProducer()


def _idle_producer(t: Any) -> bool:
    # what FileDescriptor.doWrite would do once the buffer is empty: nothing, unless a
    # producer waits to be resumed (paused by the buffer, or a pull producer)
    return t.producer is None or (t.streamingProducer and not t.producerPaused)


def can_write_now(t: Any) -> bool:
    """True when bytes may go straight to the socket of the plain TCP transport ``t``
    (:func:`write_now`, :func:`send_all_now`): :func:`can_send_now`, nothing queued
    either, and no producer waiting for the buffer to drain."""
    return can_send_now(t) and not t._tempDataLen and _idle_producer(t)


def write_now(t: Any, data: bytes) -> None:
    """``t.write(data)``, sent at once when ``t`` is plain TCP with nothing queued.

    Twisted's ``write`` queues and registers the socket for writing; the bytes go out
    on the next reactor iteration, one more epoll wake-up and ``doWrite`` per request
    head sent to a backend. What the kernel does not take now is queued as usual.
    """
    if not (isinstance(t, _TCP) and not getattr(t, "TLS", False) and can_write_now(t)):
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
    :func:`can_write_now`); what the kernel does not take is queued with ``t.write`` as
    usual."""
    try:
        sent = t.socket.sendmsg(pieces)
    except OSError:
        sent = 0  # would block, or broken: the ordinary path finds out
    if sent < sum(map(len, pieces)):
        t.write(b"".join(pieces)[sent:])


def flush_now(t: Any) -> None:
    """Send what the plain TCP transport ``t`` has queued now, not on its next writable
    event (a finished small response: saves the reactor a wake-up and a ``doWrite``)."""
    if t._tempDataLen and can_send_now(t) and _idle_producer(t) and send_now(t, b""):
        t.stopWriting()


# -- for tests --------------------------------------------------------------------------------


def gai_resolver(reactor: Any, getaddrinfo: Callable[..., Any]) -> Any:
    """Twisted's ``getaddrinfo`` resolver (its thread pool and all) with another
    ``getaddrinfo``: the real lookup path without a network, for tests."""
    from twisted.internet._resolver import GAIResolver

    return GAIResolver(reactor, getaddrinfo=getaddrinfo)


# -- the switch -------------------------------------------------------------------------------

_on = False
_reason: str | None = "not decided yet"
_binders: list[Callable[[bool], None]] = []


def fast_paths_on() -> bool:
    """Whether the fast paths are in use."""
    return _on


def why_off() -> str | None:
    """Why the fast paths are off (None while they are on)."""
    return None if _on else _reason


def when_switched(binder: Callable[[bool], None]) -> Callable[[bool], None]:
    """Call ``binder(on)`` now and at every later switch: a module outside the seam
    binds its own choice between a fast path and Twisted's road this way (once, not
    per call)."""
    _binders.append(binder)
    binder(_on)
    return binder


def _apply(on: bool, reason: str | None) -> None:
    global _on, _reason, _DIRECT  # noqa: PLW0603 - the one switch, bound once, read per call
    _on, _reason = on, reason
    _DIRECT = _TCP if on else ()
    # class attributes, so that no call tests a flag
    SeamChannel.dataReceived = (  # type: ignore[method-assign]
        SeamChannel._fast_data_received if on else HTTPChannel.dataReceived  # type: ignore[assignment]
    )
    SeamRequest.process = process_request if on else server.Request.process  # type: ignore[method-assign,assignment]
    SeamRequest.requestReceived = (  # type: ignore[method-assign]
        receive_request if on else server.Request.requestReceived  # type: ignore[assignment]
    )
    if not on:
        _uninstall_request_line_parser()
    elif _parser_wanted:
        install_request_line_parser()
    for binder in _binders:
        binder(on)


def forced_off(environ: Mapping[str, str]) -> bool:
    """True when ``environ`` turns the fast paths off (``DOCKERSPACES_FAST_PATHS=0``)."""
    return environ.get(ENV, "").strip().lower() in _OFF_VALUES


def decide(environ: Mapping[str, str] = os.environ) -> bool:
    """Turn the fast paths on, or every one of them off with one log line saying why:
    forced off by ``environ``, a private name missing, or a self-test mismatch. Run
    when this module is imported; True when they are on."""
    if forced_off(environ):
        reason: str | None = f"{ENV}={environ[ENV]}"
        _apply(False, reason)
        log.info("twisted.web fast paths off: {reason}", reason=reason)
        return False
    missing = missing_names()
    reason = ("missing Twisted internals: " + ", ".join(missing)) if missing else None
    if reason is None:
        try:
            reason = self_test()
        except Exception as e:  # noqa: BLE001 - any failure of the self-test turns them off
            reason = f"self-test raised {type(e).__name__}: {e}"
    _apply(reason is None, reason)
    if reason is not None:
        log.warn(  # noqa: G010 - twisted.logger
            "twisted.web fast paths off (Twisted's own code is used): {reason}", reason=reason
        )
    return reason is None


# -- the self-test ----------------------------------------------------------------------------


def _private_names() -> list[tuple[str, Any, str]]:
    """(where, object, name) of every private name the seam reads."""
    from twisted.internet.testing import MemoryReactor

    return [
        ("HTTPChannel", HTTPChannel, "_HTTPChannel__first_line"),
        ("HTTPChannel", HTTPChannel, "_HTTPChannel__header"),
        ("HTTPChannel", HTTPChannel, "_receivedHeaderCount"),
        ("HTTPChannel", HTTPChannel, "_receivedHeaderSize"),
        ("HTTPChannel", HTTPChannel, "_respondToBadRequestAndDisconnect"),
        ("HTTPChannel()", HTTPChannel(), "_handlingRequest"),
        ("HTTPChannel()", HTTPChannel(), "_dataBuffer"),
        ("LineReceiver", LineReceiver, "_buffer"),
        ("LineReceiver", LineReceiver, "_busyReceiving"),
        ("twisted.web.http", http, "_parseRequestLine"),
        ("twisted.web.http", http, "_ChunkedTransferDecoder"),
        ("twisted.web.http_headers", http_headers, "_nameEncoder"),
        ("Headers()", http_headers.Headers(), "_rawHeaders"),
        ("twisted.web.resource", resource, "_IEncodingResource"),
        ("server.Request", server.Request, "_handleStar"),
        ("server.Request", server.Request, "_encoder"),
        ("FileDescriptor()", abstract.FileDescriptor(MemoryReactor()), "_tempDataBuffer"),
        ("FileDescriptor()", abstract.FileDescriptor(MemoryReactor()), "_tempDataLen"),
        ("FileDescriptor", abstract.FileDescriptor, "_writeDisconnecting"),
        ("FileDescriptor", abstract.FileDescriptor, "_writeDisconnected"),
        ("FileDescriptor", abstract.FileDescriptor, "_maybePauseProducer"),
        ("SSL4ServerEndpoint()", _ssl_endpoint(MemoryReactor()), "_sslContextFactory"),
    ]


def _ssl_endpoint(reactor: Any) -> Any:
    from twisted.internet.endpoints import SSL4ServerEndpoint

    return SSL4ServerEndpoint(reactor, 0, None)


def tls_context_of(endpoint: Any) -> Any:
    """The TLS context factory of an ``ssl:`` server endpoint (``serverFromString``
    builds it from the description; the endpoint keeps it private): a ``--workers``
    child wraps the listening socket it adopts in it."""
    return endpoint._sslContextFactory


def missing_names() -> list[str]:
    """The private Twisted names the seam reads that this Twisted lacks."""
    return [f"{where}.{name}" for where, owner, name in _private_names() if not hasattr(owner, name)]


def self_test() -> str | None:
    """None when every fast path behaves as Twisted's own code does here, else the
    first difference: known request lines and heads through the fast parsers and
    through twisted.web's ``HTTPChannel``/``Request``, requests through
    :func:`process_request` and ``server.Request.process``, writes through the direct
    socket paths and through the transport's ``write``; the chunked decoder on known
    bodies."""
    with _twisted_parser():
        for check in (_check_request_lines, _check_heads, _check_requests, _check_writes, _check_chunked):
            reason = check()
            if reason is not None:
                return reason
    return None


@contextmanager
def _twisted_parser() -> Iterator[None]:
    """twisted.web's own request-line parser installed meanwhile (the reference)."""
    current = getattr(http, "_parseRequestLine", None)
    if TWISTED_PARSE_REQUEST_LINE is not None:
        http._parseRequestLine = TWISTED_PARSE_REQUEST_LINE
    try:
        yield
    finally:
        if current is not None:
            http._parseRequestLine = current


def _outcome(parse: Callable[[bytes], Any], line: bytes) -> Any:
    try:
        return ("ok", parse(line))
    except ValueError as e:
        return ("ValueError", str(e))


def _check_request_lines() -> str | None:
    twisted_parse = TWISTED_PARSE_REQUEST_LINE
    assert twisted_parse is not None  # noqa: S101 - missing_names() checked it
    lines = [
        b"GET / HTTP/1.1",
        b"GET http://example.org/a?b=1 HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
        b"M-SEARCH * HTTP/1.1",
        b"get /a HTTP/1.0",
        b"GET  / HTTP/1.1",
        b"GET /\tx HTTP/1.1",
        b"GET / HTTP/1.2",
        b"GET / http/1.1",
        b"GET / HTTP/2.0",
        b"GET /",
        b"GET",
        b"",
        b" GET / HTTP/1.1",
        b"GET / HTTP/1.1 ",
        b"GET /a b HTTP/1.1",
        b"G@T / HTTP/1.1",
    ]
    for c in range(256):
        lines += [b"GET /a" + bytes([c]) + b"b HTTP/1.1", b"G" + bytes([c]) + b"T / HTTP/1.1"]
    for line in lines:
        ours, theirs = _outcome(parse_request_line, line), _outcome(twisted_parse, line)
        if ours != theirs:
            return f"request line {line!r}: {ours} here, {theirs} from twisted.web"
    return None


#: request heads the fast head path must read as twisted.web does (and the bad ones it
#: must leave to twisted.web's answers)
_HEADS = [
    b"GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /a?b=1&c HTTP/1.1\r\nHost: h\r\nX-Thing:  v  w \t\r\nx-thing:\t2\r\nAccept: */*\r\n\r\n",
    b"GET http://example.org/a?b HTTP/1.1\r\nhost: example.org\r\nCONNECTION: close\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
    b"HEAD /h HTTP/1.0\r\nHost: h\r\nEmpty:\r\n\r\n",
    b"GET /e HTTP/1.1\r\nExpect: 100-continue\r\nCookie: a=1; b=2\r\n\r\n",
    b"DELETE /x HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
    b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: nul\x00\r\n\r\n",
    b"GET / HTTP/1.1\r\nX: bare\rCR\r\n\r\n",
    b"GET / HTTP/1.1\r\nNo-Colon\r\n\r\n",
    b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
    b"G@T / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET / HTTP/1.2\r\nHost: h\r\n\r\n",
    b"GET /\x7f\xb0 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /\xb1 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n",
]
_NEXT = b"GET /next HTTP/1.1\r\nHost: n\r\n\r\n"


class _Seen(http.Request):
    """Records what a request looks like to a resource, answers ``ok``."""

    seen: list[Any]

    def process(self) -> None:
        self.seen.append(
            (
                self.method,
                self.uri,
                self.path,
                self.clientproto,
                self.args,
                list(self.requestHeaders.getAllRawHeaders()),
                self.channel.persistent,
            )
        )  # type: ignore[union-attr]
        self.setHeader(b"content-length", b"2")
        self.write(b"ok")
        self.finish()


def _serve_head(raw: bytes, fast: bool) -> tuple[Any, ...]:
    """``raw`` and then a second request through a fresh channel: what the requests
    looked like, the bytes answered, whether it closed, how often the fast path ran."""
    from twisted.internet.testing import StringTransport

    seen: list[Any] = []
    taken: list[int] = []

    class Channel(SeamChannel):
        timeOut = None  # type: ignore[assignment]
        abortTimeout = None  # type: ignore[assignment]
        requestFactory = type("Seen", (_Seen,), {"seen": seen})  # type: ignore[assignment]
        dataReceived = SeamChannel._fast_data_received if fast else HTTPChannel.dataReceived

        def _fast_head(self, m: Any, pairs: list[tuple[bytes, bytes]]) -> None:
            taken.append(1)
            SeamChannel._fast_head(self, m, pairs)

    channel = Channel()
    t = StringTransport()
    channel.makeConnection(t)
    channel.dataReceived(raw)
    if not t.disconnecting:
        channel.dataReceived(_NEXT)
    return seen, t.value(), t.disconnecting, len(taken)


def _check_heads() -> str | None:
    for i, raw in enumerate(_HEADS):
        ours, theirs = _serve_head(raw, fast=True), _serve_head(raw, fast=False)
        if ours[:3] != theirs[:3]:
            return f"request head {raw!r}: read as {ours[:3]!r} here, {theirs[:3]!r} by twisted.web"
        if i == 0 and ours[3] != 2:
            return f"the fast head path was not taken for {raw!r}"
    return None


def _serve_request(raw: bytes, fast: bool) -> tuple[Any, ...]:
    """``raw`` through a channel of a ``Site`` with a recording resource, processed by
    :func:`process_request` or ``server.Request.process``: what the resource saw,
    the answer without its ``Server``/``Date`` lines, whether it closed."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    seen: list[Any] = []

    class Leaf(resource.Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            seen.append((request.prepath, request.postpath, request.path, request.args, request.sitepath))
            return b"hello " * 20

    root = resource.Resource()
    root.putChild(b"a", Leaf())
    root.putChild(b"z", resource.EncodingResourceWrapper(Leaf(), [server.GzipEncoderFactory()]))

    class Fast(SeamRequest):
        def process(self) -> None:
            process_request(self)

        def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
            receive_request(self, command, path, version)

    site = server.Site(root, reactor=Clock(), timeout=None)
    channel = HTTPChannel()
    channel.timeOut = None  # type: ignore[assignment]
    channel.abortTimeout = None  # type: ignore[assignment]
    channel.site = site  # type: ignore[attr-defined]
    channel.requestFactory = Fast if fast else server.Request  # type: ignore[assignment]
    t = StringTransport()
    channel.makeConnection(t)
    channel.dataReceived(raw)
    lines = [line for line in t.value().split(b"\r\n") if not line.lower().startswith((b"server:", b"date:"))]
    return seen, lines, t.disconnecting


#: requests :func:`process_request` must answer as ``server.Request.process``
_REQUESTS = [
    b"GET /a/b%41/%2f//c?x=1&x=2&y HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /a HTTP/1.0\r\n\r\n",
    b"GET /missing HTTP/1.1\r\nHost: h\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET * HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /z HTTP/1.1\r\nHost: h\r\nAccept-Encoding: gzip\r\n\r\n",
    b"HEAD /a HTTP/1.1\r\nHost: h\r\n\r\n",
]


def _check_requests() -> str | None:
    for raw in _REQUESTS:
        ours, theirs = _serve_request(raw, fast=True), _serve_request(raw, fast=False)
        if ours != theirs:
            return f"request {raw!r}: processed as {ours!r} here, {theirs!r} by twisted.web"
    return None


def _transport(sndbuf: int | None = None) -> tuple[Any, socket.socket, Any]:
    """A ``tcp.Connection`` on one end of a socketpair (a MemoryReactor's), its peer."""
    from twisted.internet.protocol import Protocol
    from twisted.internet.testing import MemoryReactor

    a, b = socket.socketpair()
    if sndbuf is not None:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    b.setblocking(False)
    reactor = MemoryReactor()
    t = tcp.Connection(a, Protocol(), reactor)
    t.connected = 1
    return t, b, reactor


class _Producer:
    """A streaming producer that notes whether it is paused."""

    paused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        pass


def _write_case(name: str, fast: bool, sndbuf: int | None = None) -> tuple[Any, ...]:
    """One write scenario through the direct path or Twisted's ``write``: the bytes
    the peer got, and what was left registered, paused or buffered along the way."""
    head, small, big = b"HTTP/1.1 200 OK\r\n\r\n", b"hello", bytes(range(256)) * 512
    t, peer, reactor = _transport(sndbuf)
    producer = _Producer()
    events: list[Any] = []
    try:
        if name == "write_now":
            if fast:
                write_now(t, head)
                events.append(reactor.getWriters() == [])
            else:
                t.write(head)
                t.doWrite()
                events.append(True)
        elif name == "send_now":
            t.write(head)
            if fast:
                events.append(can_send_now(t))
                events.append(send_now(t, small))
            else:
                t.write(small)
                t.doWrite()
                events += [True, True]
        elif name == "send_all_now":
            if fast:
                events.append(can_write_now(t))
                send_all_now(t, [head, small])
                events.append(reactor.getWriters() == [])
            else:
                t.writeSequence([head, small])
                t.doWrite()
                events += [True, True]
        elif name == "flush_now":
            t.write(head + small)
            if fast:
                flush_now(t)
                events.append(reactor.getWriters() == [])
            else:
                t.doWrite()
                events.append(True)
        elif name == "relay_now":  # a partial send: the rest queued, the producer paused
            t.registerProducer(producer, True)
            t.write(head)
            if fast:
                relay_now(t, big)
            else:
                t.write(big)
            events.append((producer.paused, t in reactor.getWriters()))
        got = b""
        for _ in range(10_000):
            try:
                got += peer.recv(1 << 20)
            except BlockingIOError:
                if t not in reactor.getWriters():
                    break
                t.doWrite()
        events.append((producer.paused, len(t.dataBuffer) - t.offset, t._tempDataLen))
        return got, events
    finally:
        t.socket.close()
        peer.close()


def _check_writes() -> str | None:
    for name, sndbuf in (
        ("write_now", None),
        ("send_now", None),
        ("send_all_now", None),
        ("flush_now", None),
        ("relay_now", 4096),
    ):
        ours, theirs = _write_case(name, True, sndbuf), _write_case(name, False, sndbuf)
        if ours[0] != theirs[0]:
            return (
                f"{name}: the peer got {len(ours[0])} bytes (…{ours[0][-20:]!r}) here, "
                f"{len(theirs[0])} (…{theirs[0][-20:]!r}) through twisted's write"
            )
        if ours[1] != theirs[1]:
            return f"{name}: transport states {ours[1]!r} here, {theirs[1]!r} through write"
    return None


#: (chunked body, the data it carries, the bytes after it); then bodies it must refuse
_CHUNKED = [
    (b"5\r\nhello\r\n0\r\n\r\n", b"hello", b""),
    (b"5;ext=1\r\nhello\r\nA\r\n0123456789\r\n0\r\nTrailer: x\r\n\r\nnext", b"hello0123456789", b"next"),
    (b"0\r\n\r\n", b"", b""),
]
_BAD_CHUNKED = [b"zz\r\nhello\r\n", b"5\r\nhelloXX", b"-1\r\n", b"0x5\r\nhello\r\n"]


def _decode(body: bytes, bytewise: bool) -> tuple[bytes, bytes | None] | str:
    data: list[bytes] = []
    extra: list[bytes] = []
    decoder = ChunkedDecoder(data.append, extra.append)
    try:
        for piece in [body[i : i + 1] for i in range(len(body))] if bytewise else [body]:
            if extra:
                break
            decoder.dataReceived(piece)
    except Exception as e:  # noqa: BLE001 - which error twisted raises is not our contract
        return f"refused ({type(e).__name__})"
    return b"".join(data), b"".join(extra) if extra else None


def _check_chunked() -> str | None:
    for body, want, after in _CHUNKED:
        got = _decode(body, bytewise=False)
        if got != (want, after) or (after == b"" and _decode(body, bytewise=True) != got):
            return f"chunked body {body!r}: decoded as {got!r}, expected {(want, after)!r}"
    for body in _BAD_CHUNKED:
        got = _decode(body, bytewise=False)
        if not isinstance(got, str):
            return f"chunked body {body!r}: decoded as {got!r}, expected a refusal"
    return None


decide()
