"""Turning option values (command line, config file) into a validated :class:`Config`.

One table, :data:`OPTIONS`, lists every option of SPEC's table with its default and
coercion; ``tap.Options`` (twistd) and ``compat`` (the original's flags) both end in
:func:`build_config`, so the two command lines cannot drift apart.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import attrs
from attrs import frozen

from .config import (
    AUTH_MODES,
    COOKIE_PATHS,
    LOG_FORMATS,
    PREFIX_MODES,
    PULL_POLICIES,
    Config,
    ConfigError,
    ImageProfile,
    parse_allow_host,
    parse_app_domain,
    parse_cluster,
    parse_public_url,
    parse_root,
    read_toml,
    validate_engine_url,
)

#: an option's value as given: a command-line string, or what TOML reads (a string,
#: number, boolean or list); multi options as lists
RawValue = object
#: a Config field's value after coercion: each field has its own type, which
#: ``Config(**values)`` checks
FieldValue = Any


def _int(name: str, low: int = 0, high: int | None = None) -> Callable[[RawValue], int]:
    def coerce(v: RawValue) -> int:
        try:
            n = int(str(v).strip())
        except ValueError:
            raise ConfigError(f"--{name}: {v!r} is not a whole number") from None
        if n < low or (high is not None and n > high):
            rng = f"{low}..{high}" if high is not None else f">= {low}"
            raise ConfigError(f"--{name}: {n} is out of range ({rng})")
        return n

    return coerce


def _workers(v: RawValue) -> int:
    """``--workers``: a whole number >= 1, or ``auto`` (0: one per core)."""
    if str(v).strip().lower() == "auto":
        return 0
    return _int("workers", 1, 256)(v)


def _seconds(name: str) -> Callable[[RawValue], float]:
    def coerce(v: RawValue) -> float:
        try:
            n = float(str(v).strip())
        except ValueError:
            raise ConfigError(f"--{name}: {v!r} is not a number of seconds") from None
        if not n >= 0 or n == float("inf"):
            raise ConfigError(f"--{name}: {v!r} must be a finite number >= 0")
        return n

    return coerce


def _choice(name: str, choices: tuple[str, ...]) -> Callable[[RawValue], str]:
    def coerce(v: RawValue) -> str:
        if v not in choices:
            raise ConfigError(f"--{name}: {v!r} is not one of {', '.join(choices)}")
        return str(v)

    return coerce


def _str(v: RawValue) -> str:
    return str(v)


def _size(v: RawValue) -> int:
    text = str(v).strip().upper()
    mult = 1
    for suffix, m in (
        ("KIB", 1024),
        ("MIB", 1024**2),
        ("GIB", 1024**3),
        ("K", 1024),
        ("M", 1024**2),
        ("G", 1024**3),
        ("B", 1),
    ):
        if text.endswith(suffix):
            text, mult = text[: -len(suffix)], m
            break
    try:
        n = int(float(text) * mult)
    except ValueError:
        raise ConfigError(f"--max-body: {v!r} is not a size (e.g. 8GiB, 500M, 1048576)") from None
    if n <= 0:
        raise ConfigError(f"--max-body: {v!r} must be > 0")
    return n


def parse_gpu(v: RawValue) -> int:
    """``--gpu N`` (GPUs per host) or the original's boolean: true = one GPU per slot (-1)."""
    text = str(v).strip().lower()
    if text in ("true", "yes", "on"):
        return -1
    if text in ("false", "no", "off"):
        return 0
    return _int("gpu")(text)


def _engine_url(v: RawValue) -> str:
    return validate_engine_url(str(v), "--docker")


def _ip(v: RawValue) -> str:
    try:
        return str(ipaddress.ip_address(str(v)))
    except ValueError:
        raise ConfigError(f"--publish-ip: {v!r} is not an IP address") from None


def _cidr(v: RawValue) -> str:
    try:
        return str(ipaddress.ip_network(str(v), strict=False))
    except ValueError:
        raise ConfigError(f"--docker-api-allow: {v!r} is not an address or CIDR") from None


def _allow_host(v: RawValue) -> str:
    parse_allow_host(str(v))
    return str(v)


def _port_desc(v: RawValue) -> str:
    text = str(v)
    if text.isdigit():
        return f"tcp:{text}"
    if ":" not in text:
        raise ConfigError(f"--port: {text!r} is not an endpoint description (e.g. tcp:8888)")
    return text


_CONFIG_DEFAULTS = {f.name: f.default for f in attrs.fields(Config)}


