"""The ``dsroute`` cookie: an opaque reference to the route a page came from.

A page served under ``/x:IMAGE:TAG:PORT:ENV/`` that loads ``/static/app.js`` (an
absolute path) is routed back to its container by this cookie. The cookie used to carry
the raw route segment -- env values included -- and went with every request to every
backend. Now it carries only a reference: the first 128 bits of an HMAC-SHA256 of the
segment under a key made at start, naming an entry of a bounded server-side table
(least recently used entries go first). A reference the table does not hold (forged,
evicted, from before a restart) routes nothing: the request falls through as if it
had no cookie.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections import OrderedDict
from collections.abc import Callable

from attrs import define, field
from twisted.web.server import Request

COOKIE_NAME = b"dsroute"

#: our own cookies (the route, and --auth accounts' session and CSRF cookies): never
#: forwarded to a backend; each name starts with "ds"
OWN_COOKIES = frozenset({COOKIE_NAME, b"dssession", b"dscsrf"})

#: longest route segment remembered (longer ones get no cookie)
MAX_SEGMENT = 4096


@define
class RouteCookies:
    """Route segments by opaque reference, for the ``dsroute`` cookie (see module)."""

    size: int = 4096
    key: bytes = field(factory=lambda: os.urandom(32), repr=False)
    _table: OrderedDict[bytes, str] = field(factory=OrderedDict, repr=False)
    _refs: dict[str, bytes] = field(factory=dict, repr=False)
    #: --workers: told of every new reference (``"route"``, reference, segment), so
    #: that the other processes know it too (:meth:`learn`)
    noted: Callable[[str, str, str], None] | None = field(default=None, repr=False)

    def ref(self, segment: str) -> bytes | None:
        """The cookie value naming ``segment`` (remembered); None when it is too long."""
        ref = self._refs.get(segment)
        if ref is None:
            if len(segment) > MAX_SEGMENT:
                return None
            mac = hmac.new(self.key, segment.encode("utf-8", "surrogateescape"), hashlib.sha256).digest()[:16]
            ref = base64.urlsafe_b64encode(mac).rstrip(b"=")
            self._keep(ref, segment)
            if self.noted is not None:
                self.noted("route", ref.decode("ascii"), segment)
        else:
            self._table.move_to_end(ref)
        return ref

    def learn(self, ref: bytes, segment: str) -> None:
        """Hold a reference another process made (same key: same reference)."""
        if len(segment) <= MAX_SEGMENT and ref not in self._table:
            self._keep(ref, segment)

    def _keep(self, ref: bytes, segment: str) -> None:
        while len(self._table) >= self.size:
            _, old = self._table.popitem(last=False)
            self._refs.pop(old, None)
        self._table[ref] = segment
        self._refs[segment] = ref

    def header(self, segment: str, secure: bool) -> bytes | None:
        """The ``Set-Cookie`` value for ``segment`` (``Secure`` on a TLS listener)."""
        ref = self.ref(segment)
        if ref is None:
            return None
        return b"dsroute=" + ref + b"; Path=/; HttpOnly; SameSite=Lax" + (b"; Secure" if secure else b"")

    def segment(self, value: bytes | None) -> str | None:
        """The segment a cookie value names, or None (unknown, evicted, forged)."""
        if not value or len(value) > 64:
            return None
        segment = self._table.get(value.strip(b'"'))
        if segment is not None:
            self._table.move_to_end(value.strip(b'"'))
        return segment

    def from_request(self, request: Request) -> str | None:
        """The segment named by ``request``'s ``dsroute`` cookie, if any."""
        value = self.value_of(request)
        return None if value is None else self.segment(value)

    @staticmethod
    def value_of(request: Request) -> bytes | None:
        """The raw value of ``request``'s ``dsroute`` cookie (None: it has none)."""
        header = request.requestHeaders.getRawHeaders(b"cookie")
        if not header:
            return None
        for line in header:
            value = cookie_value(line, COOKIE_NAME)
            if value is not None:
                return value
        return None


def cookie_value(header: bytes, name: bytes) -> bytes | None:
    """The value of cookie ``name`` in one ``Cookie`` header line."""
    for part in header.split(b";"):
        k, sep, v = part.strip().partition(b"=")
        if sep and k == name:
            return v
    return None


def without_own_cookies(header: bytes) -> bytes | None:
    """A ``Cookie`` header line less dockerspaces' own cookies (None if nothing is left)."""
    if b"ds" not in header:
        return header
    parts = [p for p in header.split(b";") if p.strip().partition(b"=")[0] not in OWN_COOKIES]
    kept = b";".join(parts).strip()
    return kept or None
