"""The broker's values and state: settings, progress, leases, owners, slots, containers,
waiters.

Values are ``@frozen``; the mutable records (``@define``) are owned and mutated only by
the parts of :class:`dockerspaces.broker.broker.Broker`. Counts that follow from a
record's contents (a key's starting and busy containers) are properties computed from
them, not fields kept beside them.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from attrs import define, field, frozen
from twisted.internet.defer import Deferred, fail, succeed

from ..config import Config, HostConfig
from ..engine.interface import ContainerHandle, IEngine, RunOptions, SlotInfo
from ..spec import JobSpec
from .errors import BackendRefused
from .quota import Line, Owner
from .scaling import Ewma

_DEFAULTS: dict[str, Any] = {f.name: f.default for f in attrs.fields(Config)}


class IDelayedCall(Protocol):
    """What the broker uses of a delayed call (typed without the zope plugin)."""

    def active(self) -> bool:
        """True until it ran or was cancelled."""

    def cancel(self) -> None:
        """Do not run it."""

    def getTime(self) -> float:
        """When it runs."""


class Clock(Protocol):
    """What the broker uses of ``IReactorTime`` (typed without the zope plugin)."""

    def seconds(self) -> float:
        """Now."""

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall:
        """Run ``callable`` after ``delay`` seconds."""


# Container states.
STARTING = "starting"  # cold start in progress (maybe still waiting for an eviction)
IDLE = "idle"  # running, no request in flight
BUSY = "busy"  # running, requests in flight (x: exactly one)
WORKER = "worker"  # a running worker (no leases)
STOPPING = "stopping"  # being stopped (eviction, failure, shutdown)
GONE = "gone"  # forgotten (died, stopped, host lost)


@frozen
class BrokerSettings:
    """The broker's options; the defaults are :class:`~dockerspaces.config.Config`'s
    (SPEC "Options and defaults"), declared there once."""

    source: int = _DEFAULTS["source"]
    queue: int = _DEFAULTS["queue"]
    queue_timeout: float = _DEFAULTS["queue_timeout"]
    start_timeout: float = _DEFAULTS["start_timeout"]
    worker_timeout: float = _DEFAULTS["worker_timeout"]
    release: float = _DEFAULTS["release"]
    stop: float = _DEFAULTS["stop"]
    ping_interval: float = 5  # seconds between engine pings (not an option)
    worker_release_max: int = _DEFAULTS["worker_release_max"]  # per key; 0: no limit
    worker_slots: int = _DEFAULTS["worker_slots"]  # all hosts; -1: all but one (>= 1)

    @classmethod
    def from_config(cls, config: Config) -> BrokerSettings:
        """The settings named like a Config field, taken from ``config``."""
        return cls(**{f.name: getattr(config, f.name) for f in attrs.fields(cls) if hasattr(config, f.name)})


@frozen
class Progress:
    """What a waiting request is waiting for, published to its progress callback."""

    state: str  # "queued" | "pulling" | "starting" | "ready" | "failed"
    position: int | None = None
    detail: str | None = None
    current: int | None = None
    total: int | None = None


ProgressCallback = Callable[[Progress], None]


@define(eq=False)
class HostState:
    """One engine and its slots, with its up/down state."""

    config: HostConfig
    engine: IEngine
    slots: list[Slot] = field(factory=list)
    free: OrderedDict[Slot, None] = field(factory=OrderedDict)
    up: bool = True
    since: float = 0.0
    pinging: bool = False
    reconciling: bool = False
    last_error: str | None = None
    leaving: bool = False  # removed (a swarm node gone): dropped once its slots are empty

    @property
    def name(self) -> str:
        """The host's display name (``HostConfig.name``)."""
        return self.config.name


@define(eq=False)
class Slot:
    """A container place: fixed port/GPU on one host; at most one container."""

    info: SlotInfo
    host: HostState
    index: int
    container: Container | None = None
    evicting: Container | None = None  # the previous container, being stopped
    since: float = 0.0
    last_error: str | None = None
    blocked_until: float = 0.0  # quarantined (port taken by something else) until then
    clearing: int = 0  # containers of ours found on this port, being removed
    retired: bool = False  # beyond its host's slot count now: dropped once empty

    @property
    def ref_info(self) -> str:
        """``address:port`` of the slot as the monitor shows it."""
        return f"{self.host.config.address}:{self.info.port}"

    def takes_new(self, now: float) -> bool:
        """True when a new container may be placed here: empty, no container of ours
        being cleared from its port, not quarantined, not retired."""
        return (
            not self.retired
            and self.container is None
            and self.evicting is None
            and not self.clearing
            and self.blocked_until <= now
        )

    @property
    def empty(self) -> bool:
        """No container in it, none leaving it, none of ours being cleared from its port."""
        return self.container is None and self.evicting is None and not self.clearing


