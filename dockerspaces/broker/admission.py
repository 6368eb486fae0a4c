"""Admission and queues: requests from arrival until served or failed.

A request (or worker launch) is a :class:`~dockerspaces.broker.model.Waiter`. It is
refused at once (draining, no slot, every host down, a quota), or admitted within
``--source``, or waits in the admission FIFO of at most ``--queue`` (beyond it:
``Overloaded``); an admitted x:/y: request waits in its key's
:class:`~dockerspaces.broker.quota.Line` until :mod:`.placement` hands it a container.
Its deadlines (``--queue-timeout``, ``--worker-timeout``) are kept in arrival order
with one timer per kind. See ``docs/broker.md``, "Admission and timeouts".
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from ..engine.interface import LABEL_DISPLAY, LABEL_KEY
from ..spec import JobSpec
from .deadlines import Deadlines
from .effects import entry
from .errors import BrokerError, Draining, NoCapacity, Overloaded, OverQuota, QueueTimeout
from .model import KeyState, Owner, Progress, ProgressCallback, Waiter
from .parts import PlacementPart
from .quota import over_quota
from .state import BrokerState

KEY_CACHE = 10_000  # specs remembered by identity before the cache starts over


class Admission:
    """The key table, the admission FIFO and the waiters' lives from arrival to end."""

    placement: PlacementPart  # set by the Broker once every part exists

    def __init__(self, st: BrokerState):
        self.st = st
        self.fx = st.fx
        self.settings = st.settings
        self.queue: OrderedDict[Waiter, None] = OrderedDict()  # the admission FIFO
        self._queue_watchers = 0  # of those, waiters with a progress callback
        self.admitted: dict[Waiter, None] = {}  # counted in --source, in admission order
        self.deadlines = Deadlines(st.clock, st.fx, self._queue_timed_out)
        self.worker_deadlines = Deadlines(st.clock, st.fx, self._worker_timed_out)
        self._by_spec: dict[JobSpec, KeyState] = {}  # cache: spec.key hashes the env

    # ------------------------------------------------------------------ keys

    def key_for(self, spec: JobSpec) -> KeyState:
        """The key of ``spec``, created on first use; an adopted key (its spec read from
        a label, without env values) takes the full spec of the first request."""
        k = self._by_spec.get(spec)
        if k is None:
            keys = self.st.keys
            k = keys.get(spec.key)
            if k is None:
                k = keys[spec.key] = KeyState(spec.key, spec, spec.display)
            elif k.adopted:
                k.spec, k.adopted = spec, False
            if len(self._by_spec) > KEY_CACHE:
                self._by_spec.clear()
            self._by_spec[spec] = k
        return k

    def adopted_key(self, spec: JobSpec, labels: Mapping[str, str]) -> KeyState:
        """The key of an adopted container: its labels name the key and display (the
        spec label holds no env values, so ``spec`` may lack them)."""
        key = labels.get(LABEL_KEY) or spec.key
        k = self.st.keys.get(key)
        if k is None:
            k = self.st.keys[key] = KeyState(
                key, spec, labels.get(LABEL_DISPLAY) or spec.display, adopted=key != spec.key
            )
        return k

    def maybe_forget(self, k: KeyState) -> None:
        """Drop a key no waiter (in any line) holds and no container uses, so the
        table stays bounded by what is in use."""
        if (
            k.live
            or k.waiters
            or k.containers
            or k in self.placement.hungry
            or (k.recheck is not None and k.recheck.active())
        ):
            return
        if self.st.keys.get(k.key) is k:
            del self.st.keys[k.key]
            self._by_spec = {sp: v for sp, v in self._by_spec.items() if v is not k}

    # ------------------------------------------------------------------ a waiter's life

    def new_waiter(
        self, spec: JobSpec, progress: ProgressCallback | None, owner: Owner | None = None
    ) -> Waiter:
        """A request arrives: it holds its key and counts as waiting for its owner
        until it ends; cancelling its Deferred makes it leave every line."""
        holder: list[Waiter] = []
        d: Deferred[Any] = Deferred(lambda _d: self.cancel(holder[0]))
        w = Waiter(
            spec, self.key_for(spec), d, self.st.clock.seconds(), progress, owner=owner, seq=self.st.tick()
        )
        self.live(w)
        holder.append(w)
        return w

    def live(self, w: Waiter) -> None:
        """``w`` is not yet served (it arrived, or was handed back): it holds its key
        and counts among its owner's waiting requests."""
        w.key.live += 1
        if w.owner is not None:
            self.st.quotas.wait(w.owner.user)

    def end_waiter(self, w: Waiter) -> None:
        """``w`` is over (served, failed, cancelled): it no longer holds its key."""
        if not w.done:
            w.done = True
            w.key.live -= 1
            if w.owner is not None:
                self.st.quotas.unwait(w.owner.user)

    def refuse(self, w: Waiter) -> BrokerError | None:
        """Why an arrival fails at once, if it does: draining, no slot configured,
        every host down, or its owner's quota (``quota_refusal``)."""
        if self.st.draining:
            return Draining("dockerspaces is shutting down")
        if not self.st.slots:
            return NoCapacity("no container slots are configured (--target 0)")
        if not any((h.up or h.reconciling) and h.slots for h in self.st.hosts):
            return NoCapacity("every Docker host is down")
        return self.quota_refusal(w)

    def takes_at_once(self, w: Waiter) -> bool:
        """True when an arriving x:/y: request will be handed a container at once:
        admitted now, and a container of its key it may take is idle (x:) or up (y:).
        (No waiter that may take an idle container is ever left waiting.)"""
        k = w.key
        pl = self.placement
        if k.spec.mode == "y":
            c = pl.usable_y(k)
            return c is not None and pl.may_take(w, c)
        if len(self.admitted) >= self.settings.source or self.queue:
            return False
        return any(pl.may_take(w, c) for c in k.idle)

    def quota_refusal(self, w: Waiter) -> OverQuota | None:
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
        pl, quotas = self.placement, self.st.quotas
        if w.spec.worker or not self.takes_at_once(w):
            if not pl.may_start(o, k) and (w.spec.worker or not quotas.held_of_key(o.user, k)):
                return over_quota(o, quotas.refusal(o), pl.retry_after(k))
            if o.queued is not None and quotas.queued(o.user) > o.queued:
                return over_quota(o, "queued", pl.retry_after(k))
        return None

    def admit_or_queue(self, w: Waiter) -> None:
        """x: requests and worker launches: admitted within ``--source`` when nobody is
        queued before them, else queued within ``--queue``, else ``Overloaded``."""
        if len(self.admitted) < self.settings.source and not self.queue:
            self._admit(w)
        elif len(self.queue) < self.settings.queue:
            self.queue[w] = None
            w.queued = True
            if w.progress is not None:
                self._queue_watchers += 1
                self.fx.publish(w, Progress("queued", position=len(self.queue)))
        else:
            self.fail(
                w,
                Overloaded(
                    f"too many requests: {self.settings.source} being served and "
                    f"{self.settings.queue} waiting (--source/--queue)"
                ),
            )

    def _admit(self, w: Waiter) -> None:
        """An admitted launch claims a slot; an admitted request joins its key's line."""
        w.admitted = True
        self.admitted[w] = None
        if w.spec.worker:
            self.placement.claim_worker(w)
        else:
            self.enqueue(w)

    def unadmit(self, w: Waiter) -> None:
        """``w`` no longer counts in ``--source`` (its lease ended, its worker started,
        it failed): the head of the admission FIFO takes its place; positions move."""
        if not w.admitted:
            return
        w.admitted = False
        self.admitted.pop(w, None)
        moved = False
        while self.queue and len(self.admitted) < self.settings.source:
            nxt = next(iter(self.queue))
            self._dequeue(nxt)
            moved = True
            self._admit(nxt)
        if moved and self._queue_watchers:
            for i, q in enumerate(self.queue, 1):
                if q.progress is not None:
                    self.fx.publish(q, Progress("queued", position=i))

    def _dequeue(self, w: Waiter) -> None:
        """``w`` leaves the admission FIFO."""
        del self.queue[w]
        w.queued = False
        if w.progress is not None:
            self._queue_watchers -= 1

    def enqueue(self, w: Waiter) -> None:
        """``w`` joins its key's line (a new arrival lifts the key's hold after a failed
        start) and the key is looked at."""
        k = w.key
        k.waiters.add(w)
        w.waiting = True
        k.hold = False
        if w.progress is not None:
            position = (
                len(k.waiters)
                if k.waiters.anonymous
                else next(i for i, q in enumerate(k.waiters.in_order(), 1) if q is w)
            )
            self.fx.publish(
                w, Progress("queued", position=position, detail=k.status.detail if k.status else None)
            )
        self.placement.consider(k)

    def put_back(self, w: Waiter) -> None:
        """``w``, handed back unforwarded, goes to the head of its key's line keeping
        its arrival, deadline and admission (overdue if its deadline passed)."""
        k = w.key
        k.waiters.put_back(w)
        w.waiting = True
        k.hold = False
        deadline = w.arrived + self.settings.queue_timeout
        if deadline <= self.st.clock.seconds():
            w.overdue = True
        else:
            self.deadlines.add(w, deadline)

    def publish_positions(self, k: KeyState) -> None:
        """Tell ``k``'s waiters with a progress callback their place in line."""
        if k.waiters.watchers:
            for i, q in enumerate(k.waiters.in_order(), 1):
                if q.progress is not None:
                    self.fx.publish(q, Progress("queued", position=i))

    def leave_line(self, w: Waiter) -> None:
        """Remove a waiter from every line it stands in (not from the admitted count)."""
        if w.queued:
            self._dequeue(w)
        if w.waiting:
            w.waiting = False
            w.key.waiters.leave(w)
            self.placement.hungry.pop(w, None)
        self.deadlines.discard(w)
        self.worker_deadlines.discard(w)

    def fail(self, w: Waiter, err: BrokerError) -> None:
        """``w`` ends with ``err``: out of every line and of ``--source``, its caller's
        Deferred fails (once)."""
        if w.done:
            return
        self.end_waiter(w)
        self.leave_line(w)
        self.unadmit(w)
        self.fx.publish(w, Progress("failed", detail=str(err)))
        self.fx.fire(w.deferred, Failure(err))
        self.maybe_forget(w.key)

    @entry
    def cancel(self, w: Waiter) -> None:
        """The caller cancelled its Deferred: ``w`` leaves the line (the Deferred
        errbacks itself); a start it caused carries on."""
        if w.done:
            return
        self.end_waiter(w)
        self.leave_line(w)
        self.unadmit(w)
        self.publish_positions(w.key)
        self.maybe_forget(w.key)

    def waiting(self) -> Iterator[Waiter]:
        """Every request and launch not yet served: admission FIFO, key lines, launches
        waiting for a slot."""
        yield from self.queue
        for k in self.st.keys.values():
            yield from k.waiters
        for cl in self.placement.hungry:
            if isinstance(cl, Waiter):
                yield cl

    # ------------------------------------------------------------------ deadlines

    def _queue_timed_out(self, w: Waiter) -> None:
        """``--queue-timeout`` passed: ``w`` fails, unless a container is being started
        for it (then it is overdue and the start decides)."""
        if self.covered(w):
            w.overdue = True
            return
        self.fail(w, self.queue_timeout_error(w))

    def queue_timeout_error(self, w: Waiter) -> QueueTimeout:
        """The error of a request that got no container within ``--queue-timeout``."""
        return QueueTimeout(
            f"no container for {w.spec.display} within {self.settings.queue_timeout:g} s (--queue-timeout)"
        )

    def covered(self, w: Waiter) -> bool:
        """True when a container of its key is being started for waiter ``w``: x: one of
        the first ``starting`` in line, y: anyone in line while its container starts."""
        k = w.key
        if not w.waiting:
            return False
        starting = k.starting
        if not starting:
            return False
        if k.spec.mode == "y":
            return True
        for i, q in enumerate(k.waiters.in_order()):
            if i >= starting:
                return False
            if q is w:
                return True
        return False

    def settle_overdue(self, k: KeyState, err: BrokerError | None = None) -> None:
        """Fail the waiters whose queue deadline passed during a start that no longer
        covers them (``err``: the start's own failure, else the queue timeout)."""
        for w in [w for w in k.waiters if w.overdue]:
            if not self.covered(w):
                self.fail(w, err if err is not None else self.queue_timeout_error(w))

    def _worker_timed_out(self, w: Waiter) -> None:
        """``--worker-timeout`` passed and no container was started for launch ``w``."""
        if w.container is None:
            self.fail(
                w,
                NoCapacity(
                    f"no slot for worker {w.spec.display} within "
                    f"{self.settings.worker_timeout:g} s (--worker-timeout)"
                ),
            )
