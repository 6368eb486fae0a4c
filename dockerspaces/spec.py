"""The route grammar: the first segment of the raw request path as typed values.

``parse_route`` turns a raw (still percent-encoded) segment such as
``x:selmaproject:tts:777:5002:A=1`` into a :class:`JobSpec`, :class:`HostTarget`,
:class:`MonitorRoute` or :class:`DockerApiRoute`; ``None`` means "not a route
prefix" (the caller then tries the Referer / cookie / ``--root`` fallbacks).
Malformed segments raise :class:`SpecError` naming the bad part.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from functools import lru_cache
from typing import Literal
from urllib.parse import quote, unquote

from attrs import field, frozen

WORKER_PORT = 3

_PORT = re.compile(r"[1-9][0-9]{0,4}\Z")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*\Z")
_REGISTRY = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]*[a-z0-9])?)*(?::([0-9]{1,5}))?\Z"
)
#: Docker's limit on a repository name (registry and path components together)
MAX_NAME = 255
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\Z")
_HOSTNAME = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.?\Z"
)
_IPV6 = re.compile(r"[0-9A-Fa-f:.]+\Z")


class SpecError(ValueError):
    """A malformed route segment; ``str()`` is the message shown in the 400 answer."""


Mode = Literal["x", "y"]


def _decode(part: str, what: str) -> str:
    try:
        return unquote(part, errors="strict")
    except UnicodeDecodeError:
        raise SpecError(f"{what} {part!r} is not valid percent-encoded UTF-8") from None


def _parse_port(raw: str, what: str = "port") -> int:
    text = _decode(raw, what)
    if not _PORT.match(text) or int(text) > 65535:
        raise SpecError(f"bad {what} {text!r}: a decimal number 1-65535 without leading zeros")
    return int(text)


@frozen
class JobSpec:
    """An ``x:``/``y:`` job: image, tag, container port, env; ``worker`` when x: with port 3."""

    mode: Mode
    name: tuple[str, ...]
    tag: str
    port: int
    env: tuple[tuple[str, str], ...] = field(default=())

    @property
    def worker(self) -> bool:
        """True for a worker launch (``x:`` with the marker port 3)."""
        return self.mode == "x" and self.port == WORKER_PORT

    @property
    def image(self) -> str:
        """The image repository, e.g. ``selmaproject/tts``."""
        return "/".join(self.name)

    @property
    def ref(self) -> str:
        """The image reference, e.g. ``selmaproject/tts:777``."""
        return f"{self.image}:{self.tag}"

    @property
    def kind(self) -> str:
        """``x``, ``y`` or ``worker``."""
        return "worker" if self.worker else self.mode

    @property
    def env_hash(self) -> str:
        """Short hash of the env (names and values), for display without values."""
        h = hashlib.sha256()
        for k, v in sorted(self.env):
            h.update(k.encode() + b"\0" + v.encode() + b"\0")
        return h.hexdigest()[:6]

    @property
    def key(self) -> str:
        """Identity of the container this spec needs: mode + image + tag + port + env."""
        h = hashlib.sha256()
        for k, v in sorted(self.env):
            h.update(k.encode() + b"\0" + v.encode() + b"\0")
        return f"{self.kind}|{self.ref}|{self.port}|{h.hexdigest()}"

    @property
    def display(self) -> str:
        """The key as shown and logged: env names and a short hash, never values."""
        names = ",".join(sorted(k for k, _ in self.env))
        return f"{self.mode}:{self.ref}:{self.port} env[{names}]#{self.env_hash}"

    @property
    def slot_type(self) -> str:
        """The original's ``SlotType`` string, e.g. ``x:selmaproject/tts:777``."""
        return f"{self.mode}:{self.ref}"

    @property
    def env_dict(self) -> dict[str, str]:
        """The env as a dict (for the engine)."""
        return dict(self.env)

    def segment(self) -> str:
        """Format back into a raw path segment that parses to an equal spec."""
        parts: list[str] = [self.mode]
        parts += [quote(c, safe="") for c in self.name]
        parts.append(quote(self.tag, safe=""))
        parts.append(str(self.port))
        seg = ":".join(parts)
        if self.env:
            seg += ":" + ";".join(f"{k}={quote(v, safe='')}" for k, v in self.env)
        return seg