@define(eq=False)
class KeyState:
    """Everything about one key: its line of waiters, containers, measurements."""

    key: str
    spec: JobSpec
    display: str = ""
    waiters: Line[Waiter] = field(factory=Line)
    containers: dict[Container, None] = field(factory=dict)
    idle: OrderedDict[Container, None] = field(factory=OrderedDict)
    service: Ewma = field(factory=Ewma)
    cold: Ewma = field(factory=Ewma)
    hold: bool = False  # a start failed: wait for a new arrival before retrying
    recheck: IDelayedCall | None = None
    status: Progress | None = None  # latest pull/start progress, for progress_of()
    adopted: bool = False  # ``spec`` was read from a label (no env values): replace it
    live: int = 0  # waiters of this key not yet done (admission queue included)
    restarts: int = 0  # starts retried because the container was removed from outside
    uses_gpu: bool | None = None  # its run options attach the slot's GPU (cached)

    @property
    def starting(self) -> int:
        """Containers of this key being started (their start not yet over)."""
        return sum(1 for c in self.containers if c.state == STARTING and not c.start_over)

    @property
    def busy(self) -> int:
        """x: containers of this key holding a lease (0 for y:, whose leases share)."""
        if self.spec.mode != "x":
            return 0
        return sum(1 for c in self.containers if c.inflight)

    def mean_lease_start(self) -> float:
        """x: the mean start time of the leases in flight (0.0 with none)."""
        if self.spec.mode != "x":
            return 0.0
        n, total = 0, 0.0
        for c in self.containers:
            if c.inflight:
                n += 1
                total += c.lease_started
        return total / n if n else 0.0


@define(eq=False)
class Container:
    """A container of one key in one slot, from cold start until forgotten."""

    key: KeyState
    slot: Slot
    state: str
    handle: ContainerHandle | None = None
    inflight: int = 0
    protected_until: float = 0.0
    suspect: bool = False  # no new leases; stopped when the last one ends
    crashed: bool = False  # counted as a crash already (the proxy found it dead)
    timed_out: bool = False
    start_over: bool = False  # its start ended (ready or failed), though still STARTING
    chain: Deferred[Any] | None = None
    timer: IDelayedCall | None = None
    worker: Waiter | None = None  # the launch this worker container was started for
    created_at: float | None = None
    endpoint: str = ""  # engine.endpoint_for(slot, spec), once known
    lease_started: float = 0.0  # x: when the current lease began
    chain_args: tuple[RunOptions, float] | None = None  # start waiting for an eviction
    on_gone: list[Callable[[], None]] = field(factory=list)  # Lease.confirm watchers
    on_exit: list[Callable[[], None]] = field(factory=list)  # Lease.died_before watchers
    owner: str | None = None  # the user it was started for (None: accounts off, adopted)
    gpus: int = 0  # GPUs attached (its slot's, unless the image's profile says gpu = false)

    @property
    def id(self) -> str:
        """The engine's container id ("" before it is created)."""
        return self.handle.id if self.handle is not None else ""


@define(eq=False)
class Waiter:
    """One acquire/launch call until it ends (lease, handle or error)."""

    spec: JobSpec
    key: KeyState
    deferred: Deferred[Any]
    arrived: float
    progress: ProgressCallback | None = None
    admitted: bool = False  # counted in --source
    queued: bool = False  # in the admission queue
    waiting: bool = False  # in its key's waiters (or hungry, for a worker)
    done: bool = False
    container: Container | None = None  # worker: the container started for it
    assigned: float | None = None
    endpoint: str = ""  # addr:port once served (for the monitor)
    retries: int = 0  # times handed back unforwarded (Lease.retry)
    overdue: bool = False  # queue deadline passed while a start was under way for it
    owner: Owner | None = None  # who it is for (None: accounts off)
    seq: int = 0  # arrival order (fair share turns)


@define(eq=False)
class Lease:
    """A request's hold on a container, handed to the proxy; release it when done."""

    endpoint: str
    display: str
    container_id: str
    queued_for: float
    _release: Callable[[Lease, bool], None] = field(repr=False)
    container: Container | None = field(default=None, repr=False)
    _retry: Callable[[Lease, bool], Deferred[Lease]] | None = field(default=None, repr=False)
    _confirm: Callable[[Lease, float], Deferred[bool]] | None = field(default=None, repr=False)
    _died_before: Callable[[Lease, float, float], Deferred[bool]] | None = field(default=None, repr=False)
    waiter: Waiter | None = field(default=None, repr=False)
    started: float = 0.0
    released: bool = False

    def release(self) -> None:
        """Give the container back (idempotent): x: the oldest waiter gets it at once."""
        if not self.released:
            self.released = True
            self._release(self, False)

    def failed(self) -> None:
        """The backend refused or reset the connection before answering, and the
        request is given up (its client left): the container is counted as crashed
        and taken out of service at once."""
        if not self.released:
            self.released = True
            self._release(self, True)

    def confirm(self, grace: float) -> Deferred[bool]:
        """Is the container still alive? A backend's clean close looks the same whether
        its app finished a close-delimited answer or was killed: fires False when the
        broker learns within ``grace`` seconds that the container died (the engine's
        event, a crash, a stop), True otherwise."""
        if self._confirm is None or self.released:
            return succeed(not self.released)
        return self._confirm(self, grace)

    def died_before(self, when: float, grace: float) -> Deferred[bool]:
        """Did the container's process end before ``when`` (the broker clock's seconds)?
        Fires True once the engine reports, within ``grace`` seconds, an exit time
        earlier than ``when``: bytes first sent at ``when`` were never read by the app
        (behind docker-proxy a dead app's connection is still accepted, then closed).
        False when alive, later, or unknown (a remote engine's clock is not ours)."""
        if self._died_before is None:
            return succeed(False)
        return self._died_before(self, when, grace)

    def retry(self, failed: bool = True) -> Deferred[Lease]:
        """Serve the request again: it goes back to the head of its key's queue,
        keeping its arrival time and deadline. ``failed`` (the container refused the
        connection, or is known dead): the container is failed as by :meth:`failed`;
        else it is released as by :meth:`release`. Fires with the new lease, or fails
        with a :class:`~dockerspaces.broker.errors.BrokerError`."""
        if self.released or self._retry is None:
            return fail(BackendRefused(f"{self.display}: the container refused the request"))
        self.released = True
        return self._retry(self, failed)
