"""``[[autoscale]]`` entries of the TOML config, as frozen :class:`Entry` values.

One entry per queue-driven worker pool::

    [[autoscale]]
    name = "thumbnails"
    image = "team/thumbnailer"
    tag = "3"
    env = { SIZE = "256" }
    management = "http://rabbit.internal:15672"
    amqp = "amqp://rabbit.internal:5672/"
    credentials = "/etc/dockerspaces/rabbit.cred"   # one line: user:password
    vhost = "/"
    queue = "thumbnails"
    target = 10
    max = 8

The credentials file is read when the entry is parsed; the password appears in no
``repr``, log line or error message (it does reach the worker, inside its AMQP URL
env var: the worker needs it).  Every error is a :class:`ConfigError` naming
``[[autoscale]] NAME: key``.  See ``docs/autoscaling.md`` for every key.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from urllib.parse import quote, urlsplit, urlunsplit

from attrs import field, frozen

from ..config import ConfigError, read_toml
from ..spec import JobSpec, SpecError, parse_job
from .policy import Limits
from .rabbit import QueueRef

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

#: every key an ``[[autoscale]]`` table may hold
KEYS = frozenset(
    {
        "name",
        "image",
        "tag",
        "env",
        "management",
        "amqp",
        "credentials",
        "vhost",
        "queue",
        "target",
        "activation",
        "min",
        "max",
        "interval",
        "cooldown",
        "stabilization",
        "lag",
        "amqp-env",
        "queue-env",
        "connect-grace",
    }
)
REQUIRED = ("name", "image", "amqp", "credentials", "queue", "max")


@frozen
class Entry:
    """One ``[[autoscale]]`` entry, parsed and checked (see the module docstring)."""

    name: str
    image: str
    tag: str
    env: tuple[tuple[str, str], ...]
    management: str
    amqp: str  # as configured: no credentials in it
    vhost: str
    queue: str
    user: str
    password: str = field(repr=False)
    target: int = 10
    activation: int = 1
    min: int = 0
    max: int = 1
    interval: float = 5.0
    cooldown: float = 300.0
    stabilization: float = 60.0
    lag: float = 5.0
    amqp_env: str = "AMQP_URL"
    queue_env: str = "AMQP_QUEUE"
    connect_grace: float = 30.0
    credentials: str = ""  # the file's path

    @property
    def limits(self) -> Limits:
        """The policy's parameters."""
        return Limits(self.target, self.activation, self.min, self.max, self.cooldown, self.stabilization)

    @property
    def queue_ref(self) -> QueueRef:
        """Where to read the queue."""
        return QueueRef(self.management, self.vhost, self.queue, self.user, self.password)

    @property
    def spec(self) -> JobSpec:
        """The worker's port-3 ``x:`` spec (see :func:`worker_spec`)."""
        return worker_spec(self)

    @property
    def display(self) -> str:
        """``NAME (queue Q)`` for logs."""
        return f"{self.name} (queue {self.queue!r})"


def amqp_url_with_credentials(amqp: str, user: str, password: str, vhost: str) -> str:
    """``amqp`` with ``user:password@`` inserted (percent-encoded) and, when its path
    is empty or ``/``, the vhost as the path (``/`` written ``%2F``)."""
    parts = urlsplit(amqp)
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}"
    path = parts.path if parts.path not in ("", "/") else "/" + quote(vhost, safe="")
    return urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))


def worker_spec(entry: Entry) -> JobSpec:
    """The worker's ``x:IMAGE:TAG:3`` spec: the entry's env plus ``amqp-env`` (the AMQP
    URL with the credentials) and ``queue-env`` (the queue).  The env is part of the
    spec's key; its display shows names only."""
    env = [
        *entry.env,
        (entry.amqp_env, amqp_url_with_credentials(entry.amqp, entry.user, entry.password, entry.vhost)),
        (entry.queue_env, entry.queue),
    ]
    head = [quote(c, safe="") for c in entry.image.split("/")]
    parts = [*head, quote(entry.tag, safe=""), "3"]
    raw_env = ";".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in env)
    try:
        spec = parse_job("x", [*parts, raw_env])
    except SpecError as e:
        raise ConfigError(f"config: [[autoscale]] {entry.name}: image/env: {e}") from None
    return spec


def read_credentials(path: str) -> tuple[str, str]:
    """``(user, password)`` from a file holding ``user:password`` (one line)."""
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    user, sep, password = text.partition(":")
    if not sep or not user or "\n" in text:
        raise ValueError("must hold one line user:password")
    return user, password


class _Reader:
    """Typed access to one raw table; every error names ``[[autoscale]] NAME: key``."""

    def __init__(self, raw: Mapping[str, object], name: str) -> None:
        self.raw = raw
        self.name = name

    def error(self, key: str, why: str) -> ConfigError:
        return ConfigError(f"config: [[autoscale]] {self.name}: {key}: {why}")

    def text(self, key: str, default: str | None = None) -> str:
        v = self.raw.get(key, default)
        if v is None:
            raise self.error(key, "is required")
        if not isinstance(v, str) or not v:
            raise self.error(key, f"must be a non-empty string, not {v!r}")
        return v

    def whole(self, key: str, default: int | None, low: int) -> int:
        v = self.raw.get(key, default)
        if v is None:
            raise self.error(key, "is required")
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(key, f"must be a whole number, not {v!r}")
        if v < low:
            raise self.error(key, f"must be >= {low}, not {v}")
        return v

    def seconds(self, key: str, default: float, positive: bool = False) -> float:
        v = self.raw.get(key, default)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise self.error(key, f"must be a number of seconds, not {v!r}")
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise self.error(key, f"must be a finite number {'>' if positive else '>='} 0, not {v!r}")
        return float(v)

    def url(self, key: str, default: str | None, schemes: tuple[str, ...]) -> str:
        v = self.text(key, default)
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError as e:
            raise self.error(key, f"bad URL: {e}") from None
        if parts.scheme not in schemes or not parts.hostname:
            raise self.error(key, f"must be a {'/'.join(schemes)} URL with a host")
        if "@" in parts.netloc:
            raise self.error(key, "must not hold credentials: name a credentials file")
        return v


