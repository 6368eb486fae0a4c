"""The real engine: docker-py for one Docker host, run in a thread pool.

:class:`Engine` implements :class:`~dockerspaces.engine.interface.IEngine` for one
:class:`~dockerspaces.config.HostConfig`; it is the facade over the engine's rooms:

- :mod:`~dockerspaces.engine.threads`: the engine's own pool (``slots + 2`` daemon
  threads, a docker-py client per thread) and a bounded shutdown;
- :mod:`~dockerspaces.engine.errors`: docker-py errors to typed ``EngineError`` s;
- :mod:`~dockerspaces.engine.pull`: the pull policy, shared pulls, progress;
- :mod:`~dockerspaces.engine.readiness` and :mod:`~dockerspaces.engine.probe`:
  waiting until a started container answers;
- :mod:`~dockerspaces.engine.events`: the event thread;
- :mod:`~dockerspaces.engine.adopt`: reading back this instance's containers.

Creating, starting and stopping containers are here.  Results come back on the
reactor thread.  ``reactor`` provides ``IReactorTime``, ``IReactorFromThreads`` and
``IReactorTCP`` (typed ``Any``: zope interfaces do not intersect in a type).

:class:`EngineService` owns the pool: started in ``startService``; ``stopService``
first closes open pull and event streams, then stops the pool without waiting longer
than ``shutdown_timeout`` for calls still in flight.

For tests, pass ``pool`` (anything with ``callInThreadWithCallback``, ``start``,
``stop`` -- e.g. one that runs calls inline), ``client_factory`` (returns a docker-py
``APIClient`` or a fake with the same methods) and ``probe_agent`` (an ``IAgent``).
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Callable
from typing import Any, Protocol, cast

import docker.errors  # type: ignore[import-untyped]
from docker.types import DeviceRequest  # type: ignore[import-untyped]
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.web.iweb import IAgent

from ..config import HostConfig
from ..spec import JobSpec
from .adopt import list_own_sync, owned_from_docker
from .auth import RegistryAuth
from .errors import explanation, is_not_found, pull_error, status_of, translate
from .events import EVENT_KINDS, EventWatcher, docker_time, event_from_docker
from .interface import (
    ContainerEvent,
    ContainerHandle,
    ContainerRemoved,
    EngineError,
    ImageNotFound,
    NetworkInfo,
    OwnedContainer,
    PortAllocated,
    PullProgress,
    RunOptions,
    SlotInfo,
    container_env,
    container_labels,
)
from .probe import ProbeResult, probe_agent, probe_status_line
from .pull import PULL_POLICIES, Pulls
from .readiness import LOG_TAIL_LINES, wait_ready
from .threads import ClientThreads, DaemonThreadPool, DockerClient, IPool
from .urls import EngineTLS, make_client

__all__ = [
    "EVENT_KINDS",
    "LOG_TAIL_LINES",
    "PULL_POLICIES",
    "WORKER_SETTLE",
    "DaemonThreadPool",
    "Engine",
    "EngineService",
    "IPool",
    "docker_time",
    "event_from_docker",
    "network_from_docker",
    "owned_from_docker",
    "pull_error",
    "translate",
]

WORKER_SETTLE = 2.0  # a worker is started when still running this long after start
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_.-]+")


class Engine:
    """:class:`IEngine` for one Docker host (see the module docstring)."""

    def __init__(
        self,
        reactor: Any,
        host: HostConfig,
        instance: str,
        pull: str = "missing",
        auth: RegistryAuth | None = None,
        *,
        pool: IPool | None = None,
        client_factory: Callable[[], DockerClient] | None = None,
        tls: EngineTLS | None = None,
        extra_headers: dict[str, str] | None = None,
        timeout: int = 60,
        probe_timeout: float = 5.0,
        worker_settle: float = WORKER_SETTLE,
        shutdown_timeout: float = 10.0,
        connect_timeout: int = 5,
        probe_agent: IAgent | None = None,
    ) -> None:
        self.name = host.name
        self.host = host
        self.instance = instance
        self._reactor = reactor
        self._threads = ClientThreads(
            reactor,
            host.name,
            host.url,
            pool
            or DaemonThreadPool(minthreads=0, maxthreads=max(host.slots, 1) + 2, name=f"engine-{host.name}"),
            client_factory
            or (lambda: make_client(host.url, timeout=timeout, tls=tls, extra_headers=extra_headers)),
            shutdown_timeout,
        )
        self._pulls = Pulls(reactor, self._threads, pull, auth or RegistryAuth())
        self._events = EventWatcher(reactor, host, self._threads, instance)
        self._probe_agent = probe_agent
        self._probe_timeout = probe_timeout
        self._worker_settle = worker_settle
        self._connect_timeout = connect_timeout
        self._running = False
        self._started_at: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<Engine {self.name} {self.host.url} instance={self.instance}>"

    @property
    def pull_policy(self) -> str:
        """``always``, ``missing`` or ``never`` (settable)."""
        return self._pulls.policy

    @pull_policy.setter
    def pull_policy(self, policy: str) -> None:
        if policy not in PULL_POLICIES:
            raise ValueError(f"pull policy {policy!r}: use one of {', '.join(PULL_POLICIES)}")
        self._pulls.policy = policy

    # ----------------------------------------------------------------- lifecycle

    def start_pool(self) -> None:
        """Start the pool (and the event thread if someone watches)."""
        self._threads.start()
        self._running = True
        if self._events.callbacks:
            self._events.start()

    def shutdown(self) -> Deferred[None]:
        """Close open streams, stop the pool (bounded), close clients."""
        self._running = False
        return self._threads.shutdown()

    # --------------------------------------------------------------------- images

    def ensure_image(
        self, ref: str, on_progress: Callable[[PullProgress], None] | None = None
    ) -> Deferred[None]:
        """Make ``ref`` present per the pull policy; concurrent calls share one pull."""
        return self._pulls.ensure_image(ref, on_progress)

    # ----------------------------------------------------------------- containers

    def labels_for(self, spec: JobSpec, slot: SlotInfo) -> dict[str, str]:
        """The labels a container for ``spec`` in ``slot`` carries."""
        return container_labels(self.instance, self.name, spec, slot)

    def container_name(self, slot: SlotInfo) -> str:
        """A fresh container name ``ds-<instance>-<host>-<slotport>-<shortid>``."""
        raw = f"ds-{self.instance}-{self.name}-{slot.port}-{uuid.uuid4().hex[:6]}"
        return _NAME_BAD.sub("_", raw)

    def create(self, spec: JobSpec, slot: SlotInfo, options: RunOptions) -> Deferred[ContainerHandle]:
        """Create (not start) a labelled container for ``spec`` in ``slot``."""
        return self._threads.run(self._create_sync, spec, slot, options, self.container_name(slot))

    def _create_sync(
        self, client: DockerClient, spec: JobSpec, slot: SlotInfo, options: RunOptions, name: str
    ) -> ContainerHandle:
        ports: list[int] | None = None
        bindings: dict[int, tuple[str, int]] | None = None
        if not spec.worker:
            ports = [spec.port]
            bindings = {spec.port: (self.host.publish_ip, slot.port)}
        device_requests = None
        if slot.gpu is not None and options.gpu:
            device_requests = [
                DeviceRequest(driver="nvidia", device_ids=[str(slot.gpu)], capabilities=[["gpu"]])
            ]
        host_config = client.create_host_config(
            port_bindings=bindings,
            binds=list(options.volumes) or None,
            shm_size=options.shm_size,
            mem_limit=options.mem_limit,
            nano_cpus=options.nano_cpus,
            network_mode=options.network,
            device_requests=device_requests,
        )
        try:
            result = client.create_container(
                image=spec.ref,
                name=name,
                environment=[f"{k}={v}" for k, v in container_env(spec, options).items()],
                command=list(options.command) if options.command is not None else None,
                labels=self.labels_for(spec, slot),
                ports=ports,
                host_config=host_config,
                detach=True,
            )
        except docker.errors.APIError as e:
            msg = explanation(e)
            if is_not_found(e):
                raise ImageNotFound(f"image {spec.ref} is not present on engine {self.name}: {msg}") from None
            if status_of(e) == 409:
                raise EngineError(f"container name {name} is already in use on {self.name}") from None
            raise EngineError(
                f"creating a container for {spec.display} on {self.name} failed: {msg}"
            ) from None
        return ContainerHandle(id=result["Id"], name=name, host=self.name, slot=slot, key=spec.key, spec=spec)

    def start(self, handle: ContainerHandle) -> Deferred[None]:
        """Start a created container; on failure it is removed again."""
        d = self._threads.run(self._start_sync, handle)

        def started(_: None) -> None:
            self._started_at[handle.id] = self._reactor.seconds()

        d.addCallback(started)
        return d

    def _start_sync(self, client: DockerClient, handle: ContainerHandle) -> None:
        try:
            client.start(handle.id)
            return
        except docker.errors.APIError as e:
            msg = explanation(e)
            if is_not_found(e):
                raise ContainerRemoved(
                    f"container {handle.name} ({handle.spec.display}) was removed from "
                    "outside before it started"
                ) from None
            try:
                client.remove_container(handle.id, force=True, v=True)
            except Exception:  # noqa: BLE001, S110 - best effort cleanup
                pass
        low = msg.lower()
        if "port is already allocated" in low or "address already in use" in low:
            raise PortAllocated(
                f"port {handle.slot.port} on {self.name} is already in use by something else: {msg}"
            )
        if "device driver" in low or "nvidia" in low or "gpu" in low:
            raise EngineError(f"GPU {handle.slot.gpu} on {self.name} is not usable: {msg}")
        raise EngineError(f"starting {handle.name} ({handle.spec.display}) failed: {msg}")

    # ----------------------------------------------------------------- readiness

    def wait_ready(self, handle: ContainerHandle, deadline: float, options: RunOptions) -> Deferred[None]:
        """Poll until ready (see SPEC and :mod:`~dockerspaces.engine.readiness`);
        ContainerExited at once, NotReady at the deadline."""
        started = self._started_at.get(handle.id, self._reactor.seconds())
        d = Deferred.fromCoroutine(
            wait_ready(
                self._threads,
                self._reactor,
                self._probe,
                handle,
                deadline,
                options,
                address=self.host.address,
                started=started,
                probe_timeout=self._probe_timeout,
                worker_settle=self._worker_settle,
            )
        )

        def forget(result: object) -> object:
            self._started_at.pop(handle.id, None)
            return result

        return d.addBoth(forget)

    def _probe(self, address: str, port: int, path: str, timeout: float) -> Deferred[ProbeResult]:
        if self._probe_agent is None:  # made on first use: the reactor may not run before
            self._probe_agent = probe_agent(self._reactor, self._probe_timeout)
        return probe_status_line(self._reactor, address, port, path, timeout, agent=self._probe_agent)

    # ----------------------------------------------------------------------- stop

    def stop(self, handle: ContainerHandle | OwnedContainer, grace: float) -> Deferred[None]:
        """SIGTERM, SIGKILL after ``grace`` s (0: kill at once), then remove. Idempotent."""
        return self._threads.run(self._stop_sync, handle.id, handle.name, grace)

    def _stop_sync(self, client: DockerClient, cid: str, name: str, grace: float) -> None:
        try:
            if grace <= 0:
                client.kill(cid)
            else:
                client.stop(cid, timeout=max(1, math.ceil(grace)))
        except docker.errors.APIError as e:
            if is_not_found(e):
                return
            if status_of(e) != 409 and "is not running" not in explanation(e):
                raise EngineError(f"stopping {name} on {self.name} failed: {explanation(e)}") from None
        try:
            client.remove_container(cid, force=True, v=True)
        except docker.errors.APIError as e:
            if is_not_found(e) or status_of(e) == 409:  # gone, or removal in progress
                return
            raise EngineError(f"removing {name} on {self.name} failed: {explanation(e)}") from None

    # ---------------------------------------------------------------------- events

    def watch(self, callback: Callable[[ContainerEvent], None]) -> None:
        """Deliver this instance's container events to ``callback`` on the reactor thread."""
        self._events.callbacks.append(callback)
        if self._running:
            self._events.start()

    def event_filters(self) -> dict[str, list[str]]:
        """The docker ``events`` filters: our containers' die/oom/stop/destroy."""
        return self._events.filters

    # ------------------------------------------------------------------- adoption

    def list_own(self) -> Deferred[list[OwnedContainer]]:
        """Containers (running or not) with this instance's and this host's labels."""
        return self._threads.run(list_own_sync, self.instance, self.name)

    # ---------------------------------------------------------------------- misc

    def ping(self) -> Deferred[bool]:
        """True when the engine answers (within ``connect_timeout`` seconds).

        This is the health check of a host, a cluster peer's included (its
        ``/docker:local``): it goes through docker-py like every other engine call,
        not treq, so that it tests the very transport the engine's calls take (a
        UNIX socket, ssh, TLS with client certificates, a peer's token header)."""

        d = self._threads.run(ping_sync)
        d.addTimeout(self._connect_timeout, self._reactor)
        d.addErrback(lambda _f: False)
        return d

    def networks(self) -> Deferred[list[NetworkInfo]]:
        """Every network of the engine with its IPAM address ranges."""
        return self._threads.run(networks_sync)

    def container_address(self, container_id: str) -> Deferred[str | None]:
        """The container's IP on its first network (``NetworkSettings.Networks``, the
        legacy top-level ``IPAddress`` when there are none); None when the container is
        gone or has no address."""
        return self._threads.run(container_address_sync, container_id)

    def endpoint_for(self, slot: SlotInfo, spec: JobSpec) -> str:
        """``tcp:<address>:<slot.port>`` (an IPv6 address in brackets), as the proxy's
        ``Backend`` takes it; the proxy applies its own connect timeout."""
        addr = self.host.address
        if ":" in addr:
            return f"tcp:[{addr}]:{slot.port}"
        return f"tcp:{addr}:{slot.port}"


