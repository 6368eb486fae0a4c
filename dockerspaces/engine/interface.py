"""The engine interface the broker drives, and the values that cross it.

Everything here is pure data or a ``Protocol``; the real engine
(:mod:`dockerspaces.engine.engine`) runs docker-py in a thread pool, the fake
(:mod:`dockerspaces.engine.fake`) keeps state in memory for tests and benchmarks.
Every method returning a Deferred fires on the reactor thread.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Literal, Protocol

from attrs import field, frozen
from twisted.internet.defer import Deferred

from ..spec import JobSpec

# Labels put on every container this instance creates.
LABEL_INSTANCE = "dockerspaces.instance"
LABEL_HOST = "dockerspaces.host"
LABEL_SLOT = "dockerspaces.slot"
LABEL_KEY = "dockerspaces.key"
LABEL_DISPLAY = "dockerspaces.display"
LABEL_SPEC = "dockerspaces.spec"


@frozen
class SlotInfo:
    """One container place on a host: its published host port and optional GPU id."""

    host: str
    port: int
    gpu: int | None = None


@frozen
class RunOptions:
    """Per-image run options resolved from configuration profiles."""

    volumes: tuple[str, ...] = ()  # "src:dst[:ro]" docker bind/volume syntax
    shm_size: str | None = None
    mem_limit: str | None = None
    nano_cpus: int | None = None
    network: str | None = None
    ready_path: str = "/"
    start_timeout: float | None = None
    gpu: bool = True  # False: never attach the slot's GPU
    worker_release_max: int | None = None  # workers of this key at once; None: the broker's
    command: tuple[str, ...] | None = None  # None: the image's own
    env: tuple[tuple[str, str], ...] = ()  # added to the spec's env (these win)


def container_labels(instance: str, host: str, spec: JobSpec, slot: SlotInfo) -> dict[str, str]:
    """The labels every container (or swarm service) of this instance carries: whose it
    is, where, and its key -- the spec without env values (they are secrets; adoption
    takes key and display from their own labels)."""
    return {
        LABEL_INSTANCE: instance,
        LABEL_HOST: host,
        LABEL_SLOT: str(slot.port),
        LABEL_KEY: spec.key,
        LABEL_DISPLAY: spec.display,
        LABEL_SPEC: JobSpec(spec.mode, spec.name, spec.tag, spec.port).segment(),
    }


def container_env(spec: JobSpec, options: RunOptions) -> dict[str, str]:
    """The environment a container of ``spec`` gets: the spec's (the URL's) env, then
    the profile's and the public path and URL (these win over the URL's)."""
    env = dict(spec.env)
    env.update(options.env)
    return env


@frozen
class ContainerHandle:
    """A container created by an engine for one slot and one spec."""

    id: str
    name: str
    host: str
    slot: SlotInfo
    key: str
    spec: JobSpec


@frozen
class PullProgress:
    """A pull progress report: a status line and, when known, bytes done/total."""

    ref: str
    status: str
    current: int | None = None
    total: int | None = None


@frozen
class NetworkInfo:
    """A Docker network and the address ranges of its IPAM configuration: ``subnets``
    (``Subnet``) and ``ip_ranges`` (``IPRange``, where the engine allocates container
    addresses when set), as CIDR strings; ``host`` and ``none`` networks have none."""

    name: str
    driver: str
    subnets: tuple[str, ...] = ()
    ip_ranges: tuple[str, ...] = ()


EventKind = Literal["die", "oom", "stop", "destroy", "exited"]


@frozen
class ContainerEvent:
    """A container lifecycle event from the engine's event stream. ``exited`` (only
    from an engine sharing this machine's clock) follows a ``die`` with ``exited_at``:
    when the container's process ended, as Unix seconds from the engine's own record
    (``State.FinishedAt``)."""

    kind: EventKind
    container_id: str
    exit_code: int | None = None
    exited_at: float | None = None


@frozen
class OwnedContainer:
    """A container found on the engine carrying this instance's and host's labels."""

    id: str
    name: str
    running: bool
    slot_port: int | None
    labels: Mapping[str, str] = field(factory=dict)
    spec: JobSpec | None = None


class EngineError(Exception):
    """Base of engine errors; ``str()`` is a message an operator understands."""


class EngineUnreachable(EngineError):
    """The Docker engine does not answer."""


class ImageNotFound(EngineError):
    """The image (or tag) does not exist in its registry, or locally with pull=never."""


class Unauthorized(EngineError):
    """The registry refused the credentials (or their absence)."""


class PortAllocated(EngineError):
    """The slot's host port is already in use by something else."""


class ContainerExited(EngineError):
    """The container exited while starting; ``log_tail`` holds its last lines."""

    def __init__(self, message: str, exit_code: int | None = None, log_tail: str = ""):
        super().__init__(message)
        self.exit_code = exit_code
        self.log_tail = log_tail


class ContainerRemoved(EngineError):
    """The container was removed or killed from outside while starting (``docker rm -f``,
    ``docker kill``): not the image's fault, so the start may be tried again."""


class NotReady(EngineError):
    """The container did not become ready before the deadline."""


class IEngine(Protocol):
    """What the broker needs from one Docker host."""

    name: str

    def ensure_image(
        self, ref: str, on_progress: Callable[[PullProgress], None] | None = None
    ) -> Deferred[None]:
        """Make ``ref`` present per the pull policy; progress arrives on the reactor."""

    def create(self, spec: JobSpec, slot: SlotInfo, options: RunOptions) -> Deferred[ContainerHandle]:
        """Create (not start) a labelled container for ``spec`` in ``slot``."""

    def start(self, handle: ContainerHandle) -> Deferred[None]:
        """Start a created container."""

    def wait_ready(self, handle: ContainerHandle, deadline: float, options: RunOptions) -> Deferred[None]:
        """Fire when ready (HTTP status line / healthy / worker still running after 2 s).

        ``deadline`` is an absolute time on the engine's clock.  Fails with
        :class:`ContainerExited` or :class:`NotReady`.
        """

    def stop(self, handle: ContainerHandle | OwnedContainer, grace: float) -> Deferred[None]:
        """SIGTERM, SIGKILL after ``grace`` seconds (0: kill at once), then remove."""

    def watch(self, callback: Callable[[ContainerEvent], None]) -> None:
        """Deliver container events (die, oom, ...) to ``callback`` on the reactor thread."""

    def list_own(self) -> Deferred[list[OwnedContainer]]:
        """Running and stopped containers with this instance's and this host's labels."""

    def ping(self) -> Deferred[bool]:
        """True when the engine answers."""

    def networks(self) -> Deferred[list[NetworkInfo]]:
        """The engine's networks with their address ranges (for the ``host:`` policy)."""

    def endpoint_for(self, slot: SlotInfo, spec: JobSpec) -> str:
        """Client endpoint description (e.g. ``tcp:127.0.0.1:9100``) for a slot's container."""

    def container_address(self, container_id: str) -> Deferred[str | None]:
        """The container's IP address on its first network (``NetworkSettings``): the
        peer address a broker such as RabbitMQ sees for its connections; None when the
        container is gone or has no address (``network_mode: host``/``none``)."""
