"""``/docker:local``: this instance's Docker Engine API behind an allow-list and a token.

The original exposed the host's Docker socket -- root on the host -- to anyone who could
reach its port. Here (SPEC "Security"):

- the route answers 404 unless ``--docker-api`` (``app.Routes.docker_api`` keeps that);
- the caller's own address (``request.getClientAddress()``; ``X-Forwarded-For`` is never
  trusted) must lie inside ``--docker-api-allow`` (default ``127.0.0.0/8``); an
  IPv4-mapped IPv6 address counts as its IPv4 address; a caller on a UNIX socket has no
  address and is refused;
- with ``--docker-api-token-file`` the request must carry ``X-Dockerspaces-Token: TOKEN``
  (the docker CLI and docker-py send it from ``HttpHeaders`` in ``config.json``),
  compared in constant time; the header is removed before the request goes on;
- anything else is answered ``403`` with the reason (never the token);
- every mutating call (a method other than GET/HEAD) is logged once: method, path
  (query values of secret-looking parameters redacted), caller.

Allowed requests go to the engine of ``--docker`` with the ``/docker:local`` prefix
stripped (the docker CLI keeps the prefix of ``DOCKER_HOST=tcp://H:P/docker:local`` in
its requests: ``/docker:local/_ping``, ``/docker:local/v1.41/containers/json``), through
:class:`~dockerspaces.web.proxy.Proxy`: responses stream as they come (``events``,
``logs --follow``, pull progress), request bodies are sent from twisted.web's spool, and
hijacked connections (``attach``, ``exec start``: ``Connection: Upgrade`` +
``Upgrade: tcp``, answered ``101``) are tunnelled by :mod:`dockerspaces.web.tunnel`.

For a cluster, a front drives a peer's engine through the peer's ``/docker:local``:
:func:`peer_headers` gives the token header for the front's engine client.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterable
from typing import Any, Protocol
from urllib.parse import parse_qsl, quote, urlsplit

from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import Request

from ..config import Config, ConfigError, HostConfig
from ..spec import split_uri
from .backend import Backend
from .errors import write_error
from .proxy import ExchangeEnd
from .routing import parse_ip

TOKEN_HEADER = "X-Dockerspaces-Token"  # noqa: S105 - a header name, not a secret
PREFIX = b"/docker:local"
SAFE_METHODS = frozenset({b"GET", b"HEAD"})
_SECRET_WORDS = ("auth", "pass", "secret", "token", "cred")
_SECRET_KEYS = frozenset({"buildargs", "env", "key"})

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class Forwarder(Protocol):
    """The part of :class:`~dockerspaces.web.proxy.Proxy` this resource uses."""

    def forward(
        self,
        request: Request,
        backend: Backend,
        path: bytes,
        *,
        prefix: bytes,
        host_header: bytes | None,
        on_end: Any = None,
        cors: bool = True,
    ) -> Any:
        """Forward ``request`` to ``backend`` as ``path``; returns ``NOT_DONE_YET``."""


# -- configuration helpers -----------------------------------------------------------


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    """``--docker-api-allow`` values as networks (an address is a /32 or /128)."""
    out = []
    for text in items:
        try:
            out.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            raise ConfigError(f"--docker-api-allow: {text!r} is not an address or CIDR") from None
    return tuple(out)


def read_token(path: str) -> str:
    """The token in ``path``: its first line, surrounding white space removed.

    Raises :class:`ConfigError` when the file cannot be read or holds no token, or the
    token cannot go in an HTTP header.
    """
    try:
        with open(path, encoding="utf-8") as f:
            token = f.readline().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--docker-api-token-file {path!r}: cannot read it: {e}") from None
    if not token:
        raise ConfigError(f"--docker-api-token-file {path!r}: the file holds no token")
    if not all(0x21 <= ord(c) <= 0x7E for c in token):
        raise ConfigError(
            f"--docker-api-token-file {path!r}: the token must be printable ASCII without spaces"
        )
    return token


def load_token(config: Config) -> str | None:
    """The ``/docker:local`` token of this instance (None without a token file)."""
    if config.docker_api_token_file is None:
        return None
    return read_token(config.docker_api_token_file)


def check_config(config: Config) -> None:
    """Raise :class:`ConfigError` when ``/docker:local`` or the peer token cannot work.

    Meant for option validation (``tap.Options.postOptions``), so that a bad token file or
    an engine that cannot be proxied is a usage error rather than a traceback.
    """
    load_token(config)
    if config.docker_api:
        engine_target(config.docker)


def engine_target(url: str) -> tuple[Backend, bytes]:
    """Where ``/docker:local`` sends requests for the engine URL ``url``.

    Returns the backend and a path prefix (an ``http://`` engine URL with a path, such
    as another instance's ``/docker:local``, keeps its path). ``ssh://`` and
    ``https://`` engines cannot be proxied (the proxy speaks neither ssh nor TLS with
    client certificates): :class:`ConfigError`.
    """
    parts = urlsplit(url)
    if parts.scheme == "unix":
        path = parts.path or parts.netloc
        if parts.netloc and parts.path:
            path = "/" + parts.netloc + parts.path
        return Backend.unix(path), b""
    if parts.scheme in ("tcp", "http"):
        if not parts.hostname or parts.port is None:
            raise ConfigError(f"--docker-api: engine URL {url!r} needs HOST:PORT")
        base = parts.path.rstrip("/").encode("latin-1") if parts.scheme == "http" else b""
        return Backend.tcp(parts.hostname, parts.port), base
    raise ConfigError(
        f"--docker-api: cannot proxy the {parts.scheme}:// engine {url!r}; "
        "use a unix://, tcp:// or http:// engine"
    )


def peer_headers(host: HostConfig, token: str | None) -> dict[str, str] | None:
    """Extra headers for the engine client of ``host``: the token for a peer.

    A peer is an ``http://``/``https://``/``tcp://`` engine URL with a path (a
    ``/docker:local`` of another instance); the token is this instance's own (the same
    token cluster-wide). None when there is nothing to send.
    """
    if token is None:
        return None
    parts = urlsplit(host.url)
    if parts.scheme in ("http", "https", "tcp") and parts.path.strip("/"):
        return {TOKEN_HEADER: token}
    return None


def redact_api_path(path: bytes) -> str:
    """A Docker API path for logs: values of secret-looking query parameters hidden."""
    text = path.decode("latin-1")
    base, sep, query = text.partition("?")
    if not sep:
        return base
    items = []
    for k, v in parse_qsl(query, keep_blank_values=True):
        low = k.lower()
        secret = low in _SECRET_KEYS or any(w in low for w in _SECRET_WORDS)
        shown = "…" if secret else quote(v, safe="/:,")
        items.append(f"{quote(k, safe='')}={shown}")
    return base + "?" + "&".join(items)


def caller_ip(request: Request) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The caller's IP address (an IPv4-mapped IPv6 address as IPv4), or None."""
    host = getattr(request.getClientAddress(), "host", None)
    return parse_ip(host) if isinstance(host, str) else None


