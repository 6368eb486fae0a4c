"""Container lifecycle: starting (pull, create, start, ready), stopping, evicting,
forgetting, and what a failed start means.

A container starts in its slot at once, or — its slot taken by eviction — once the
evicted container's stop completes. A start ends ready (x:/y: idle, or a running
worker, protected from eviction for ``--release``) or failed: a user-visible
``StartFailed``/``StartTimeout`` for its waiters, or, when it was not the image's fault
(host unreachable, port taken by something else, container removed from outside), the
waiters stay in line. A forgotten container frees its slot. See ``docs/broker.md``,
"Failures".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..engine.interface import (
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
)
from ..spec import JobSpec
from .effects import entry
from .errors import BrokerError, StartFailed, StartTimeout
from .model import (
    BUSY,
    GONE,
    IDLE,
    STARTING,
    STOPPING,
    WORKER,
    Container,
    HostState,
    KeyState,
    Owner,
    Progress,
    Slot,
    Waiter,
)
from .parts import AdmissionPart, HostsPart, LeasesPart, PlacementPart
from .state import BrokerState, warn

log = Logger()

SLOT_QUARANTINE = 60.0  # seconds a slot whose port is taken by something else is left alone
START_RETRIES = 2  # starts of one key tried again after a removal from outside
LOG_TAIL = 2000  # characters of a failed start's log kept in its error


def redact(text: str, spec: JobSpec) -> str:
    """``text`` with the values of ``spec``'s env (3 characters or more) replaced by
    ``***``, for logs of a container's output."""
    for _, value in spec.env:
        if len(value) >= 3:
            text = text.replace(value, "***")
    return text


