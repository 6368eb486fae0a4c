"""The real engine: docker-py for one Docker host, run in a thread pool.

:class:`Engine` implements :class:`~dockerspaces.engine.interface.IEngine` for one
:class:`~dockerspaces.config.HostConfig`.  Every blocking docker-py call runs in the
engine's own :class:`~twisted.python.threadpool.ThreadPool` (``slots + 2`` threads)
with a thread-local ``APIClient`` per pool thread (docker-py clients are not
thread-safe, and making one blocks); results come back on the reactor thread.
The event stream (:meth:`Engine.watch`) has a dedicated thread of its own.

:class:`EngineService` owns the pool: started in ``startService``; ``stopService``
first closes open pull and event streams, then stops the pool without waiting longer
than ``shutdown_timeout`` for calls still in flight (pool threads are daemons).

For tests, pass ``pool`` (anything with ``callInThreadWithCallback``, ``start``,
``stop`` -- e.g. one that runs calls inline) and ``client_factory`` (returns a
docker-py ``APIClient`` or a fake with the same methods).
"""

from __future__ import annotations

import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any, Protocol, TypeVar

import docker  # type: ignore[import-untyped]
import docker.auth  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]
from docker.types import DeviceRequest  # type: ignore[import-untyped]
from docker.types.daemon import CancellableStream  # type: ignore[import-untyped]
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from ..config import HostConfig
from ..spec import JobSpec, SpecError, parse_route
from .auth import RegistryAuth, registry_of, split_ref
from .dockerseam import json_stream, post_streaming
from .interface import (
    LABEL_DISPLAY,
    LABEL_HOST,
    LABEL_INSTANCE,
    LABEL_KEY,
    LABEL_SLOT,
    LABEL_SPEC,
    ContainerEvent,
    ContainerExited,
    ContainerHandle,
    ContainerRemoved,
    EngineError,
    EngineUnreachable,
    ImageNotFound,
    NetworkInfo,
    NotReady,
    OwnedContainer,
    PortAllocated,
    PullProgress,
    RunOptions,
    SlotInfo,
    Unauthorized,
)
from .probe import probe_status_line
from .urls import EngineTLS, make_client

T = TypeVar("T")

log = Logger()

PULL_POLICIES = ("always", "missing", "never")
WORKER_SETTLE = 2.0  # a worker is started when still running this long after start
LOG_TAIL_LINES = 20
EVENT_KINDS = ("die", "oom", "stop", "destroy")
_NAME_BAD = re.compile(r"[^a-zA-Z0-9_.-]+")


class IPool(Protocol):
    """The part of :class:`ThreadPool` the engine uses."""

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], object], func: Callable[..., Any], *args: Any
    ) -> None:
        """Run ``func(*args)`` in a thread and report ``(ok, result)`` to ``onResult``."""

    def start(self) -> None:
        """Start the threads."""

    def stop(self) -> None:
        """Stop the threads (waits for running calls)."""


class DaemonThreadPool(ThreadPool):
    """A :class:`ThreadPool` whose threads do not keep the process alive."""

    @staticmethod
    def threadFactory(*args: Any, **kwargs: Any) -> threading.Thread:  # type: ignore[override]
        """Make a daemon thread."""
        return threading.Thread(*args, daemon=True, **kwargs)


def _explanation(e: Exception) -> str:
    if isinstance(e, docker.errors.APIError):
        return str(e.explanation or e)
    return str(e) or e.__class__.__name__


def _status(e: Exception) -> int | None:
    if isinstance(e, docker.errors.APIError):
        try:
            return e.status_code
        except AttributeError:  # pragma: no cover - response without status
            return None
    return None


def _is_not_found(e: Exception) -> bool:
    return isinstance(e, docker.errors.NotFound) or _status(e) == 404


# a 401 status in the text, not the digits of a port or a size ("localhost:51401")
_STATUS_401 = re.compile(r"(?<![\w:.])401(?!\w)")


