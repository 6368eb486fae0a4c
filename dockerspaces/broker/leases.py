"""Leases: a waiter handed a container, until the request ends, fails or is handed back.

A lease is counted on its container (``inflight``; x: at most one) and held by its
owner; an x: container whose last lease ends is idle again (the next waiter of its key
gets it at once, else it is evictable). A lease whose connection was refused or reset
before any answer marks its container crashed (no new lease; stopped once idle), and
:meth:`Leases.retry` puts the request back at the head of its line. See
``docs/broker.md``, "Failures".
"""

from __future__ import annotations

from collections import OrderedDict

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger

from .effects import entry
from .errors import BackendRefused, Draining
from .model import BUSY, IDLE, WORKER, Container, Lease, Progress, Waiter
from .parts import AdmissionPart, LifecyclePart, PlacementPart
from .state import BrokerState

log = Logger()

MAX_RETRIES = 5  # times one request may be handed back unforwarded (Lease.retry)
EXITS_KEPT = 256  # exit times remembered for Lease.died_before
REFUSED = "refused or reset a connection before answering"


class Leases:
    """Hands containers to waiters and takes them back."""

    admission: AdmissionPart  # set by the Broker once every part exists
    placement: PlacementPart
    lifecycle: LifecyclePart

    def __init__(self, st: BrokerState):
        self.st = st
        self.fx = st.fx
        # exit times of containers that died lately (the engine's "exited" events), and
        # the containers whose Lease.died_before watchers wait for theirs
        self._exits: OrderedDict[str, float] = OrderedDict()
        self._exit_watch: dict[str, Container] = {}

    def assign(self, w: Waiter, c: Container) -> None:
        """``w`` gets a lease on ``c``: it leaves its line (its user's turn moves), its
        owner holds ``c``, ``c`` is busy (x: no longer idle nor evictable), and its
        caller's Deferred fires with the lease."""
        now = self.st.clock.seconds()
        k = w.key
        w.waiting = False
        k.waiters.leave(w, served=self.st.tick())
        self.admission.deadlines.discard(w)
        self.admission.end_waiter(w)
        if w.owner is not None:
            self.st.quotas.hold(w.owner.user, c)
        w.assigned = now
        c.inflight += 1
        self.placement.lru.pop(c, None)
        if k.spec.mode == "x":
            k.idle.pop(c, None)
            c.lease_started = now
        c.state = BUSY
        if not c.endpoint:
            c.endpoint = c.slot.host.engine.endpoint_for(c.slot.info, k.spec)
        w.endpoint = c.slot.ref_info
        lease = Lease(
            c.endpoint,
            k.display,
            c.id,
            now - w.arrived,
            self._release,
            container=c,
            waiter=w,
            started=now,
            retry=self._retry,
            confirm=self._confirm,
            died_before=self._died_before,
        )
        self.fx.publish(w, Progress("ready"))
        self.fx.fire(w.deferred, lease)

    def _end_lease(self, lease: Lease, c: Container, sample: bool) -> bool:
        """Take ``lease`` off ``c`` (and its owner's holds); ``sample``: its duration
        counts as a service time. False when ``c`` dropped it already."""
        if c.state != BUSY:
            return False
        c.inflight -= 1
        w = lease.waiter
        if w is not None and w.owner is not None:
            self.placement.unhold(w.owner.user, c)
        k = c.key
        if sample and k.spec.mode == "x":
            k.service.add(self.st.clock.seconds() - lease.started)
        return True

    @entry
    def _release(self, lease: Lease, failed: bool) -> None:
        """``Lease.release``/``Lease.failed``: the request leaves ``--source``; the
        container serves the next waiter or goes idle, or (failed) is counted as
        crashed and taken out of service."""
        w, c = lease.waiter, lease.container
        if w is not None:
            self.admission.unadmit(w)
        if c is not None and self._end_lease(lease, c, sample=not failed):
            if failed:
                self.crash(c, REFUSED)
                self.placement.consider(c.key)
            elif c.inflight == 0:
                self.became_idle(c)

    @entry
    def _retry(self, lease: Lease, failed: bool) -> Deferred[Lease]:
        """``Lease.retry``: fail (or release) the container, put the request back at the
        head of its key's queue (same arrival, deadline and admission), serve it again;
        after ``MAX_RETRIES`` hand-backs it fails with ``BackendRefused``."""
        w, c = lease.waiter, lease.container
        ended = c is not None and self._end_lease(lease, c, sample=False)
        if ended and failed and c is not None:
            self.crash(c, REFUSED)
        if w is None:  # pragma: no cover - every broker lease has its waiter
            return fail(BackendRefused(f"{lease.display}: the container refused the request"))
        adm = self.admission
        d: Deferred[Lease] = Deferred(lambda _d: adm.cancel(w))
        w.deferred, w.done, w.assigned, w.endpoint = d, False, None, ""
        adm.live(w)
        w.retries += 1
        k = w.key
        if self.st.draining:
            adm.fail(w, Draining("dockerspaces is shutting down"))
        elif w.retries > MAX_RETRIES:
            adm.fail(
                w,
                BackendRefused(
                    f"{w.spec.display}: {MAX_RETRIES + 1} containers in a row refused or reset "
                    "the request before answering"
                ),
            )
        else:
            log.info(
                "request for {display} handed back unforwarded (try {n}): back to the head of its queue",
                display=w.spec.display,
                n=w.retries,
            )
            adm.put_back(w)
            if ended and not failed and c is not None and c.inflight == 0:
                self.became_idle(c)  # alive: it may serve the request again
            self.placement.consider(k)
            adm.settle_overdue(k)
        return d

    def _confirm(self, lease: Lease, grace: float) -> Deferred[bool]:
        """``Lease.confirm``: False once the container is known dead within ``grace`` s
        (event, crash, stop), else True."""
        c = lease.container
        if c is None or c.crashed or c.state not in (IDLE, BUSY, WORKER):
            return succeed(False)
        d: Deferred[bool] = Deferred()

        def alive() -> None:
            if dead in c.on_gone:
                c.on_gone.remove(dead)
            if not d.called:
                d.callback(True)

        call = self.st.clock.callLater(grace, alive)

        def dead() -> None:
            if call.active():
                call.cancel()
            if not d.called:
                d.callback(False)

        c.on_gone.append(dead)
        return d

    def _died_before(self, lease: Lease, when: float, grace: float) -> Deferred[bool]:
        """``Lease.died_before``: True when the container's exit time, known or reported
        within ``grace`` s, is before ``when``."""
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

        call = self.st.clock.callLater(grace, unknown)

        def exited() -> None:
            if call.active():
                call.cancel()
            if not d.called:
                exit_time = self._exits.get(cid)
                d.callback(exit_time is not None and exit_time < when)

        c.on_exit.append(exited)
        self._exit_watch[cid] = c
        return d

    def exited(self, cid: str, at: float) -> None:
        """The engine reported container ``cid``'s exit time: remembered (the latest
        ``EXITS_KEPT``), and its ``died_before`` watchers are told."""
        self._exits[cid] = at
        if len(self._exits) > EXITS_KEPT:
            self._exits.popitem(last=False)
        watching = self._exit_watch.pop(cid, None)
        if watching is not None:
            watchers, watching.on_exit = watching.on_exit, []
            for w in watchers:
                self.fx.later(w)

    def gone(self, c: Container) -> None:
        """Tell ``Lease.confirm`` watchers that ``c`` died or is going away."""
        watchers, c.on_gone = c.on_gone, []
        for w in watchers:
            self.fx.later(w)

    def crash(self, c: Container, why: str) -> None:
        """The proxy found ``c`` dead (refused, reset): count one crash now, before the
        engine's event, and take it out of service (stopped once no lease is left)."""
        if c.crashed or c.state not in (IDLE, BUSY, WORKER):
            return
        c.crashed = c.suspect = True
        c.slot.last_error = why
        self.gone(c)
        k = c.key
        k.idle.pop(c, None)
        self.placement.lru.pop(c, None)
        log.info("container {id} of {display} crashed: {why}", id=c.id, display=k.spec.display, why=why)
        self.st.emit("crash", c, detail=why)
        if c.inflight == 0:
            self.lifecycle.stop(c, 0, quiet=True)

    def became_idle(self, c: Container) -> None:
        """``c`` has no lease left (or just started): on a down host it is forgotten, a
        suspect one is stopped; else x: it is idle, evictable (unless draining), and
        its key is considered (the next waiter takes it at once)."""
        k = c.key
        pl = self.placement
        c.state = IDLE
        if not c.slot.host.up:
            self.lifecycle.forget(c)  # re-adopted by label when the host answers again
            pl.consider(k)
            return
        if c.suspect:
            self.lifecycle.stop(c, 0 if c.crashed else self.st.settings.stop, quiet=c.crashed)
            pl.consider(k)
            return
        if k.spec.mode == "x":
            k.idle[c] = None
        if self.st.draining:
            return
        pl.lru[c] = None
        pl.consider(k)
        if c.state == IDLE and pl.hungry:
            pl.feed()
