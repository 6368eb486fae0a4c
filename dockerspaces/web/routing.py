"""Pure routing helpers the root resource calls.

- :func:`route_from_referer`: the first fallback that routes a request without a
  known prefix (absolute asset paths, WebSockets) to the route its page came from
  (the second, the ``dsroute`` cookie, is :mod:`dockerspaces.web.routecookie`);
- :class:`HostPolicy`: may ``host:``/``shost:`` reach HOST:PORT (and at which address)?
- :func:`cors_headers`, :func:`is_preflight`, :func:`preflight`: ``--cors``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from typing import Any

from attrs import field, frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IResolutionReceiver
from twisted.web.server import Request
from zope.interface import implementer  # type: ignore[import-untyped]

from ..spec import HostTarget, JobSpec, SpecError, parse_route, split_uri

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


# -- Referer / cookie fallbacks -------------------------------------------------------


def _routable(segment: str) -> bool:
    try:
        route = parse_route(segment)
    except SpecError:
        return False
    return isinstance(route, (JobSpec, HostTarget))


def route_from_referer(referer: bytes | None, host: bytes | None) -> str | None:
    """The first segment of the Referer's path if it is a job or host route prefix.

    Only when the Referer names no host or the same host as ``host`` (the request's
    ``Host``); ``None`` otherwise.
    """
    if not referer:
        return None
    ref = referer.strip()
    low = ref.lower()
    if low.startswith((b"http://", b"https://")):
        after = ref.split(b"//", 1)[1]
        cut = len(after)
        for sep in (b"/", b"?", b"#"):
            i = after.find(sep)
            if 0 <= i < cut:
                cut = i
        authority = after[:cut].rpartition(b"@")[2]
        if host is None or authority.lower() != host.strip().lower():
            return None
        path = after[cut:]
    elif ref.startswith(b"/") and not ref.startswith(b"//"):
        path = ref
    else:
        return None
    path = path.split(b"#", 1)[0]
    if not path.startswith(b"/"):
        return None
    segment = split_uri(path).segment
    return segment if segment and _routable(segment) else None


# -- host: policy ---------------------------------------------------------------------


class Forbidden(Exception):
    """``host:``/``shost:`` may not reach this target; ``reason`` says why (for a 403)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def parse_ip(text: str) -> IPAddress | None:
    """An IP address (zone id dropped, IPv4-mapped IPv6 as IPv4), or None."""
    try:
        addr = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@implementer(IResolutionReceiver)
class _Collect:
    """Gathers one resolution's addresses into ``d`` (which may already have fired
    with a timeout: what the resolver reports afterwards is dropped)."""

    def __init__(self) -> None:
        self.addresses: list[str] = []
        self.d: Deferred[list[str]] = Deferred()

    def resolutionBegan(self, resolution: Any) -> None:
        pass

    def addressResolved(self, address: Any) -> None:
        self.addresses.append(address.host)

    def resolutionComplete(self) -> None:
        if not self.d.called:
            self.d.callback(self.addresses)


class ResolveError(Exception):
    """A host name that cannot be looked up (not encodable, or no answer in time)."""


#: longest wait for a ``host:`` name's addresses (the system resolver's own retries
#: can take longer; the request gets a 502 instead of waiting for them)
RESOLVE_TIMEOUT = 15.0


def resolver_from(
    resolver: Any, clock: Any = None, timeout: float = RESOLVE_TIMEOUT
) -> Callable[[str], Deferred[list[str]]]:
    """Adapt an ``IHostnameResolver`` (e.g. ``reactor.nameResolver``) to a lookup function.

    The lookup always fires: a name the resolver could not encode (twisted's
    ``GAIResolver`` would fail in a Deferred of its own and never complete) fails with
    :class:`ResolveError` at once, and with a ``clock``, so does a lookup without an
    answer after ``timeout`` seconds.
    """

    def resolve(name: str) -> Deferred[list[str]]:
        try:
            name.encode("idna")  # what getaddrinfo does with it
        except UnicodeError as e:
            return fail(ResolveError(f"cannot look up {name[:80]!r}: {e}"))
        c = _Collect()
        try:
            resolver.resolveHostName(c, name, 0)
        except Exception as e:  # noqa: BLE001 - a resolver refusing the name at once
            return fail(ResolveError(f"cannot look up {name[:80]!r}: {e}"))
        if clock is not None and not c.d.called:

            def expire() -> None:
                if not c.d.called:
                    c.d.errback(ResolveError(f"no address for {name[:80]!r} within {timeout:g} s"))

            timer = clock.callLater(timeout, expire)

            def done(result: Any) -> Any:
                if timer.active():
                    timer.cancel()
                return result

            c.d.addBoth(done)
        return c.d

    return resolve


#: how many (host, port) verdicts :meth:`HostPolicy.check_literal` keeps
VERDICT_CACHE = 1024
_NAME = object()  # verdict: a host name, not an IP literal


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _norm(name: str) -> str:
    return name.lower().rstrip(".")