def parse_entry(
    raw: object,
    index: int,
    base_dir: str = ".",
    read_creds: Callable[[str], tuple[str, str]] = read_credentials,
) -> Entry:
    """One ``[[autoscale]]`` table; ``credentials`` relative to ``base_dir``."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config: [[autoscale]] #{index + 1}: must be a table")
    name_v = raw.get("name")
    if not isinstance(name_v, str) or not _NAME.match(name_v):
        raise ConfigError(
            f"config: [[autoscale]] #{index + 1}: name: required, letters, "
            f"digits, '_', '.', '-' (max 63), not {name_v!r}"
        )
    r = _Reader(raw, name_v)
    for key in raw:
        if key not in KEYS:
            raise r.error(key, f"unknown key (known: {', '.join(sorted(KEYS))})")
    for key in REQUIRED:
        if key not in raw:
            raise r.error(key, "is required")
    env_raw = raw.get("env", {})
    if not isinstance(env_raw, dict):
        raise r.error("env", "must be a table of strings")
    env: list[tuple[str, str]] = []
    for k, v in env_raw.items():
        if not isinstance(v, str):
            raise r.error("env", f"{k}: must be a string, not {type(v).__name__}")
        env.append((str(k), v))
    amqp_env = r.text("amqp-env", "AMQP_URL")
    queue_env = r.text("queue-env", "AMQP_QUEUE")
    for key, var in (("amqp-env", amqp_env), ("queue-env", queue_env)):
        if not _ENV_NAME.match(var):
            raise r.error(key, f"{var!r} is not an env var name")
        if var in env_raw:
            raise r.error(key, f"{var} is also set in env")
    if amqp_env == queue_env:
        raise r.error("queue-env", "must differ from amqp-env")
    cred_path = r.text("credentials")
    try:
        user, password = read_creds(os.path.join(base_dir, cred_path))
    except OSError as e:
        raise r.error("credentials", f"cannot read {cred_path!r}: {e.strerror}") from None
    except ValueError as e:
        raise r.error("credentials", f"{cred_path!r} {e}") from None
    low = r.whole("min", 0, 0)
    entry = Entry(
        name=name_v,
        image=r.text("image"),
        tag=r.text("tag", "latest"),
        env=tuple(env),
        management=r.url("management", "http://127.0.0.1:15672", ("http", "https")),
        amqp=r.url("amqp", None, ("amqp", "amqps")),
        vhost=r.text("vhost", "/"),
        queue=r.text("queue"),
        user=user,
        password=password,
        target=r.whole("target", 10, 1),
        activation=r.whole("activation", 1, 1),
        min=low,
        max=r.whole("max", None, max(low, 1)),
        interval=r.seconds("interval", 5.0, positive=True),
        cooldown=r.seconds("cooldown", 300.0),
        stabilization=r.seconds("stabilization", 60.0),
        lag=r.seconds("lag", 5.0),
        amqp_env=amqp_env,
        queue_env=queue_env,
        connect_grace=r.seconds("connect-grace", 30.0),
        credentials=cred_path,
    )
    worker_spec(entry)  # the image, tag and env names must make a valid spec
    return entry


def parse_entries(
    raw: object,
    base_dir: str = ".",
    read_creds: Callable[[str], tuple[str, str]] = read_credentials,
) -> tuple[Entry, ...]:
    """The ``autoscale`` value of a TOML document (a list of tables, as ``tomllib``
    gives ``[[autoscale]]``): names unique, no two entries with the same worker spec
    (they would fight over the same containers)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConfigError("config: 'autoscale' must be an array of tables ([[autoscale]])")
    entries = tuple(parse_entry(t, i, base_dir, read_creds) for i, t in enumerate(raw))
    seen: dict[str, Entry] = {}
    keys: dict[str, str] = {}
    for e in entries:
        if e.name in seen:
            raise ConfigError(f"config: [[autoscale]] {e.name}: name: given twice")
        seen[e.name] = e
        key = e.spec.key
        if key in keys:
            raise ConfigError(
                f"config: [[autoscale]] {e.name}: the same worker (image, "
                f"tag, env, AMQP URL, queue) as [[autoscale]] {keys[key]}"
            )
        keys[key] = e.name
    return entries


def load_entries(path: str) -> tuple[Entry, ...]:
    """The ``[[autoscale]]`` entries of the TOML file at ``path`` (credentials files
    relative to its directory); :class:`ConfigError` when unreadable or bad."""
    data = read_toml(path)
    return parse_entries(data.get("autoscale"), os.path.dirname(path) or ".")
