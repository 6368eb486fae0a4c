"""Configuration values: :class:`Config` (every option) and :class:`HostConfig` (one engine)."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import tomllib
from urllib.parse import urlsplit

from attrs import field, frozen

from .spec import HostTarget, SpecError, parse_host_target

ENGINE_SCHEMES = ("unix", "ssh", "http", "https", "tcp")
PULL_POLICIES = ("always", "missing", "never")
LOG_FORMATS = ("text", "json")
AUTH_MODES = ("none", "accounts")
GIB = 1024**3


class ConfigError(ValueError):
    """A bad option value; the message names the option and why."""


def read_toml(path: str) -> dict[str, object]:
    """The TOML document at ``path`` (``--config``); :class:`ConfigError` saying why
    when it cannot be read or parsed."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"--config: cannot read {path!r}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config: {path!r} is not valid TOML: {e}") from None


@frozen
class ImageProfile:
    """Run options for images matching ``pattern`` (fnmatch on ``name:tag``)."""

    pattern: str
    volumes: tuple[str, ...] = ()
    shm_size: str | None = None
    mem_limit: str | None = None
    cpus: float | None = None
    network: str | None = None
    ready_path: str = "/"
    start_timeout: float | None = None
    gpu: bool = True
    worker_release_max: int | None = None  # None: --worker-release-max
    # "strip": the backend gets the path after the route segment (the original's
    # way); "keep": the whole path, the app being told its prefix (docs/apps.md)
    prefix: str = "strip"
    command: tuple[str, ...] | None = None  # may use {public_path} and {public_url}
    env: tuple[tuple[str, str], ...] = ()  # the same; added to the container's env
    # "prefix": a stripped app's Set-Cookie paths put under its prefix (apps kept
    # apart); "as-sent": passed on (one app whose pages use absolute URLs, docs/apps.md)
    cookie_path: str = "prefix"


PREFIX_MODES = ("strip", "keep")
COOKIE_PATHS = ("prefix", "as-sent")


