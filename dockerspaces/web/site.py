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

import time
from collections.abc import Callable
from typing import Any

from twisted.web import resource as _resource
from twisted.web.http import datetimeToString
from twisted.web.resource import IResource
from twisted.web.server import Request, Site, version

from ..twistedseam import (
    TOKEN,
    TWISTED_PARSE_REQUEST_LINE,
    SeamChannel,
    SeamRequest,
    head_received,
    install_request_line_parser,
    parse_request_line,
    reading_request_line,
    request_line_seen,
    simple_head,
)

__all__ = [
    "TOKEN",
    "TWISTED_PARSE_REQUEST_LINE",
    "HeadDeadlineChannel",
    "LimitedRequest",
    "ProxySite",
    "done_or_gone",
    "http_date",
    "install_request_line_parser",
    "make_site",
    "on_lost",
    "parse_request_line",
    "refused",
    "simple_head",
]

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


_date_cache: list[Any] = [None, b""]


def http_date() -> bytes:
    """The ``Date`` header value for now, formatted once per second."""
    second = int(time.time())
    if _date_cache[0] != second:
        _date_cache[0] = second
        _date_cache[1] = datetimeToString(second)
    return _date_cache[1]  # type: ignore[no-any-return]


class LimitedRequest(SeamRequest):
    """A ``Request`` that refuses bodies over the site's ``max_body`` with ``413``
    (and the other changes of the module docstring)."""

    rejected = False
    _received = 0
    _lost_hooks: list[Callable[[Any], object]] | None = None

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
        # a chunked body may still end within this read: never process the request
        self.requestReceived = lambda command, path, version: None  # type: ignore[method-assign]
        channel: Any = self.channel
        channel.persistent = False
        # drop whatever else the client sends on this connection
        channel.rawDataReceived = lambda data: None
        channel.lineReceived = lambda line: None
        channel.transport.write(_too_large(size, limit))
        channel.transport.loseConnection()
        method, uri = request_line_seen(channel)
        refused(channel, 413, method, uri[:_LOGGED_URI], "body-too-large")


#: at most this much of a refused request's URI reaches the log
_LOGGED_URI = 200
#: the channel's own answers (twisted.web's ``RESPONSES`` has no 431)
_REFUSALS = {400: b"Bad Request", 414: b"URI Too Long", 431: b"Request Header Fields Too Large"}


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


def done_or_gone(request: Request) -> bool:
    """Whether nothing more can be written to ``request``: it is finished, or its
    client has gone.

    ``Request.connectionLost`` sets the public ``channel`` to None (with the private
    ``_disconnected``), and nothing else does while a request is unfinished; once it
    is finished, ``channel`` is deleted, hence ``finished`` first. A test double
    without a ``channel`` counts as connected.
    """
    return bool(request.finished) or getattr(request, "channel", True) is None


def on_lost(request: Request, hook: Callable[[Any], object]) -> None:
    """Call ``hook(reason)`` if the client goes before ``request`` is done: the cheap
    :meth:`LimitedRequest.on_connection_lost` when the request has it, else a
    ``notifyFinish`` errback (other ``Request`` classes, test doubles)."""
    add = getattr(request, "on_connection_lost", None)
    if add is not None:
        add(hook)
    else:
        request.notifyFinish().addErrback(hook)


class HeadDeadlineChannel(SeamChannel):
    """An ``HTTPChannel`` that drops clients too slow to send a request head (and, as a
    :class:`~dockerspaces.twistedseam.SeamChannel`, reads a bodiless request head that
    arrives whole at once with two regexes while the fast paths are on)."""

    head_timeout: float | None = 30.0
    _head_call: Any = None
    _head_armed = False

    def lineLengthExceeded(self, line: bytes) -> None:
        """A request line or header line over ``MAX_LENGTH``: 414 for the request
        line (a URI too long), 431 for a header line -- twisted.web only closes."""
        if reading_request_line(self):
            self._refuse(414, "uri-too-long", line)
        else:
            self._refuse(431, "head-too-large")

    def bad_head(self) -> None:
        """twisted.web's 400-and-close, but 414 when the request line alone is over
        ``totalHeadersSize``, 431 when the head is or has more than ``maxHeaders``
        lines."""
        size, count = head_received(self)
        if size > self.totalHeadersSize:
            if reading_request_line(self):
                self._refuse(414, "uri-too-long")
            else:
                self._refuse(431, "head-too-large")
        elif count > self.maxHeaders:
            self._refuse(431, "head-too-large")
        else:
            self._refuse(400, "bad-request")

    def _refuse(self, code: int, reason: str, line: bytes | None = None) -> None:
        """Answer ``code`` with no body, close, tell the site (``on_refused``)."""
        if self.transport is None or getattr(self, "_refused", False):
            return
        self._refused = True
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % (code, _REFUSALS[code])
        )
        self.loseConnection()
        # no more parsing of what the client sends after the refused head
        self.dataReceived = self.lineReceived = lambda *a: None  # type: ignore[method-assign]
        if line is not None:  # the request line itself: what of it can be read
            method, _, rest = line[:_LOGGED_URI].partition(b" ")
            uri = rest.partition(b" ")[0]
        elif reading_request_line(self):
            method = uri = b""
        else:
            method, uri = request_line_seen(self)
            uri = uri[:_LOGGED_URI]
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