@frozen
class Opt:
    """One option: name (as on the command line), Config field, coercion, help. Its
    default is the Config field's (declared once, there)."""

    name: str
    field: str
    coerce: Callable[[RawValue], FieldValue]
    help: str
    flag: bool = False
    multi: bool = False
    short: str | None = None

    @property
    def default(self) -> FieldValue:
        """The Config field's default."""
        return _CONFIG_DEFAULTS[self.field]


OPTIONS: tuple[Opt, ...] = (
    Opt(
        "port",
        "ports",
        _port_desc,
        "listening endpoint (strports: tcp:8888, ssl:443:privateKey=K:certKey=C, unix:/p); repeatable",
        multi=True,
        short="p",
    ),
    Opt("docker", "docker", _engine_url, "the single Docker engine (ignored with --cluster)"),
    Opt("target", "target", _int("target"), "slots on the single engine (0: none)"),
    Opt(
        "start-port",
        "start_port",
        _int("start-port", 1, 65535),
        "first host port of the single engine's slots",
    ),
    Opt(
        "cluster",
        "cluster",
        lambda v: parse_cluster(str(v)),
        "PORT:SLOTS:URL, one engine each (repeatable)",
        multi=True,
    ),
    Opt(
        "swarm",
        "swarm",
        lambda v: validate_engine_url(str(v), "--swarm"),
        "a Docker Swarm manager: every ready node is a host (slots from its dockerspaces.slots label)",
    ),
    Opt("gpu", "gpu", parse_gpu, "GPUs per host, round-robin over slots; true = one per slot"),
    Opt("source", "source", _int("source", 1), "x: requests and worker launches admitted at once"),
    Opt("queue", "queue", _int("queue"), "requests waiting for admission beyond --source"),
    Opt(
        "queue-timeout",
        "queue_timeout",
        _seconds("queue-timeout"),
        "longest wait until a container is assigned (s) -> 503",
    ),
    Opt(
        "start-timeout",
        "start_timeout",
        _seconds("start-timeout"),
        "pull + start + ready deadline (s) -> 504",
    ),
    Opt(
        "worker-timeout",
        "worker_timeout",
        _seconds("worker-timeout"),
        "longest wait of a worker launch for a slot (s) -> 503",
    ),
    Opt(
        "release",
        "release",
        _seconds("release"),
        "a worker is protected from eviction this long after it starts (s)",
    ),
    Opt("stop", "stop", _seconds("stop"), "grace between SIGTERM and SIGKILL (s)"),
    Opt("pull", "pull", _choice("pull", PULL_POLICIES), "always|missing|never"),
    Opt("registry", "registry", _str, "registry URL the credentials belong to (default Docker Hub)"),
    Opt("user", "user", _str, "registry user"),
    Opt("password", "password", _str, "registry password (prefer --password-file)"),
    Opt("password-file", "password_file", _str, "file holding the registry password"),
    Opt("email", "email", _str, "registry e-mail"),
    Opt("auths", "auths", _str, "docker config.json-style credentials for several registries"),
    Opt("allow-image", "allow_image", _str, "only matching images may be started (repeatable)", multi=True),
    Opt(
        "worker-post-only",
        "worker_post_only",
        bool,
        "worker launches (port 3) only by POST; other methods get 405",
        flag=True,
    ),
    Opt(
        "worker-release-max",
        "worker_release_max",
        _int("worker-release-max"),
        "workers of one image key holding slots at once (0: no limit) -> 503",
    ),
    Opt(
        "worker-slots",
        "worker_slots",
        _int("worker-slots", -1),
        "slots workers may hold at once, all hosts together (-1: all but one; 0: none)",
    ),
    Opt(
        "publish-ip",
        "publish_ip",
        _ip,
        "address slot ports are published on (default 127.0.0.1 local, 0.0.0.0 remote)",
    ),
    Opt("instance", "instance", _str, "label marking this instance's containers"),
    Opt(
        "keep-containers",
        "keep_containers",
        bool,
        "leave containers running at shutdown; the next start adopts them",
        flag=True,
    ),
    Opt("cors", "cors", bool, "answer CORS preflights, echo Origin", flag=True),
    Opt("root", "root", lambda v: parse_root(str(v)), "default HOST[:PORT] for unmatched requests"),
    Opt(
        "allow-host",
        "allow_host",
        _allow_host,
        "HOST or CIDR that host:/--root may reach even if loopback/link-local (repeatable)",
        multi=True,
    ),
    Opt("no-host-route", "no_host_route", bool, "turn host:/shost: routes off (404)", flag=True),
    Opt(
        "app-domain",
        "app_domain",
        lambda v: parse_app_domain(str(v)),
        "serve every x:/y: key on its own host NAME.DOMAIN (wildcard DNS; docs/apps.md)",
    ),
    Opt(
        "public-url",
        "public_url",
        lambda v: parse_public_url(str(v)),
        "scheme://host[:port] clients use to reach this server (else each request's own)",
    ),
    Opt("docker-api", "docker_api", bool, "enable /docker:local", flag=True),
    Opt(
        "docker-api-allow",
        "docker_api_allow",
        _cidr,
        "CIDR allowed to use /docker:local (repeatable)",
        multi=True,
    ),
    Opt(
        "docker-api-token-file",
        "docker_api_token_file",
        _str,
        "file with the token /docker:local callers must present",
    ),
    Opt(
        "auth",
        "auth",
        _choice("auth", AUTH_MODES),
        "none (anyone who reaches the port) | accounts (users, groups, tokens in --state)",
    ),
    Opt(
        "state",
        "state",
        _str,
        "SQLite file of accounts, sessions and usage (--auth accounts; created on first "
        "start; default $DOCKERSPACES_STATE, else in the working directory)",
    ),
    Opt(
        "session-lifetime",
        "session_lifetime",
        _seconds("session-lifetime"),
        "a browser login lasts this long (s)",
    ),
    Opt("config", "config", _str, "TOML file with any of these options"),
    Opt("log-format", "log_format", _choice("log-format", LOG_FORMATS), "text|json"),
    Opt("max-body", "max_body", _size, "largest request body (bytes, or 8GiB, 500M)"),
    Opt(
        "workers",
        "workers",
        _workers,
        "proxy processes: 1 = one process; N > 1 or auto (one per core): the broker in "
        "this process, the HTTP side in N children sharing the ports",
    ),
)