def container_address_sync(client: DockerClient, container_id: str) -> str | None:
    """:meth:`Engine.container_address` in a pool thread."""
    try:
        info = client.inspect_container(container_id)
    except docker.errors.APIError as e:
        if is_not_found(e):
            return None
        raise
    settings = info.get("NetworkSettings") or {}
    for net in (settings.get("Networks") or {}).values():
        if isinstance(net, dict):
            ip = net.get("IPAddress") or net.get("GlobalIPv6Address")
            if ip:
                return str(ip)
    return str(settings["IPAddress"]) if settings.get("IPAddress") else None


def network_from_docker(info: dict[str, Any]) -> NetworkInfo:
    """A :class:`NetworkInfo` from one ``networks()`` list entry."""
    subnets: list[str] = []
    ranges: list[str] = []
    for conf in (info.get("IPAM") or {}).get("Config") or []:
        if not isinstance(conf, dict):
            continue
        if conf.get("Subnet"):
            subnets.append(str(conf["Subnet"]))
        if conf.get("IPRange"):
            ranges.append(str(conf["IPRange"]))
    return NetworkInfo(
        name=str(info.get("Name") or ""),
        driver=str(info.get("Driver") or ""),
        subnets=tuple(subnets),
        ip_ranges=tuple(ranges),
    )


