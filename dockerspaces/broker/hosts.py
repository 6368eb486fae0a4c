"""Host health and adoption: engine events, pings, hosts going down and coming back.

A host whose ``ping()`` fails, or whose engine answers an operation with
``EngineUnreachable``, is down: its slots take no new container and its idle
containers are forgotten (leases in flight carry on). When it answers again its
labelled containers are reconciled (``list_own``) before it is used: running ones in a
free matching slot are adopted as warm containers, the rest removed. An engine's
``die``/``oom`` event loses the container; its ``exited`` event records the exit time
for ``Lease.died_before``. See ``docs/broker.md``, "Slots and hosts" and "Start-up,
adoption, shutdown".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import HostConfig
from ..engine.interface import ContainerEvent, ContainerHandle, EngineUnreachable, IEngine, OwnedContainer
from .effects import entry
from .model import BUSY, GONE, IDLE, STARTING, WORKER, Container, HostState, Slot
from .parts import AdmissionPart, LeasesPart, LifecyclePart, PlacementPart
from .state import BrokerState, warn

log = Logger()


class Hosts:
    """Watches the engines, pings them, and adopts what they run."""

    admission: AdmissionPart  # set by the Broker once every part exists
    placement: PlacementPart
    leases: LeasesPart
    lifecycle: LifecyclePart

    def __init__(self, st: BrokerState):
        self.st = st
        self.fx = st.fx
        self._ping_loop: LoopingCall | None = None

    @entry
    def start(self) -> list[Deferred[None]]:
        """Watch every engine's events, reconcile every host, ping every
        ``ping_interval`` seconds; the reconciliations' Deferreds."""
        ds: list[Deferred[None]] = []
        for h in self.st.hosts:
            h.engine.watch(self._watcher(h))
            h.up = False
            ds.append(self._reconcile(h))
        interval = self.st.settings.ping_interval
        if interval > 0:
            self._ping_loop = LoopingCall(self._ping_all)
            self._ping_loop.clock = cast(IReactorTime, self.st.clock)
            self._ping_loop.start(interval, now=False)
        return ds

    def stop_pinging(self) -> None:
        """No more pings (shutdown)."""
        if self._ping_loop is not None and self._ping_loop.running:
            self._ping_loop.stop()

    def _watcher(self, h: HostState) -> Callable[[ContainerEvent], None]:
        """The event callback of host ``h``'s engine."""
        return lambda ev: self._on_event(h, ev)

    @entry
    def _on_event(self, h: HostState, ev: ContainerEvent) -> None:
        """An engine event: ``exited`` records the exit time; ``die``/``oom`` of a
        running container of ours counts a crash (unless the proxy counted it) and
        loses the container. Other events, and starting or stopping containers (their
        start or stop reports), are left alone."""
        if ev.kind == "exited":  # the exit time, after the die: Lease.died_before
            if ev.exited_at is not None:
                self.leases.exited(ev.container_id, ev.exited_at)
            return
        if ev.kind not in ("die", "oom"):
            return
        c = self.st.by_id.get(ev.container_id)
        if c is None or c.state not in (IDLE, BUSY, WORKER):
            return
        if not c.crashed:
            log.info(
                "container {id} of {display} {kind}",
                id=c.id,
                display=c.key.spec.display,
                kind="was killed (out of memory)" if ev.kind == "oom" else "died",
            )
            self.st.emit(
                "crash",
                c,
                detail="oom"
                if ev.kind == "oom"
                else (f"exit {ev.exit_code}" if ev.exit_code is not None else None),
            )
        self.lifecycle.lose(
            c,
            f"container {'killed (oom)' if ev.kind == 'oom' else 'died'}"
            + (f" (exit {ev.exit_code})" if ev.exit_code is not None else ""),
        )

    @entry
    def _ping_all(self) -> None:
        """Ping every host not being pinged or reconciled already."""
        for h in self.st.hosts:
            if h.pinging or h.reconciling:
                continue
            h.pinging = True
            try:
                d = h.engine.ping()
            except Exception:  # noqa: BLE001 - any failure means "down"
                d = succeed(False)
            d.addBoth(self._pinged, h)

    @entry
    def _pinged(self, result: object, h: HostState) -> None:
        """A ping's answer: a down host that answers is reconciled; an up host that
        does not is down."""
        ok = result is True
        h.pinging = False
        if ok and not h.up:
            self._reconcile(h)
        elif not ok and h.up:
            self.host_down(h, "engine does not answer ping")

    # -- hosts that come and go (swarm nodes) ----------------------------------------
    @entry
    def add(self, config: HostConfig, engine: IEngine) -> Deferred[None]:
        """A host joins: watched, its labelled containers reconciled, then its slots
        used. A host of that name still leaving comes back, resized."""
        for h in self.st.hosts:
            if h.name == config.name:
                h.leaving = False
                h.config, h.engine = config, engine
                self.resize(h, config.slots)
                return succeed(None) if h.up else self._reconcile(h)
        h = HostState(config=config, engine=engine, since=self.st.clock.seconds(), up=False)
        self.st.add_slots(h, range(config.slots))
        self.st.hosts.append(h)
        engine.watch(self._watcher(h))
        self.placement.slots_changed()
        return self._reconcile(h)

    @entry
    def resize(self, h: HostState, slots: int) -> None:
        """``h`` has ``slots`` slots from now: new ones are free at once; those beyond
        take nothing new, their idle containers stop, busy ones stop once idle (workers
        run on), and each goes once empty."""
        have = {s.index: s for s in h.slots}
        for i in range(slots):
            s = have.get(i)
            if s is not None and s.retired:
                s.retired = False
                self.placement.slot_freed(s)
        self.st.add_slots(h, range(max(have, default=-1) + 1, slots))
        for s in list(h.slots):
            if s.index >= slots and not s.retired:
                self._retire(s)
        self.placement.slots_changed()

    @entry
    def remove(self, h: HostState, reason: str) -> None:
        """``h`` leaves (a node drained, down or gone): it takes nothing new, its idle
        containers and workers are stopped, busy ones once idle; gone once empty."""
        warn("host {host} leaves: {reason}", host=h.name, reason=reason)
        h.leaving = True
        h.last_error = reason
        for s in list(h.slots):
            c = s.container
            if c is not None and c.state == WORKER:
                self.lifecycle.stop(c, self.st.settings.stop)
            if not s.retired:
                self._retire(s)
        if not h.slots and h in self.st.hosts:
            self.st.hosts.remove(h)
        self.placement.slots_changed()
        self._consider_waiting()

    def _retire(self, s: Slot) -> None:
        s.retired = True
        s.host.free.pop(s, None)
        c = s.container
        if c is not None and c.state in (IDLE, BUSY, STARTING):
            c.suspect = True  # no new leases; stopped when its last one ends
            if c.state == IDLE:
                self.lifecycle.stop(c, self.st.settings.stop)
        if s.empty:
            self.st.drop_slot(s)

    def engine_failed(self, h: HostState, f: Failure) -> None:
        """An engine call failed: EngineUnreachable marks the host down (ping recovers)."""
        if isinstance(f.value, EngineUnreachable):
            self.host_down(h, str(f.value))

    def host_down(self, h: HostState, reason: str) -> None:
        """``h`` is down: its idle containers and workers are forgotten (re-adopted when
        it is back), and the keys with waiters look for slots elsewhere."""
        if not h.up:
            return
        warn("host {host} is down: {reason}", host=h.name, reason=reason)
        h.up = False
        h.since = self.st.clock.seconds()
        h.last_error = reason
        for s in h.slots:
            c = s.container
            if c is not None and c.state in (IDLE, WORKER):
                self.lifecycle.forget(c)
        self._consider_waiting()

    def _consider_waiting(self) -> None:
        """Every key with waiters is looked at again (a host went down or came back)."""
        for k in list(self.st.keys.values()):
            if k.waiters:
                self.placement.consider(k)

    def _reconcile(self, h: HostState) -> Deferred[None]:
        """Adopt or remove the host's labelled containers, then mark it up (a failed
        listing leaves it down)."""
        h.reconciling = True
        try:
            d = h.engine.list_own()
        except Exception as e:  # noqa: BLE001 - any failure means "down"
            d = fail(e)

        @self.fx.wrap
        def got(owned: list[OwnedContainer]) -> None:
            h.reconciling = False
            self._adopt(h, owned)
            h.up = True
            h.since = self.st.clock.seconds()
            h.last_error = None
            self._consider_waiting()
            self.placement.feed()

        @self.fx.wrap
        def failed(f: Failure) -> None:
            h.reconciling = False
            h.up = False
            h.last_error = str(f.value)
            warn("host {host}: listing containers failed: {err}", host=h.name, err=f.value)

        return d.addCallbacks(got, failed)

    def _adopt(self, h: HostState, owned: list[OwnedContainer]) -> None:
        """Known containers no longer running are lost; a running labelled container
        whose spec parses, in a configured slot that is free, is adopted (idle, or a
        worker protected for ``--release``; at most one per y: key); the rest are
        removed."""
        now = self.st.clock.seconds()
        running = {o.id for o in owned if o.running}
        for s in h.slots:
            for c in (s.container, s.evicting):
                if c is not None and c.state in (IDLE, BUSY, WORKER) and c.id not in running:
                    self.lifecycle.lose(c, "container vanished while the host was down")
        for o in owned:
            if o.id in self.st.by_id:
                continue
            slot = self.st.slot_by_port.get((h.name, o.slot_port or -1))
            spec = o.spec
            ok = (
                o.running
                and spec is not None
                and slot is not None
                and (slot.container is None and slot.evicting is None)
            )
            if ok and spec is not None and spec.mode == "y":
                ok = not any(c.state != GONE for c in self.admission.adopted_key(spec, o.labels).containers)
            if not ok or spec is None or slot is None:
                self.lifecycle.remove_owned(h, o)
                continue
            k = self.admission.adopted_key(spec, o.labels)
            handle = ContainerHandle(o.id, o.name, h.name, slot.info, k.key, spec)
            c = Container(k, slot, IDLE, handle=handle, gpus=self.placement.gpus_in(k, slot))
            slot.container = c
            slot.since = now
            h.free.pop(slot, None)
            self.st.by_id[o.id] = c
            k.containers[c] = None
            log.info(
                "adopted {id} of {display} in {host}:{port}",
                id=o.id,
                display=spec.display,
                host=h.name,
                port=slot.info.port,
            )
            if spec.worker:
                c.state = WORKER
                c.protected_until = now + self.st.settings.release
                c.timer = self.st.clock.callLater(self.st.settings.release, self.lifecycle.protection_over, c)
            else:
                if spec.mode == "x":
                    k.idle[c] = None
                self.placement.lru[c] = None
