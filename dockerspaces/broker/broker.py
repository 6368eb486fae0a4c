"""The broker: hands containers to requests, starts, queues, evicts — pure and event driven.

The broker talks to Docker hosts only through :class:`~dockerspaces.engine.interface.IEngine`
and to time only through an injected ``IReactorTime``, so tests drive it synchronously
with ``task.Clock`` and :class:`~dockerspaces.engine.fake.FakeEngine`.

:class:`Broker` is the public face; its parts, one module each, share the tables of
:mod:`.state`:

- :mod:`.admission`: arrivals, the admission FIFO, keys' lines, deadlines, quota checks;
- :mod:`.placement`: handing containers over, scale-out, slot choice, eviction, workers;
- :mod:`.leases`: leases from hand-over to release, retry, crash;
- :mod:`.containers`: starting, stopping and forgetting containers, failed starts;
- :mod:`.hosts`: engine events, pings, hosts down and back, adoption;
- :mod:`.snapshot`: the ``/monitor:broker/`` JSON and container views, read only;
- :mod:`.effects`: side effects queued by mutations, run at the end of every entry point.

The scheduling and scale-out rules are described in ``docs/broker.md``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from ..config import HostConfig
from ..engine.interface import ContainerHandle, IEngine, RunOptions
from ..spec import JobSpec
from .admission import Admission
from .containers import SLOT_QUARANTINE, START_RETRIES, Lifecycle, redact
from .effects import Effects, entry
from .errors import Draining
from .hosts import Hosts
from .leases import EXITS_KEPT, MAX_RETRIES, Leases
from .model import (
    BUSY,
    GONE,
    IDLE,
    STARTING,
    STOPPING,
    WORKER,
    BrokerSettings,
    Clock,
    Lease,
    Owner,
    Progress,
    ProgressCallback,
    Waiter,
)
from .placement import Placement
from .quota import Quotas
from .snapshot import ContainerView, WorkerView, container_views, monitor_view
from .state import BrokerState, ContainerHook, warn

__all__ = [
    "EXITS_KEPT",
    "MAX_RETRIES",
    "SLOT_QUARANTINE",
    "START_RETRIES",
    "Broker",
    "BrokerSettings",
    "ContainerHook",
    "ContainerView",
    "Lease",
    "Owner",
    "Progress",
    "redact",
]


def _default_run_options(spec: JobSpec) -> RunOptions:
    """No image profile: the engine's defaults."""
    return RunOptions()


