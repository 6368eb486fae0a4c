"""Every error a user sees is produced here: an HTTP answer with a clear message."""

from __future__ import annotations

from twisted.web.http import RESPONSES
from twisted.web.resource import Resource
from twisted.web.server import Request

from .site import done_or_gone


def write_error(request: Request, status: int, message: str, retry_after: int | None = None) -> bytes:
    """Set status and headers for an error answer and return its body (plain text)."""
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"text/plain; charset=utf-8"])
    request.responseHeaders.setRawHeaders(b"cache-control", [b"no-store"])
    if retry_after is not None:
        request.responseHeaders.setRawHeaders(b"retry-after", [str(int(retry_after)).encode()])
    reason = RESPONSES.get(status, b"Error").decode("latin-1")
    body = f"{status} {reason}: {message}\n".encode()
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    request.setHeader(b"x-dockerspaces-error", reason.encode("latin-1"))
    return b"" if request.method == b"HEAD" else body


def finish_error(request: Request, status: int, message: str, retry_after: int | None = None) -> None:
    """Answer an asynchronous request with an error, unless it is already gone or started."""
    if done_or_gone(request):
        return
    if getattr(request, "startedWriting", False):
        # Headers already went out: all we can do is cut the response short.
        transport = request.channel.transport if request.channel else None
        if transport is not None:
            transport.loseConnection()
        return
    body = write_error(request, status, message, retry_after)
    request.write(body)
    request.finish()


def status_of(exc: BaseException) -> tuple[int, int | None]:
    """Status and Retry-After for an exception (broker and engine errors carry them)."""
    status = getattr(exc, "status", None)
    if not isinstance(status, int):
        return 502, None
    retry = getattr(exc, "retry_after", None)
    return status, retry if isinstance(retry, int) else None


class ErrorResource(Resource):
    """A leaf answering every method with one error."""

    isLeaf = True

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__()
        self.status, self.message, self.retry_after = status, message, retry_after

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        """Write the error answer."""
        return write_error(request, self.status, self.message, self.retry_after)


class MethodNotAllowed(Resource):
    """A leaf answering 405 with ``Allow`` (twisted.web would answer 501 "Huh?")."""

    isLeaf = True

    def __init__(self, allow: bytes = b"GET, HEAD"):
        super().__init__()
        self.allow = allow

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        """Write the 405 answer."""
        request.setHeader(b"allow", self.allow)
        method = request.method.decode("latin-1", "replace")[:20]
        return write_error(request, 405, f"{method!r} is not allowed here; use {self.allow.decode()}")


class RedirectResource(Resource):
    """A leaf answering with a redirect (308 keeps method and body)."""

    isLeaf = True

    def __init__(self, location: bytes, status: int = 308):
        super().__init__()
        self.location, self.status = location, status

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        """Write the redirect."""
        request.setResponseCode(self.status)
        request.setHeader(b"location", self.location)
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"" if request.method == b"HEAD" else b"Moved to " + self.location + b"\n"
