"""HTTP/1.1 header rules of the proxy: hop-by-hop headers, the request head sent to a
backend, ``Location`` rewriting, and the backend's response head parsed.

A response header block that is *plain* (every line ``token ":" value``, no bare CR
or LF, no byte ``bytes.strip`` would remove but SP/HTAB) is parsed and validated by
one anchored regex and passed on as received less its hop-by-hop lines
(:func:`drop_lines`); any other goes through :func:`parse_header_lines`, which joins
folded lines and drops what may not be sent on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from collections.abc import Set as AbstractSet

from attrs import define
from twisted.web.server import Request

from .routecookie import without_own_cookies
from .site import TOKEN

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
        # dockerspaces' own credential (/docker:local): never sent on
        b"x-dockerspaces-token",
    }
)
_DROP_REQUEST = HOP_BY_HOP | _OWN_REQUEST
#: set on a request whose ``Authorization`` header was dockerspaces' own credential
#: (``--auth accounts``): never forwarded then
OWN_AUTH_ATTR = "_dockerspaces_own_auth"

# request headers sent on filtered: our cookie out of Cookie; for host: targets no
# Authorization and no Referer naming env values
_FILTERED = frozenset({b"cookie", b"authorization", b"referer"})

Headers = list[tuple[bytes, bytes]]


class BadResponse(Exception):
    """The backend sent something that is not an HTTP/1.x response."""


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
        for raw in v.split(b","):
            t = raw.strip().lower()
            if t:
                out.add(t)
    return out


# the Connection values nearly every request and response carries
_COMMON_TOKENS = {
    v: frozenset({v.lower()})
    for v in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
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


def read_client_head(request: Request, external: bool = False) -> ClientHead:
    """One pass over the client's request headers (see :class:`ClientHead`): hop-by-hop
    headers, those named in ``Connection``, those the proxy sets itself and
    dockerspaces' own token are left out of ``kept``; dockerspaces' own cookies are
    taken out of ``Cookie``; ``external`` (a ``host:`` target, not one of our
    containers) also leaves out ``Authorization``."""
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
            elif lk in {b"content-length", b"transfer-encoding"}:
                has_body = True
            continue
        sent = values
        if lk in _FILTERED:  # one set lookup for the common header
            if lk == b"cookie":
                sent = [c for c in map(without_own_cookies, values) if c is not None]
            elif lk == b"authorization":
                # a host: target never gets it; our containers do unless it was
                # dockerspaces' own (--auth accounts: the gate marked it)
                if external or getattr(request, OWN_AUTH_ATTR, False):
                    continue
            elif not external:
                pass
            else:
                # a page of ours under /x:…:NAME=VALUE/ linking to a host: target
                # would hand it the env values: such a Referer stays here
                sent = [v for v in values if not _names_env(v)]
        for v in sent:
            kept.append((lk, b"%s: %s\r\n" % (k, v)))
    if named:
        wants = upgrade[0] if upgrade and b"upgrade" in named else None
        named -= _DROP_REQUEST
        if named:
            kept = [item for item in kept if item[0] not in named]
    else:
        wants = None
    return ClientHead(b"".join([line for _, line in kept]), host, xff, has_body, wants)


def _names_env(referer: bytes) -> bool:
    """True when a Referer's first path segment is a job route with env (``=``)."""
    path = referer
    if b"://" in path[:12]:
        path = path.split(b"://", 1)[1]
        path = path[path.find(b"/") :] if b"/" in path else b"/"
    first = path.lstrip(b"/").split(b"/", 1)[0].split(b"?", 1)[0]
    return first[:2] in (b"x:", b"y:") and b"=" in first


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
    host: bytes,
    body_length: int | None,
    upgrade: bytes | None = None,
) -> bytes:
    """The request head sent to the backend (request line + headers + blank line);
    ``head`` is the client's (:func:`read_client_head`), ``host`` the ``Host`` sent."""
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
                cut = min(
                    (i for i in (rest.find(b"/"), rest.find(b"?"), rest.find(b"#")) if i >= 0),
                    default=len(rest),
                )
                authority, path_part = rest[:cut], rest[cut:]
                if (
                    authority.lower() == backend_host.lower()
                    or (scheme == b"http://" and authority.lower() == backend_host.lower() + b":80")
                    or (scheme == b"https://" and authority.lower() == backend_host.lower() + b":443")
                ):
                    path = path_part if path_part.startswith(b"/") else b"/" + path_part
                break
    if path is None:
        return value
    if prefix and (path == prefix or path.startswith((prefix + b"/", prefix + b"?"))):
        return path
    return prefix + path


_COOKIE_PATH = re.compile(rb"(;[ \t]*[Pp][Aa][Tt][Hh][ \t]*=[ \t]*)([^;]*)")


def rewrite_cookie_path(value: bytes, *, prefix: bytes) -> bytes:
    """A ``Set-Cookie`` value with its ``Path`` under the route prefix (``Path=/`` →
    ``Path=PREFIX/``), so that one app's cookies go only to that app; a path already
    under the prefix, or not starting with ``/`` (the browser ignores it), stays."""

    def under(m: re.Match[bytes]) -> bytes:
        path = m.group(2)
        if not path.startswith(b"/") or path.rstrip(b" \t") == prefix or path.startswith(prefix + b"/"):
            return m.group(0)
        return m.group(1) + prefix + path

    return _COOKIE_PATH.sub(under, value) if prefix else value


#: One ``token ":" value`` line with no byte in the value that ``bytes.strip`` would
#: remove but SP/HTAB, the value without the SP/HTAB at its edges; anchored at line
#: starts. A header block is plain (parsed by this one regex, passed on as received)
#: when each of its CRLFs ends a matched line and it has no bare CR or LF. No lazy
#: quantifier: ``[^\r\n]*?`` retried the rest of the pattern at every byte.
_PLAIN_LINE = re.compile(rb"(?m)^(" + TOKEN + rb"):[ \t]*((?:[^\r\n\x0b\x0c]*[^ \t\r\n\x0b\x0c])?)[ \t]*\r\n")
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


def parse_response_head(head: bytes) -> tuple[bytes, int, bytes, Headers, bytes | None]:
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