class Broker:
    """Assigns containers to requests across hosts and slots (SPEC "The broker")."""

    def __init__(
        self,
        clock: IReactorTime,
        hosts: list[HostConfig],
        engines: Mapping[str, IEngine],
        settings: BrokerSettings,
        run_options: Callable[[JobSpec], RunOptions] = _default_run_options,
        on_container: ContainerHook | None = None,
    ):
        self.settings = settings
        self.fx = Effects(before=self._settle)
        self.state = st = BrokerState(
            cast(Clock, clock), hosts, engines, settings, run_options, on_container, self.fx
        )
        self.admission = Admission(st)
        self.placement = Placement(st)
        self.leases = Leases(st)
        self.lifecycle = Lifecycle(st)
        self.hosts = Hosts(st)
        adm, pl, ls, lc, hs = self.admission, self.placement, self.leases, self.lifecycle, self.hosts
        adm.placement = pl
        pl.admission, pl.leases, pl.lifecycle = adm, ls, lc
        ls.admission, ls.placement, ls.lifecycle = adm, pl, lc
        lc.admission, lc.placement, lc.leases, lc.hosts = adm, pl, ls, hs
        hs.admission, hs.placement, hs.leases, hs.lifecycle = adm, pl, ls, lc
        self._drain_waiters: list[Deferred[None]] = []

    def _settle(self) -> bool:
        """Asked by the flush before every job: users whose holdings dropped are served
        first; a drain that is complete is resolved. True when it did something."""
        pl = self.placement
        if pl.kicked:
            pl.serve_kicked()
            return True
        if self.state.draining and self._drain_waiters and self.idle:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                self.fx.later(self._resolver(d))
            return True
        return False

    # ------------------------------------------------------------------ public API

    def start(self) -> Deferred[None]:
        """Adopt our containers (``list_own``), watch engine events, start pinging;
        fires once every host was reconciled (or failed to list)."""
        ds = self.hosts.start()
        done: Deferred[None] = Deferred()
        remaining = [len(ds)]

        def one(_: object) -> None:
            remaining[0] -= 1
            if remaining[0] == 0:
                done.callback(None)

        if not ds:
            done.callback(None)
        for d in ds:
            d.addBoth(one)
        return done

    def add_host(self, config: HostConfig, engine: IEngine) -> Deferred[None]:
        """A host joins while running (a swarm node): its containers are reconciled,
        then its slots used; fires once reconciled."""
        return self.hosts.add(config, engine)

    def resize_host(self, name: str, slots: int) -> None:
        """Host ``name`` has ``slots`` slots from now (a node's label changed): slots
        beyond take nothing new and go once their containers have stopped."""
        for h in self.state.hosts:
            if h.name == name and not h.leaving:
                self.hosts.resize(h, slots)

    def remove_host(self, name: str, reason: str) -> None:
        """Host ``name`` leaves (a node drained, down or gone): its idle containers and
        workers stop, busy ones once their requests end; forgotten once empty."""
        for h in list(self.state.hosts):
            if h.name == name and not h.leaving:
                self.hosts.remove(h, reason)

    def host_slots(self) -> dict[str, int]:
        """The hosts in use and their slot counts (retired slots and leaving hosts
        not counted)."""
        return {h.name: sum(1 for s in h.slots if not s.retired) for h in self.state.hosts if not h.leaving}

    @property
    def quotas(self) -> Quotas:
        """Per-user holds and waiting requests (read only: tests, dashboards)."""
        return self.state.quotas

    @property
    def events(self) -> int:
        """Entry points run so far (for benchmarks)."""
        return self.fx.entries

    @entry
    def acquire(
        self, spec: JobSpec, progress: ProgressCallback | None = None, owner: Owner | None = None
    ) -> Deferred[Lease]:
        """A lease on a container for ``spec`` (x: exclusive, y: shared), for ``owner``
        (None: accounts off; else its quotas apply, see ``docs/broker.md``).

        Cancelling the Deferred means the client went away while waiting: it leaves
        the line; a cold start it triggered still finishes and the container stays warm.
        """
        if spec.worker:
            raise ValueError("acquire() is for x:/y: requests; use launch_worker()")
        adm = self.admission
        w = adm.new_waiter(spec, progress, owner)
        err = adm.refuse(w)
        if err is not None:
            adm.end_waiter(w)
            adm.maybe_forget(w.key)
            return fail(err)
        adm.deadlines.add(w, w.arrived + self.settings.queue_timeout)
        if spec.mode == "y":
            adm.enqueue(w)  # y: requests share a container: not counted in --source
        else:
            adm.admit_or_queue(w)
        return w.deferred

    @entry
    def launch_worker(
        self,
        spec: JobSpec,
        progress: ProgressCallback | None = None,
        owner: Owner | None = None,
    ) -> Deferred[ContainerHandle]:
        """Start one more container of a port-3 spec for ``owner``; fires once it has
        started (admitted like an x: request, within ``--worker-timeout``)."""
        if not spec.worker:
            raise ValueError("launch_worker() needs an x: spec with port 3")
        adm = self.admission
        w = adm.new_waiter(spec, progress, owner)
        err = adm.refuse(w)
        if err is not None:
            adm.end_waiter(w)
            adm.maybe_forget(w.key)
            return fail(err)
        adm.worker_deadlines.add(w, w.arrived + self.settings.worker_timeout)
        adm.admit_or_queue(w)
        return w.deferred

    def worker_views(self, spec: JobSpec) -> list[WorkerView]:
        """The running workers of ``spec``'s key (started, not stopping), oldest first:
        what an autoscaler may count and choose from."""
        k = self.state.keys.get(spec.key)
        if k is None:
            return []
        out = [
            WorkerView(
                c.handle.id, c.slot.host.name, c.created_at if c.created_at is not None else c.slot.since
            )
            for c in k.containers
            if c.state == WORKER and c.handle is not None
        ]
        return sorted(out, key=lambda v: v.since)

    @entry
    def stop_worker(self, container_id: str) -> Deferred[None]:
        """Stop one running worker: SIGTERM, then SIGKILL after the ``--stop`` grace, so
        that it can finish the message in hand and exit. Fires once the engine is done
        and its slot is free; at once if it is already gone. Only workers may be
        stopped this way (``ValueError`` otherwise)."""
        c = self.state.by_id.get(container_id)
        if c is None or c.state in (STOPPING, GONE):
            return succeed(None)
        if c.state != WORKER:
            raise ValueError(f"{container_id} is not a running worker ({c.state})")
        done: Deferred[None] = Deferred()
        self.lifecycle.stop(c, self.settings.stop)
        c.on_gone.append(lambda: done.callback(None))
        return done

    @entry
    def shutdown(self, keep_containers: bool, drain_timeout: float = 30) -> Deferred[None]:
        """Stop admitting (``Draining``), fail what waits, let leases in flight and
        engine operations end (at most ``drain_timeout`` s), then stop every container
        unless ``keep_containers``."""
        st = self.state
        st.draining = True
        self.hosts.stop_pinging()
        waiting = list(self.admission.waiting())
        waiting += [
            s.container.worker
            for s in st.slots
            if s.container is not None and s.container.worker is not None and not s.container.worker.done
        ]
        for k in st.keys.values():
            if k.recheck is not None and k.recheck.active():
                k.recheck.cancel()
            k.recheck = None
        self.placement.hungry.clear()
        for w in waiting:
            self.admission.fail(w, Draining("dockerspaces is shutting down"))
        drained: Deferred[None] = Deferred()
        self._drain_waiters.append(drained)
        timer = self.state.clock.callLater(drain_timeout, self._drain_timeout, drained)

        def after_drain(_: object) -> Deferred[None] | None:
            if timer.active():
                timer.cancel()
            self.admission.deadlines.stop()
            self.admission.worker_deadlines.stop()
            if keep_containers:
                return None
            return self._stop_everything()

        drained.addCallback(after_drain)
        return drained

    def snapshot(self) -> dict[str, Any]:
        """The ``/monitor:broker/`` JSON (SPEC's shape plus Hosts, Pulls, Admission,
        and who holds what and waits: per slot ``Users``, ``QueueUsers``)."""
        adm = self.admission
        lone: list[Waiter] = list(adm.queue)
        lone += [cl for cl in self.placement.hungry if isinstance(cl, Waiter)]
        return monitor_view(self.state, adm.admitted, adm.queue, lone, self.lifecycle.pulls)

    def progress_of(self, spec: JobSpec) -> Progress | None:
        """The latest pull/start progress of ``spec``'s key (None when nothing is known)."""
        k = self.state.keys.get(spec.key)
        return k.status if k is not None else None

    def containers(self) -> list[ContainerView]:
        """Every container the broker currently knows (starting ones once created)."""
        return container_views(self.state)

    @property
    def idle(self) -> bool:
        """True when no lease is in flight and no engine operation is pending."""
        return self.state.leases == 0 and self.state.pending == 0

    def waiting(self) -> int:
        """Requests and launches waiting (admission queue, key queues, worker claims)."""
        return sum(1 for _ in self.admission.waiting())

    # ------------------------------------------------------------------ shutdown

    @staticmethod
    def _resolver(d: Deferred[None]) -> Callable[[], None]:
        """A job firing ``d`` (unless it fired already: drain timeout)."""

        def fire() -> None:
            if not d.called:
                d.callback(None)

        return fire

    @entry
    def _drain_timeout(self, d: Deferred[None]) -> None:
        """The drain took too long: shutdown goes on with leases still in flight."""
        if not d.called:
            warn("drain timeout: {n} request(s) still in flight", n=self.state.leases)
            if d in self._drain_waiters:
                self._drain_waiters.remove(d)
            d.callback(None)

    @entry
    def _stop_everything(self) -> Deferred[None]:
        """Stop every running container (``--stop`` grace) and cancel every start;
        fires once every engine operation ended."""
        for s in self.state.slots:
            c = s.container
            if c is None:
                continue
            if c.state == STARTING and c.chain is not None:
                c.chain.cancel()
            elif c.state in (IDLE, BUSY, WORKER):
                self.lifecycle.stop(c, self.settings.stop)
        done: Deferred[None] = Deferred()
        self._drain_waiters.append(done)
        return done