@frozen
class HostPolicy:
    """Which ``host:``/``shost:`` targets may be reached, and at which address.

    Refused unless ``allow`` (``--allow-host`` names, addresses or CIDRs) names them:
    loopback and link-local addresses, every address of this machine (``local``),
    Docker's networks, where slot containers have addresses of their own
    (``blocked``), and the engines and peers (``engines``: their names and addresses,
    every port) -- each of which would bypass the broker or reach a Docker API (root
    on that host). Always refused: this instance's own listening ports
    (``own_ports``) on this machine. ``resolve``: name → Deferred list of address
    strings (e.g. ``resolver_from(reactor.nameResolver)``).

    What a running instance learns later (the engines' network lists, addresses of
    interfaces that came up) is added with :meth:`update`; each change forgets the
    cached verdicts and raises ``generation``, so that callers caching a verdict of
    their own know to ask again.
    """

    allow: tuple[str, ...]
    own_ports: frozenset[int] | set[int]
    resolve: Callable[[str], Deferred[list[str]]] | None = None
    local: frozenset[str] = frozenset()
    blocked: frozenset[IPNetwork] = frozenset()
    engines: frozenset[str] = frozenset()
    _names: frozenset[str] = field(init=False)
    _nets: tuple[IPNetwork, ...] = field(init=False)
    _engine_names: frozenset[str] = field(init=False)
    # what update() added, per source; merged into the two sets the checks read
    _added_local: dict[str, frozenset[str]] = field(init=False, factory=dict, eq=False, repr=False)
    _added_nets: dict[str, frozenset[IPNetwork]] = field(init=False, factory=dict, eq=False, repr=False)
    _local_now: frozenset[str] = field(init=False, eq=False, repr=False)
    _blocked_now: tuple[IPNetwork, ...] = field(init=False, eq=False, repr=False)
    #: how many times :meth:`update` changed the policy
    generation: int = field(init=False, default=0, eq=False)
    # (host, port) -> checked address, Forbidden, or _NAME (needs resolving): the
    # verdict for an IP literal is a pure function of the policy (until an update)
    _verdicts: dict[tuple[str, int], str | Forbidden | object] = field(
        init=False, factory=dict, eq=False, repr=False
    )

    def __attrs_post_init__(self) -> None:
        names, nets = set(), []
        for entry in self.allow:
            try:
                nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                names.add(_norm(entry))
        object.__setattr__(self, "_names", frozenset(names))
        object.__setattr__(self, "_nets", tuple(nets))
        object.__setattr__(self, "_engine_names", frozenset(_norm(e) for e in self.engines))
        self._merge()

    def _merge(self) -> None:
        local = set(self.local)
        for more in self._added_local.values():
            local |= more
        nets = set(self.blocked)
        for added in self._added_nets.values():
            nets |= added
        object.__setattr__(self, "_local_now", frozenset(local))
        object.__setattr__(self, "_blocked_now", tuple(nets))

    def update(
        self, source: str, *, local: Iterable[str] | None = None, networks: Iterable[IPNetwork] | None = None
    ) -> bool:
        """Set the addresses of this machine (``local``) and the Docker networks
        (``networks``) that ``source`` (e.g. an engine's name) adds to those given at
        construction; None leaves that part of ``source``'s as it was. True when the
        policy changed: cached verdicts are forgotten and ``generation`` goes up."""
        changed = False
        if local is not None:
            new_local = frozenset(str(a) for a in local)
            if self._added_local.get(source, frozenset()) != new_local:
                self._added_local[source] = new_local
                changed = True
        if networks is not None:
            new_nets = frozenset(networks)
            if self._added_nets.get(source, frozenset()) != new_nets:
                self._added_nets[source] = new_nets
                changed = True
        if changed:
            self._merge()
            self._verdicts.clear()
            object.__setattr__(self, "generation", self.generation + 1)
        return changed

    @property
    def local_now(self) -> frozenset[str]:
        """Every address of this machine known now (given and updated)."""
        return self._local_now

    @property
    def blocked_now(self) -> frozenset[IPNetwork]:
        """Every refused Docker network known now (given and updated)."""
        return frozenset(self._blocked_now)

    def check(self, host: str, port: int) -> Deferred[str]:
        """The address to connect to for HOST:PORT, or a failure with :class:`Forbidden`
        (:class:`ResolveError` when the name cannot be looked up)."""
        try:
            address = self.check_literal(host, port)
        except Forbidden as e:
            return fail(e)
        if address is not None:
            return succeed(address)
        if self.resolve is None:
            return fail(Forbidden(f"cannot resolve {host!r}: no resolver configured"))
        d = self.resolve(host)

        def got(addresses: list[str]) -> str:
            if not addresses:
                raise Forbidden(f"{host!r} does not resolve to any address")
            # every address must pass (a name must not smuggle in a loopback address);
            # prefer IPv4 for the connection
            checked = [self._check_address(host, a, port) for a in addresses]
            v4 = [a for a in checked if ":" not in a]
            return (v4 or checked)[0]

        return d.addCallback(got)

    def check_literal(self, host: str, port: int) -> str | None:
        """:meth:`check` without a Deferred for an IP-literal HOST: the address to connect
        to, or :class:`Forbidden` raised; ``None`` when HOST is a name (use :meth:`check`).

        Verdicts are cached per (HOST, PORT) (at most :data:`VERDICT_CACHE` entries,
        forgotten at each :meth:`update`): for a literal they depend on nothing but
        the policy itself.
        """
        key = (host, port)
        verdict = self._verdicts.get(key)
        if verdict is None:
            literal = parse_ip(host)
            if literal is None:
                verdict = _NAME
            else:
                try:
                    verdict = self._check_address(host, str(literal), port)
                except Forbidden as e:
                    verdict = e
            if len(self._verdicts) >= VERDICT_CACHE:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        if verdict is _NAME:
            return None
        if isinstance(verdict, Forbidden):
            raise Forbidden(verdict.reason)
        return verdict  # type: ignore[return-value]

    def _allowed(self, host: str, addr: IPAddress) -> bool:
        if _norm(host) in self._names:
            return True
        return any(addr.version == n.version and addr in n for n in self._nets)

    def _check_address(self, host: str, address: str, port: int) -> str:
        addr = parse_ip(address)
        if addr is None:
            raise Forbidden(f"{host!r} resolved to an unusable address {address!r}")
        text = str(addr)
        target = _hostport(host, port)
        local = self._local_now
        on_this_machine = addr.is_loopback or addr.is_unspecified or text in local
        if port in self.own_ports and on_this_machine:
            raise Forbidden(f"{target} is this dockerspaces instance's own port")
        if addr.is_unspecified or addr.is_multicast:
            raise Forbidden(f"{host} ({addr}) is not a host address")
        kind = None
        if addr.is_loopback:
            kind = "a loopback address"
        elif addr.is_link_local:
            kind = "a link-local address"
        elif text in local:
            kind = "an address of this machine"
        elif any(addr.version == n.version and addr in n for n in self._blocked_now):
            kind = "in a Docker network (slot containers are reached through dockerspaces)"
        elif text in self._engine_names or _norm(host) in self._engine_names:
            kind = "a Docker engine or peer of this instance"
        if kind is not None and not self._allowed(host, addr):
            raise Forbidden(f"{target} ({addr}) is {kind}; allow it with --allow-host")
        return text