def _describe(request: Request) -> str:
    addr = request.getClientAddress()
    host = getattr(addr, "host", None)
    if isinstance(host, str):
        return host
    name = getattr(addr, "name", None)
    return f"unix:{name.decode('latin-1') if isinstance(name, bytes) else name or '?'}"


# -- the resource ----------------------------------------------------------------------


class DockerApiResource(Resource):
    """The gate in front of the engine API: allow-list, token, log, then forward.

    Build it once (at startup) and hand it out for every ``/docker:local`` request;
    :meth:`render` takes the path to forward from the raw ``request.uri``.
    ``engine_path`` is put in front of every forwarded path (an ``http://`` engine URL
    with a path). ``log`` may be replaced (tests).
    """

    isLeaf = True
    log = Logger()

    def __init__(
        self,
        config: Config,
        proxy: Forwarder,
        engine_backend: Backend,
        token: str | None,
        allow_networks: Iterable[Network],
        *,
        engine_path: bytes = b"",
    ):
        super().__init__()
        self.config = config
        self.proxy = proxy
        self.engine_backend = engine_backend
        self.engine_path = engine_path.rstrip(b"/")
        self._token = token.encode("ascii") if token is not None else None
        self.allow_networks = tuple(allow_networks)

    @classmethod
    def from_config(cls, config: Config, proxy: Forwarder) -> DockerApiResource:
        """The gate for ``config`` (token file read, engine URL checked: may raise ConfigError)."""
        backend, engine_path = engine_target(config.docker)
        return cls(
            config,
            proxy,
            backend,
            # --auth accounts: the gate asked for a token with the docker-api scope
            None if config.auth == "accounts" else load_token(config),
            parse_networks(config.docker_api_allow),
            engine_path=engine_path,
        )

    def check(self, request: Request) -> str | None:
        """Why ``request`` may not use the engine API, or None when it may."""
        ip = caller_ip(request)
        if ip is None:
            return f"/docker:local only serves callers with an IP address (this one is {_describe(request)})"
        if not any(ip in net for net in self.allow_networks if net.version == ip.version):
            allowed = ", ".join(str(n) for n in self.allow_networks) or "nobody"
            return f"/docker:local: caller {ip} is not in --docker-api-allow ({allowed})"
        if self._token is not None:
            given = request.requestHeaders.getRawHeaders(TOKEN_HEADER.encode("ascii"))
            if not given:
                return (
                    f"/docker:local needs the {TOKEN_HEADER} header "
                    '(docker CLI: "HttpHeaders" in $DOCKER_CONFIG/config.json)'
                )
            if len(given) > 1 or not hmac.compare_digest(given[0], self._token):
                return f"/docker:local: wrong {TOKEN_HEADER}"
        return None

    def render(self, request: Request) -> Any:  # type: ignore[override]
        """Answer 403 with the reason, or forward the request to the engine."""
        path = split_uri(request.uri).forward_path
        denied = self.check(request)
        method = request.method.decode("latin-1")
        if denied is not None:
            self.log.warn(  # noqa: G010 - twisted.logger
                "docker-api: refused {method} {path} from {caller}: {reason}",
                method=method,
                path=redact_api_path(path),
                caller=_describe(request),
                reason=denied,
            )
            return write_error(request, 403, denied)
        request.requestHeaders.removeHeader(TOKEN_HEADER.encode("ascii"))
        if request.method not in SAFE_METHODS:
            self.log.info(
                "docker-api: {method} {path} from {caller}",
                method=method,
                path=redact_api_path(path),
                caller=_describe(request),
            )
        return self.proxy.forward(
            request,
            self.engine_backend,
            self.engine_path + path,
            prefix=PREFIX,
            host_header=None,
            on_end=self._ended,
            cors=False,  # a web page must never read the engine's answers (SPEC)
        )

    def _ended(self, end: ExchangeEnd) -> None:
        if end.reason in ("backend-error", "refused"):
            self.log.warn(  # noqa: G010 - twisted.logger
                "docker-api: engine {backend} failed: {reason}",
                backend=str(self.engine_backend),
                reason=end.reason,
            )