def pull_error(ref: str, registry: str, message: str, had_credentials: bool) -> EngineError:
    """Classify a pull error message from the engine into a typed :class:`EngineError`."""
    low = message.lower()
    where = "Docker Hub" if registry == "docker.io" else f"registry {registry}"
    if any(
        s in low
        for s in (
            "unauthorized",
            "authentication required",
            "no basic auth credentials",
            "incorrect username or password",
        )
    ) or _STATUS_401.search(low):
        who = "the configured credentials" if had_credentials else "access without credentials"
        return Unauthorized(f"{where} refused {who} for {ref}: {message}")
    if "denied" in low:
        if had_credentials:
            return Unauthorized(f"{where} denied access to {ref}: {message}")
        return ImageNotFound(
            f"image {ref} not found on {where} (or it needs credentials): {message}"
        )
    if any(s in low for s in ("not found", "manifest unknown", "does not exist", "no such")):
        return ImageNotFound(f"image {ref} not found on {where}: {message}")
    return EngineError(f"pulling {ref} from {where} failed: {message}")


def translate(e: BaseException, engine: str, url: str) -> BaseException:
    """Map a docker-py / transport exception to an :class:`EngineError` (others unchanged)."""
    if isinstance(e, (EngineError, CancelledError)):
        return e
    import requests.exceptions

    unreachable: tuple[type[BaseException], ...] = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        ConnectionError,
        TimeoutError,
    )
    try:
        import paramiko  # type: ignore[import-untyped]

        unreachable += (paramiko.SSHException,)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(e, unreachable):
        return EngineUnreachable(f"Docker engine {engine} ({url}) does not answer: {e}")
    if isinstance(e, docker.errors.APIError):
        return EngineError(f"Docker engine {engine}: {_explanation(e)}")
    if isinstance(e, docker.errors.DockerException):
        return EngineUnreachable(f"Docker engine {engine} ({url}): {e}")
    if isinstance(e, OSError):
        return EngineUnreachable(f"Docker engine {engine} ({url}) does not answer: {e}")
    return e


class _Pull:
    """One pull in flight for a ref, shared by every caller of ensure_image."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.listeners: list[Callable[[PullProgress], None]] = []
        self.waiters: list[Deferred[None]] = []
        self.last_emit = 0.0


class _State:
    """A container's state as read by inspect."""

    def __init__(self, info: dict[str, Any] | None) -> None:
        self.gone = info is None
        state = (info or {}).get("State") or {}
        self.status: str = state.get("Status", "gone" if info is None else "unknown")
        self.exit_code: int | None = state.get("ExitCode")
        self.oom: bool = bool(state.get("OOMKilled"))
        health = state.get("Health")
        self.health: str | None = health.get("Status") if isinstance(health, dict) else None
        self.error: str = state.get("Error") or ""