@frozen(cache_hash=True)
class HostTarget:
    """A ``host:``/``shost:`` route: plain reverse proxy to HOST:PORT (TLS for shost)."""

    host: str
    port: int
    tls: bool = False

    @property
    def default_port(self) -> bool:
        """True when the port is the scheme's default (80, or 443 with TLS)."""
        return self.port == (443 if self.tls else 80)

    @property
    def host_header(self) -> str:
        """``Host`` value sent to the backend: HOST[:PORT], port left out when default."""
        h = f"[{self.host}]" if ":" in self.host else self.host
        return h if self.default_port else f"{h}:{self.port}"

    def segment(self) -> str:
        """Format back into a raw path segment."""
        h = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'shost' if self.tls else 'host'}:{h}:{self.port}"


@frozen
class MonitorRoute:
    """``/monitor:NAME/`` (``broker``, and later ``metrics``, ``health``)."""

    name: str


@frozen
class DockerApiRoute:
    """``/docker:local/…``: the local Docker Engine API, when enabled."""


Route = JobSpec | HostTarget | MonitorRoute | DockerApiRoute

MONITOR_NAMES = frozenset({"broker", "metrics", "health", "progress"})


#: DNS limits (RFC 1035): a label 1-63 characters, a name at most 253 (no final dot)
MAX_LABEL = 63
MAX_HOST_NAME = 253


def check_host_name(host: str, what: str = "host") -> None:
    """Raise :class:`SpecError` unless ``host`` is a name DNS and IDNA can carry: labels
    of 1-63 letters, digits and inner hyphens, at most 253 characters in all, an
    ``xn--`` label valid Punycode. (What resolving or TLS would otherwise trip over
    later, when the request is no longer easy to answer.)"""
    if len(host.rstrip(".")) > MAX_HOST_NAME:
        raise SpecError(f"bad {what} name {host[:80]!r}…: a host name is at most {MAX_HOST_NAME} characters")
    if not host or not _HOSTNAME.match(host):
        raise SpecError(f"bad {what} name {host[:80]!r}: letters, digits, inner '-', labels joined by '.'")
    for label in host.rstrip(".").split("."):
        if len(label) > MAX_LABEL:
            raise SpecError(f"bad {what} name {host[:80]!r}: a DNS label is at most {MAX_LABEL} characters")
        if label[2:4] == "--" and label[:4].lower() == "xn--":
            try:
                label.lower().encode("ascii").decode("idna")
            except UnicodeError:
                raise SpecError(
                    f"bad {what} name {host[:80]!r}: {label!r} is not a valid IDNA label"
                ) from None


def _check_tls_name(host: str) -> None:
    """A ``shost:`` name must also be one TLS can verify a certificate for: twisted's
    ``optionsForClientTLS`` takes IDNA 2008 names (``idna``, a dependency of
    ``twisted[tls]``), stricter than DNS (no ``--`` in a label's 3rd and 4th place
    unless ``xn--``, Punycode of allowed code points only)."""
    try:
        import idna
    except ImportError:  # pragma: no cover - twisted[tls] brings it
        return
    try:
        idna.encode(host)
    except UnicodeError as e:  # idna.IDNAError is one
        raise SpecError(f"bad shost name {host[:80]!r}: not a name TLS can verify ({e})") from None