# -- CORS -----------------------------------------------------------------------------


def _header(request: Any, name: bytes) -> bytes | None:
    values = request.requestHeaders.getRawHeaders(name)
    return values[0] if values else None


def _add_vary(request: Any, token: bytes) -> None:
    rh = request.responseHeaders
    existing = rh.getRawHeaders(b"vary") or []
    tokens = [t.strip() for v in existing for t in v.split(b",") if t.strip()]
    if b"*" in tokens or any(t.lower() == token.lower() for t in tokens):
        return
    rh.setRawHeaders(b"vary", [b", ".join([*tokens, token])])


def _drop_cors(rh: Any) -> None:
    for name, _ in list(rh.getAllRawHeaders()):
        if name.lower().startswith(b"access-control-"):
            rh.removeHeader(name)


def cors_headers(request: Request) -> None:
    """``--cors`` on an answer: echo ``Origin`` with credentials; replace other CORS headers."""
    rh = request.responseHeaders
    _drop_cors(rh)
    _add_vary(request, b"Origin")
    origin = _header(request, b"origin")
    if origin is None:
        return
    rh.setRawHeaders(b"access-control-allow-origin", [origin])
    rh.setRawHeaders(b"access-control-allow-credentials", [b"true"])


def is_preflight(request: Request) -> bool:
    """True for a CORS preflight: ``OPTIONS`` with ``Origin`` and a requested method."""
    return (
        request.method == b"OPTIONS"
        and _header(request, b"origin") is not None
        and _header(request, b"access-control-request-method") is not None
    )


DEFAULT_METHODS = b"GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"


def preflight(request: Request, max_age: int = 600) -> bytes:
    """Answer a preflight ``OPTIONS``: 204 echoing the requested method and headers.

    Sets status and headers; returns the (empty) body for ``render`` to return.
    """
    request.setResponseCode(204)
    cors_headers(request)
    rh = request.responseHeaders
    method = _header(request, b"access-control-request-method")
    rh.setRawHeaders(b"access-control-allow-methods", [method or DEFAULT_METHODS])
    asked = _header(request, b"access-control-request-headers")
    if asked:
        rh.setRawHeaders(b"access-control-allow-headers", [asked])
    rh.setRawHeaders(b"access-control-max-age", [str(max_age).encode()])
    _add_vary(request, b"Access-Control-Request-Method")
    _add_vary(request, b"Access-Control-Request-Headers")
    rh.removeHeader(b"content-type")
    return b""