class Lifecycle:
    """Starts, stops and forgets containers; owns the pulls in progress."""

    admission: AdmissionPart  # set by the Broker once every part exists
    placement: PlacementPart
    leases: LeasesPart
    hosts: HostsPart

    def __init__(self, st: BrokerState):
        self.st = st
        self.fx = st.fx
        self.settings = st.settings
        self.pulls: dict[tuple[str, str], PullProgress] = {}  # (host, ref): in progress

    # ------------------------------------------------------------------ starting

    def start_container(
        self, k: KeyState, slot: Slot, worker: Waiter | None = None, owner: Owner | None = None
    ) -> Container:
        """Start a container of ``k`` in ``slot`` (for a worker launch, or for a request
        of ``owner``, who holds it while it starts), within the start timeout; the
        engine is called once the slot's evicted container is gone."""
        now = self.st.clock.seconds()
        opts = self.st.run_options(k.spec)
        c = Container(
            k,
            slot,
            STARTING,
            worker=worker,
            owner=owner.user if owner is not None else None,
            gpus=1 if slot.info.gpu is not None and opts.gpu else 0,
        )
        if c.owner is not None:
            self.st.quotas.hold(c.owner, c)  # a worker's, until it is gone
        slot.container = c
        slot.since = now
        k.containers[c] = None
        timeout = opts.start_timeout or self.settings.start_timeout
        c.timer = self.st.clock.callLater(timeout, self._start_timed_out, c)
        deadline = now + timeout
        if slot.evicting is None:
            self.fx.later(lambda: self._run_chain(c, opts, deadline))
        else:
            c.chain_args = (opts, deadline)
        return c

    def _run_chain(self, c: Container, opts: RunOptions, deadline: float) -> None:
        """Run ``c``'s start (unless it was given up meanwhile); its end is an entry
        point (ready or failed)."""
        if c.state != STARTING:
            return
        d = Deferred.fromCoroutine(self._chain(c, opts, deadline))
        c.chain = d
        d.addCallbacks(lambda _: self._chain_ok(c), lambda f: self._chain_failed(c, f))

    async def _chain(self, c: Container, opts: RunOptions, deadline: float) -> None:
        """Pull (progress published), create, start, wait until ready."""
        k, slot = c.key, c.slot
        engine = slot.host.engine
        pull_key = (slot.host.name, k.spec.ref)

        @self.fx.wrap
        def on_progress(p: PullProgress) -> None:
            self.pulls[pull_key] = p
            self._key_status(c, Progress("pulling", detail=p.status, current=p.current, total=p.total))

        t0 = self.st.clock.seconds()
        self.st.emit("pull-start", c)
        try:
            await engine.ensure_image(k.spec.ref, on_progress)
        finally:
            self.pulls.pop(pull_key, None)
        self.st.emit("pull-end", c, seconds=self.st.clock.seconds() - t0)
        self._pulled(c)
        c.created_at = self.st.clock.seconds()
        handle = await self._removed_if_late(engine.create(k.spec, slot.info, opts), engine)
        c.handle = handle
        self.st.by_id[handle.id] = c
        self.st.emit("create", c)
        await engine.start(handle)
        self.st.emit("start", c)
        await engine.wait_ready(handle, deadline, opts)

    @entry
    def _pulled(self, c: Container) -> None:
        """The image is there: ``c``'s waiters learn it is starting."""
        self._key_status(c, Progress("starting"))

    def _removed_if_late(self, d: Deferred[ContainerHandle], engine: IEngine) -> Deferred[ContainerHandle]:
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
                log.info("removing {name}: created after its start was given up", name=result.name)
                engine.stop(result, 0).addBoth(self._removing(lambda r: None))

        d.addBoth(got)
        return out

    def _key_status(self, c: Container, p: Progress) -> None:
        """Publish start progress: to the launch of a worker, else as its key's status
        to the key's waiters."""
        if c.worker is not None:
            self.fx.publish(c.worker, p)
            return
        k = c.key
        k.status = p
        if k.waiters.watchers:
            for w in k.waiters:
                if w.progress is not None:
                    self.fx.publish(w, p)

    @entry
    def _start_timed_out(self, c: Container) -> None:
        """The start timeout: a start under way is cancelled; one still waiting for its
        eviction fails at once."""
        c.timer = None
        if c.state == STARTING and c.chain is not None:
            c.timed_out = True
            c.chain.cancel()
        elif c.state == STARTING:
            c.timed_out = True
            self._chain_failed(c, Failure(CancelledError()))

    def _end_start(self, c: Container) -> None:
        """``c``'s start is over (ready or failed): no longer counted as starting, no
        timer; its owner's hold for the start ends (a worker's lasts)."""
        if c.timer is not None and c.timer.active():
            c.timer.cancel()
        c.timer = None
        c.start_over = True
        if c.owner is not None and not c.key.spec.worker:
            self.placement.unhold(c.owner, c)  # started: held by whoever it serves

    @entry
    def _chain_ok(self, c: Container) -> None:
        """``c`` is ready: its cold start is measured; a worker runs protected and its
        launch fires, an x:/y: container goes idle (its key's waiters take it); on a
        host gone down meanwhile it is forgotten (adopted when the host is back)."""
        self._end_start(c)
        k = c.key
        now = self.st.clock.seconds()
        if c.created_at is not None:
            k.cold.add(now - c.created_at)
        self.st.emit("ready", c, seconds=None if c.created_at is None else now - c.created_at)
        k.status = None
        k.restarts = 0
        c.slot.since = now
        c.slot.last_error = None
        if not c.slot.host.up:
            self.forget(c)
            w = c.worker
            if w is not None and not w.done:
                self.placement.reclaim_worker(w)
            self.placement.consider(k)
            return
        if k.spec.worker:
            c.state = WORKER
            c.protected_until = now + self.settings.release
            c.timer = self.st.clock.callLater(self.settings.release, self.protection_over, c)
            w = c.worker
            if w is not None and not w.done:
                self.admission.end_waiter(w)
                w.assigned = now
                self.admission.unadmit(w)
                self.fx.publish(w, Progress("ready"))
                self.fx.fire(w.deferred, c.handle)  # set: the chain created it
        else:
            self.leases.became_idle(c)
            self.admission.settle_overdue(k)

    @entry
    def protection_over(self, c: Container) -> None:
        """A worker's ``--release`` protection ended: it is evictable now."""
        c.timer = None
        if c.state == WORKER and c.slot.host.up and not self.st.draining:
            self.placement.lru[c] = None
            self.placement.feed()

    def _start_error(self, c: Container, e: BaseException) -> BrokerError | None:
        """What a failed start means for its waiters: a ``StartTimeout``/``StartFailed``,
        or None when it was not the image's fault (host unreachable: the host goes
        down; port taken: the slot is quarantined; removed from outside: started again,
        ``START_RETRIES`` times in a row at most)."""
        k = c.key
        display = k.spec.display
        if c.timed_out or isinstance(e, NotReady):
            timeout = self.st.run_options(k.spec).start_timeout or self.settings.start_timeout
            return StartTimeout(f"{display} did not become ready within {timeout:g} s (--start-timeout)")
        if isinstance(e, EngineUnreachable):
            self.hosts.host_down(c.slot.host, str(e))
            return None
        if isinstance(e, PortAllocated):
            self._quarantine(c.slot, str(e))
            return None
        if isinstance(e, ContainerRemoved) and k.restarts < START_RETRIES and not self.st.draining:
            k.restarts += 1
            c.slot.last_error = str(e)
            warn(
                "start of {display} on {host}:{port}: {why}; starting it again ({n} of {most})",
                display=display,
                host=c.slot.host.name,
                port=c.slot.info.port,
                why=str(e),
                n=k.restarts,
                most=START_RETRIES,
            )
            return None
        if isinstance(e, ContainerRemoved):
            return StartFailed(f"{display}: {e} ({k.restarts + 1} times in a row)")
        if isinstance(e, ContainerExited):
            tail = (e.log_tail or "")[-LOG_TAIL:]
            return StartFailed(
                f"{display} exited while starting: {e}" + (f"\n--- log tail ---\n{tail}" if tail else "")
            )
        if isinstance(e, CancelledError):
            return StartFailed(f"{display}: start cancelled")
        return StartFailed(f"{display} failed to start: {e}")

    @entry
    def _chain_failed(self, c: Container, f: Failure) -> None:
        """``c``'s start failed: its slot is freed (the container removed if created and
        reachable); a launch fails or looks elsewhere; with no other live container of
        the key its waiters fail, and the key is held until the next arrival."""
        self._end_start(c)
        k = c.key
        err = self._start_error(c, f.value)
        if err is not None:
            warn(
                "start of {display} on {host}:{port} failed: {err}",
                display=k.spec.display,
                host=c.slot.host.name,
                port=c.slot.info.port,
                err=redact(err.message, k.spec),
            )
            # the monitor is unauthenticated: the first line (exit code, reason) only;
            # the log tail is in the log and on the requester's own error page
            c.slot.last_error = err.message.splitlines()[0][:500]
            self.st.emit("fail", c, detail=c.slot.last_error[:200])
        k.status = None
        if c.handle is not None and (err is not None or c.slot.host.up):
            self.stop(c, 0, quiet=err is None)  # created, not started (port taken): removed
        else:
            self.forget(c)  # unreachable: reconciled by label when the host is back
        w = c.worker
        if w is not None and not w.done:
            if err is None:
                self.placement.reclaim_worker(w)
            else:
                self.admission.fail(w, err)
        elif err is not None:
            k.hold = True  # the next arrival for the key tries again
            if not any(o.state in (STARTING, IDLE, BUSY) for o in k.containers):
                for q in list(k.waiters):
                    self.admission.fail(q, err)
        self.placement.consider(k)
        self.admission.settle_overdue(k, err)
        self.admission.maybe_forget(k)

    def _quarantine(self, s: Slot, why: str) -> None:
        """Keep a slot whose port something else holds out of use for a while."""
        s.blocked_until = self.st.clock.seconds() + SLOT_QUARANTINE
        s.last_error = why
        warn(
            "slot {host}:{port} is taken by something else; not used for {secs:g} s: {why}",
            host=s.host.name,
            port=s.info.port,
            secs=SLOT_QUARANTINE,
            why=why,
        )

        @self.fx.wrap
        def unblock() -> None:
            s.blocked_until = 0.0
            self.placement.slot_freed(s)

        self.st.clock.callLater(SLOT_QUARANTINE, unblock)

    # ------------------------------------------------------------------ ending

    def forget(self, c: Container) -> None:
        """Drop a container from every structure; its slot becomes free (or, freed by an
        eviction, starts the container waiting for it)."""
        if c.state == GONE:
            return
        k = c.key
        self._drop_leases(c)
        c.state = GONE
        k.containers.pop(c, None)
        k.idle.pop(c, None)
        self.placement.lru.pop(c, None)
        if c.handle is not None and self.st.by_id.get(c.handle.id) is c:
            del self.st.by_id[c.handle.id]
        if c.timer is not None and c.timer.active():
            c.timer.cancel()
        c.timer = None
        s = c.slot
        now = self.st.clock.seconds()
        if s.evicting is c:
            s.evicting = None
            s.since = now
            nxt = s.container
            if nxt is not None and nxt.state == STARTING and nxt.chain is None:
                args = nxt.chain_args
                if args is not None:
                    opts, deadline = args
                    self.fx.later(lambda: self._run_chain(nxt, opts, deadline))
            elif nxt is None:
                self.placement.slot_freed(s)
        elif s.container is c:
            s.container = None
            s.since = now
            self.placement.slot_freed(s)
        self.admission.maybe_forget(k)

    def _drop_leases(self, c: Container) -> None:
        """Forget the leases in flight on a container going away (their release is a
        no-op), and who held it."""
        for user in self.st.quotas.clear(c):
            self.placement.kick(user)
        if c.on_gone:
            self.leases.gone(c)
        c.inflight = 0

    def stop(self, c: Container, grace: float, evict: bool = False, quiet: bool = False) -> None:
        """Stop and remove a container (``evict``: to make room; its slot then waits for
        the stop before the new container starts); forgotten once the engine is done."""
        k = c.key
        self._drop_leases(c)
        c.state = STOPPING
        k.containers.pop(c, None)
        k.idle.pop(c, None)
        self.placement.lru.pop(c, None)
        if c.timer is not None and c.timer.active():
            c.timer.cancel()
        c.timer = None
        if not quiet:
            self.st.emit("evict" if evict else "stop", c)
        if evict:
            c.slot.evicting = c
            c.slot.container = None
        c.slot.since = self.st.clock.seconds()
        handle = c.handle
        engine = c.slot.host.engine

        @self.fx.wrap
        def done(result: object) -> None:
            if isinstance(result, Failure):
                if isinstance(result.value, EngineUnreachable):
                    self.hosts.host_down(c.slot.host, str(result.value))
                else:
                    warn("stopping {id} failed: {err}", id=c.id, err=result.value)
            c.state = STOPPING  # forget() expects a live state
            self.forget(c)
            self.placement.consider(k)

        if handle is None:
            self.fx.later(lambda: done(None))
        else:
            self.fx.later(lambda: engine.stop(handle, grace).addBoth(done))

    def _removing(self, then: Callable[[object], None]) -> Callable[[object], None]:
        """Count one removal under way (a container no slot tracks); the returned
        callback, an entry point, ends it and calls ``then`` with the engine's result."""
        self.st.removals += 1

        def done(result: object) -> None:
            self.st.removals -= 1
            then(result)

        return self.fx.wrap(done)

    def remove_owned(self, h: HostState, o: OwnedContainer) -> None:
        """Remove a labelled container we do not adopt. Its slot, if it has one, takes
        no new container until it is gone: it may still hold the slot's port."""
        grace = self.settings.stop if o.running else 0
        slot = self.st.slot_by_port.get((h.name, o.slot_port or -1))
        if slot is not None:
            slot.clearing += 1
            h.free.pop(slot, None)

        def then(result: object) -> None:
            if isinstance(result, Failure):
                self.hosts.engine_failed(h, result)
                warn("removing {id} failed: {err}", id=o.id, err=result.value)
            if slot is not None:
                slot.clearing -= 1
                self.placement.slot_freed(slot)

        done = self._removing(then)
        self.fx.later(lambda: h.engine.stop(o, grace).addBoth(done))

    def lose(self, c: Container, why: str) -> None:
        """A running container died: forget it, free its slot, remove what is left."""
        handle = c.handle
        h = c.slot.host
        c.slot.last_error = why
        k = c.key
        self.forget(c)
        if handle is not None:

            def then(result: object) -> None:
                if isinstance(result, Failure):
                    self.hosts.engine_failed(h, result)

            done = self._removing(then)
            self.fx.later(lambda: h.engine.stop(handle, 0).addBoth(done))
        self.placement.consider(k)