def parse_host_target(rest: str, tls: bool) -> HostTarget:
    """Parse the part after ``host:``/``shost:``: ``HOST[:PORT]`` or ``[V6][:PORT]``."""
    what = "shost" if tls else "host"
    text = _decode(rest, what)
    if not text:
        raise SpecError(f"empty {what}: write /{what}:HOST[:PORT]/")
    port_text: str | None = None
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise SpecError(f"bad {what} {text!r}: unclosed '['")
        host = text[1:end]
        tail = text[end + 1 :]
        if tail:
            if not tail.startswith(":"):
                raise SpecError(f"bad {what} {text!r}: expected ':PORT' after ']'")
            port_text = tail[1:]
        if not host or not _IPV6.match(host) or ":" not in host:
            raise SpecError(f"bad {what} address {host[:80]!r}")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise SpecError(f"bad {what} address {host[:80]!r}: not an IPv6 address") from None
    else:
        host, sep, port_part = text.partition(":")
        if sep:
            port_text = port_part
        check_host_name(host, what)
        if tls:
            _check_tls_name(host)
    if port_text is None:
        port = 443 if tls else 80
    elif port_text == "":
        raise SpecError(f"trailing ':' in {what} {text!r}")
    else:
        port = _parse_port(port_text)
    return HostTarget(host=host, port=port, tls=tls)


def _parse_env(raw: str) -> tuple[tuple[str, str], ...]:
    seen: dict[str, str] = {}
    for item in raw.split(";"):
        if item == "":
            continue
        if "=" not in item:
            raise SpecError(f"env item {item!r} has no '=': write NAME=VALUE")
        raw_name, _, raw_value = item.partition("=")
        name = _decode(raw_name, "env name")
        if name == "":
            raise SpecError(f"env item {item!r} has an empty name")
        if not _ENV_NAME.match(name):
            raise SpecError(f"bad env name {name!r}: must match [A-Za-z_][A-Za-z0-9_.]*")
        if name.upper().startswith("NVIDIA_"):
            raise SpecError(f"env name {name!r} is not allowed: NVIDIA_* could claim every GPU")
        if name in seen:
            raise SpecError(f"env name {name!r} is given twice")
        seen[name] = _decode(raw_value, f"value of env {name}")
    return tuple(seen.items())


def parse_job(mode: Mode, raw_parts: list[str]) -> JobSpec:
    """Parse the parts after ``x:``/``y:`` (raw, split on ``:``) into a :class:`JobSpec`."""
    env_at = next((i for i, p in enumerate(raw_parts) if "=" in p), None)
    head = raw_parts if env_at is None else raw_parts[:env_at]
    env_raw = None if env_at is None else ":".join(raw_parts[env_at:])
    for i, p in enumerate(head):
        if p == "":
            raise SpecError(f"empty part #{i + 2} in the job spec (two ':' in a row?)")
    if len(head) < 3:
        raise SpecError(
            f"{mode}: needs NAME:TAG:PORT (got {len(head)} part(s)); e.g. /{mode}:selmaproject:tts:777:5002/"
        )
    port = _parse_port(head[-1])
    tag = _decode(head[-2], "tag")
    if not _TAG.match(tag):
        raise SpecError(f"bad tag {tag!r}: letters, digits, '_', '.', '-' (max 128)")
    # before decoding anything: a percent-encoded character takes 3 raw ones
    if sum(len(p) + 1 for p in head[:-2]) - 1 > 3 * MAX_NAME:
        raise SpecError(f"image name too long (at most {MAX_NAME} characters, as Docker)")
    name: list[str] = []
    for i, p in enumerate(head[:-2]):
        comp = _decode(p, "image name")
        if comp != comp.lower():
            raise SpecError(f"image name component {comp[:80]!r} must be lower-case")
        # Docker reads a first component with '.' or ':' (or "localhost") before others
        # as a registry: then it must be a host name with an optional port
        registry = i == 0 and len(head) > 3 and ("." in comp or ":" in comp or comp == "localhost")
        m = (_REGISTRY if registry else _COMPONENT).match(comp)
        if not m or (registry and m.group(1) is not None and not 0 < int(m.group(1)) < 65536):
            what = "registry" if registry else "image name component"
            raise SpecError(f"bad {what} {comp[:80]!r}")
        name.append(comp)
    if len("/".join(name)) > MAX_NAME:
        raise SpecError(f"image name too long (at most {MAX_NAME} characters, as Docker)")
    env = _parse_env(env_raw) if env_raw is not None else ()
    if mode == "y" and port == WORKER_PORT:
        raise SpecError("y: with port 3 is not allowed: port 3 marks an x: worker launch")
    return JobSpec(mode=mode, name=tuple(name), tag=tag, port=port, env=env)


