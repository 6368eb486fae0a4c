"""The broker: hands containers to requests, starts, queues, evicts — pure and event driven.

The broker talks to Docker hosts only through :class:`~dockerspaces.engine.interface.IEngine`
and to time only through an injected ``IReactorTime``, so tests drive it synchronously
with ``task.Clock`` and :class:`~dockerspaces.engine.fake.FakeEngine`.

Internally every state change is a synchronous *mutation* that leaves the state
consistent; side effects (firing a caller's Deferred, calling an engine, publishing
progress) are queued as jobs and run by :meth:`Broker._flush` at the end of the
outermost entry point, so a caller's callback that re-enters the broker (a lease
released from inside its own callback) never sees half-updated state and never recurses.
The scheduling and scale-out rules are described in ``docs/broker.md``.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from typing import Any, cast

from attrs import frozen
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import HostConfig
from ..engine.interface import (
    LABEL_DISPLAY,
    LABEL_KEY,
    ContainerExited,
    ContainerHandle,
    ContainerRemoved,
    EngineUnreachable,
    IEngine,
    NotReady,
    OwnedContainer,
    PortAllocated,
    PullProgress,
    RunOptions,
    SlotInfo,
)
from ..spec import JobSpec
from . import scaling
from .errors import (
    BackendRefused,
    BrokerError,
    Draining,
    NoCapacity,
    Overloaded,
    OverQuota,
    QueueTimeout,
    StartFailed,
    StartTimeout,
)
from .model import (
    BUSY,
    GONE,
    IDLE,
    STARTING,
    STOPPING,
    WORKER,
    BrokerSettings,
    Clock,
    Container,
    HostState,
    IDelayedCall,
    KeyState,
    Lease,
    Owner,
    Progress,
    ProgressCallback,
    Slot,
    Waiter,
)
from .quota import Quotas, over_quota

__all__ = [
    "Broker",
    "BrokerSettings",
    "ContainerView",
    "Lease",
    "Owner",
    "Progress",
]

log = Logger()


def _warn(fmt: str, **kw: object) -> None:
    log.warn(fmt, **kw)  # noqa: G010 - twisted.logger spells it warn

Claimant = KeyState | Waiter  # a key needing a container, or a worker launch

_SLOT_STATE = {STARTING: "Starting", IDLE: "Wait", BUSY: "Run", WORKER: "Run", STOPPING: "Stopping"}
_LOG_TAIL = 2000


@frozen
class ContainerView:
    """A read-only view of one container the broker knows (tests, dashboards)."""

    id: str
    host: str
    port: int
    key: str
    display: str
    state: str
    inflight: int
    spec: JobSpec | None = None
    users: tuple[str, ...] = ()  # who holds it (accounts)
    owner: str | None = None  # the user it was started for (accounts)


SLOT_QUARANTINE = 60.0  # seconds a slot whose port is taken by something else is left alone
MAX_RETRIES = 5  # times one request may be handed back unforwarded (Lease.retry)
EXITS_KEPT = 256  # exit times remembered for Lease.died_before
START_RETRIES = 2  # starts of one key tried again after a removal from outside

ContainerHook = Callable[..., None]
"""``hook(event, display, host, slot, container=, seconds=, detail=, owner=, gpus=)`` for
logs, metrics and usage; events: pull-start, pull-end, create, start, ready, fail, stop,
evict, crash. ``owner``: the user the container was started for (None without accounts);
``gpus``: the GPUs attached to it."""


def redact(text: str, spec: JobSpec) -> str:
    """``text`` with the values of ``spec``'s env (3 characters or more) replaced by
    ``***``, for logs of a container's output."""
    for _, value in spec.env:
        if len(value) >= 3:
            text = text.replace(value, "***")
    return text


def _default_run_options(spec: JobSpec) -> RunOptions:
    return RunOptions()


