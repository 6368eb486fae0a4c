"""Placement and eviction: which waiter gets which container, when another container
starts, in which slot, and which idle container makes room.

For a key with waiters (:meth:`Placement.consider`): idle x: containers go to the next
waiters in turn (or every y: waiter shares the running container); then, while the
scale-out rule (:mod:`.scaling`) wants more, a container starts in a free slot on the
up host with the most free slots, else in the slot of the least recently used idle
container of another key, evicted. Owners' container/GPU quotas bound both. A key that
wants a slot and finds none is *hungry* and is fed first when capacity appears. See
``docs/broker.md``: "x: — exclusive", "The scale-out rule", "Quotas and fair share",
"Workers".
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

from . import scaling
from .effects import entry
from .errors import Draining, NoCapacity
from .model import (
    BUSY,
    IDLE,
    STARTING,
    WORKER,
    Container,
    HostState,
    KeyState,
    Owner,
    Slot,
    Waiter,
)
from .parts import AdmissionPart, Claimant, LeasesPart, LifecyclePart
from .quota import over_quota
from .state import BrokerState


class Placement:
    """Hands containers to waiters, starts containers, picks and frees slots."""

    admission: AdmissionPart  # set by the Broker once every part exists
    leases: LeasesPart
    lifecycle: LifecyclePart

    def __init__(self, st: BrokerState):
        self.st = st
        self.fx = st.fx
        self.settings = st.settings
        self.lru: OrderedDict[Container, None] = OrderedDict()  # evictable, oldest first
        self.hungry: OrderedDict[Claimant, None] = OrderedDict()  # waiting for a slot
        self.kicked: set[str] = set()  # users whose holds dropped while they wait
        self._started = 0  # containers started (a tick: did feeding start any?)
        self._gpuless = any(s.info.gpu is None for s in st.slots)

    # ------------------------------------------------------------------ GPUs and quotas

    def _uses_gpu(self, k: KeyState) -> bool:
        """True when ``k``'s run options attach a slot's GPU (asked once per key)."""
        if k.uses_gpu is None:
            k.uses_gpu = self.st.run_options(k.spec).gpu
        return k.uses_gpu

    def gpus_in(self, k: KeyState, slot: Slot) -> int:
        """GPUs a container of ``k`` gets in ``slot``: the slot's, if it uses one."""
        return 1 if slot.info.gpu is not None and self._uses_gpu(k) else 0

    def _least_gpus(self, k: KeyState) -> int:
        """The fewest GPUs a new container of ``k`` can have (0 with a GPU-less slot)."""
        return 0 if self._gpuless or not self._uses_gpu(k) else 1

    def may_start(self, o: Owner, k: KeyState) -> bool:
        """True when ``o`` may hold one more container of ``k`` (in some slot); else
        ``o`` is marked blocked (a look again when they hold less)."""
        if self.st.quotas.may_add(o, self._least_gpus(k)):
            return True
        self.st.quotas.block(o.user)
        return False

    def may_take(self, w: Waiter, c: Container) -> bool:
        """True when handing ``c`` to ``w`` keeps its owner within quota (else the
        owner is marked blocked: a look again when they hold less)."""
        if w.owner is None or self.st.quotas.may_hold(w.owner, c):
            return True
        self.st.quotas.block(w.owner.user)
        return False

    def _fits(self, o: Owner | None, k: KeyState) -> Callable[[Slot], bool] | None:
        """The slots a new container of ``k`` for ``o`` may take (None: any): those
        whose GPU the owner's GPU quota still allows."""
        if o is None or o.gpus is None or not self._uses_gpu(k):
            return None
        quotas = self.st.quotas
        return lambda slot: quotas.may_add(o, self.gpus_in(k, slot))

    def retry_after(self, k: KeyState) -> int:
        """Retry-After of an OverQuota: the key's expected service time, at least 1 s."""
        service = scaling.service_estimate(k.service.value, self._mean_age(k))
        return max(1, math.ceil(service))

    def unhold(self, user: str, c: Container) -> None:
        """One reason for ``user`` to hold ``c`` ended; if it was the last, their
        waiters may fit now (``kick``)."""
        if self.st.quotas.unhold(user, c):
            self.kick(user)

    def kick(self, user: str) -> None:
        """``user`` holds less now: if a request of theirs was passed over for the
        quota, their keys are considered again (at the flush, before any callback)."""
        if self.st.quotas.unblock(user) and not self.st.draining:
            self.kicked.add(user)

    def serve_kicked(self) -> None:
        """Consider again the keys the kicked users wait for (run by the flush before
        any job, so before any caller's callback can arrive again)."""
        users, self.kicked = self.kicked, set()
        for k in list(self.st.keys.values()):
            if k.waiters.owned and any(k.waiters.has_user(u) for u in users):
                self.consider(k)

    def _demand(self, k: KeyState) -> int:
        """Waiters of x: key ``k`` that containers could serve, for the scale-out rule:
        a user's waiters count up to the containers of ``k`` they hold or start plus
        those they may still add (all of them without a limit, or without accounts)."""
        line = k.waiters
        if line.anonymous:
            return len(line)
        quotas = self.st.quotas
        total = 0
        for _, n, head in line.groups():
            o = head.owner
            room = None if o is None else quotas.room(o, self._least_gpus(k))
            if room is None or o is None:
                total += n
                continue
            cap = quotas.held_of_key(o.user, k) + room
            if cap < n:
                quotas.block(o.user)  # a look again when they hold less
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
            if n > starting.get(user, 0) and (o is None or self.may_start(o, k)):
                return head
        return None

    # ------------------------------------------------------------------ scale-out

    def _mean_age(self, k: KeyState) -> float:
        """The mean age of ``k``'s x: leases in flight (0 with none)."""
        return self.st.clock.seconds() - k.mean_lease_start() if k.busy else 0.0

    @staticmethod
    def _cold_estimate(k: KeyState) -> float:
        """``k``'s measured cold start, or the default before the first."""
        return k.cold.value if k.cold.value is not None else scaling.DEFAULT_COLD_START

    def _wants_more(self, k: KeyState) -> bool:
        """The scale-out rule (:func:`.scaling.wants_more`) for x: key ``k`` now."""
        service = scaling.service_estimate(k.service.value, self._mean_age(k))
        demand = self._demand(k) if k.waiters.owned else len(k.waiters)
        return scaling.wants_more(demand, k.starting, k.busy, service, self._cold_estimate(k))

    def _schedule_recheck(self, k: KeyState) -> None:
        """Set ``k``'s timer for the moment the rule would want one more container as
        its leases in flight age (at most one timer per key, the earliest)."""
        busy = k.busy
        if not k.waiters or not busy:
            return
        t = scaling.time_to_scale(
            self._demand(k), k.starting, busy, k.service.value, k.mean_lease_start(), self._cold_estimate(k)
        )
        if t is None:
            return
        now = self.st.clock.seconds()
        t = max(t + 1e-3, now + 1e-3)
        if k.recheck is not None and k.recheck.active():
            if k.recheck.getTime() <= t:
                return
            k.recheck.cancel()
        k.recheck = self.st.clock.callLater(t - now, self._recheck, k)

    @entry
    def _recheck(self, k: KeyState) -> None:
        """``k``'s timer: the rule is asked again."""
        k.recheck = None
        self.consider(k)

    # ------------------------------------------------------------------ handing over

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
        return lambda w: self.may_take(w, c)

    def consider(self, k: KeyState) -> None:
        """Serve, start for, or park key ``k``: x: idle containers go to the next
        waiters that may take them; then containers start while the scale-out rule
        wants more (for the next user who may hold one); a key finding no slot is
        hungry; else its re-check timer is set."""
        if k.spec.mode == "y":
            self._consider_y(k)
            return
        handed = False
        while k.idle and k.waiters:
            if k.waiters.owned:
                pair = self._next_pair(k)
                if pair is None:
                    break
                self.leases.assign(*pair)
            else:  # FIFO
                self.leases.assign(next(iter(k.waiters)), next(iter(k.idle)))
            handed = True
        if handed:
            self.admission.publish_positions(k)
        if not k.waiters or k.hold or self.st.draining:
            self.hungry.pop(k, None)
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
                self.hungry[k] = None
                return
            self._start(k, slot, owner=owner)
        self.hungry.pop(k, None)
        self._schedule_recheck(k)

    @staticmethod
    def usable_y(k: KeyState) -> Container | None:
        """The running container of y: key ``k`` taking new leases, if any."""
        for c in k.containers:
            if c.state in (IDLE, BUSY) and c.slot.host.up and not c.suspect:
                return c
        return None

    def _consider_y(self, k: KeyState) -> None:
        """y: every waiter that may take the running container shares it at once; with
        none running or starting, one starts for the first waiter who may hold it."""
        usable = self.usable_y(k)
        if usable is not None:
            for q in list(k.waiters.in_order()):
                if self.may_take(q, usable):
                    self.leases.assign(q, usable)
            self.hungry.pop(k, None)
            return
        pending = any(
            c.state == STARTING or (c.state in (IDLE, BUSY) and c.slot.host.up) for c in k.containers
        )
        if not k.waiters or pending or k.hold or self.st.draining:
            self.hungry.pop(k, None)
            return
        w = k.waiters.first(lambda w: w.owner is None or self.may_start(w.owner, k))
        if w is None:
            self.hungry.pop(k, None)
            return
        slot = self._take_capacity(k, self._fits(w.owner, k))
        if slot is None:
            self.hungry[k] = None
        else:
            self.hungry.pop(k, None)
            self._start(k, slot, owner=w.owner)

    def _start(
        self, k: KeyState, slot: Slot, worker: Waiter | None = None, owner: Owner | None = None
    ) -> Container:
        """Start a container of ``k`` in ``slot`` (counted for :meth:`feed`)."""
        self._started += 1
        return self.lifecycle.start_container(k, slot, worker=worker, owner=owner)

    # ------------------------------------------------------------------ workers

    def _worker_cap(self) -> int:
        """Slots workers may hold at once (``--worker-slots``; default all but one)."""
        cap = self.settings.worker_slots
        return cap if cap >= 0 else max(1, len(self.st.slots) - 1)

    def claim_worker(self, w: Waiter) -> None:
        """An admitted worker launch: refused over its owner's quota or its key's
        ``--worker-release-max``, waits while workers hold ``--worker-slots`` or no slot
        is free or evictable, else starts its container."""
        adm = self.admission
        if self.st.draining:
            adm.fail(w, Draining("dockerspaces is shutting down"))
            return
        o = w.owner
        if o is not None and not self.may_start(o, w.key):
            adm.fail(w, over_quota(o, self.st.quotas.refusal(o), self.retry_after(w.key)))
            return
        limit = self.st.run_options(w.spec).worker_release_max
        if limit is None:
            limit = self.settings.worker_release_max
        if limit > 0:
            held = sum(1 for c in w.key.containers if c.state in (STARTING, WORKER))
            if held >= limit:
                adm.fail(
                    w,
                    NoCapacity(
                        f"worker {w.spec.display}: {held} of its kind already hold slots "
                        f"(--worker-release-max {limit})"
                    ),
                )
                return
        cap = self._worker_cap()
        if cap == 0:
            adm.fail(w, NoCapacity("worker launches are turned off here (--worker-slots 0)"))
            return
        if (
            sum(
                1
                for s in self.st.slots
                if s.container is not None
                and s.container.key.spec.worker
                and s.container.state in (STARTING, WORKER)
            )
            >= cap
        ):
            w.waiting = True  # workers hold their share of the slots: wait for one to end
            self.hungry[w] = None
            return
        slot = self._take_capacity(w.key, self._fits(o, w.key))
        if slot is None:
            w.waiting = True
            self.hungry[w] = None
            return
        adm.worker_deadlines.discard(w)
        w.container = self._start(w.key, slot, worker=w, owner=o)

    def reclaim_worker(self, w: Waiter) -> None:
        """A worker's start was lost with its host: look for a slot elsewhere, with a
        new ``--worker-timeout``."""
        w.container = None
        self.admission.worker_deadlines.add(w, self.st.clock.seconds() + self.settings.worker_timeout)
        self.claim_worker(w)

    # ------------------------------------------------------------------ slots

    def _take_capacity(self, k: KeyState, fits: Callable[[Slot], bool] | None = None) -> Slot | None:
        """A slot for a new container of ``k``: a free one on the up host with the most
        free slots (the one free the longest there), else the slot of the least
        recently used idle container of another key, evicted. ``fits``: only slots it
        accepts (the owner's GPU quota)."""
        best: HostState | None = None
        for h in self.st.hosts:
            if (
                h.up
                and h.free
                and (best is None or len(h.free) > len(best.free))
                and (fits is None or any(fits(s) for s in h.free))
            ):
                best = h
        if best is not None:
            slot = next(s for s in best.free if fits is None or fits(s))
            del best.free[slot]
            return slot
        for c in self.lru:
            if c.key is not k and c.slot.host.up and not c.slot.retired and (fits is None or fits(c.slot)):
                slot = c.slot
                self.lifecycle.stop(c, self.settings.stop, evict=True)
                return slot
        return None

    def _has_capacity(self) -> bool:
        """True when some slot is free on an up host, or some container is evictable."""
        return bool(self.lru) or any(h.up and h.free for h in self.st.hosts)

    def slot_freed(self, s: Slot) -> None:
        """``s`` may have become free (its container gone, its port cleared, its
        quarantine over): if it takes a new container, it joins its host's free slots
        and those waiting for a slot are fed."""
        if s.retired:
            if s.empty:
                self.st.drop_slot(s)
            return
        if s.takes_new(self.st.clock.seconds()):
            s.host.free[s] = None
            if self.hungry:
                self.feed()

    def slots_changed(self) -> None:
        """Slots came or went (a host joined or was resized): GPU accounting and
        those waiting for capacity follow."""
        self._gpuless = any(s.info.gpu is None for s in self.st.slots)
        if self.hungry:
            self.feed()

    def feed(self) -> None:
        """Capacity appeared: give it to those waiting for it, oldest first, round robin."""
        if self.st.draining:
            return
        while self.hungry and self._has_capacity():
            before = self._started
            for cl in list(self.hungry):
                if cl not in self.hungry:
                    continue
                if not self._has_capacity():
                    break
                del self.hungry[cl]
                if isinstance(cl, Waiter):
                    if not cl.done:
                        cl.waiting = False
                        self.claim_worker(cl)
                else:
                    self.consider(cl)
            if self._started == before:
                break
