"""One node of a Docker Swarm as an engine: a container in a slot is a swarm service.

:class:`SwarmManager` is the connection to a swarm manager: its own pool of docker-py
clients (:class:`~dockerspaces.engine.threads.ClientThreads`, as :class:`Engine` has),
the node list (:class:`NodeInfo`, :func:`slots_and_gpus` from the node labels
``dockerspaces.slots`` / ``dockerspaces.gpus``) and one task poller for every node
engine: a ``LoopingCall`` every ``poll_interval`` seconds lists this instance's
services and their tasks (two calls, whatever the number of nodes; none while no
service is followed) and reports, once per service, the services that ended while
the broker expects them running: a task in a terminal state gives ``die`` (with the
container's exit code) and ``exited`` (the task's status time: the node's clock, so
only with ``exit_times``); a service gone from the listing gives ``die`` and
``destroy``.

:class:`SwarmNodeEngine` implements :class:`~dockerspaces.engine.interface.IEngine`
for one node.  ``create`` makes a service with one replica pinned to the node
(``node.id==``), restart policy ``none``, the slot's port published in ``host`` mode
on the node (on every interface of the node: swarm has no host IP for a published
port, so the node's firewall must keep the slot ports from the world), a GPU as the
generic resource ``gpu`` (the node must advertise it; swarm cannot ask for one device
id, so the slot's GPU number only says *that* a GPU is wanted), the profile's command
as the service's ``Args`` (like ``docker run IMAGE CMD``: the entrypoint stays),
``shm_size`` ignored (a swarm service has none; logged once per spec) and the
service's stop grace period fixed at creation (``stop_grace``): ``stop`` removes the
service and only waits, bounded by its ``grace`` (or ``stop_grace``) plus 15 s, until
the task's container is gone and the slot's port is free.  Images are pulled by the
node when the task starts (swarm's own rule: the pull policy does not apply); the
image's registry credentials, when known, go with the service (as ``docker service
create --with-registry-auth`` does), and never the ones of ``~/.docker/config.json``:
the service is created with an explicit ``POST /services/create`` through the
client's public ``requests`` session (docker-py's ``create_service`` reads that file
and may run credential helpers).

Every docker-py call runs in the manager's pool; results fire on the reactor thread.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast

import docker.auth  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]
import requests.exceptions
from attrs import field, frozen
from docker.types import (  # type: ignore[import-untyped]
    ContainerSpec,
    EndpointSpec,
    Placement,
    Resources,
    RestartPolicy,
    ServiceMode,
    TaskTemplate,
)
from docker.utils import parse_bytes  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IAgent

from ..config import HostConfig
from ..spec import JobSpec
from .adopt import owned_from_docker
from .auth import RegistryAuth, registry_of
from .engine import WORKER_SETTLE, EngineService, networks_sync, ping_sync
from .errors import explanation, is_not_found, pull_error, status_of
from .events import docker_time
from .interface import (
    LABEL_HOST,
    LABEL_INSTANCE,
    ContainerEvent,
    ContainerExited,
    ContainerHandle,
    ContainerRemoved,
    EngineError,
    NetworkInfo,
    NotReady,
    OwnedContainer,
    PortAllocated,
    PullProgress,
    RunOptions,
    SlotInfo,
    container_env,
    container_labels,
)
from .probe import ProbeResult, probe_agent, probe_status_line
from .readiness import LOG_TAIL_LINES
from .threads import ClientThreads, DaemonThreadPool, DockerClient, IPool
from .urls import EngineTLS, make_client

T = TypeVar("T")
P = ParamSpec("P")

log = Logger()

LABEL_SLOTS = "dockerspaces.slots"  # node label: slots of the node
LABEL_GPUS = "dockerspaces.gpus"  # node label: GPUs of the node (round-robin over slots)
POLL_INTERVAL = 1.0  # seconds between two polls of the task poller
READY_POLL = 0.25  # seconds between two looks at a starting service's task
STOP_MARGIN = 15.0  # seconds a stop waits for the task's container beyond the grace
#: task states after which the task's container no longer runs
TERMINAL_STATES = frozenset({"complete", "shutdown", "failed", "rejected", "orphaned", "remove"})
SERVICE_NAME_MAX = 63  # swarm's limit
_SERVICE_BAD = re.compile(r"[^a-zA-Z0-9]+")
_IMAGE_WORDS = (
    "no such image",
    "manifest unknown",
    "pull access denied",
    "unauthorized",
    "authentication required",
    "repository does not exist",
)
_PORT_WORDS = ("port is already allocated", "address already in use")


# --------------------------------------------------------------------------- nodes


@frozen
class NodeInfo:
    """A swarm node as the manager describes it (``GET /nodes``)."""

    id: str
    hostname: str
    address: str  # where the node's published ports are reached (Status.Addr)
    state: str  # ready, down, unknown, disconnected
    availability: str  # active, pause, drain
    role: str  # worker, manager
    labels: Mapping[str, str] = field(factory=dict)

    @property
    def ready(self) -> bool:
        """Whether the node takes containers: up (``ready``) and ``active``."""
        return self.state == "ready" and self.availability == "active"


def node_from_docker(d: Mapping[str, Any]) -> NodeInfo:
    """A :class:`NodeInfo` from the Engine API's node JSON. A manager may report its
    ``Status.Addr`` as ``0.0.0.0``: then the address of ``ManagerStatus.Addr``."""
    spec = d.get("Spec") or {}
    status = d.get("Status") or {}
    address = str(status.get("Addr") or "")
    if address in ("", "0.0.0.0"):  # noqa: S104 - a comparison, not a bind
        manager = str((d.get("ManagerStatus") or {}).get("Addr") or "")
        host = manager.rsplit(":", 1)[0] if ":" in manager else manager
        address = host.strip("[]") or address
    return NodeInfo(
        id=str(d.get("ID") or ""),
        hostname=str((d.get("Description") or {}).get("Hostname") or ""),
        address=address,
        state=str(status.get("State") or "unknown"),
        availability=str(spec.get("Availability") or "active"),
        role=str(spec.get("Role") or "worker"),
        labels={str(k): str(v) for k, v in (spec.get("Labels") or {}).items()},
    )


def _label_count(node: NodeInfo, label: str) -> tuple[int | None, str | None]:
    """The whole number >= 0 of ``label`` on ``node``: (None, None) when absent,
    (None, why) when not such a number."""
    text = node.labels.get(label)
    if text is None:
        return None, None
    if text.strip().isdigit():
        return int(text.strip()), None
    return None, f"node {node.hostname} ({node.id}): label {label}={text!r} is not a whole number >= 0"


def slots_and_gpus(node: NodeInfo, default_slots: int, default_gpus: int) -> tuple[int, int]:
    """The node's slots and GPUs: its ``dockerspaces.slots`` and ``dockerspaces.gpus``
    labels, the defaults where a label is absent or bad (:func:`label_problems` says
    why). GPUs -1 (``--gpu true``): one per slot."""
    slots, _ = _label_count(node, LABEL_SLOTS)
    gpus, _ = _label_count(node, LABEL_GPUS)
    slots = default_slots if slots is None else slots
    gpus = default_gpus if gpus is None else gpus
    return slots, (slots if gpus < 0 else gpus)


def label_problems(node: NodeInfo) -> tuple[str, ...]:
    """Why :func:`slots_and_gpus` took a default instead of a label of ``node`` (to
    log when a node's labels change, not every inventory round)."""
    whys = (_label_count(node, label)[1] for label in (LABEL_SLOTS, LABEL_GPUS))
    return tuple(f"{why}; using the default" for why in whys if why is not None)


def host_for_node(
    node: NodeInfo, url: str, start_port: int, slots: int, gpus: int, name: str | None = None
) -> HostConfig:
    """The :class:`HostConfig` of ``node``'s engine: ``swarm-<hostname>`` (unless
    ``name``), the manager's ``url``, its slots reached at the node's address."""
    return HostConfig(
        name=name or f"swarm-{node.hostname}",
        url=url,
        start_port=start_port,
        slots=slots,
        gpus=gpus,
        address_override=node.address,
    )


# --------------------------------------------------------------------------- tasks


@frozen
class TaskInfo:
    """A swarm task as the manager describes it (``GET /tasks``)."""

    id: str
    service_id: str
    node_id: str
    state: str
    desired_state: str
    message: str = ""
    err: str = ""
    exit_code: int | None = None  # only when the task had a container
    timestamp: float | None = None  # Unix seconds of its last status (the node's clock)
    version: int = 0
    addresses: tuple[str, ...] = ()  # on its networks, without the /prefix

    @property
    def terminal(self) -> bool:
        """Whether its container (if it had one) no longer runs."""
        return self.state in TERMINAL_STATES


def task_from_docker(d: Mapping[str, Any]) -> TaskInfo:
    """A :class:`TaskInfo` from the Engine API's task JSON."""
    status = d.get("Status") or {}
    cstatus = status.get("ContainerStatus") or {}
    code = cstatus.get("ExitCode")
    addresses = []
    for attachment in d.get("NetworksAttachments") or []:
        for addr in (attachment or {}).get("Addresses") or []:
            addresses.append(str(addr).split("/", 1)[0])
    return TaskInfo(
        id=str(d.get("ID") or ""),
        service_id=str(d.get("ServiceID") or ""),
        node_id=str(d.get("NodeID") or ""),
        state=str(status.get("State") or "new"),
        desired_state=str(d.get("DesiredState") or ""),
        message=str(status.get("Message") or ""),
        err=str(status.get("Err") or ""),
        exit_code=int(code) if cstatus.get("ContainerID") and isinstance(code, int) else None,
        timestamp=docker_time(str(status.get("Timestamp") or "")),
        version=int((d.get("Version") or {}).get("Index") or 0),
        addresses=tuple(addresses),
    )


def current_task(tasks: Iterable[TaskInfo]) -> TaskInfo | None:
    """A one-replica service's task that counts: a live one, else the newest."""
    ordered = sorted(tasks, key=lambda t: t.version)
    live = [t for t in ordered if not t.terminal]
    if live:
        return live[-1]
    return ordered[-1] if ordered else None


# --------------------------------------------------------------------------- the client


class Response(Protocol):
    """The part of a ``requests`` response :func:`post_json` reads."""

    def raise_for_status(self) -> None:
        """``requests.HTTPError`` for a 4xx/5xx status."""

    def json(self) -> Any:
        """The decoded body."""


class SwarmClient(Protocol):
    """The docker-py ``APIClient`` methods and attributes the swarm engine uses (the
    tests' fake has the same)."""

    base_url: str
    timeout: Any

    @property
    def api_version(self) -> str:
        """The API version the client speaks."""

    def close(self) -> None:
        """Close the client's connections."""

    def ping(self) -> bool:
        """Whether the manager answers ``/_ping``."""

    def post(self, url: str, **kwargs: Any) -> Response:
        """``requests.Session.post`` (an ``APIClient`` is a session)."""

    def nodes(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The swarm's nodes."""

    def inspect_node(self, node_id: str) -> dict[str, Any]:
        """One node (``APIError`` 404 when it left the swarm)."""

    def services(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The services matching ``filters``."""

    def tasks(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The tasks matching ``filters`` (404 for a ``service`` filter naming none)."""

    def remove_service(self, service: str) -> bool:
        """Remove a service (404 when there is none)."""

    def service_logs(self, service: str, **kwargs: Any) -> Iterable[bytes]:
        """A service's output, in chunks."""

    def networks(self) -> list[dict[str, Any]]:
        """The manager's networks."""


def post_json(client: SwarmClient, path: str, body: Mapping[str, Any], headers: Mapping[str, str]) -> Any:
    """POST ``body`` as JSON to the API ``path`` with ``headers`` (and the client's
    own, e.g. a peer token) and nothing else; the decoded answer, ``APIError`` on an
    error status (blocking)."""
    url = f"{client.base_url}/v{client.api_version}{path}"
    response = client.post(
        url,
        data=json.dumps(body),
        headers={"Content-Type": "application/json", **headers},
        timeout=client.timeout,
    )
    try:
        response.raise_for_status()
    except requests.exceptions.HTTPError as e:
        docker.errors.create_api_error_from_http_exception(e)  # raises the APIError
        raise
    return response.json()


def instance_filter(instance: str, host: str | None = None) -> dict[str, list[str]]:
    """The label filter of ``instance``'s services (on ``host`` when given); a
    ``tasks`` label filter matches the task's service's labels."""
    labels = [f"{LABEL_INSTANCE}={instance}"]
    if host is not None:
        labels.append(f"{LABEL_HOST}={host}")
    return {"label": labels}


def service_tasks_sync(client: SwarmClient, service_id: str) -> list[TaskInfo] | None:
    """The tasks of ``service_id``; None when the service is gone (blocking)."""
    try:
        return [task_from_docker(t) for t in client.tasks(filters={"service": [service_id]})]
    except docker.errors.APIError as e:
        if is_not_found(e):
            return None
        raise


def service_log_tail_sync(client: SwarmClient, service_id: str) -> str:
    """The last :data:`LOG_TAIL_LINES` lines of the service's output (blocking; empty
    when the manager cannot give them)."""
    try:
        chunks = client.service_logs(
            service_id, stdout=True, stderr=True, tail=LOG_TAIL_LINES, timestamps=False, is_tty=False
        )
        raw = chunks if isinstance(chunks, bytes) else b"".join(chunks)
    except (docker.errors.APIError, requests.exceptions.RequestException):
        return ""
    return raw.decode("utf-8", "replace").rstrip()


@frozen
class PollResult:
    """One poll: the ids of this instance's services and their tasks."""

    services: frozenset[str]
    tasks: tuple[TaskInfo, ...]


def poll_sync(client: SwarmClient, instance: str) -> PollResult:
    """:meth:`SwarmManager.poll` in a pool thread: two calls."""
    flt = instance_filter(instance)
    services = frozenset(str(s.get("ID") or "") for s in client.services(filters=flt))
    tasks = tuple(task_from_docker(t) for t in client.tasks(filters=flt))
    return PollResult(services, tasks)


# --------------------------------------------------------------------------- the manager


@frozen
class _Followed:
    """A service the poller watches for its end, for the engine of its node."""

    node_id: str
    deliver: Callable[[ContainerEvent], None]


class SwarmManager:
    """The connection to a swarm manager (see the module docstring).

    ``reactor`` provides ``IReactorTime``, ``IReactorFromThreads`` and
    ``IReactorTCP``; for tests pass ``pool`` and ``client_factory`` as to
    :class:`~dockerspaces.engine.engine.Engine`.
    """

    def __init__(
        self,
        reactor: Any,
        url: str,
        instance: str,
        *,
        pool: IPool | None = None,
        client_factory: Callable[[], SwarmClient] | None = None,
        tls: EngineTLS | None = None,
        extra_headers: dict[str, str] | None = None,
        timeout: int = 60,
        connect_timeout: int = 5,
        shutdown_timeout: float = 10.0,
        threads: int = 8,
        poll_interval: float = POLL_INTERVAL,
        exit_times: bool = True,
    ) -> None:
        self.url = url
        self.instance = instance
        self.reactor = reactor
        self.connect_timeout = connect_timeout
        self.poll_interval = poll_interval
        self.exit_times = exit_times
        factory = client_factory or (
            lambda: make_client(url, timeout=timeout, tls=tls, extra_headers=extra_headers)
        )
        self._threads = ClientThreads(
            reactor,
            "swarm-manager",
            url,
            pool or DaemonThreadPool(minthreads=0, maxthreads=max(threads, 1), name="swarm-manager"),
            cast("Callable[[], DockerClient]", factory),
            shutdown_timeout,
        )
        self._followed: dict[str, _Followed] = {}
        self._loop = LoopingCall(self.poll)
        self._loop.clock = reactor

    def __repr__(self) -> str:
        return f"<SwarmManager {self.url} instance={self.instance}>"

    def run(
        self, func: Callable[Concatenate[SwarmClient, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        """Run ``func(client, *args)`` in the manager's pool (see
        :meth:`ClientThreads.run <dockerspaces.engine.threads.ClientThreads.run>`)."""
        return self._threads.run(cast("Callable[Concatenate[DockerClient, P], T]", func), *args, **kwargs)

    # ----------------------------------------------------------------- lifecycle

    def start_pool(self) -> None:
        """Start the pool and the task poller."""
        self._threads.start()
        if not self._loop.running:
            self._loop.start(self.poll_interval, now=False).addErrback(
                lambda f: log.failure("the swarm task poller stopped", f)
            )

    def shutdown(self) -> Deferred[None]:
        """Stop the poller, then the pool (bounded), close the clients."""
        if self._loop.running:
            self._loop.stop()
        return self._threads.shutdown()

    # --------------------------------------------------------------------- reads

    def nodes(self) -> Deferred[list[NodeInfo]]:
        """Every node of the swarm."""

        def nodes_sync(client: SwarmClient) -> list[NodeInfo]:
            return [node_from_docker(n) for n in client.nodes() or []]

        return self.run(nodes_sync)

    def ping(self) -> Deferred[bool]:
        """True when the manager answers (within ``connect_timeout`` seconds)."""

        d = self._threads.run(ping_sync)
        d.addTimeout(self.connect_timeout, self.reactor)
        d.addErrback(lambda _f: False)
        return d

    def networks(self) -> Deferred[list[NetworkInfo]]:
        """The manager's networks with their IPAM address ranges."""
        return self._threads.run(networks_sync)

    # ------------------------------------------------------------------- poller

    def follow(self, service_id: str, node_id: str, deliver: Callable[[ContainerEvent], None]) -> None:
        """Report the end of ``service_id`` (on ``node_id``) to ``deliver``, once."""
        self._followed[service_id] = _Followed(node_id, deliver)

    def forget(self, service_id: str) -> None:
        """Report nothing more about ``service_id`` (it is being stopped)."""
        self._followed.pop(service_id, None)

    def forget_node(self, node_id: str) -> None:
        """Report nothing more about the services on ``node_id`` (its engine is gone)."""
        for sid in [s for s, f in self._followed.items() if f.node_id == node_id]:
            del self._followed[sid]

    @property
    def followed(self) -> frozenset[str]:
        """The services whose end the poller would report."""
        return frozenset(self._followed)

    def poll(self) -> Deferred[None]:
        """One round of the task poller (the ``LoopingCall``'s body; never fails)."""
        watched = dict(self._followed)  # what existed before the listing was asked for
        if not watched:
            return succeed(None)
        d = self.run(poll_sync, self.instance).addCallback(self._judge, watched)

        def failed(f: Failure) -> None:
            log.warn(  # noqa: G010 - twisted.logger
                "polling the swarm's tasks failed: {err}", err=f.getErrorMessage()
            )

        return d.addErrback(failed)

    def _judge(self, result: PollResult, watched: dict[str, _Followed]) -> None:
        """Report every watched service that ended (see the module docstring)."""
        by_service: dict[str, list[TaskInfo]] = {}
        for t in result.tasks:
            by_service.setdefault(t.service_id, []).append(t)
        for sid, followed in watched.items():
            if self._followed.get(sid) is not followed:
                continue  # stopped or forgotten meanwhile
            events: list[ContainerEvent] = []
            if sid not in result.services:
                events = [ContainerEvent("die", sid), ContainerEvent("destroy", sid)]
            else:
                task = current_task(by_service.get(sid, ()))
                if task is None or not task.terminal:
                    continue
                events = [ContainerEvent("die", sid, task.exit_code)]
                if self.exit_times and task.timestamp is not None:
                    events.append(ContainerEvent("exited", sid, task.exit_code, task.timestamp))
            del self._followed[sid]
            for ev in events:
                try:
                    followed.deliver(ev)
                except Exception:  # noqa: BLE001 - one engine's watcher must not stop the rest
                    log.failure("swarm event delivery failed")


class SwarmManagerService(EngineService):
    """Owns a :class:`SwarmManager`'s pool and poller: starts them, stops them without
    hanging (as an engine's service does)."""

    def __init__(self, manager: SwarmManager) -> None:
        super().__init__(manager, "swarm-manager")
        self.manager = manager


# --------------------------------------------------------------------------- a node


def _ended_error(handle: ContainerHandle, task: TaskInfo, tail: str, auth: RegistryAuth) -> EngineError:
    """What a task that ended while its service was starting means."""
    spec = handle.spec
    what = f"service {handle.name} ({spec.display})"
    reason = task.err or task.message or task.state
    low = reason.lower()
    if task.state in ("shutdown", "remove", "orphaned"):
        return ContainerRemoved(f"{what} was stopped from outside while starting ({task.state}: {reason})")
    if task.exit_code is None and any(w in low for w in _IMAGE_WORDS):
        return pull_error(spec.ref, registry_of(spec.ref), reason, auth.for_ref(spec.ref) is not None)
    if any(w in low for w in _PORT_WORDS):
        return PortAllocated(
            f"port {handle.slot.port} on {handle.host} is already in use by something else: {reason}"
        )
    if task.exit_code is None:
        return ContainerExited(f"{what} was {task.state} while starting: {reason}", log_tail=tail)
    return ContainerExited(
        f"{what} exited with code {task.exit_code} while starting: {reason}",
        exit_code=task.exit_code,
        log_tail=tail,
    )


def _waiting_why(task: TaskInfo | None) -> str:
    """Why a service that has not ended is not running yet, in plain words."""
    if task is None:
        return "the service has no task yet"
    if task.state == "preparing":
        return "the node is pulling the image (task preparing)"
    detail = task.err or ""
    return f"its task is {task.state}" + (f": {detail}" if detail else "")


class SwarmNodeEngine:
    """:class:`IEngine` for one node of a swarm (see the module docstring).

    ``host`` gives the engine's name (``swarm-<hostname>``), slots and GPUs and, as
    its ``address``, where the node's published ports are reached
    (:func:`host_for_node`); the instance is the manager's.
    """

    def __init__(
        self,
        manager: SwarmManager,
        node: NodeInfo,
        host: HostConfig,
        *,
        stop_grace: float = 10.0,
        auth: RegistryAuth | None = None,
        probe_agent: IAgent | None = None,
        probe_timeout: float = 5.0,
        worker_settle: float = WORKER_SETTLE,
    ) -> None:
        self.name = host.name
        self.host = host
        self.node = node
        self.manager = manager
        self.instance = manager.instance
        self.stop_grace = stop_grace
        self._auth = auth or RegistryAuth()
        self._reactor = manager.reactor
        self._probe_agent = probe_agent
        self._probe_timeout = probe_timeout
        self._worker_settle = worker_settle
        self._callbacks: list[Callable[[ContainerEvent], None]] = []
        self._shm_warned: set[str] = set()

    def __repr__(self) -> str:
        return f"<SwarmNodeEngine {self.name} node={self.node.id} instance={self.instance}>"

    # --------------------------------------------------------------------- images

    def ensure_image(
        self, ref: str, on_progress: Callable[[PullProgress], None] | None = None
    ) -> Deferred[None]:
        """Nothing to do here: the node pulls the image when the task starts."""
        if on_progress is not None:
            on_progress(PullProgress(ref, "pulled on the node when its task starts"))
        return succeed(None)

    # --------------------------------------------------------------------- create

    def labels_for(self, spec: JobSpec, slot: SlotInfo) -> dict[str, str]:
        """The labels a service for ``spec`` in ``slot`` carries (a container's)."""
        return container_labels(self.instance, self.name, spec, slot)

    def service_name(self, slot: SlotInfo) -> str:
        """A fresh service name ``ds-<instance>-<host>-<slotport>-<shortid>``: letters,
        digits and dashes, at most 63 characters (swarm's rule)."""
        suffix = f"-{slot.port}-{uuid.uuid4().hex[:6]}"
        prefix = _SERVICE_BAD.sub("-", f"ds-{self.instance}-{self.name}").strip("-")
        return prefix[: SERVICE_NAME_MAX - len(suffix)].rstrip("-") + suffix

    def service_body(self, spec: JobSpec, slot: SlotInfo, options: RunOptions, name: str) -> dict[str, Any]:
        """The ``POST /services/create`` body for ``spec`` in ``slot`` (raises
        ``DockerException``/``ValueError`` for a bad volume or memory size)."""
        labels = self.labels_for(spec, slot)
        container = ContainerSpec(
            image=spec.ref,
            args=list(options.command) if options.command is not None else None,
            env=[f"{k}={v}" for k, v in container_env(spec, options).items()],
            labels=labels,
            mounts=list(options.volumes) or None,
            stop_grace_period=int(max(0.0, self.stop_grace) * 1e9),
        )
        generic = {"gpu": 1} if slot.gpu is not None and options.gpu else None
        mem = parse_bytes(options.mem_limit) if options.mem_limit else None
        resources = None
        if mem is not None or options.nano_cpus is not None or generic is not None:
            resources = Resources(cpu_limit=options.nano_cpus, mem_limit=mem, generic_resources=generic)
        template = TaskTemplate(
            container,
            resources=resources,
            restart_policy=RestartPolicy(condition="none"),
            placement=Placement(constraints=[f"node.id=={self.node.id}"]),
            networks=[options.network] if options.network else None,
        )
        body: dict[str, Any] = {
            "Name": name,
            "Labels": labels,
            "TaskTemplate": template,
            "Mode": ServiceMode("replicated", replicas=1),
        }
        if not spec.worker:
            body["EndpointSpec"] = EndpointSpec(ports={slot.port: (spec.port, "tcp", "host")})
        return body

    def create(self, spec: JobSpec, slot: SlotInfo, options: RunOptions) -> Deferred[ContainerHandle]:
        """Create the one-replica service for ``spec`` in ``slot`` (its task starts at
        once: :meth:`start` has nothing left to do)."""
        if options.shm_size and spec.key not in self._shm_warned:
            self._shm_warned.add(spec.key)
            log.warn(  # noqa: G010 - twisted.logger
                "{display}: shm_size {size} is ignored on swarm node {host} (a service has none)",
                display=spec.display,
                size=options.shm_size,
                host=self.name,
            )
        name = self.service_name(slot)
        try:
            body = self.service_body(spec, slot, options, name)
        except (docker.errors.DockerException, ValueError) as e:
            return fail(EngineError(f"creating a service for {spec.display} on {self.name}: {e}"))
        auth_config = self._auth.for_ref(spec.ref)
        headers = {"X-Registry-Auth": docker.auth.encode_header(auth_config)} if auth_config else {}
        engine = self.name

        def create_sync(client: SwarmClient) -> str:
            try:
                return str(post_json(client, "/services/create", body, headers)["ID"])
            except docker.errors.APIError as e:
                if status_of(e) == 409:
                    raise EngineError(f"service name {name} is already in use on {engine}") from None
                raise EngineError(
                    f"creating a service for {spec.display} on {engine} failed: {explanation(e)}"
                ) from None

        def created(sid: str) -> ContainerHandle:
            self.manager.follow(sid, self.node.id, self._deliver)
            return ContainerHandle(id=sid, name=name, host=self.name, slot=slot, key=spec.key, spec=spec)

        return self.manager.run(create_sync).addCallback(created)

    def start(self, handle: ContainerHandle) -> Deferred[None]:
        """Nothing: the service was created with its one replica."""
        return succeed(None)

    # ------------------------------------------------------------------ readiness

    def wait_ready(self, handle: ContainerHandle, deadline: float, options: RunOptions) -> Deferred[None]:
        """Look at the service's task every 0.25 s until ready: a task that ended is
        ContainerExited (or ContainerRemoved, or the image's typed error) at once; a
        running one is ready when its port gives an HTTP answer (a worker: when it
        still runs ``worker_settle`` s after it was first seen running); NotReady at
        ``deadline``."""
        return Deferred.fromCoroutine(self._wait_ready(handle, deadline, options))

    async def _wait_ready(self, handle: ContainerHandle, deadline: float, options: RunOptions) -> None:
        spec = handle.spec
        clock = self._reactor
        address = self.host.address
        running_since: float | None = None
        while True:
            tasks = await self.manager.run(service_tasks_sync, handle.id)
            if tasks is None:
                raise ContainerRemoved(
                    f"service {handle.name} ({spec.display}) was removed from outside while starting"
                )
            task = current_task(tasks)
            now = clock.seconds()
            if task is not None and task.terminal:
                tail = ""
                if task.exit_code is not None:
                    tail = await self.manager.run(service_log_tail_sync, handle.id)
                raise _ended_error(handle, task, tail, self._auth)
            if task is not None and task.state == "running":
                if running_since is None:
                    running_since = now
                if spec.worker:
                    if now >= running_since + self._worker_settle:
                        return
                    why = f"worker is running, not yet {self._worker_settle:g}s"
                else:
                    budget = max(0.05, min(self._probe_timeout, deadline - now))
                    res = await self._probe(address, handle.slot.port, options.ready_path, budget)
                    if res.ready:
                        return
                    why = res.reason
            else:
                running_since = None
                why = _waiting_why(task)
            now = clock.seconds()
            if now >= deadline:
                raise NotReady(
                    f"service {handle.name} ({spec.display}) not ready on "
                    f"{address}:{handle.slot.port} by the deadline: {why}"
                )
            wait = min(READY_POLL, deadline - now)
            if spec.worker and running_since is not None:
                wait = min(wait, max(0.0, running_since + self._worker_settle - now)) or 0.01
            await deferLater(clock, wait)

    def _probe(self, address: str, port: int, path: str, timeout: float) -> Deferred[ProbeResult]:
        if self._probe_agent is None:  # made on first use: the reactor may not run before
            self._probe_agent = probe_agent(self._reactor, self._probe_timeout)
        return probe_status_line(self._reactor, address, port, path, timeout, agent=self._probe_agent)

    # ----------------------------------------------------------------------- stop

    def stop(self, handle: ContainerHandle | OwnedContainer, grace: float) -> Deferred[None]:
        """Remove the service (its task stops with the service's own grace period),
        then wait until the task's container is gone: the slot's port is free.
        Idempotent; EngineError when it still runs ``max(grace, stop_grace) + 15`` s
        later."""
        self.manager.forget(handle.id)
        bound = max(grace, self.stop_grace) + STOP_MARGIN
        return Deferred.fromCoroutine(self._stop(handle.id, handle.name, bound))

    async def _stop(self, sid: str, name: str, bound: float) -> None:
        clock = self._reactor
        until = clock.seconds() + bound
        engine = self.name

        def remove_sync(client: SwarmClient) -> None:
            try:
                client.remove_service(sid)
            except docker.errors.APIError as e:
                if is_not_found(e):
                    return  # gone already; its task may still be stopping
                raise EngineError(f"removing service {name} on {engine} failed: {explanation(e)}") from None

        def still_running_sync(client: SwarmClient) -> bool:
            tasks = client.tasks(filters=instance_filter(self.instance, engine))
            return any(t.service_id == sid and not t.terminal for t in map(task_from_docker, tasks))

        await self.manager.run(remove_sync)
        while await self.manager.run(still_running_sync):
            if clock.seconds() >= until:
                raise EngineError(
                    f"service {name} on {engine}: its task still runs {bound:g}s after the service "
                    "was removed"
                )
            await deferLater(clock, READY_POLL)

    # --------------------------------------------------------------------- events

    def watch(self, callback: Callable[[ContainerEvent], None]) -> None:
        """Deliver the end of this node's services to ``callback`` on the reactor
        thread (from the manager's task poller)."""
        self._callbacks.append(callback)

    def _deliver(self, event: ContainerEvent) -> None:
        for cb in list(self._callbacks):
            try:
                cb(event)
            except Exception:  # noqa: BLE001 - one callback must not starve others
                log.failure("container event callback failed")

    # ------------------------------------------------------------------ adoption

    def list_own(self) -> Deferred[list[OwnedContainer]]:
        """Services (their task running or not) with this instance's and this host's
        labels; the running ones are followed by the poller."""
        instance, host = self.instance, self.name

        def list_sync(client: SwarmClient) -> list[OwnedContainer]:
            flt = instance_filter(instance, host)
            by_service: dict[str, list[TaskInfo]] = {}
            for t in map(task_from_docker, client.tasks(filters=flt)):
                by_service.setdefault(t.service_id, []).append(t)
            out = []
            for s in client.services(filters=flt):
                spec = s.get("Spec") or {}
                labels = {str(k): str(v) for k, v in (spec.get("Labels") or {}).items()}
                if labels.get(LABEL_INSTANCE) != instance or labels.get(LABEL_HOST) != host:
                    continue  # never trust the filter alone
                sid = str(s.get("ID") or "")
                task = current_task(by_service.get(sid, ()))
                running = task is not None and task.state == "running"
                info = {
                    "Id": sid,
                    "Names": [str(spec.get("Name") or "")],
                    "State": "running" if running else "",
                }
                out.append(owned_from_docker(info, labels))
            return out

        def follow(owned: list[OwnedContainer]) -> list[OwnedContainer]:
            for o in owned:
                if o.running:
                    self.manager.follow(o.id, self.node.id, self._deliver)
            return owned

        return self.manager.run(list_sync).addCallback(follow)

    # ----------------------------------------------------------------------- misc

    def ping(self) -> Deferred[bool]:
        """True when the manager answers and still has this node ready and active."""
        node_id = self.node.id

        def ping_sync(client: SwarmClient) -> bool:
            try:
                return node_from_docker(client.inspect_node(node_id)).ready
            except docker.errors.APIError as e:
                if is_not_found(e):
                    return False  # left the swarm
                raise

        d = self.manager.run(ping_sync)
        d.addTimeout(self.manager.connect_timeout, self._reactor)
        d.addErrback(lambda _f: False)
        return d

    def networks(self) -> Deferred[list[NetworkInfo]]:
        """The manager's networks (swarm-wide ones included)."""
        return self.manager.networks()

    def endpoint_for(self, slot: SlotInfo, spec: JobSpec) -> str:
        """``tcp:<node address>:<slot.port>`` (an IPv6 address in brackets)."""
        addr = self.host.address
        if ":" in addr:
            return f"tcp:[{addr}]:{slot.port}"
        return f"tcp:{addr}:{slot.port}"

    def container_address(self, container_id: str) -> Deferred[str | None]:
        """The service's task's address on its first network (an overlay network's
        attachment); None when the service is gone or its task has none (only the
        node's default bridge: peers see the node's address)."""

        def address_sync(client: SwarmClient) -> str | None:
            tasks = service_tasks_sync(client, container_id)
            task = current_task(tasks or ())
            if task is None or not task.addresses:
                return None
            return task.addresses[0]

        return self.manager.run(address_sync)