class _TimeoutQueue:
    """Waiters in deadline order (constant timeout, so arrival order) with one timer."""

    def __init__(self, clock: Clock, on_expired: Callable[[Waiter], None],
                 flush: Callable[[], None]):
        self.items: OrderedDict[Waiter, float] = OrderedDict()
        self._clock = clock
        self._on_expired = on_expired
        self._flush = flush
        self._call: IDelayedCall | None = None

    def add(self, w: Waiter, deadline: float) -> None:
        if self.items and deadline < next(reversed(self.items.values())):
            # out of order (a request handed back keeps its old deadline): rare, re-sort
            self.items[w] = deadline
            self.items = OrderedDict(sorted(self.items.items(), key=lambda kv: kv[1]))
            if self._call is not None and self._call.getTime() > deadline:
                self._call.cancel()
                self._call = None
        else:
            self.items[w] = deadline
        if self._call is None:
            first = next(iter(self.items.values()))
            self._call = self._clock.callLater(max(0.0, first - self._clock.seconds()),
                                               self._fire)

    def discard(self, w: Waiter) -> None:
        self.items.pop(w, None)

    def _fire(self) -> None:
        self._call = None
        now = self._clock.seconds()
        while self.items:
            w, deadline = next(iter(self.items.items()))
            if deadline > now:
                break
            del self.items[w]
            self._on_expired(w)
        if self.items and self._call is None:
            deadline = next(iter(self.items.values()))
            self._call = self._clock.callLater(max(0.0, deadline - now), self._fire)
        self._flush()

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None


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
        self._on_container = on_container
        self._clock: Clock = cast(Clock, clock)
        self._run_options = run_options
        now = self._clock.seconds()
        self._hosts: list[HostState] = []
        self._slots: list[Slot] = []
        self._slot_by_port: dict[tuple[str, int], Slot] = {}
        for hc in hosts:
            h = HostState(config=hc, engine=engines[hc.name], since=now)
            for i in range(hc.slots):
                s = Slot(SlotInfo(hc.name, hc.start_port + i, hc.gpu_for(i)), h, i, since=now)
                h.slots.append(s)
                h.free[s] = None
                self._slots.append(s)
                self._slot_by_port[(hc.name, s.info.port)] = s
            self._hosts.append(h)
        self._keys: dict[str, KeyState] = {}
        self._by_spec: dict[JobSpec, KeyState] = {}  # cache: spec.key hashes the env
        self._by_id: dict[str, Container] = {}
        # exit times of containers that died lately (the engine's "exited" events), and
        # the containers whose Lease.died_before watchers wait for theirs
        self._exits: OrderedDict[str, float] = OrderedDict()
        self._exit_watch: dict[str, Container] = {}
        self._lru: OrderedDict[Container, None] = OrderedDict()
        self._hungry: OrderedDict[Claimant, None] = OrderedDict()
        self._admission: OrderedDict[Waiter, None] = OrderedDict()
        self._admission_watchers = 0
        self._admitted: dict[Waiter, None] = {}
        self._timeouts = _TimeoutQueue(self._clock, self._queue_timed_out, self._flush)
        self._worker_timeouts = _TimeoutQueue(self._clock, self._worker_timed_out, self._flush)
        self._jobs: deque[Callable[[], object]] = deque()
        self._flushing = False
        self._pending = 0  # engine operations in flight: starts and stops
        self._leases = 0  # leases in flight
        self._draining = False
        self._drain_waiters: list[Deferred[None]] = []
        self._ping_loop: LoopingCall | None = None
        self._pulls: dict[tuple[str, str], PullProgress] = {}
        self._started_count = 0
        self._quotas = Quotas()
        self._kicked: set[str] = set()  # users whose holds dropped while they wait
        self._seq = 0  # one counter stamping arrivals and services (fair share turns)
        self._gpuless = any(s.info.gpu is None for s in self._slots)
        self.events = 0  # mutations processed (for benchmarks)

    # ------------------------------------------------------------------ public API

    def start(self) -> Deferred[None]:
        """Adopt our containers (``list_own``), watch engine events, start pinging."""
        ds: list[Deferred[None]] = []
        for h in self._hosts:
            h.engine.watch(self._watcher(h))
            h.up = False
            ds.append(self._reconcile(h))
        if self.settings.ping_interval > 0:
            self._ping_loop = LoopingCall(self._ping_all)
            self._ping_loop.clock = cast(IReactorTime, self._clock)
            self._ping_loop.start(self.settings.ping_interval, now=False)
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

    def _watcher(self, h: HostState) -> Callable[[Any], None]:
        return lambda ev: self._on_event(h, ev)

    @property
    def quotas(self) -> Quotas:
        """Per-user holds and waiting requests (read only: tests, dashboards)."""
        return self._quotas

    def acquire(self, spec: JobSpec, progress: ProgressCallback | None = None,
                owner: Owner | None = None) -> Deferred[Lease]:
        """A lease on a container for ``spec`` (x: exclusive, y: shared), for ``owner``
        (None: accounts off; else its quotas apply, see ``docs/broker.md``).

        Cancelling the Deferred means the client went away while waiting: it leaves
        the line; a cold start it triggered still finishes and the container stays warm.
        """
        if spec.worker:
            raise ValueError("acquire() is for x:/y: requests; use launch_worker()")
        w = self._new_waiter(spec, progress, owner)
        err = self._refuse_reason(w) or self._quota_refusal(w)
        if err is not None:
            self._end_waiter(w)
            self._maybe_forget(w.key)
            return fail(err)
        self._timeouts.add(w, w.arrived + self.settings.queue_timeout)
        if spec.mode == "y":
            self._enqueue(w)
        else:
            self._admit_or_queue(w)
        self._flush()
        return w.deferred

    def launch_worker(
        self, spec: JobSpec, progress: ProgressCallback | None = None,
        owner: Owner | None = None,
    ) -> Deferred[ContainerHandle]:
        """Start one more container of a port-3 spec for ``owner``; fires once it has
        started."""
        if not spec.worker:
            raise ValueError("launch_worker() needs an x: spec with port 3")
        w = self._new_waiter(spec, progress, owner)
        err = self._refuse_reason(w) or self._quota_refusal(w)
        if err is not None:
            self._end_waiter(w)
            self._maybe_forget(w.key)
            return fail(err)
        self._worker_timeouts.add(w, w.arrived + self.settings.worker_timeout)
        self._admit_or_queue(w)
        self._flush()
        return w.deferred

    def shutdown(self, keep_containers: bool, drain_timeout: float = 30) -> Deferred[None]:
        """Stop admitting, let leases in flight end (bounded), stop containers unless kept."""
        self._draining = True
        if self._ping_loop is not None and self._ping_loop.running:
            self._ping_loop.stop()
        waiting = list(self._admission) + [
            w for k in self._keys.values() for w in k.waiters
        ] + [c for c in self._hungry if isinstance(c, Waiter)]
        waiting += [
            s.container.worker for s in self._slots
            if s.container is not None and s.container.worker is not None
            and not s.container.worker.done
        ]
        for k in self._keys.values():
            if k.recheck is not None and k.recheck.active():
                k.recheck.cancel()
            k.recheck = None
        self._hungry.clear()
        for w in waiting:
            self._fail(w, Draining("dockerspaces is shutting down"))
        self._flush()
        drained: Deferred[None] = Deferred()
        self._drain_waiters.append(drained)
        timer = self._clock.callLater(drain_timeout, self._drain_timeout, drained)
        self._check_drained()
        self._flush()

        def after_drain(_: object) -> Deferred[None] | None:
            if timer.active():
                timer.cancel()
            self._timeouts.stop()
            self._worker_timeouts.stop()
            if keep_containers:
                return None
            return self._stop_everything()

        drained.addCallback(after_drain)
        return drained

    def snapshot(self) -> dict[str, Any]:
        """The ``/monitor:broker/`` JSON (SPEC's shape plus Hosts, Pulls, Admission,
        and who holds what and waits: per slot ``Users``, ``QueueUsers``)."""
        now = self._clock.seconds()
        source_slots: list[dict[str, Any]] = []
        for w in self._admitted:
            if len(source_slots) >= self.settings.source:
                break
            served = w.assigned is not None and not w.spec.worker
            source_slots.append({
                "State": "Run" if served else "Wait",
                "Since": int(w.assigned if served and w.assigned is not None else w.arrived),
                "SlotType": w.spec.slot_type,
                "RunInfo": {},
                "RefInfo": w.endpoint if served else "",
                "Key": w.spec.display,
            })
        while len(source_slots) < self.settings.source:
            source_slots.append({"State": "Free", "Since": None, "SlotType": "", "RunInfo": {},
                                 "RefInfo": "", "Key": ""})
        target_slots = []
        for s in self._slots:
            c = s.evicting or s.container
            state = "Free" if c is None else (
                "Stopping" if s.evicting is not None else _SLOT_STATE.get(c.state, "Free"))
            target_slots.append({
                "State": state,
                "Since": int(s.since),
                "SlotType": c.key.spec.slot_type if c is not None else "",
                "RunInfo": {},
                "RefInfo": s.ref_info,
                "Host": s.host.name,
                "Port": s.info.port,
                "Gpu": s.info.gpu,
                "Container": (c.id or None) if c is not None else None,
                "Key": c.key.spec.display if c is not None else None,
                "InFlight": c.inflight if c is not None else 0,
                "LastError": s.last_error,
                "HostUp": s.host.up,
                "ProtectedFor": (
                    max(0, math.ceil(c.protected_until - now))
                    if c is not None and c.state == WORKER else None
                ),
                "Users": self._quotas.users_of(c) if c is not None else [],
            })
        queues: dict[str, int] = {}
        queue_users: dict[str, dict[str, int]] = {}

        def by_user(display: str, user: str, n: int) -> None:
            per = queue_users.setdefault(display, {})
            per[user] = per.get(user, 0) + n

        for k in self._keys.values():
            if k.waiters:
                queues[k.spec.display] = queues.get(k.spec.display, 0) + len(k.waiters)
                if not k.waiters.anonymous:
                    for user, n in k.waiters.users().items():
                        by_user(k.spec.display, user, n)
        lone = list(self._admission) + [cl for cl in self._hungry if isinstance(cl, Waiter)]
        for w in lone:
            queues[w.spec.display] = queues.get(w.spec.display, 0) + 1
            if w.owner is not None:
                by_user(w.spec.display, w.owner.user, 1)
        return {
            "SourceName": "TCP",
            "TargetName": "Docker",
            "LoopSleep": 0,
            "ReleaseTimeout": self.settings.release,
            "SourceSlots": source_slots,
            "TargetSlots": target_slots,
            "Queues": queues,
            "QueueUsers": queue_users,
            "Hosts": [
                {"Name": h.name, "Up": h.up, "Since": int(h.since), "Slots": len(h.slots),
                 "Free": sum(1 for s in h.slots if s.container is None and s.evicting is None),
                 "LastError": h.last_error}
                for h in self._hosts
            ],
            "Pulls": [
                {"Host": host, "Ref": ref, "Status": p.status, "Current": p.current,
                 "Total": p.total}
                for (host, ref), p in self._pulls.items()
            ],
            "Admission": {"Admitted": len(self._admitted), "Source": self.settings.source,
                          "Queued": len(self._admission), "Queue": self.settings.queue},
            "Estimates": {
                k.spec.display: {"Service": k.service.value, "ColdStart": k.cold.value}
                for k in self._keys.values()
                if k.service.value is not None or k.cold.value is not None
            },
            "Draining": self._draining,
        }

    def progress_of(self, spec: JobSpec) -> Progress | None:
        """The latest pull/start progress of ``spec``'s key (None when nothing is known)."""
        k = self._keys.get(spec.key)
        return k.status if k is not None else None

    def containers(self) -> list[ContainerView]:
        """Every container the broker currently knows (starting ones once created)."""
        out = []
        for s in self._slots:
            for c in (s.evicting, s.container):
                if c is not None and c.handle is not None:
                    out.append(ContainerView(c.id, s.host.name, s.info.port, c.key.key,
                                             c.key.spec.display, c.state, c.inflight,
                                             c.key.spec, tuple(self._quotas.users_of(c)),
                                             c.owner))
        return out

    @property
    def idle(self) -> bool:
        """True when no lease is in flight and no engine operation is pending."""
        return self._leases == 0 and self._pending == 0

    def waiting(self) -> int:
        """Requests and launches waiting (admission queue, key queues, worker claims)."""
        return (len(self._admission) + sum(len(k.waiters) for k in self._keys.values())
                + sum(1 for c in self._hungry if isinstance(c, Waiter)))

    # ------------------------------------------------------------------ job queue

    def _later(self, job: Callable[[], object]) -> None:
        self._jobs.append(job)

    def _flush(self) -> None:
        if self._flushing:
            return
        self._flushing = True
        try:
            while self._jobs or self._kicked:
                if self._kicked:  # before any caller's callback can arrive again
                    self._serve_kicked()
                    continue
                job = self._jobs.popleft()
                try:
                    job()
                except Exception:  # noqa: BLE001 - one bad job must not stop the rest
                    log.failure("broker job failed")
        finally:
            self._flushing = False

    def _fire(self, d: Deferred[Any], result: object) -> None:
        def job() -> None:
            if d.called:  # cancelled meanwhile: give a lease straight back
                if isinstance(result, Lease):
                    result.release()
                return
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

        self._later(job)

    def _publish(self, w: Waiter, p: Progress) -> None:
        cb = w.progress
        if cb is not None:
            self._later(lambda: cb(p))

    # ------------------------------------------------------------------ arrivals

    def _key_for(self, spec: JobSpec) -> KeyState:
        k = self._by_spec.get(spec)
        if k is None:
            k = self._keys.get(spec.key)
            if k is None:
                k = self._keys[spec.key] = KeyState(spec.key, spec, spec.display)
            elif k.adopted:  # its spec came from a label, without the env values
                k.spec, k.adopted = spec, False
            if len(self._by_spec) > 10_000:
                self._by_spec.clear()
            self._by_spec[spec] = k
        return k

    def _adopted_key(self, spec: JobSpec, labels: Mapping[str, str]) -> KeyState:
        """The key of an adopted container: its labels name the key and display (the
        spec label holds no env values, so ``spec`` may lack them)."""
        key = labels.get(LABEL_KEY) or spec.key
        k = self._keys.get(key)
        if k is None:
            k = self._keys[key] = KeyState(key, spec, labels.get(LABEL_DISPLAY) or spec.display,
                                           adopted=key != spec.key)
        return k

    def _live(self, w: Waiter) -> None:
        """``w`` is not yet served (it arrived, or was handed back): it holds its key
        and counts among its owner's waiting requests."""
        w.key.live += 1
        if w.owner is not None:
            self._quotas.wait(w.owner.user)

    def _end_waiter(self, w: Waiter) -> None:
        """``w`` is over (served, failed, cancelled): it no longer holds its key."""
        if not w.done:
            w.done = True
            w.key.live -= 1
            if w.owner is not None:
                self._quotas.unwait(w.owner.user)

    def _maybe_forget(self, k: KeyState) -> None:
        """Drop a key no waiter (in any line) holds and no container uses, so the
        table stays bounded by what is in use."""
        if (k.live or k.waiters or k.containers or k.starting or k.busy or k in self._hungry
                or (k.recheck is not None and k.recheck.active())):
            return
        if self._keys.get(k.key) is k:
            del self._keys[k.key]
            self._by_spec = {sp: v for sp, v in self._by_spec.items() if v is not k}

    def _new_waiter(self, spec: JobSpec, progress: ProgressCallback | None,
                    owner: Owner | None = None) -> Waiter:
        holder: list[Waiter] = []
        d: Deferred[Any] = Deferred(lambda _d: self._cancel(holder[0]))
        self._seq += 1
        w = Waiter(spec, self._key_for(spec), d, self._clock.seconds(), progress,
                   owner=owner, seq=self._seq)
        self._live(w)
        holder.append(w)
        self.events += 1
        return w

    def _refuse_reason(self, w: Waiter) -> BrokerError | None:
        if self._draining:
            return Draining("dockerspaces is shutting down")
        if not self._slots:
            return NoCapacity("no container slots are configured (--target 0)")
        for h in self._hosts:
            if (h.up or h.reconciling) and h.slots:
                return None
        return NoCapacity("every Docker host is down")

    # ------------------------------------------------------------------ quotas

    def _uses_gpu(self, k: KeyState) -> bool:
        if k.uses_gpu is None:
            k.uses_gpu = self._run_options(k.spec).gpu
        return k.uses_gpu

    def _gpus_in(self, k: KeyState, slot: Slot) -> int:
        """GPUs a container of ``k`` gets in ``slot``."""
        return 1 if slot.info.gpu is not None and self._uses_gpu(k) else 0

    def _least_gpus(self, k: KeyState) -> int:
        """The fewest GPUs a new container of ``k`` can have (0 with a GPU-less slot)."""
        return 0 if self._gpuless or not self._uses_gpu(k) else 1

    def _may_start(self, o: Owner, k: KeyState) -> bool:
        """True when ``o`` may hold one more container of ``k`` (in some slot); else
        ``o`` is marked blocked (a look again when they hold less)."""
        if self._quotas.may_add(o, self._least_gpus(k)):
            return True
        self._quotas.block(o.user)
        return False

    def _may_take(self, w: Waiter, c: Container) -> bool:
        """True when handing ``c`` to ``w`` keeps its owner within quota (else the
        owner is marked blocked: a look again when they hold less)."""
        if w.owner is None or self._quotas.may_hold(w.owner, c):
            return True
        self._quotas.block(w.owner.user)
        return False

    def _fits(self, o: Owner | None, k: KeyState) -> Callable[[Slot], bool] | None:
        """The slots a new container of ``k`` for ``o`` may take (None: any)."""
        if o is None or o.gpus is None or not self._uses_gpu(k):
            return None
        return lambda slot: self._quotas.may_add(o, self._gpus_in(k, slot))

    def _quota_retry_after(self, k: KeyState) -> int:
        """Retry-After of an OverQuota: the key's expected service time, at least 1 s."""
        service = scaling.service_estimate(k.service.value,
                                           self._mean_age(k, self._clock.seconds()))
        return max(1, math.ceil(service))

    def _takes_at_once(self, w: Waiter) -> bool:
        """True when an arriving x:/y: request will be handed a container at once:
        admitted now, and a container of its key it may take is idle (x:) or up (y:).
        (No waiter that may take an idle container is ever left waiting.)"""
        k = w.key
        if k.spec.mode == "y":
            c = self._usable_y(k)
            return c is not None and self._may_take(w, c)
        if len(self._admitted) >= self.settings.source or self._admission:
            return False
        return any(self._may_take(w, c) for c in k.idle)

    def _quota_refusal(self, w: Waiter) -> OverQuota | None:
        """An arrival's quota check, in the step that admits it: a request that could
        only be given a container beyond its owner's container/GPU quota fails at
        once, unless the owner holds (or is starting) a container of the same key
        (then it waits for it); a request that has to wait fails when its owner has
        ``queued`` requests waiting already. A worker launch always waits for its
        start and never shares: over the container/GPU quota it fails at once."""
        o = w.owner
        if o is None:
            return None
        k = w.key
        if w.spec.worker or not self._takes_at_once(w):
            if not self._may_start(o, k) and (
                    w.spec.worker or not self._quotas.held_of_key(o.user, k)):
                return over_quota(o, self._quotas.refusal(o),
                                  self._quota_retry_after(k))
            if o.queued is not None and self._quotas.queued(o.user) > o.queued:
                return over_quota(o, "queued", self._quota_retry_after(k))
        return None

    def _unhold(self, user: str, c: Container) -> None:
        if self._quotas.unhold(user, c):
            self._kick(user)

    def _kick(self, user: str) -> None:
        """``user`` holds less now: if a request of theirs was passed over for the
        quota, their keys are considered again (at the flush, before any callback)."""
        if self._quotas.unblock(user) and not self._draining:
            self._kicked.add(user)

    def _serve_kicked(self) -> None:
        """Consider again the keys the kicked users wait for."""
        users, self._kicked = self._kicked, set()
        for k in list(self._keys.values()):
            if k.waiters.owned and any(k.waiters.has_user(u) for u in users):
                self._consider(k)

    def _demand(self, k: KeyState) -> int:
        """Waiters of x: key ``k`` that containers could serve, for the scale-out rule:
        a user's waiters count up to the containers of ``k`` they hold or start plus
        those they may still add (all of them without a limit, or without accounts)."""
        line = k.waiters
        if line.anonymous:
            return len(line)
        total = 0
        for _, n, head in line.groups():
            o = head.owner
            room = None if o is None else self._quotas.room(o, self._least_gpus(k))
            if room is None or o is None:
                total += n
                continue
            cap = self._quotas.held_of_key(o.user, k) + room
            if cap < n:
                self._quotas.block(o.user)  # a look again when they hold less
            total += min(n, cap)
        return total

    def _start_for(self, k: KeyState) -> Waiter | None:
        """Whom the next container of x: key ``k`` is started for: the next request,
        in turn order, of a user with more waiters than starts of ``k`` under way for
        them, who may hold one more container. None: nobody may."""
        starting: dict[str | None, int] = {}
        for c in k.containers:
            if c.state == STARTING:
                starting[c.owner] = starting.get(c.owner, 0) + 1
        for user, n, head in k.waiters.groups():
            o = head.owner
            if n > starting.get(user, 0) and (o is None or self._may_start(o, k)):
                return head
        return None

    def _admit_or_queue(self, w: Waiter) -> None:
        if len(self._admitted) < self.settings.source and not self._admission:
            self._admit(w)
        elif len(self._admission) < self.settings.queue:
            self._admission[w] = None
            w.queued = True
            if w.progress is not None:
                self._admission_watchers += 1
                self._publish(w, Progress("queued", position=len(self._admission)))
        else:
            self._fail(w, Overloaded(
                f"too many requests: {self.settings.source} being served and "
                f"{self.settings.queue} waiting (--source/--queue)"))

    def _admit(self, w: Waiter) -> None:
        w.admitted = True
        self._admitted[w] = None
        if w.spec.worker:
            self._claim_worker(w)
        else:
            self._enqueue(w)

    def _unadmit(self, w: Waiter) -> None:
        if not w.admitted:
            return
        w.admitted = False
        self._admitted.pop(w, None)
        moved = False
        while self._admission and len(self._admitted) < self.settings.source:
            nxt = next(iter(self._admission))
            del self._admission[nxt]
            nxt.queued = False
            if nxt.progress is not None:
                self._admission_watchers -= 1
            moved = True
            self._admit(nxt)
        if moved and self._admission_watchers:
            for i, q in enumerate(self._admission, 1):
                if q.progress is not None:
                    self._publish(q, Progress("queued", position=i))

    def _enqueue(self, w: Waiter) -> None:
        k = w.key
        k.waiters.add(w)
        w.waiting = True
        k.hold = False  # a new arrival retries a key whose last start failed
        if w.progress is not None:
            k.watchers += 1
            position = len(k.waiters) if k.waiters.anonymous else next(
                i for i, q in enumerate(k.waiters.in_order(), 1) if q is w)
            self._publish(w, Progress("queued", position=position,
                                      detail=k.status.detail if k.status else None))
        self._consider(k)

    def _publish_positions(self, k: KeyState) -> None:
        if k.watchers:
            for i, q in enumerate(k.waiters.in_order(), 1):
                if q.progress is not None:
                    self._publish(q, Progress("queued", position=i))

    def _leave_line(self, w: Waiter) -> None:
        """Remove a waiter from every line it stands in (not from admission count)."""
        if w.queued:
            self._admission.pop(w, None)
            w.queued = False
            if w.progress is not None:
                self._admission_watchers -= 1
        if w.waiting:
            w.waiting = False
            k = w.key
            if k.waiters.leave(w) and w.progress is not None:
                k.watchers -= 1
            self._hungry.pop(w, None)
        self._timeouts.discard(w)
        self._worker_timeouts.discard(w)

    def _fail(self, w: Waiter, err: BrokerError) -> None:
        if w.done:
            return
        self._end_waiter(w)
        self._leave_line(w)
        self._unadmit(w)
        self._publish(w, Progress("failed", detail=str(err)))
        self._fire(w.deferred, Failure(err))
        self._maybe_forget(w.key)

    def _cancel(self, w: Waiter) -> None:
        """The caller cancelled its Deferred: leave the line (Deferred errbacks itself)."""
        if w.done:
            return
        self.events += 1
        self._end_waiter(w)
        self._leave_line(w)
        self._unadmit(w)
        self._publish_positions(w.key)
        self._maybe_forget(w.key)
        self._flush()

    def _queue_timed_out(self, w: Waiter) -> None:
        self.events += 1
        if self._covered(w):
            w.overdue = True  # a container is being started for it: --start-timeout rules
            return
        self._fail(w, self._queue_timeout_error(w))

    def _queue_timeout_error(self, w: Waiter) -> QueueTimeout:
        return QueueTimeout(
            f"no container for {w.spec.display} within {self.settings.queue_timeout:g} s "
            "(--queue-timeout)")

    def _covered(self, w: Waiter) -> bool:
        """True when a container of its key is being started for waiter ``w``: x: one of
        the first ``starting`` in line, y: anyone in line while its container starts."""
        k = w.key
        if not w.waiting or not k.starting:
            return False
        if k.spec.mode == "y":
            return True
        for i, q in enumerate(k.waiters.in_order()):
            if i >= k.starting:
                return False
            if q is w:
                return True
        return False

    def _settle_overdue(self, k: KeyState, err: BrokerError | None = None) -> None:
        """Fail the waiters whose queue deadline passed during a start that no longer
        covers them (``err``: the start's own failure, else the queue timeout)."""
        for w in [w for w in k.waiters if w.overdue]:
            if not self._covered(w):
                self._fail(w, err if err is not None else self._queue_timeout_error(w))

    def _worker_timed_out(self, w: Waiter) -> None:
        self.events += 1
        if w.container is None:
            self._fail(w, NoCapacity(
                f"no slot for worker {w.spec.display} within "
                f"{self.settings.worker_timeout:g} s (--worker-timeout)"))

    # ------------------------------------------------------------------ scheduling

    def _mean_age(self, k: KeyState, now: float) -> float:
        return now - k.lease_start_sum / k.busy if k.busy else 0.0

    def _cold_estimate(self, k: KeyState) -> float:
        return k.cold.value if k.cold.value is not None else scaling.DEFAULT_COLD_START

    def _wants_more(self, k: KeyState) -> bool:
        now = self._clock.seconds()
        service = scaling.service_estimate(k.service.value, self._mean_age(k, now))
        demand = self._demand(k) if k.waiters.owned else len(k.waiters)
        return scaling.wants_more(demand, k.starting, k.busy, service, self._cold_estimate(k))

    def _next_pair(self, k: KeyState) -> tuple[Waiter, Container] | None:
        """An idle container of x: key ``k`` and the next waiter, in turn order, that
        may take it within its owner's quota."""
        for c in k.idle:
            w = k.waiters.first(self._taker_of(c))
            if w is not None:
                return w, c
        return None

    def _taker_of(self, c: Container) -> Callable[[Waiter], bool]:
        """Who may be handed ``c`` (a predicate for ``Line.first``)."""
        return lambda w: self._may_take(w, c)

    def _consider(self, k: KeyState) -> None:
        """Serve, start for, or park key ``k`` according to the rules."""
        if k.spec.mode == "y":
            self._consider_y(k)
            return
        handed = False
        while k.idle and k.waiters:
            if k.waiters.owned:
                pair = self._next_pair(k)
                if pair is None:
                    break
                self._assign(*pair)
            else:  # FIFO
                self._assign(next(iter(k.waiters)), next(iter(k.idle)))
            handed = True
        if handed:
            self._publish_positions(k)
        if not k.waiters or k.hold or self._draining:
            self._hungry.pop(k, None)
            return
        while self._wants_more(k):
            owner = None
            if k.waiters.owned:
                w = self._start_for(k)
                if w is None:
                    break
                owner = w.owner
            slot = self._take_capacity(k, self._fits(owner, k) if owner is not None else None)
            if slot is None:
                self._hungry[k] = None
                return
            self._start_container(k, slot, owner=owner)
        self._hungry.pop(k, None)
        self._schedule_recheck(k)

    def _usable_y(self, k: KeyState) -> Container | None:
        """The running container of y: key ``k`` taking new leases, if any."""
        for c in k.containers:
            if c.state in (IDLE, BUSY) and c.slot.host.up and not c.suspect:
                return c
        return None

    def _consider_y(self, k: KeyState) -> None:
        usable = self._usable_y(k)
        if usable is not None:
            for q in list(k.waiters.in_order()):  # all at once: those within quota
                if self._may_take(q, usable):
                    self._assign(q, usable)
            self._hungry.pop(k, None)
            return
        pending = any(c.state == STARTING or (c.state in (IDLE, BUSY) and c.slot.host.up)
                      for c in k.containers)
        if not k.waiters or pending or k.hold or self._draining:
            self._hungry.pop(k, None)
            return
        w = k.waiters.first(lambda w: w.owner is None or self._may_start(w.owner, k))
        if w is None:
            self._hungry.pop(k, None)
            return
        slot = self._take_capacity(k, self._fits(w.owner, k))
        if slot is None:
            self._hungry[k] = None
        else:
            self._hungry.pop(k, None)
            self._start_container(k, slot, owner=w.owner)

    def _schedule_recheck(self, k: KeyState) -> None:
        if not k.waiters or not k.busy:
            return
        t = scaling.time_to_scale(self._demand(k), k.starting, k.busy, k.service.value,
                                  k.lease_start_sum / k.busy, self._cold_estimate(k))
        if t is None:
            return
        now = self._clock.seconds()
        t = max(t + 1e-3, now + 1e-3)
        if k.recheck is not None and k.recheck.active():
            if k.recheck.getTime() <= t:
                return
            k.recheck.cancel()
        k.recheck = self._clock.callLater(t - now, self._recheck, k)

    def _recheck(self, k: KeyState) -> None:
        k.recheck = None
        self.events += 1
        self._consider(k)
        self._flush()

    def _worker_cap(self) -> int:
        """Slots workers may hold at once (``--worker-slots``; default all but one)."""
        cap = self.settings.worker_slots
        return cap if cap >= 0 else max(1, len(self._slots) - 1)

    def _claim_worker(self, w: Waiter) -> None:
        if self._draining:
            self._fail(w, Draining("dockerspaces is shutting down"))
            return
        o = w.owner
        if o is not None and not self._may_start(o, w.key):
            self._fail(w, over_quota(o, self._quotas.refusal(o),
                                     self._quota_retry_after(w.key)))
            return
        limit = self._run_options(w.spec).worker_release_max
        if limit is None:
            limit = self.settings.worker_release_max
        if limit > 0:
            held = sum(1 for c in w.key.containers if c.state in (STARTING, WORKER))
            if held >= limit:
                self._fail(w, NoCapacity(
                    f"worker {w.spec.display}: {held} of its kind already hold slots "
                    f"(--worker-release-max {limit})"))
                return
        cap = self._worker_cap()
        if cap == 0:
            self._fail(w, NoCapacity("worker launches are turned off here (--worker-slots 0)"))
            return
        if sum(1 for s in self._slots if s.container is not None and s.container.key.spec.worker
               and s.container.state in (STARTING, WORKER)) >= cap:
            w.waiting = True  # workers hold their share of the slots: wait for one to end
            self._hungry[w] = None
            return
        slot = self._take_capacity(w.key, self._fits(o, w.key))
        if slot is None:
            w.waiting = True
            self._hungry[w] = None
            return
        self._worker_timeouts.discard(w)
        w.container = self._start_container(w.key, slot, worker=w, owner=o)

    def _reclaim_worker(self, w: Waiter) -> None:
        """A worker's start was lost with its host: look for a slot elsewhere."""
        w.container = None
        self._worker_timeouts.add(w, self._clock.seconds() + self.settings.worker_timeout)
        self._claim_worker(w)

    def _take_capacity(self, k: KeyState, fits: Callable[[Slot], bool] | None = None
                       ) -> Slot | None:
        """A slot for a new container of ``k``: a free one, else evict the LRU idle one.
        ``fits``: only slots it accepts (the owner's GPU quota)."""
        best: HostState | None = None
        for h in self._hosts:
            if h.up and h.free and (best is None or len(h.free) > len(best.free)) and (
                    fits is None or any(fits(s) for s in h.free)):
                best = h
        if best is not None:
            slot = next(s for s in best.free if fits is None or fits(s))
            del best.free[slot]
            return slot
        for c in self._lru:
            if c.key is not k and c.slot.host.up and (fits is None or fits(c.slot)):
                slot = c.slot
                self._stop(c, self.settings.stop, evict=True)
                return slot
        return None

    def _has_capacity(self) -> bool:
        return bool(self._lru) or any(h.up and h.free for h in self._hosts)

    def _feed(self) -> None:
        """Capacity appeared: give it to those waiting for it, oldest first, round robin."""
        if self._draining:
            return
        while self._hungry and self._has_capacity():
            before = self._started_count
            for cl in list(self._hungry):
                if cl not in self._hungry:
                    continue
                if not self._has_capacity():
                    break
                del self._hungry[cl]
                if isinstance(cl, Waiter):
                    if not cl.done:
                        cl.waiting = False
                        self._claim_worker(cl)
                else:
                    self._consider(cl)
            if self._started_count == before:
                break

    # ------------------------------------------------------------------ leases

    def _assign(self, w: Waiter, c: Container) -> None:
        now = self._clock.seconds()
        k = w.key
        w.waiting = False
        self._seq += 1
        if k.waiters.leave(w, served=self._seq) and w.progress is not None:
            k.watchers -= 1
        self._timeouts.discard(w)
        self._end_waiter(w)
        if w.owner is not None:
            self._quotas.hold(w.owner.user, c)
        w.assigned = now
        c.inflight += 1
        self._leases += 1
        c.last_used = now
        self._lru.pop(c, None)
        if k.spec.mode == "x":
            k.idle.pop(c, None)
            k.busy += 1
            c.lease_started = now
            k.lease_start_sum += now
        c.state = BUSY
        if not c.endpoint:
            c.endpoint = c.slot.host.engine.endpoint_for(c.slot.info, k.spec)
        w.endpoint = c.slot.ref_info
        lease = Lease(c.endpoint, k.display, c.id, now - w.arrived, self._release,
                      container=c, waiter=w, started=now, retry=self._retry_lease,
                      confirm=self._confirm_lease, died_before=self._died_before)
        self._publish(w, Progress("ready"))
        self._fire(w.deferred, lease)

    def _release(self, lease: Lease, failed: bool) -> None:
        self.events += 1
        w, c = lease.waiter, lease.container
        if w is not None:
            self._unadmit(w)
        if c is not None and self._end_lease(lease, c, sample=not failed):
            if failed:
                self._crash(c, "refused or reset a connection before answering")
                self._consider(c.key)
            elif c.inflight == 0:
                self._became_idle(c)
        self._check_drained()
        self._flush()

    def _end_lease(self, lease: Lease, c: Container, sample: bool) -> bool:
        """Take ``lease`` off ``c``'s counts; False when ``c`` dropped it already."""
        if c.state != BUSY:
            return False
        now = self._clock.seconds()
        c.inflight -= 1
        self._leases -= 1
        c.last_used = now
        w = lease.waiter
        if w is not None and w.owner is not None:
            self._unhold(w.owner.user, c)
        k = c.key
        if k.spec.mode == "x":
            k.busy -= 1
            k.lease_start_sum -= lease.started
            if sample:
                k.service.add(now - lease.started)
        return True

    def _retry_lease(self, lease: Lease, failed: bool) -> Deferred[Lease]:
        """``Lease.retry``: fail (or release) the container, put the request back at the
        head of its key's queue (same arrival, deadline and admission), serve it again."""
        self.events += 1
        w, c = lease.waiter, lease.container
        ended = c is not None and self._end_lease(lease, c, sample=False)
        if ended and failed and c is not None:
            self._crash(c, "refused or reset a connection before answering")
        if w is None:  # pragma: no cover - every broker lease has its waiter
            self._flush()
            return fail(BackendRefused(f"{lease.display}: the container refused the request"))
        d: Deferred[Lease] = Deferred(lambda _d: self._cancel(w))
        w.deferred, w.done, w.assigned, w.endpoint = d, False, None, ""
        self._live(w)
        w.retries += 1
        k = w.key
        if self._draining:
            self._fail(w, Draining("dockerspaces is shutting down"))
        elif w.retries > MAX_RETRIES:
            self._fail(w, BackendRefused(
                f"{w.spec.display}: {MAX_RETRIES + 1} containers in a row refused or reset "
                "the request before answering"))
        else:
            log.info("request for {display} handed back unforwarded (try {n}): back to the "
                     "head of its queue", display=w.spec.display, n=w.retries)
            k.waiters.put_back(w)
            w.waiting = True
            if w.progress is not None:
                k.watchers += 1
            k.hold = False
            deadline = w.arrived + self.settings.queue_timeout
            if deadline <= self._clock.seconds():
                w.overdue = True
            else:
                self._timeouts.add(w, deadline)
            if ended and not failed and c is not None and c.inflight == 0:
                self._became_idle(c)  # alive: it may serve the request again
            self._consider(k)
            self._settle_overdue(k)
        self._check_drained()
        self._flush()
        return d

    def _confirm_lease(self, lease: Lease, grace: float) -> Deferred[bool]:
        """``Lease.confirm``: False once ``c`` is known dead within ``grace`` s, else True."""
        c = lease.container
        if c is None or c.crashed or c.state not in (IDLE, BUSY, WORKER):
            return succeed(False)
        d: Deferred[bool] = Deferred()

        def alive() -> None:
            if dead in c.on_gone:
                c.on_gone.remove(dead)
            if not d.called:
                d.callback(True)

        call = self._clock.callLater(grace, alive)

        def dead() -> None:
            if call.active():
                call.cancel()
            if not d.called:
                d.callback(False)

        c.on_gone.append(dead)
        return d

    def _died_before(self, lease: Lease, when: float, grace: float) -> Deferred[bool]:
        """``Lease.died_before``: waits up to ``grace`` s for the container's exit time."""
        c = lease.container
        if c is None or not c.id:
            return succeed(False)
        cid = c.id
        if cid in self._exits:
            return succeed(self._exits[cid] < when)
        d: Deferred[bool] = Deferred()

        def unknown() -> None:
            if exited in c.on_exit:
                c.on_exit.remove(exited)
            if not c.on_exit:
                self._exit_watch.pop(cid, None)
            if not d.called:
                d.callback(False)

        call = self._clock.callLater(grace, unknown)

        def exited() -> None:
            if call.active():
                call.cancel()
            if not d.called:
                exit_time = self._exits.get(cid)
                d.callback(exit_time is not None and exit_time < when)

        c.on_exit.append(exited)
        self._exit_watch[cid] = c
        return d

    def _gone(self, c: Container) -> None:
        """Tell ``Lease.confirm`` watchers that ``c`` died or is going away."""
        watchers, c.on_gone = c.on_gone, []
        for w in watchers:
            self._later(w)

    def _crash(self, c: Container, why: str) -> None:
        """The proxy found ``c`` dead (refused, reset): count one crash now, before the
        engine's event, and take it out of service (stopped once no lease is left)."""
        if c.crashed or c.state not in (IDLE, BUSY, WORKER):
            return
        c.crashed = c.suspect = True
        c.last_error = c.slot.last_error = why
        self._gone(c)
        k = c.key
        k.idle.pop(c, None)
        self._lru.pop(c, None)
        log.info("container {id} of {display} crashed: {why}", id=c.id,
                 display=k.spec.display, why=why)
        self._emit("crash", c, detail=why)
        if c.inflight == 0:
            self._stop(c, 0, quiet=True)

    def _became_idle(self, c: Container) -> None:
        k = c.key
        c.state = IDLE
        if not c.slot.host.up:
            self._forget(c)  # re-adopted by label when the host answers again
            self._consider(k)
            return
        if c.suspect:
            self._stop(c, 0 if c.crashed else self.settings.stop, quiet=c.crashed)
            self._consider(k)
            return
        if k.spec.mode == "x":
            k.idle[c] = None
        if self._draining:
            return
        self._lru[c] = None
        self._consider(k)
        if c.state == IDLE and self._hungry:
            self._feed()

    # ------------------------------------------------------------------ containers

    def _start_container(self, k: KeyState, slot: Slot, worker: Waiter | None = None,
                         owner: Owner | None = None) -> Container:
        """Start a container of ``k`` in ``slot`` (for a worker launch, or for a
        request of ``owner``, who holds it while it starts)."""
        now = self._clock.seconds()
        opts = self._run_options(k.spec)
        c = Container(k, slot, STARTING, since=now, worker=worker,
                      owner=owner.user if owner is not None else None,
                      gpus=1 if slot.info.gpu is not None and opts.gpu else 0)
        if c.owner is not None:
            self._quotas.hold(c.owner, c)  # a worker's, until it is gone
        slot.container = c
        slot.since = now
        k.containers[c] = None
        k.starting += 1
        self._pending += 1
        self._started_count += 1
        timeout = opts.start_timeout or self.settings.start_timeout
        c.timer = self._clock.callLater(timeout, self._start_timed_out, c)
        deadline = now + timeout
        if slot.evicting is None:
            self._later(lambda: self._run_chain(c, opts, deadline))
        else:
            c.chain_args = (opts, deadline)
        return c

    def _run_chain(self, c: Container, opts: RunOptions, deadline: float) -> None:
        if c.state != STARTING:
            return
        d = Deferred.fromCoroutine(self._chain(c, opts, deadline))
        c.chain = d
        d.addCallbacks(lambda _: self._chain_ok(c), lambda f: self._chain_failed(c, f))
        d.addBoth(lambda _: self._flush())

    async def _chain(self, c: Container, opts: RunOptions, deadline: float) -> None:
        k, slot = c.key, c.slot
        engine = slot.host.engine
        pull_key = (slot.host.name, k.spec.ref)

        def on_progress(p: PullProgress) -> None:
            self._pulls[pull_key] = p
            prog = Progress("pulling", detail=p.status, current=p.current, total=p.total)
            self._key_status(c, prog)
            self._flush()

        t0 = self._clock.seconds()
        self._emit("pull-start", c)
        try:
            await engine.ensure_image(k.spec.ref, on_progress)
        finally:
            self._pulls.pop(pull_key, None)
        self._emit("pull-end", c, seconds=self._clock.seconds() - t0)
        self._key_status(c, Progress("starting"))
        self._flush()
        c.created_at = self._clock.seconds()
        handle = await self._removed_if_late(engine.create(k.spec, slot.info, opts), engine)
        c.handle = handle
        self._by_id[handle.id] = c
        self._emit("create", c)
        await engine.start(handle)
        self._emit("start", c)
        await engine.wait_ready(handle, deadline, opts)

    def _removed_if_late(self, d: Deferred[ContainerHandle], engine: IEngine
                         ) -> Deferred[ContainerHandle]:
        """``d`` (an engine's create), cancellable: a container created after its start
        was given up (start deadline, shutdown) is removed when the engine returns it."""
        out: Deferred[ContainerHandle] = Deferred(lambda _d: None)

        def got(result: object) -> None:
            if not out.called:
                if isinstance(result, Failure):
                    out.errback(result)
                else:
                    out.callback(cast(ContainerHandle, result))
                return
            if isinstance(result, ContainerHandle):
                log.info("removing {name}: created after its start was given up",
                         name=result.name)
                self._pending += 1

                def removed(r: object) -> None:
                    self._pending -= 1
                    self._check_drained()
                    self._flush()

                engine.stop(result, 0).addBoth(removed)

        d.addBoth(got)
        return out

    def _emit(self, event: str, c: Container, seconds: float | None = None,
              detail: str | None = None) -> None:
        """Tell the container hook (logs, metrics) about a container event."""
        if self._on_container is None:
            return
        self._on_container(event, c.key.spec.display, c.slot.host.name, c.slot.info.port,
                           container=c.handle.id if c.handle is not None else None,
                           seconds=seconds, detail=detail, owner=c.owner, gpus=c.gpus)

    def _key_status(self, c: Container, p: Progress) -> None:
        if c.worker is not None:
            self._publish(c.worker, p)
            return
        k = c.key
        k.status = p
        if k.watchers:
            for w in k.waiters:
                if w.progress is not None:
                    self._publish(w, p)

    def _start_timed_out(self, c: Container) -> None:
        c.timer = None
        if c.state == STARTING and c.chain is not None:
            c.timed_out = True
            c.chain.cancel()
        elif c.state == STARTING:  # still waiting for the eviction's stop
            c.timed_out = True
            self._chain_failed(c, Failure(CancelledError()))
        self._flush()

    def _end_start(self, c: Container) -> None:
        if c.timer is not None and c.timer.active():
            c.timer.cancel()
        c.timer = None
        self._pending -= 1
        c.key.starting -= 1
        if c.owner is not None and not c.key.spec.worker:
            self._unhold(c.owner, c)  # started: held by whoever it serves

    def _chain_ok(self, c: Container) -> None:
        self.events += 1
        self._end_start(c)
        k = c.key
        now = self._clock.seconds()
        if c.created_at is not None:
            k.cold.add(now - c.created_at)
        self._emit("ready", c, seconds=None if c.created_at is None else now - c.created_at)
        k.status = None
        k.restarts = 0
        c.slot.since = now
        c.slot.last_error = None
        if not c.slot.host.up:
            self._forget(c)  # adopted by label when the host answers again
            w = c.worker
            if w is not None and not w.done:
                self._reclaim_worker(w)
            self._consider(k)
            self._check_drained()
            return
        if k.spec.worker:
            c.state = WORKER
            c.protected_until = now + self.settings.release
            c.timer = self._clock.callLater(self.settings.release, self._protection_over, c)
            w = c.worker
            if w is not None and not w.done:
                self._end_waiter(w)
                w.assigned = now
                self._unadmit(w)
                self._publish(w, Progress("ready"))
                self._fire(w.deferred, c.handle)  # set: the chain created it
        else:
            self._became_idle(c)
            self._settle_overdue(k)
        self._check_drained()

    def _protection_over(self, c: Container) -> None:
        c.timer = None
        if c.state == WORKER and c.slot.host.up and not self._draining:
            self._lru[c] = None
            self._feed()
        self._flush()

    def _chain_failed(self, c: Container, f: Failure) -> None:
        self.events += 1
        self._end_start(c)
        k = c.key
        e = f.value
        display = k.spec.display
        err: BrokerError | None
        if c.timed_out or isinstance(e, NotReady):
            timeout = self._run_options(k.spec).start_timeout or self.settings.start_timeout
            err = StartTimeout(f"{display} did not become ready within {timeout:g} s "
                               "(--start-timeout)")
        elif isinstance(e, EngineUnreachable):
            err = None
            self._host_down(c.slot.host, str(e))
        elif isinstance(e, PortAllocated):
            err = None  # not the image's fault: its waiters try another slot
            self._quarantine(c.slot, str(e))
        elif isinstance(e, ContainerRemoved) and k.restarts < START_RETRIES \
                and not self._draining:
            err = None  # removed from outside: not the image's fault, start it again
            k.restarts += 1
            c.slot.last_error = str(e)
            _warn("start of {display} on {host}:{port}: {why}; starting it again "
                  "({n} of {most})", display=display, host=c.slot.host.name,
                  port=c.slot.info.port, why=str(e), n=k.restarts, most=START_RETRIES)
        elif isinstance(e, ContainerRemoved):
            err = StartFailed(f"{display}: {e} ({k.restarts + 1} times in a row)")
        elif isinstance(e, ContainerExited):
            tail = (e.log_tail or "")[-_LOG_TAIL:]
            err = StartFailed(f"{display} exited while starting: {e}"
                              + (f"\n--- log tail ---\n{tail}" if tail else ""))
        elif isinstance(e, CancelledError):
            err = StartFailed(f"{display}: start cancelled")
        else:
            err = StartFailed(f"{display} failed to start: {e}")
        if err is not None:
            _warn("start of {display} on {host}:{port} failed: {err}", display=display,
                  host=c.slot.host.name, port=c.slot.info.port,
                  err=redact(err.message, k.spec))
            # the monitor is unauthenticated: the first line (exit code, reason) only;
            # the log tail is in the log and on the requester's own error page
            c.slot.last_error = err.message.splitlines()[0][:500]
            self._emit("fail", c, detail=c.slot.last_error[:200])
        k.status = None
        if c.handle is not None and (err is not None or c.slot.host.up):
            self._stop(c, 0, quiet=err is None)  # created, not started (port taken): removed
        else:
            self._forget(c)  # unreachable: reconciled by label when the host is back
        w = c.worker
        if w is not None and not w.done:
            if err is None:
                self._reclaim_worker(w)
            else:
                self._fail(w, err)
        elif err is not None:
            k.hold = True  # the next arrival for the key tries again
            if not any(o.state in (STARTING, IDLE, BUSY) for o in k.containers):
                for q in list(k.waiters):
                    self._fail(q, err)
        self._consider(k)
        self._settle_overdue(k, err)
        self._maybe_forget(k)
        self._check_drained()

    def _quarantine(self, s: Slot, why: str) -> None:
        """Keep a slot whose port something else holds out of use for a while."""
        s.blocked_until = self._clock.seconds() + SLOT_QUARANTINE
        s.last_error = why
        _warn("slot {host}:{port} is taken by something else; not used for {secs:g} s: {why}",
              host=s.host.name, port=s.info.port, secs=SLOT_QUARANTINE, why=why)

        def unblock() -> None:
            s.blocked_until = 0.0
            if s.container is None and s.evicting is None and not s.clearing:
                s.host.free[s] = None
                self._feed()
            self._flush()

        self._clock.callLater(SLOT_QUARANTINE, unblock)

    def _forget(self, c: Container) -> None:
        """Drop a container from every structure; its slot becomes free."""
        if c.state == GONE:
            return
        k = c.key
        self._drop_leases(c)
        c.state = GONE
        k.containers.pop(c, None)
        k.idle.pop(c, None)
        self._lru.pop(c, None)
        if c.handle is not None and self._by_id.get(c.handle.id) is c:
            del self._by_id[c.handle.id]
        if c.timer is not None and c.timer.active():
            c.timer.cancel()
        c.timer = None
        s = c.slot
        now = self._clock.seconds()
        if s.evicting is c:
            s.evicting = None
            s.since = now
            nxt = s.container
            if nxt is not None and nxt.state == STARTING and nxt.chain is None:
                args = nxt.chain_args
                if args is not None:
                    opts, deadline = args
                    self._later(lambda: self._run_chain(nxt, opts, deadline))
            elif nxt is None and not s.clearing:
                s.host.free[s] = None
                if self._hungry:
                    self._feed()
        elif s.container is c:
            s.container = None
            s.since = now
            if s.evicting is None and s.blocked_until <= now and not s.clearing:
                s.host.free[s] = None
                if self._hungry:
                    self._feed()
        self._maybe_forget(k)
        self._check_drained()

    def _drop_leases(self, c: Container) -> None:
        """Forget the leases in flight on a container going away (their release is a
        no-op), and who held it."""
        for user in self._quotas.clear(c):
            self._kick(user)
        if c.on_gone:
            self._gone(c)
        if c.state == BUSY:
            k = c.key
            self._leases -= c.inflight
            if k.spec.mode == "x":
                k.busy -= 1
                k.lease_start_sum -= c.lease_started
        c.inflight = 0

    def _stop(self, c: Container, grace: float, evict: bool = False, quiet: bool = False
              ) -> None:
        """Stop and remove a container; its slot is freed once the engine is done."""
        k = c.key
        self._drop_leases(c)
        c.state = STOPPING
        k.containers.pop(c, None)
        k.idle.pop(c, None)
        self._lru.pop(c, None)
        if c.timer is not None and c.timer.active():
            c.timer.cancel()
        c.timer = None
        if not quiet:
            self._emit("evict" if evict else "stop", c)
        if evict:
            c.slot.evicting = c
            c.slot.container = None
        c.slot.since = self._clock.seconds()
        self._pending += 1
        handle = c.handle
        engine = c.slot.host.engine

        def done(result: object) -> None:
            self._pending -= 1
            self.events += 1
            if isinstance(result, Failure):
                if isinstance(result.value, EngineUnreachable):
                    self._host_down(c.slot.host, str(result.value))
                else:
                    _warn("stopping {id} failed: {err}", id=c.id, err=result.value)
            c.state = STOPPING  # _forget expects a live state
            self._forget(c)
            self._consider(k)
            self._check_drained()
            self._flush()

        if handle is None:
            self._later(lambda: done(None))
        else:
            self._later(lambda: engine.stop(handle, grace).addBoth(done))

    def _remove_owned(self, h: HostState, o: OwnedContainer) -> None:
        """Remove a labelled container we do not adopt. Its slot, if it has one, takes
        no new container until it is gone: it may still hold the slot's port."""
        self._pending += 1
        grace = self.settings.stop if o.running else 0
        slot = self._slot_by_port.get((h.name, o.slot_port or -1))
        if slot is not None:
            slot.clearing += 1
            h.free.pop(slot, None)

        def done(result: object) -> None:
            self._pending -= 1
            if isinstance(result, Failure):
                self._engine_failed(h, result)
                _warn("removing {id} failed: {err}", id=o.id, err=result.value)
            if slot is not None:
                slot.clearing -= 1
                if (not slot.clearing and slot.container is None and slot.evicting is None
                        and slot.blocked_until <= self._clock.seconds()):
                    h.free[slot] = None
                    self._feed()
            self._check_drained()
            self._flush()

        self._later(lambda: h.engine.stop(o, grace).addBoth(done))

    def _lose(self, c: Container, why: str) -> None:
        """A running container died: forget it, free its slot, remove what is left."""
        handle = c.handle
        h = c.slot.host
        c.last_error = why
        c.slot.last_error = why
        k = c.key
        self._forget(c)
        if handle is not None:
            self._pending += 1

            def done(result: object) -> None:
                self._pending -= 1
                if isinstance(result, Failure):
                    self._engine_failed(h, result)
                self._check_drained()
                self._flush()

            self._later(lambda: h.engine.stop(handle, 0).addBoth(done))
        self._consider(k)

    # ------------------------------------------------------------------ hosts and events

    def _on_event(self, h: HostState, ev: Any) -> None:
        c = self._by_id.get(ev.container_id)
        if ev.kind == "exited":  # the exit time, after the die: Lease.died_before
            if ev.exited_at is not None:
                self._exits[ev.container_id] = ev.exited_at
                if len(self._exits) > EXITS_KEPT:
                    self._exits.popitem(last=False)
                watching = self._exit_watch.pop(ev.container_id, None)
                if watching is not None:
                    watchers, watching.on_exit = watching.on_exit, []
                    for w in watchers:
                        self._later(w)
                    self._flush()
            return
        if ev.kind not in ("die", "oom"):
            return
        if c is None or c.state not in (IDLE, BUSY, WORKER):
            return  # unknown, starting (its start fails with the log tail) or stopping
        self.events += 1
        if not c.crashed:  # else counted when the proxy found it dead
            log.info("container {id} of {display} {kind}", id=c.id,
                     display=c.key.spec.display,
                     kind="was killed (out of memory)" if ev.kind == "oom" else "died")
            self._emit("crash", c, detail="oom" if ev.kind == "oom" else
                       (f"exit {ev.exit_code}" if ev.exit_code is not None else None))
        self._lose(c, f"container {'killed (oom)' if ev.kind == 'oom' else 'died'}"
                   + (f" (exit {ev.exit_code})" if ev.exit_code is not None else ""))
        self._flush()

    def _ping_all(self) -> None:
        for h in self._hosts:
            if h.pinging or h.reconciling:
                continue
            h.pinging = True
            try:
                d = h.engine.ping()
            except Exception:  # noqa: BLE001 - any failure means "down"
                d = succeed(False)
            d.addBoth(self._pinged, h)

    def _pinged(self, result: object, h: HostState) -> None:
        ok = result is True
        h.pinging = False
        if ok and not h.up:
            self._reconcile(h)
        elif not ok and h.up:
            self._host_down(h, "engine does not answer ping")
        self._flush()

    def _engine_failed(self, h: HostState, f: Failure) -> None:
        """An engine call failed: EngineUnreachable marks the host down (ping recovers)."""
        if isinstance(f.value, EngineUnreachable):
            self._host_down(h, str(f.value))

    def _host_down(self, h: HostState, reason: str) -> None:
        if not h.up:
            return
        _warn("host {host} is down: {reason}", host=h.name, reason=reason)
        h.up = False
        h.since = self._clock.seconds()
        h.last_error = reason
        touched = set()
        for s in h.slots:
            c = s.container
            if c is not None and c.state in (IDLE, WORKER):
                touched.add(c.key)
                self._forget(c)
        for k in list(self._keys.values()):
            if k.waiters:
                self._consider(k)

    def _reconcile(self, h: HostState) -> Deferred[None]:
        """Adopt or remove the host's labelled containers, then mark it up."""
        h.reconciling = True
        try:
            d = h.engine.list_own()
        except Exception as e:  # noqa: BLE001 - any failure means "down"
            d = fail(e)

        def got(owned: list[OwnedContainer]) -> None:
            h.reconciling = False
            self._adopt(h, owned)
            h.up = True
            h.since = self._clock.seconds()
            h.last_error = None
            for k in list(self._keys.values()):
                if k.waiters:
                    self._consider(k)
            self._feed()
            self._flush()

        def failed(f: Failure) -> None:
            h.reconciling = False
            h.up = False
            h.last_error = str(f.value)
            _warn("host {host}: listing containers failed: {err}", host=h.name, err=f.value)
            self._flush()

        return d.addCallbacks(got, failed)

    def _adopt(self, h: HostState, owned: list[OwnedContainer]) -> None:
        now = self._clock.seconds()
        running = {o.id for o in owned if o.running}
        for s in h.slots:  # known containers that vanished while we were not looking
            for c in (s.container, s.evicting):
                if c is not None and c.state in (IDLE, BUSY, WORKER) and c.id not in running:
                    self._lose(c, "container vanished while the host was down")
        for o in owned:
            if o.id in self._by_id:
                continue
            slot = self._slot_by_port.get((h.name, o.slot_port or -1))
            spec = o.spec
            ok = o.running and spec is not None and slot is not None and (
                slot.container is None and slot.evicting is None)
            if ok and spec is not None and spec.mode == "y":
                ok = not any(c.state != GONE
                             for c in self._adopted_key(spec, o.labels).containers)
            if not ok or spec is None or slot is None:
                self._remove_owned(h, o)
                continue
            k = self._adopted_key(spec, o.labels)
            handle = ContainerHandle(o.id, o.name, h.name, slot.info, k.key, spec)
            c = Container(k, slot, IDLE, since=now, handle=handle, last_used=now,
                          gpus=self._gpus_in(k, slot))
            slot.container = c
            slot.since = now
            h.free.pop(slot, None)
            self._by_id[o.id] = c
            k.containers[c] = None
            log.info("adopted {id} of {display} in {host}:{port}", id=o.id,
                     display=spec.display, host=h.name, port=slot.info.port)
            if spec.worker:
                c.state = WORKER
                c.protected_until = now + self.settings.release
                c.timer = self._clock.callLater(self.settings.release,
                                                self._protection_over, c)
            else:
                if spec.mode == "x":
                    k.idle[c] = None
                self._lru[c] = None

    # ------------------------------------------------------------------ shutdown

    def _check_drained(self) -> None:
        if self._draining and self._drain_waiters and self.idle:
            waiters, self._drain_waiters = self._drain_waiters, []
            for d in waiters:
                self._later(self._resolver(d))

    @staticmethod
    def _resolver(d: Deferred[None]) -> Callable[[], None]:
        def fire() -> None:
            if not d.called:
                d.callback(None)
        return fire

    def _drain_timeout(self, d: Deferred[None]) -> None:
        if not d.called:
            _warn("drain timeout: {n} request(s) still in flight", n=self._leases)
            if d in self._drain_waiters:
                self._drain_waiters.remove(d)
            d.callback(None)

    def _stop_everything(self) -> Deferred[None]:
        for s in self._slots:
            c = s.container
            if c is None:
                continue
            if c.state == STARTING and c.chain is not None:
                c.chain.cancel()
            elif c.state in (IDLE, BUSY, WORKER):
                self._stop(c, self.settings.stop)
        done: Deferred[None] = Deferred()
        self._drain_waiters.append(done)
        self._check_drained()
        self._flush()
        return done