@lru_cache(maxsize=4096)
def parse_route(segment: str) -> Route | None:
    """Parse a raw first path segment; ``None`` if it names no known route kind.

    Pure, so results are cached (a page's assets repeat one segment many times);
    malformed segments raise :class:`SpecError` every time.
    """
    kind, sep, rest = segment.partition(":")
    if not sep:
        return None
    if kind in ("x", "y"):
        if segment.endswith(":"):
            raise SpecError(f"trailing ':' in {segment[:60]!r}")
        mode: Mode = "x" if kind == "x" else "y"
        return parse_job(mode, rest.split(":"))
    if kind in ("host", "shost"):
        return parse_host_target(rest, tls=kind == "shost")
    if kind == "monitor":
        return MonitorRoute(rest) if rest in MONITOR_NAMES else None
    if kind == "docker":
        return DockerApiRoute() if rest == "local" else None
    return None


@frozen
class RawPath:
    """A request URI split for routing: first segment, the rest of the path, the query."""

    segment: str
    rest: bytes
    query: bytes

    @property
    def has_slash(self) -> bool:
        """False when nothing (not even ``/``) follows the first segment."""
        return self.rest != b""

    @property
    def forward_path(self) -> bytes:
        """What the backend sees: rest of the path (``/`` if none) plus the query."""
        path = self.rest or b"/"
        return path + (b"?" + self.query if self.query else b"")


def split_uri(uri: bytes) -> RawPath:
    """Split a raw request URI (``/seg/rest?q``) without percent-decoding anything."""
    path, _, query = uri.partition(b"?")
    if path.startswith((b"http://", b"https://")):
        # absolute-form request target: drop scheme and authority
        after = path.split(b"//", 1)[1]
        at = after.find(b"/")
        path = after[at:] if at >= 0 else b"/"
    path = path.lstrip(b"/")
    seg, slash, rest = path.partition(b"/")
    return RawPath(
        segment=seg.decode("latin-1"),
        rest=(b"/" + rest) if slash else b"",
        query=query,
    )


#: URIs up to this long have their split cached (a page's requests repeat)
_SPLIT_MAX = 512


def split_uri_cached(uri: bytes) -> tuple[RawPath, bytes]:
    """:func:`split_uri` and the path to forward (``RawPath.forward_path``), cached for
    URIs up to 512 bytes (4,096 of them)."""
    if len(uri) <= _SPLIT_MAX:
        return _split_cached(uri)
    raw = split_uri(uri)
    return raw, raw.forward_path


@lru_cache(maxsize=4096)
def _split_cached(uri: bytes) -> tuple[RawPath, bytes]:
    raw = split_uri(uri)
    return raw, raw.forward_path


def redact_path(uri: bytes) -> str:
    """The URI for logs: a job segment's env replaced by its names and hash."""
    raw = split_uri(uri)
    try:
        route = parse_route(raw.segment)
    except SpecError:
        route = None
        if "=" in raw.segment:
            return "/" + raw.segment.split("=", 1)[0] + "=…"
    seg = route.display.replace(" ", ":") if isinstance(route, JobSpec) and route.env else raw.segment
    tail = raw.rest + (b"?" + raw.query if raw.query else b"")
    return "/" + seg + tail.decode("latin-1")