def ping_sync(client: DockerClient) -> bool:
    """Whether the engine answers ``/_ping`` (in a pool thread)."""
    return bool(client.ping())


def networks_sync(client: DockerClient) -> list[NetworkInfo]:
    """The engine's networks with their IPAM address ranges (in a pool thread)."""
    return [network_from_docker(n) for n in client.networks() or []]


class PoolOwner(Protocol):
    """What owns a Docker pool: an :class:`Engine`, or a swarm's manager."""

    def start_pool(self) -> None:
        """Start the pool (and its event thread or poller)."""

    def shutdown(self) -> Deferred[None]:
        """Close streams, then stop the pool (bounded)."""


class EngineService(Service):
    """Owns an engine's thread pool (any :class:`PoolOwner`, named ``name``, default
    ``engine-NAME``): starts it, and stops it without hanging."""

    def __init__(self, engine: PoolOwner, name: str | None = None) -> None:
        self.engine = engine
        self.setName(name if name is not None else f"engine-{cast(Engine, engine).name}")

    def startService(self) -> None:
        """Start the engine's pool (and its event thread when watched)."""
        super().startService()
        self.engine.start_pool()

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        """Close streams, then stop the pool (bounded by ``shutdown_timeout``)."""
        super().stopService()
        return self.engine.shutdown()
