"""The tables every part of the broker reads: settings, clock, hosts and slots, keys,
containers by id, quotas; and the counts derived from them.

Counts that follow from the tables (leases in flight, engine operations pending) are
computed here when asked, not kept beside them; only what no table records (removals
of containers the broker no longer tracks) is counted, in one place each way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from twisted.logger import Logger

from ..config import HostConfig
from ..engine.interface import IEngine, RunOptions, SlotInfo
from ..spec import JobSpec
from .effects import Effects
from .model import (
    STARTING,
    STOPPING,
    BrokerSettings,
    Clock,
    Container,
    HostState,
    KeyState,
    Slot,
)
from .quota import Quotas

log = Logger()


def warn(fmt: str, **kw: object) -> None:
    """Log a warning (twisted.logger spells it ``warn``)."""
    log.warn(fmt, **kw)  # noqa: G010 - twisted.logger spells it warn


ContainerHook = Callable[..., None]
"""``hook(event, display, host, slot, container=, seconds=, detail=, owner=, gpus=)`` for
logs, metrics and usage; events: pull-start, pull-end, create, start, ready, fail, stop,
evict, crash. ``owner``: the user the container was started for (None without accounts);
``gpus``: the GPUs attached to it."""


class BrokerState:
    """What the parts of the broker share; each part owns the rest of its own state."""

    def __init__(
        self,
        clock: Clock,
        hosts: list[HostConfig],
        engines: Mapping[str, IEngine],
        settings: BrokerSettings,
        run_options: Callable[[JobSpec], RunOptions],
        on_container: ContainerHook | None,
        fx: Effects,
    ):
        self.settings = settings
        self.clock = clock
        self.run_options = run_options
        self.on_container = on_container
        self.fx = fx
        self.quotas = Quotas()
        now = clock.seconds()
        self.hosts: list[HostState] = []
        self.slots: list[Slot] = []
        self.slot_by_port: dict[tuple[str, int], Slot] = {}
        for hc in hosts:
            h = HostState(config=hc, engine=engines[hc.name], since=now)
            self.add_slots(h, range(hc.slots))
            self.hosts.append(h)
        self.keys: dict[str, KeyState] = {}
        self.by_id: dict[str, Container] = {}
        self.draining = False
        self.removals = 0  # removals under way of containers no slot tracks any more
        self._seq = 0

    def add_slots(self, h: HostState, indexes: range) -> None:
        """New free slots on ``h``: ports ``start_port + index``, GPUs round-robin."""
        hc, now = h.config, self.clock.seconds()
        for i in indexes:
            s = Slot(SlotInfo(hc.name, hc.start_port + i, hc.gpu_for(i)), h, i, since=now)
            h.slots.append(s)
            h.free[s] = None
            self.slots.append(s)
            self.slot_by_port[(hc.name, s.info.port)] = s

    def drop_slot(self, s: Slot) -> None:
        """Forget an empty retired slot; its host too once it is leaving and has none."""
        h = s.host
        h.free.pop(s, None)
        h.slots.remove(s)
        self.slots.remove(s)
        self.slot_by_port.pop((h.name, s.info.port), None)
        if h.leaving and not h.slots:
            self.hosts.remove(h)

    def tick(self) -> int:
        """The next stamp of the one counter ordering arrivals and services (fair share
        turns never tie)."""
        self._seq += 1
        return self._seq

    @property
    def leases(self) -> int:
        """Leases in flight: the requests on the containers in the slots (a container
        stopping or gone carries none)."""
        return sum(s.container.inflight for s in self.slots if s.container is not None)

    @property
    def pending(self) -> int:
        """Engine operations under way: starts, stops, and removals."""
        n = self.removals
        for s in self.slots:
            for c in (s.container, s.evicting):
                if c is not None and (c.state == STOPPING or (c.state == STARTING and not c.start_over)):
                    n += 1
        return n

    def emit(self, event: str, c: Container, seconds: float | None = None, detail: str | None = None) -> None:
        """Tell the container hook (logs, metrics, usage) about a container event."""
        if self.on_container is None:
            return
        self.on_container(
            event,
            c.key.spec.display,
            c.slot.host.name,
            c.slot.info.port,
            container=c.handle.id if c.handle is not None else None,
            seconds=seconds,
            detail=detail,
            owner=c.owner,
            gpus=c.gpus,
        )