BY_NAME = {o.name: o for o in OPTIONS}


#: the placeholders profile command/env values may use (checked at load)
_PLACEHOLDERS = {"public_path": "/", "public_url": "http://x/"}


def _profile(entry: RawValue, i: int) -> ImageProfile:
    where = f"profile #{i + 1}"
    if not isinstance(entry, dict) or "image" not in entry:
        raise ConfigError(f"config: {where} needs an 'image' pattern")
    known = {
        "image",
        "volumes",
        "shm-size",
        "memory",
        "cpus",
        "network",
        "ready-path",
        "start-timeout",
        "gpu",
        "worker-release-max",
        "prefix",
        "command",
        "env",
        "cookie-path",
    }
    for k in entry:
        if k.replace("_", "-") not in known:
            raise ConfigError(f"config: {where}: unknown key {k!r}")
    e = {k.replace("_", "-"): v for k, v in entry.items()}
    vols = e.get("volumes", [])
    if not isinstance(vols, list) or not all(isinstance(v, str) for v in vols):
        raise ConfigError(f"config: {where}: 'volumes' must be a list of strings")
    prefix = e.get("prefix", "strip")
    if prefix not in PREFIX_MODES:
        raise ConfigError(f'config: {where}: \'prefix\' must be "strip" or "keep", not {prefix!r}')
    cookie_path = e.get("cookie-path", "prefix")
    if cookie_path not in COOKIE_PATHS:
        raise ConfigError(
            f'config: {where}: \'cookie-path\' must be "prefix" or "as-sent", not {cookie_path!r}'
        )
    command = e.get("command")
    if command is not None and (
        not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command)
    ):
        raise ConfigError(f"config: {where}: 'command' must be a non-empty list of strings")
    env = e.get("env", {})
    if not isinstance(env, dict) or not all(
        isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in env.items()
    ):
        raise ConfigError(f"config: {where}: 'env' must be a table of NAME = \"value\" strings")
    for text in [*(command or ()), *env.values(), str(e.get("ready-path", "/"))]:
        try:
            text.format_map(_PLACEHOLDERS)
        except (KeyError, ValueError, IndexError) as ex:
            raise ConfigError(
                f"config: {where}: {text!r}: only {{public_path}} and {{public_url}} may be "
                f"used (write {{{{ and }}}} for braces): {ex}"
            ) from None
    try:
        return ImageProfile(
            pattern=str(e["image"]),
            volumes=tuple(vols),
            shm_size=None if e.get("shm-size") is None else str(e["shm-size"]),
            mem_limit=None if e.get("memory") is None else str(e["memory"]),
            cpus=None if e.get("cpus") is None else float(e["cpus"]),
            network=None if e.get("network") is None else str(e["network"]),
            ready_path=str(e.get("ready-path", "/")),
            start_timeout=None if e.get("start-timeout") is None else float(e["start-timeout"]),
            gpu=bool(e.get("gpu", True)),
            worker_release_max=(
                None if e.get("worker-release-max") is None else int(e["worker-release-max"])
            ),
            prefix=str(prefix),
            command=None if command is None else tuple(command),
            env=tuple((str(k), str(v)) for k, v in env.items()),
            cookie_path=str(cookie_path),
        )
    except (TypeError, ValueError) as ex:
        raise ConfigError(f"config: {where}: {ex}") from None


