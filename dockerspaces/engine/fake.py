"""An in-memory :class:`~dockerspaces.engine.interface.IEngine` for tests and benchmarks.

Deterministic with an injected clock: with zero delays every operation answers with an
already-fired Deferred; with delays it answers after that many clock seconds.  Failure
injection: :meth:`FakeEngine.fail_next_start`, :meth:`FakeEngine.fail_next_ready`,
:meth:`FakeEngine.fail_pull`, :meth:`FakeEngine.crash`, :meth:`FakeEngine.set_down`.
Containers "from a previous run" or "of another instance" are planted with
:meth:`FakeEngine.seed`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, TypeVar, cast

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from ..config import HostConfig
from ..spec import JobSpec
from .interface import (
    LABEL_DISPLAY,
    LABEL_HOST,
    LABEL_INSTANCE,
    LABEL_KEY,
    LABEL_SLOT,
    ContainerEvent,
    ContainerExited,
    ContainerHandle,
    ContainerRemoved,
    EngineUnreachable,
    NetworkInfo,
    NotReady,
    OwnedContainer,
    PortAllocated,
    PullProgress,
    RunOptions,
    SlotInfo,
    container_env,
)

T = TypeVar("T")


@define(eq=False)
class FakeContainer:
    """One container in the fake engine."""

    id: str
    name: str
    spec: JobSpec | None
    port: int | None
    labels: dict[str, str]
    running: bool = False
    exit_code: int | None = None
    log_tail: str = ""
    gpu: int | None = None
    ready_waiters: list[Deferred[None]] = field(factory=list)
    env: dict[str, str] = field(factory=dict)  # as the real engine would set it
    command: tuple[str, ...] | None = None


class FakeEngine:
    """In-memory engine for one host; see the module docstring."""

    def __init__(
        self,
        clock: IReactorTime,
        host: HostConfig,
        *,
        instance: str = "test",
        pull_delay: float = 0,
        start_delay: float = 0,
        ready_delay: float = 0,
        create_delay: float = 0,
    ):
        self.name = host.name
        self.host = host
        self.instance = instance
        self.clock: Any = cast(Any, clock)
        self.pull_delay = pull_delay
        self.start_delay = start_delay
        self.ready_delay = ready_delay
        self.create_delay = create_delay  # like a thread: cancelling does not stop it
        self.containers: dict[str, FakeContainer] = {}
        self.images: set[str] = set()
        self.down = False
        self.starts = 0
        self.stops = 0
        self.creates = 0
        self.pulls = 0
        self._ids = itertools.count(1)
        self._watchers: list[Callable[[ContainerEvent], None]] = []
        self._next_start: list[Exception] = []
        self._next_ready: list[Exception] = []
        self._pull_failures: dict[str, Exception] = {}
        #: what :meth:`networks` answers (Docker's default bridge; tests change it)
        self.network_list: list[NetworkInfo] = [
            NetworkInfo("bridge", "bridge", ("172.17.0.0/16",)),
            NetworkInfo("host", "host"),
            NetworkInfo("none", "null"),
        ]
        #: what :meth:`container_address` answers, by container id (tests fill it)
        self.addresses: dict[str, str] = {}

    # ---------------------------------------------------------------- injection

    def fail_next_start(self, exc: Exception) -> None:
        """The next ``start()`` fails with ``exc``."""
        self._next_start.append(exc)

    def fail_next_ready(self, exc: Exception) -> None:
        """The next ``wait_ready()`` fails with ``exc`` (e.g. ContainerExited with a log tail)."""
        self._next_ready.append(exc)

    def fail_pull(self, ref: str, exc: Exception | None) -> None:
        """Every ``ensure_image(ref)`` fails with ``exc`` (None: stop failing)."""
        if exc is None:
            self._pull_failures.pop(ref, None)
        else:
            self._pull_failures[ref] = exc

    def set_down(self, down: bool) -> None:
        """Down: ``ping()`` answers False and every operation fails with EngineUnreachable."""
        self.down = down

    def crash(
        self,
        container_id: str,
        exit_code: int = 137,
        log_tail: str = "",
        kind: str = "die",
        exited_at: float | None = None,
    ) -> None:
        """The container exits; watchers get a ``die`` (or ``oom``) event, carrying
        ``exited_at`` as an engine on this machine reports it."""
        c = self.containers[container_id]
        c.running = False
        c.exit_code = exit_code
        c.log_tail = log_tail
        waiters, c.ready_waiters = c.ready_waiters, []
        for d in waiters:
            d.errback(ContainerExited(f"container exited with code {exit_code}", exit_code, log_tail))
        self._emit(ContainerEvent("oom" if kind == "oom" else "die", container_id, exit_code))
        if exited_at is not None:
            self._emit(ContainerEvent("exited", container_id, exit_code, exited_at))

    def seed(
        self,
        spec: JobSpec | None,
        port: int | None,
        *,
        running: bool = True,
        instance: str | None = None,
        host: str | None = None,
    ) -> str:
        """Plant a container from a previous run (our labels) or of another instance."""
        labels = {
            LABEL_INSTANCE: instance if instance is not None else self.instance,
            LABEL_HOST: host if host is not None else self.name,
        }
        if port is not None:
            labels[LABEL_SLOT] = str(port)
        if spec is not None:
            labels[LABEL_KEY] = spec.key
            labels[LABEL_DISPLAY] = spec.display
        cid = f"{self.name}-{next(self._ids):06x}"
        self.containers[cid] = FakeContainer(cid, f"seed-{cid}", spec, port, labels, running)
        return cid

    # ---------------------------------------------------------------- inspection

    def own(self) -> dict[str, FakeContainer]:
        """Containers carrying this instance's and this host's labels."""
        return {
            cid: c
            for cid, c in self.containers.items()
            if c.labels.get(LABEL_INSTANCE) == self.instance and c.labels.get(LABEL_HOST) == self.name
        }

    def running_on(self, port: int) -> list[FakeContainer]:
        """Running containers publishing ``port``."""
        return [c for c in self.containers.values() if c.running and c.port == port]

    # ---------------------------------------------------------------- IEngine

    def _op(self, delay: float, fn: Callable[[], T]) -> Deferred[T]:
        def run() -> T:
            if self.down:
                raise EngineUnreachable(f"engine {self.name} does not answer")
            return fn()

        if delay <= 0:
            try:
                return succeed(run())
            except Exception as e:  # noqa: BLE001 - injected failures of any type
                return fail(e)
        if self.down:
            return fail(EngineUnreachable(f"engine {self.name} does not answer"))
        return deferLater(self.clock, delay, run)

    def ensure_image(
        self, ref: str, on_progress: Callable[[PullProgress], None] | None = None
    ) -> Deferred[None]:
        """Pull ``ref`` (after ``pull_delay``) unless present; fails as injected."""
        if self.down:
            return fail(EngineUnreachable(f"engine {self.name} does not answer"))
        if ref in self._pull_failures:
            return fail(self._pull_failures[ref])
        if ref in self.images:
            return succeed(None)
        if on_progress is not None:
            on_progress(PullProgress(ref, "Pulling", 0, 100))

        def done() -> None:
            self.images.add(ref)
            self.pulls += 1
            if on_progress is not None:
                on_progress(PullProgress(ref, "Downloaded", 100, 100))

        return self._op(self.pull_delay, done)

    def create(self, spec: JobSpec, slot: SlotInfo, options: RunOptions) -> Deferred[ContainerHandle]:
        """Create a labelled, stopped container for ``spec`` in ``slot``."""

        def run() -> ContainerHandle:
            cid = f"{self.name}-{next(self._ids):06x}"
            labels = {
                LABEL_INSTANCE: self.instance,
                LABEL_HOST: self.name,
                LABEL_SLOT: str(slot.port),
                LABEL_KEY: spec.key,
                LABEL_DISPLAY: spec.display,
            }
            self.containers[cid] = FakeContainer(
                cid,
                f"ds-{cid}",
                spec,
                slot.port,
                labels,
                gpu=slot.gpu if options.gpu else None,
                env=container_env(spec, options),
                command=options.command,
            )
            self.creates += 1
            return ContainerHandle(cid, f"ds-{cid}", self.name, slot, spec.key, spec)

        if self.create_delay <= 0:
            return self._op(0, run)
        d: Deferred[ContainerHandle] = Deferred()  # no canceller, as a thread's result

        def later() -> None:
            try:
                handle = run()
            except Exception as e:  # noqa: BLE001 - injected failures of any type
                if not d.called:
                    d.errback(e)
                return
            if not d.called:
                d.callback(handle)

        self.clock.callLater(self.create_delay, later)
        return d

    def start(self, handle: ContainerHandle) -> Deferred[None]:
        """Start after ``start_delay``; PortAllocated if the slot port is taken."""

        def run() -> None:
            if self._next_start:
                raise self._next_start.pop(0)
            c = self.containers.get(handle.id)
            if c is None:
                raise ContainerRemoved(f"no such container {handle.id}")
            if any(o is not c for o in self.running_on(handle.slot.port)):
                raise PortAllocated(f"port {handle.slot.port} is already allocated")
            c.running = True
            self.starts += 1

        return self._op(self.start_delay, run)

    def wait_ready(self, handle: ContainerHandle, deadline: float, options: RunOptions) -> Deferred[None]:
        """Ready after ``ready_delay``; NotReady at ``deadline``; ContainerExited on a crash."""
        if self.down:
            return fail(EngineUnreachable(f"engine {self.name} does not answer"))
        c = self.containers.get(handle.id)
        if c is None or not c.running:
            tail = c.log_tail if c is not None else ""
            return fail(ContainerExited("container is not running", None, tail))
        if self._next_ready:
            return fail(self._next_ready.pop(0))
        now = self.clock.seconds()
        if self.ready_delay <= 0:
            return succeed(None) if now <= deadline else fail(NotReady("deadline passed"))
        d: Deferred[None] = Deferred(lambda d: _cancel_call(call))
        c.ready_waiters.append(d)

        def fire() -> None:
            if d in c.ready_waiters:
                c.ready_waiters.remove(d)
            if d.called:
                return
            if self.clock.seconds() > deadline or now + self.ready_delay > deadline:
                d.errback(NotReady(f"not ready before the deadline ({deadline:g})"))
            else:
                d.callback(None)

        call = self.clock.callLater(min(self.ready_delay, max(0.0, deadline - now)), fire)
        return d

    def stop(self, handle: ContainerHandle | OwnedContainer, grace: float) -> Deferred[None]:
        """SIGTERM, kill after ``grace`` clock seconds (0: at once), then remove."""
        if self.down:
            return fail(EngineUnreachable(f"engine {self.name} does not answer"))
        c = self.containers.get(handle.id)

        def remove() -> None:
            if c is not None and self.containers.get(c.id) is c:
                was_running = c.running
                c.running = False
                del self.containers[c.id]
                self.stops += 1
                if was_running:
                    self._emit(ContainerEvent("die", c.id, 137))
                self._emit(ContainerEvent("destroy", c.id))

        if c is not None and c.running and grace > 0:
            return deferLater(self.clock, grace, remove)
        remove()
        return succeed(None)

    def watch(self, callback: Callable[[ContainerEvent], None]) -> None:
        """Deliver events to ``callback`` (synchronously)."""
        self._watchers.append(callback)

    def list_own(self) -> Deferred[list[OwnedContainer]]:
        """Our labelled containers, running or stopped."""
        if self.down:
            return fail(EngineUnreachable(f"engine {self.name} does not answer"))
        return succeed(
            [
                OwnedContainer(c.id, c.name, c.running, c.port, dict(c.labels), c.spec)
                for c in self.own().values()
            ]
        )

    def ping(self) -> Deferred[bool]:
        """False while down."""
        return succeed(not self.down)

    def networks(self) -> Deferred[list[NetworkInfo]]:
        """``network_list``; EngineUnreachable while down."""
        return self._op(0, lambda: list(self.network_list))

    def container_address(self, container_id: str) -> Deferred[str | None]:
        """``addresses[container_id]`` (None when absent); EngineUnreachable while down."""
        return self._op(0, lambda: self.addresses.get(container_id))

    def endpoint_for(self, slot: SlotInfo, spec: JobSpec) -> str:
        """``tcp:ADDRESS:PORT`` of the slot."""
        return f"tcp:{self.host.address}:{slot.port}"

    def _emit(self, ev: ContainerEvent) -> None:
        for cb in list(self._watchers):
            cb(ev)


def _cancel_call(call: object) -> None:
    cancel = getattr(call, "cancel", None)
    active = getattr(call, "active", None)
    if cancel is not None and active is not None and active():
        cancel()