def parse_app_domain(text: str) -> str:
    """``--app-domain``: a DNS name whose one-label subdomains are the apps' hosts."""
    name = text.strip().strip(".").lower()
    labels = name.split(".")
    if not name or any(not re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", lb) for lb in labels):
        raise ConfigError(f"--app-domain {text!r}: not a DNS name (e.g. apps.example.org)")
    return name


def parse_public_url(text: str) -> str:
    """``--public-url``: the absolute http(s) URL clients use for this server (no path)."""
    parts = urlsplit(text.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--public-url {text!r}: expected http(s)://HOST[:PORT]")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"--public-url {text!r}: give scheme, host and port only (no path)")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError:
        raise ConfigError(f"--public-url {text!r}: bad port") from None
    return f"{parts.scheme}://{parts.netloc}"


@frozen
class HostConfig:
    """One Docker engine with its slots: ports ``start_port .. start_port+slots-1``."""

    name: str
    url: str
    start_port: int
    slots: int
    gpus: int = 0
    publish_ip: str = "127.0.0.1"
    address_override: str | None = None  # in a container: the bridge gateway (inside.py)

    @property
    def local(self) -> bool:
        """True for a ``unix://`` engine (containers reached on loopback)."""
        return self.url.startswith("unix://")

    @property
    def address(self) -> str:
        """Where slot ports of this host are reached from here."""
        if self.address_override:
            return self.address_override
        if self.local:
            return "127.0.0.1" if self.publish_ip in ("0.0.0.0", "::") else self.publish_ip  # noqa: S104 - a comparison, not a bind
        host = urlsplit(self.url).hostname or "127.0.0.1"
        return host

    def gpu_for(self, index: int) -> int | None:
        """GPU device id of slot ``index`` (round-robin), or None without GPUs."""
        return index % self.gpus if self.gpus > 0 else None


def validate_engine_url(url: str, option: str = "--docker") -> str:
    """Check an engine URL's scheme and port; return it unchanged."""
    parts = urlsplit(url)
    if parts.scheme not in ENGINE_SCHEMES:
        raise ConfigError(
            f"{option}: {url!r} has scheme {parts.scheme!r}; use one of "
            + ", ".join(s + "://" for s in ENGINE_SCHEMES)
        )
    if parts.scheme == "unix":
        if not (parts.path or parts.netloc):
            raise ConfigError(f"{option}: {url!r} names no socket path")
        return url
    if not parts.hostname:
        raise ConfigError(f"{option}: {url!r} names no host")
    try:
        port = parts.port
    except ValueError:
        raise ConfigError(f"{option}: {url!r} has a bad port") from None
    if parts.scheme in ("tcp", "http", "https") and port is None:
        raise ConfigError(f"{option}: {url!r} needs a port ({parts.scheme}://HOST:PORT)")
    return url


def parse_cluster(text: str) -> tuple[int, int, str]:
    """Parse ``PORT:SLOTS:URL`` into its three parts, validated."""
    bits = text.split(":", 2)
    if len(bits) != 3:
        raise ConfigError(f"--cluster {text!r}: expected PORT:SLOTS:URL")
    port_s, slots_s, url = bits
    try:
        port, slots = int(port_s), int(slots_s)
    except ValueError:
        raise ConfigError(f"--cluster {text!r}: PORT and SLOTS must be whole numbers") from None
    if slots < 0:
        raise ConfigError(f"--cluster {text!r}: SLOTS must be >= 0")
    if not port >= 1 or port + max(slots, 1) - 1 > 65535:
        raise ConfigError(f"--cluster {text!r}: ports {port}..{port + slots - 1} out of 1-65535")
    validate_engine_url(url, "--cluster")
    return port, slots, url


def host_name_for(url: str, taken: set[str]) -> str:
    """A short, unique display name for an engine URL (``local`` for a unix socket)."""
    parts = urlsplit(url)
    base = "local" if parts.scheme == "unix" else (parts.netloc.rpartition("@")[2] or url)
    name, n = base, 2
    while name in taken:
        name, n = f"{base}#{n}", n + 1
    taken.add(name)
    return name


def parse_allow_host(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network | str:
    """``--allow-host``: a CIDR/address becomes a network, anything else a host name."""
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        if not text or any(c in text for c in "/ "):
            raise ConfigError(f"--allow-host {text!r}: not a host name, address or CIDR") from None
        return text.lower()


@frozen
class Config:
    """Every option of dockerspaces, validated. The defaults (SPEC's table) are declared
    here and nowhere else: the option table (``options.Opt.default``) and the broker's
    settings (``BrokerSettings``) read them from these fields."""

    ports: tuple[str, ...] = ("tcp:8888",)
    docker: str = "unix:///var/run/docker.sock"
    target: int = 5
    start_port: int = 9100
    cluster: tuple[tuple[int, int, str], ...] = ()
    swarm: str | None = None  # a swarm manager's URL: its ready nodes are the hosts
    gpu: int = 0  # GPUs per host; -1: one GPU per slot (the original's boolean)
    source: int = 15
    queue: int = 1000
    queue_timeout: float = 300.0
    start_timeout: float = 600.0
    worker_timeout: float = 1800.0
    release: float = 1800.0
    stop: float = 0.0
    pull: str = "missing"
    registry: str | None = None
    user: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    password_file: str | None = None
    email: str | None = None
    auths: str | None = None
    allow_image: tuple[str, ...] = ()
    worker_post_only: bool = False
    worker_release_max: int = 0  # workers of one key holding slots at once; 0: no limit
    worker_slots: int = -1  # slots workers may hold at once, all hosts; -1: all but one
    publish_ip: str | None = None
    instance: str | None = None
    keep_containers: bool = False
    cors: bool = False
    root: HostTarget | None = None
    allow_host: tuple[str, ...] = ()
    no_host_route: bool = False
    docker_api: bool = False
    docker_api_allow: tuple[str, ...] = ("127.0.0.0/8",)
    docker_api_token_file: str | None = None
    auth: str = "none"
    state: str = os.environ.get("DOCKERSPACES_STATE") or "dockerspaces.sqlite"
    session_lifetime: float = 86400.0
    config: str | None = None
    log_format: str = "text"
    max_body: int = 8 * GIB
    app_domain: str | None = None  # every key on its own host NAME.DOMAIN (docs/apps.md)
    public_url: str | None = None  # scheme://host[:port] clients use (else the request's)
    profiles: tuple[ImageProfile, ...] = ()
    workers: int = 1  # proxy processes (0: one per core); > 1: a broker process + N children

    @property
    def worker_count(self) -> int:
        """Proxy processes to run (``--workers auto``: the number of cores)."""
        return self.workers if self.workers > 0 else (os.cpu_count() or 1)

    def hosts(self) -> list[HostConfig]:
        """The engines and their slots: ``--cluster`` entries, else the single ``--docker``."""
        from .inside import local_slot_address

        taken: set[str] = set()
        entries = list(self.cluster) or [(self.start_port, self.target, self.docker)]
        out = []
        inside = local_slot_address()  # None unless dockerspaces runs in a container
        for port, slots, url in entries:
            local = url.startswith("unix://")
            # a remote engine publishes slot ports on all its interfaces: the front
            # reaches them over the network (--publish-ip narrows it)
            ip = self.publish_ip or ((inside or "127.0.0.1") if local else "0.0.0.0")  # noqa: S104 - remote slots are reached over the network
            override = inside if local and ip in (inside, "0.0.0.0", "::") else None  # noqa: S104 - a comparison
            out.append(
                HostConfig(
                    name=host_name_for(url, taken),
                    url=url,
                    start_port=port,
                    slots=slots,
                    gpus=self.gpu if self.gpu >= 0 else slots,
                    publish_ip=ip,
                    address_override=override,
                )
            )
        return out

    def instance_name(self, in_container: bool | None = None) -> str:
        """``--instance``, else a name that survives a restart: hostname + first
        listening port on a machine; in a container (whose hostname is its id, new on
        every ``docker run``) ``dockerspaces`` + first listening port, so a recreated
        dockerspaces container adopts its slot containers instead of orphaning them."""
        if self.instance:
            return self.instance
        first = self.ports[0] if self.ports else "tcp:8888"
        port = next(
            (p.removeprefix("port=") for p in first.split(":")[1:] if p.removeprefix("port=").isdigit()), "0"
        )
        if in_container is None:
            from .inside import in_container as detect

            in_container = detect()
        return f"dockerspaces-{port}" if in_container else f"{socket.gethostname()}-{port}"

    def read_password(self) -> str | None:
        """The registry password: ``--password``, else the first line of ``--password-file``."""
        if self.password is not None:
            return self.password
        if self.password_file:
            with open(self.password_file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        return None


def parse_root(text: str) -> HostTarget:
    """``--root HOST[:PORT]`` (or ``https://HOST[:PORT]`` for TLS)."""
    tls = False
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            tls = scheme == "https://"
            text = text[len(scheme) :].rstrip("/")
    try:
        return parse_host_target(text, tls=tls)
    except SpecError as e:
        raise ConfigError(f"--root: {e}") from None