def load_config_file(path: str) -> tuple[dict[str, RawValue], tuple[ImageProfile, ...]]:
    """Read a TOML config file: option values by option name, and image profiles."""
    data = read_toml(path)
    values: dict[str, RawValue] = {}
    profiles: tuple[ImageProfile, ...] = ()
    for raw_key, value in data.items():
        key = raw_key.replace("_", "-")
        if key == "auth" and isinstance(value, dict):  # [auth] mode/state/session-lifetime
            for sub, v in value.items():
                name = {"mode": "auth"}.get(sub.replace("_", "-"), sub.replace("_", "-"))
                if name not in ("auth", "state", "session-lifetime"):
                    raise ConfigError(f"config: [auth]: unknown key {sub!r} (mode, state, session-lifetime)")
                values[name] = v
            continue
        if key == "autoscale":  # [[autoscale]] entries: read by dockerspaces.autoscale.config
            if not isinstance(value, list):
                raise ConfigError("config: 'autoscale' must be an array of tables ([[autoscale]])")
            continue
        if key in ("profile", "profiles"):
            if not isinstance(value, list):
                raise ConfigError("config: 'profile' must be an array of tables ([[profile]])")
            profiles = tuple(_profile(p, i) for i, p in enumerate(value))
            continue
        if key == "config" or key not in BY_NAME:
            raise ConfigError(f"config: unknown key {raw_key!r}")
        opt = BY_NAME[key]
        if opt.flag and not isinstance(value, bool):
            raise ConfigError(f"config: {raw_key!r} must be true or false")
        values[key] = [value] if opt.multi and not isinstance(value, list) else value
    return values, profiles


def build_config(given: Mapping[str, RawValue]) -> Config:
    """Build a Config from option values given by name (command line wins over the file).

    ``given`` holds only options that were actually given; multi options as lists.
    """
    file_values: dict[str, RawValue] = {}
    profiles: tuple[ImageProfile, ...] = ()
    if given.get("config"):
        file_values, profiles = load_config_file(str(given["config"]))
    kwargs: dict[str, FieldValue] = {"profiles": profiles}
    for opt in OPTIONS:
        if opt.name in given:
            raw, origin = given[opt.name], "command line"
        elif opt.name in file_values:
            raw, origin = file_values[opt.name], "config"
        else:
            kwargs[opt.field] = opt.default
            continue
        try:
            if opt.flag:
                value: FieldValue = bool(raw)
            elif opt.multi:
                value = tuple(opt.coerce(v) for v in cast("Iterable[RawValue]", raw))  # lists
            else:
                value = opt.coerce(raw)
        except ConfigError as e:
            if origin == "config":
                raise ConfigError(f"config: key {opt.name!r}: {e}") from None
            raise
        kwargs[opt.field] = value
    config = Config(**kwargs)
    _check(config)
    return config


def _check(config: Config) -> None:
    if not config.ports:
        raise ConfigError("--port: at least one listening endpoint is needed")
    if config.password is not None and config.password_file is not None:
        raise ConfigError("--password and --password-file: give one, not both")
    if config.app_domain and config.auth == "accounts" and not config.public_url:
        # browsers sign in on the main host and are handed over to an app's host
        raise ConfigError(
            "--app-domain with --auth accounts needs --public-url (the main host's "
            "scheme://host[:port], where browsers sign in before going to an app's host)"
        )
    if config.worker_count > 1:
        kinds = {d.partition(":")[0].lower() for d in config.ports}
        if not kinds <= {"tcp", "tcp6", "ssl", "unix"}:
            raise ConfigError(
                "--workers: every --port must be tcp:, ssl: or unix: (children adopt the sockets)"
            )
    if config.swarm and config.cluster:
        raise ConfigError("--swarm and --cluster: give one (a swarm's nodes are its hosts)")
    if config.gpu == -1 and not config.cluster and config.target == 0:
        raise ConfigError("--gpu true: one GPU per slot needs --target > 0")
    hosts = config.hosts()
    used: dict[int, str] = {}
    for h in hosts:
        if h.start_port + max(h.slots, 1) - 1 > 65535:
            last = h.start_port + h.slots - 1
            raise ConfigError(f"--start-port: slots {h.start_port}..{last} exceed 65535")
        for p in range(h.start_port, h.start_port + h.slots):
            if p in used and used[p] == h.publish_ip + h.address:
                raise ConfigError(f"--cluster: port {p} is used by two slots of the same host")
            used[p] = h.publish_ip + h.address