def _close_stream(stream: Any, client: Any) -> None:
    """Interrupt a blocking stream from another thread (ssh: close the client)."""
    try:
        stream.close()
        return
    except docker.errors.DockerException:
        pass  # paramiko channels cannot be cancelled; close the connection instead
    except Exception as e:  # noqa: BLE001 - best effort at shutdown
        log.debug("closing a stream failed: {e!r}", e=e)
    try:
        client.close()
    except Exception as e:  # noqa: BLE001 - best effort at shutdown
        log.debug("closing a client failed: {e!r}", e=e)


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
        client_factory: Callable[[], Any] | None = None,
        tls: EngineTLS | None = None,
        extra_headers: dict[str, str] | None = None,
        timeout: int = 60,
        probe_timeout: float = 5.0,
        worker_settle: float = WORKER_SETTLE,
        shutdown_timeout: float = 10.0,
        connect_timeout: int = 5,
    ) -> None:
        if pull not in PULL_POLICIES:
            raise ValueError(f"pull policy {pull!r}: use one of {', '.join(PULL_POLICIES)}")
        self.name = host.name
        self.host = host
        self.instance = instance
        self.pull_policy = pull
        self._reactor = reactor
        self._auth = auth or RegistryAuth()
        self._pool: IPool = pool or DaemonThreadPool(
            minthreads=0, maxthreads=max(host.slots, 1) + 2, name=f"engine-{host.name}"
        )
        self._client_factory = client_factory or (
            lambda: make_client(host.url, timeout=timeout, tls=tls, extra_headers=extra_headers)
        )
        self._probe_timeout = probe_timeout
        self._worker_settle = worker_settle
        self._shutdown_timeout = shutdown_timeout
        self._connect_timeout = connect_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[Any] = []
        self._streams: dict[int, tuple[Any, Any]] = {}
        self._stopping = threading.Event()
        self._running = False
        self._pulls: dict[str, _Pull] = {}
        self._callbacks: list[Callable[[ContainerEvent], None]] = []
        self._watch_thread: threading.Thread | None = None
        self._started_at: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<Engine {self.name} {self.host.url} instance={self.instance}>"

    # ------------------------------------------------------------------ threads

    def _client(self) -> Any:
        client = getattr(self._local, "client", None)
        if client is None:
            client = self._client_factory()
            with self._lock:
                self._clients.append(client)
            self._local.client = client
        return client

    def _drop_client(self) -> None:
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            try:
                client.close()
            except Exception:  # noqa: BLE001, S110 - it is being thrown away anyway
                pass

    def _track(self, stream: Any, client: Any) -> int:
        with self._lock:
            key = id(stream)
            self._streams[key] = (stream, client)
        return key

    def _untrack(self, key: int) -> None:
        with self._lock:
            self._streams.pop(key, None)

    def _run(self, func: Callable[..., T], *args: Any) -> Deferred[T]:
        """Run ``func(client, *args)`` in the pool; fire on the reactor thread."""
        d: Deferred[T] = Deferred()
        if self._stopping.is_set():
            d.errback(EngineError(f"engine {self.name} is shut down"))
            return d

        def work() -> T:
            try:
                return func(self._client(), *args)
            except BaseException as e:
                new = translate(e, self.name, self.host.url)
                if isinstance(new, EngineUnreachable):
                    self._drop_client()
                if new is e:
                    raise
                raise new from e

        def on_result(ok: bool, result: Any) -> None:
            self._reactor.callFromThread(self._fire, d, ok, result)

        self._pool.callInThreadWithCallback(on_result, work)
        return d

    @staticmethod
    def _fire(d: Deferred[Any], ok: bool, result: Any) -> None:
        if d.called:  # cancelled by the caller meanwhile
            return
        if ok:
            d.callback(result)
        else:
            d.errback(result)

    # ----------------------------------------------------------------- lifecycle

    def start_pool(self) -> None:
        """Start the pool (and the event thread if someone watches)."""
        self._pool.start()
        self._running = True
        if self._callbacks:
            self._start_watch_thread()

    def shutdown(self) -> Deferred[None]:
        """Close open streams, stop the pool (bounded), close clients."""
        self._stopping.set()
        self._running = False
        with self._lock:
            streams = list(self._streams.values())
        for stream, client in streams:
            _close_stream(stream, client)
        d: Deferred[None] = Deferred()

        def stop_pool() -> None:
            try:
                self._pool.stop()
            finally:
                with self._lock:
                    clients, self._clients = self._clients, []
                for c in clients:
                    try:
                        c.close()
                    except Exception:  # noqa: BLE001, S110 - shutting down
                        pass
                self._reactor.callFromThread(self._fire, d, True, None)

        t = threading.Thread(target=stop_pool, name=f"engine-{self.name}-stop", daemon=True)
        t.start()
        timer = self._reactor.callLater(self._shutdown_timeout, self._fire, d, True, None)

        def done(r: None) -> None:
            if timer.active():
                timer.cancel()

        d.addCallback(done)
        return d

    # --------------------------------------------------------------------- images

    def ensure_image(
        self, ref: str, on_progress: Callable[[PullProgress], None] | None = None
    ) -> Deferred[None]:
        """Make ``ref`` present per the pull policy; concurrent calls share one pull."""
        pull = self._pulls.get(ref)
        fresh = pull is None
        if pull is None:
            pull = _Pull(ref)
            self._pulls[ref] = pull
        if on_progress is not None:
            pull.listeners.append(on_progress)
        p = pull

        def cancel(w: Deferred[None]) -> None:
            if w in p.waiters:
                p.waiters.remove(w)

        waiter: Deferred[None] = Deferred(canceller=cancel)
        pull.waiters.append(waiter)
        if fresh:
            work = self._run(self._ensure_image_sync, ref, pull)
            work.addBoth(self._pull_done, pull)
        return waiter

    def _pull_done(self, result: Any, pull: _Pull) -> None:
        if self._pulls.get(pull.ref) is pull:
            del self._pulls[pull.ref]
        waiters, pull.waiters = pull.waiters, []
        for w in waiters:
            if w.called:
                continue
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(None)
        if isinstance(result, Failure) and not waiters:
            log.info("pull of {ref} failed (nobody waiting): {e}", ref=pull.ref, e=result.value)

    def _deliver(self, pull: _Pull, progress: PullProgress) -> None:
        for cb in list(pull.listeners):
            try:
                cb(progress)
            except Exception:  # noqa: BLE001 - a listener must not break the pull
                log.failure("pull progress listener failed")

    def _progress(self, pull: _Pull, progress: PullProgress, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - pull.last_emit < 0.1:
            return
        pull.last_emit = now
        self._reactor.callFromThread(self._deliver, pull, progress)

    def _ensure_image_sync(self, client: Any, ref: str, pull: _Pull) -> None:
        if self.pull_policy != "always":
            try:
                client.inspect_image(ref)
                return
            except docker.errors.APIError as e:
                if not _is_not_found(e):
                    raise
            if self.pull_policy == "never":
                raise ImageNotFound(
                    f"image {ref} is not present on engine {self.name} and --pull is never"
                )
        self._pull_sync(client, ref, pull)

    def _pull_sync(self, client: Any, ref: str, pull: _Pull) -> None:
        repo, tag = split_ref(ref)
        registry = registry_of(ref)
        auth_config = self._auth.for_ref(ref)
        headers = {"X-Registry-Auth": docker.auth.encode_header(auth_config)} if auth_config else {}
        self._progress(pull, PullProgress(ref, f"pulling {ref} from {registry}"), force=True)
        try:
            response = post_streaming(client, "/images/create",
                                      params={"fromImage": repo, "tag": tag}, headers=headers)
        except docker.errors.APIError as e:
            raise pull_error(ref, registry, _explanation(e), auth_config is not None) from None
        stream = CancellableStream(json_stream(client, response), response)
        key = self._track(stream, client)
        try:
            for chunk in stream:
                if self._stopping.is_set():
                    break
                if not isinstance(chunk, dict):
                    continue
                if "error" in chunk or "errorDetail" in chunk:
                    detail = chunk.get("errorDetail") or {}
                    msg = detail.get("message") or chunk.get("error") or "unknown error"
                    raise pull_error(ref, registry, str(msg), auth_config is not None)
                status = str(chunk.get("status", ""))
                layer = chunk.get("id")
                detail = chunk.get("progressDetail") or {}
                progress = PullProgress(
                    ref,
                    f"{layer}: {status}" if layer else status,
                    detail.get("current"),
                    detail.get("total"),
                )
                self._progress(pull, progress, force=status not in ("Downloading", "Extracting"))
        finally:
            self._untrack(key)
            try:
                stream.close()
            except Exception:  # noqa: BLE001, S110 - ssh streams cannot be closed
                pass
        if self._stopping.is_set():
            raise EngineError(f"pull of {ref} interrupted: engine {self.name} is shutting down")
        try:
            client.inspect_image(ref)
        except docker.errors.APIError as e:
            if _is_not_found(e):
                raise EngineError(f"pull of {ref} ended but the image is not there") from None
            raise

    # ----------------------------------------------------------------- containers

    def labels_for(self, spec: JobSpec, slot: SlotInfo) -> dict[str, str]:
        """The labels a container for ``spec`` in ``slot`` carries."""
        return {
            LABEL_INSTANCE: self.instance,
            LABEL_HOST: self.name,
            LABEL_SLOT: str(slot.port),
            LABEL_KEY: spec.key,
            LABEL_DISPLAY: spec.display,
            # without env values (they are secrets); adoption takes key and display
            # from their own labels
            LABEL_SPEC: JobSpec(spec.mode, spec.name, spec.tag, spec.port).segment(),
        }

    def container_name(self, slot: SlotInfo) -> str:
        """A fresh container name ``ds-<instance>-<host>-<slotport>-<shortid>``."""
        raw = f"ds-{self.instance}-{self.name}-{slot.port}-{uuid.uuid4().hex[:6]}"
        return _NAME_BAD.sub("_", raw)

    def create(
        self, spec: JobSpec, slot: SlotInfo, options: RunOptions
    ) -> Deferred[ContainerHandle]:
        """Create (not start) a labelled container for ``spec`` in ``slot``."""
        return self._run(self._create_sync, spec, slot, options, self.container_name(slot))

    def _create_sync(
        self, client: Any, spec: JobSpec, slot: SlotInfo, options: RunOptions, name: str
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
                environment=[f"{k}={v}" for k, v in spec.env],
                labels=self.labels_for(spec, slot),
                ports=ports,
                host_config=host_config,
                detach=True,
            )
        except docker.errors.APIError as e:
            msg = _explanation(e)
            if _is_not_found(e):
                raise ImageNotFound(f"image {spec.ref} is not present on engine {self.name}: {msg}") from None
            if _status(e) == 409:
                raise EngineError(f"container name {name} is already in use on {self.name}") from None
            raise EngineError(
                f"creating a container for {spec.display} on {self.name} failed: {msg}") from None
        return ContainerHandle(
            id=result["Id"], name=name, host=self.name, slot=slot, key=spec.key, spec=spec
        )

    def start(self, handle: ContainerHandle) -> Deferred[None]:
        """Start a created container; on failure it is removed again."""
        d = self._run(self._start_sync, handle)

        def started(_: None) -> None:
            self._started_at[handle.id] = self._reactor.seconds()

        d.addCallback(started)
        return d

    def _start_sync(self, client: Any, handle: ContainerHandle) -> None:
        try:
            client.start(handle.id)
            return
        except docker.errors.APIError as e:
            msg = _explanation(e)
            if _is_not_found(e):
                raise ContainerRemoved(
                    f"container {handle.name} ({handle.spec.display}) was removed from "
                    "outside before it started") from None
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

    def wait_ready(
        self, handle: ContainerHandle, deadline: float, options: RunOptions
    ) -> Deferred[None]:
        """Poll until ready (see SPEC); ContainerExited at once, NotReady at the deadline."""
        return Deferred.fromCoroutine(self._wait_ready(handle, deadline, options))

    def _inspect_sync(self, client: Any, cid: str) -> _State:
        try:
            return _State(client.inspect_container(cid))
        except docker.errors.APIError as e:
            if _is_not_found(e):
                return _State(None)
            raise

    def _log_tail_sync(self, client: Any, cid: str) -> str:
        try:
            raw = client.logs(cid, stdout=True, stderr=True, tail=LOG_TAIL_LINES, timestamps=False)
        except docker.errors.APIError:
            return ""
        if isinstance(raw, bytes):
            raw = raw.decode("utf-8", "replace")
        return str(raw).rstrip()

    async def _wait_ready(
        self, handle: ContainerHandle, deadline: float, options: RunOptions
    ) -> None:
        clock = self._reactor
        spec = handle.spec
        started = self._started_at.get(handle.id, clock.seconds())
        delay = 0.05
        why = "no answer yet"
        try:
            while True:
                st = await self._run(self._inspect_sync, handle.id)
                if st.gone or st.status == "removing":
                    raise ContainerRemoved(
                        f"container {handle.name} ({spec.display}) was removed from outside "
                        "while starting"
                    )
                if st.status in ("exited", "dead") and st.exit_code == 137 and not st.oom:
                    raise ContainerRemoved(
                        f"container {handle.name} ({spec.display}) was killed (exit 137) "
                        "from outside while starting"
                    )
                if st.status in ("exited", "dead"):
                    tail = await self._run(self._log_tail_sync, handle.id)
                    oom = " (out of memory)" if st.oom else ""
                    raise ContainerExited(
                        f"container {handle.name} ({spec.display}) exited with code "
                        f"{st.exit_code}{oom} while starting",
                        exit_code=st.exit_code,
                        log_tail=tail,
                    )
                now = clock.seconds()
                if spec.worker:
                    if st.status == "running" and now >= started + self._worker_settle:
                        return
                    why = f"worker is {st.status}, not yet {self._worker_settle:g}s old"
                elif st.status == "running":
                    budget = max(0.05, min(self._probe_timeout, deadline - now))
                    res = await probe_status_line(
                        clock, self.host.address, handle.slot.port, options.ready_path, budget
                    )
                    if res.ready:
                        if st.health in (None, "healthy"):
                            return
                        why = f"HTTP answers ({res.status_line}) but health is {st.health}"
                    else:
                        why = res.reason
                else:
                    why = f"container is {st.status}"
                now = clock.seconds()
                if now >= deadline:
                    raise NotReady(
                        f"container {handle.name} ({spec.display}) not ready on "
                        f"{self.host.address}:{handle.slot.port} by the deadline: {why}"
                    )
                wait = min(delay, deadline - now)
                if spec.worker:
                    wait = min(wait, max(0.0, started + self._worker_settle - now)) or 0.01
                await deferLater(clock, wait)
                delay = min(delay * 1.5, 0.5)
        finally:
            self._started_at.pop(handle.id, None)

    # ----------------------------------------------------------------------- stop

    def stop(self, handle: ContainerHandle | OwnedContainer, grace: float) -> Deferred[None]:
        """SIGTERM, SIGKILL after ``grace`` s (0: kill at once), then remove. Idempotent."""
        return self._run(self._stop_sync, handle.id, handle.name, grace)

    def _stop_sync(self, client: Any, cid: str, name: str, grace: float) -> None:
        try:
            if grace <= 0:
                client.kill(cid)
            else:
                client.stop(cid, timeout=max(1, math.ceil(grace)))
        except docker.errors.APIError as e:
            if _is_not_found(e):
                return
            if _status(e) != 409 and "is not running" not in _explanation(e):
                raise EngineError(f"stopping {name} on {self.name} failed: {_explanation(e)}") from None
        try:
            client.remove_container(cid, force=True, v=True)
        except docker.errors.APIError as e:
            if _is_not_found(e) or _status(e) == 409:  # gone, or removal in progress
                return
            raise EngineError(f"removing {name} on {self.name} failed: {_explanation(e)}") from None

    # ---------------------------------------------------------------------- events

    def watch(self, callback: Callable[[ContainerEvent], None]) -> None:
        """Deliver this instance's container events to ``callback`` on the reactor thread."""
        self._callbacks.append(callback)
        if self._running:
            self._start_watch_thread()

    def event_filters(self) -> dict[str, list[str]]:
        """The docker ``events`` filters: our containers' die/oom/stop/destroy."""
        return {
            "type": ["container"],
            "event": list(EVENT_KINDS),
            "label": [f"{LABEL_INSTANCE}={self.instance}", f"{LABEL_HOST}={self.name}"],
        }

    def _start_watch_thread(self) -> None:
        if self._watch_thread is not None:
            return
        t = threading.Thread(
            target=self._watch_loop, name=f"engine-{self.name}-events", daemon=True
        )
        self._watch_thread = t
        t.start()

    def _dispatch(self, event: ContainerEvent) -> None:
        for cb in list(self._callbacks):
            try:
                cb(event)
            except Exception:  # noqa: BLE001 - one callback must not starve others
                log.failure("container event callback failed")

    def _watch_loop(self, backoff_start: float = 0.5, backoff_max: float = 10.0) -> None:
        backoff = backoff_start
        last_nano = 0
        while not self._stopping.is_set():
            client = None
            key = None
            try:
                client = self._client_factory()
                kwargs: dict[str, Any] = {"decode": True, "filters": self.event_filters()}
                if last_nano:
                    kwargs["since"] = f"{last_nano // 10**9}.{last_nano % 10**9:09d}"
                stream = client.events(**kwargs)
                key = self._track(stream, client)
                if self._stopping.is_set():
                    break
                backoff = backoff_start
                for raw in stream:
                    if self._stopping.is_set():
                        break
                    nano = int(raw.get("timeNano") or 0)
                    if nano and nano <= last_nano:
                        continue  # replayed by "since" after a reconnect
                    last_nano = max(last_nano, nano)
                    event = event_from_docker(raw)
                    if event is not None:
                        self._reactor.callFromThread(self._dispatch, event)
                    if event is not None and event.kind == "die" and self.host.local:
                        # after the die itself (which must not wait for an inspect)
                        exited = self._exited_at(event.container_id)
                        if exited is not None:
                            self._reactor.callFromThread(self._dispatch, ContainerEvent(
                                "exited", event.container_id, event.exit_code, exited))
            except Exception as e:  # noqa: BLE001 - reconnect after any failure
                if self._stopping.is_set():
                    break
                msg = str(translate(e, self.name, self.host.url))
                self._reactor.callFromThread(
                    log.warn,
                    "event stream of {engine} failed, retrying in {s}s: {msg}",
                    engine=self.name,
                    s=backoff,
                    msg=msg,
                )
            finally:
                if key is not None:
                    self._untrack(key)
                if client is not None:
                    try:
                        client.close()
                    except Exception:  # noqa: BLE001, S110 - a broken event stream: a new client next round
                        pass
            if self._stopping.wait(backoff):
                break
            backoff = min(backoff * 2, backoff_max)

    def _exited_at(self, container_id: str) -> float | None:
        """When ``container_id``'s process ended (its ``State.FinishedAt``), in the event
        thread; None when unknown. Only for engines on this machine: the proxy compares
        it with its own clock (a request sent after it never reached the app)."""
        try:
            state = self._client().inspect_container(container_id).get("State") or {}
        except Exception:  # noqa: BLE001 - removed meanwhile, engine gone: not known
            return None
        return docker_time(str(state.get("FinishedAt") or ""))

    # ------------------------------------------------------------------- adoption

    def list_own(self) -> Deferred[list[OwnedContainer]]:
        """Containers (running or not) with this instance's and this host's labels."""
        return self._run(self._list_own_sync)

    def _list_own_sync(self, client: Any) -> list[OwnedContainer]:
        filters = {"label": [f"{LABEL_INSTANCE}={self.instance}", f"{LABEL_HOST}={self.name}"]}
        out = []
        for info in client.containers(all=True, filters=filters):
            labels = dict(info.get("Labels") or {})
            if labels.get(LABEL_INSTANCE) != self.instance or labels.get(LABEL_HOST) != self.name:
                continue  # never trust the filter alone
            out.append(owned_from_docker(info, labels))
        return out

    # ---------------------------------------------------------------------- misc

    def ping(self) -> Deferred[bool]:
        """True when the engine answers (within ``connect_timeout`` seconds)."""

        def ping_sync(client: Any) -> bool:
            return bool(client.ping())

        d = self._run(ping_sync)
        d.addTimeout(self._connect_timeout, self._reactor)
        d.addErrback(lambda _f: False)
        return d

    def networks(self) -> Deferred[list[NetworkInfo]]:
        """Every network of the engine with its IPAM address ranges."""

        def networks_sync(client: Any) -> list[NetworkInfo]:
            return [network_from_docker(n) for n in client.networks() or []]

        return self._run(networks_sync)

    def endpoint_for(self, slot: SlotInfo, spec: JobSpec) -> str:
        """``tcp:<address>:<slot.port>`` (an IPv6 address in brackets), as the proxy's
        ``Backend`` takes it; the proxy applies its own connect timeout."""
        addr = self.host.address
        if ":" in addr:
            return f"tcp:[{addr}]:{slot.port}"
        return f"tcp:{addr}:{slot.port}"


def docker_time(text: str) -> float | None:
    """Unix seconds of a Docker RFC 3339 timestamp (nanoseconds cut to micro); None for
    an empty or zero one (``0001-01-01T00:00:00Z``: not happened)."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if m is None or m.group(1) < "1971":
        return None
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    stamp = datetime.fromisoformat(m.group(1) + zone).timestamp()
    return stamp + float("0." + (m.group(2) or "0"))


def event_from_docker(raw: dict[str, Any]) -> ContainerEvent | None:
    """A :class:`ContainerEvent` from one decoded docker event, or None if not ours to report."""
    if raw.get("Type", "container") != "container":
        return None
    action = str(raw.get("Action") or raw.get("status") or "")
    action = action.split(":", 1)[0].strip()
    if action not in EVENT_KINDS:
        return None
    actor = raw.get("Actor") or {}
    cid = actor.get("ID") or raw.get("id") or ""
    attrs = actor.get("Attributes") or {}
    code = attrs.get("exitCode")
    try:
        exit_code = int(code) if code is not None else None
    except ValueError:
        exit_code = None
    return ContainerEvent(kind=action, container_id=cid, exit_code=exit_code)  # type: ignore[arg-type]


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
    return NetworkInfo(name=str(info.get("Name") or ""), driver=str(info.get("Driver") or ""),
                       subnets=tuple(subnets), ip_ranges=tuple(ranges))


def owned_from_docker(info: dict[str, Any], labels: dict[str, str]) -> OwnedContainer:
    """An :class:`OwnedContainer` from a ``containers()`` list entry."""
    names: Iterable[str] = info.get("Names") or []
    name = next(iter(names), "").lstrip("/")
    slot_text = labels.get(LABEL_SLOT, "")
    spec = None
    try:
        route = parse_route(labels.get(LABEL_SPEC, ""))
        spec = route if isinstance(route, JobSpec) else None
    except SpecError:
        spec = None
    return OwnedContainer(
        id=info["Id"],
        name=name,
        running=info.get("State") == "running",
        slot_port=int(slot_text) if slot_text.isdigit() else None,
        labels=labels,
        spec=spec,
    )


class EngineService(Service):
    """Owns an :class:`Engine`'s thread pool: starts it, and stops it without hanging."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.setName(f"engine-{engine.name}")

    def startService(self) -> None:
        """Start the engine's pool (and its event thread when watched)."""
        super().startService()
        self.engine.start_pool()

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        """Close streams, then stop the pool (bounded by ``shutdown_timeout``)."""
        super().stopService()
        return self.engine.shutdown()
