"""What each part of the broker asks of the others, as Protocols.

The broker is five parts over one :class:`~dockerspaces.broker.state.BrokerState`:
:mod:`.admission`, :mod:`.placement`, :mod:`.leases`, :mod:`.containers` (the
lifecycle) and :mod:`.hosts`. A part calls another only through the names listed
here, so the contracts between them are written down in one place, the parts import
this module rather than each other (no import circle), and
:class:`~dockerspaces.broker.broker.Broker` wires the concrete parts together (mypy
checks there that each one fits its Protocol).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol

from twisted.python.failure import Failure

from ..engine.interface import OwnedContainer
from ..spec import JobSpec
from .deadlines import Deadlines
from .errors import BrokerError
from .model import Container, HostState, KeyState, Owner, Slot, Waiter

Claimant = KeyState | Waiter
"""Who waits for a slot: a key needing a container, or a worker launch."""


class AdmissionPart(Protocol):
    """Waiters from arrival to end (:class:`~dockerspaces.broker.admission.Admission`)."""

    deadlines: Deadlines
    worker_deadlines: Deadlines

    def adopted_key(self, spec: JobSpec, labels: Mapping[str, str]) -> KeyState:
        """The key of an adopted container, from its labels."""

    def maybe_forget(self, k: KeyState) -> None:
        """Drop ``k`` from the key table once nothing refers to it."""

    def live(self, w: Waiter) -> None:
        """``w`` was served: it no longer waits."""

    def end_waiter(self, w: Waiter) -> None:
        """``w``'s life ends (served, failed or gone): its quota hold is dropped."""

    def unadmit(self, w: Waiter) -> None:
        """``w`` leaves ``--source``; the next queued request is admitted."""

    def put_back(self, w: Waiter) -> None:
        """``w`` was handed back unforwarded: the head of its key's line again."""

    def publish_positions(self, k: KeyState) -> None:
        """Tell the waiters of ``k`` that watch their place in the line."""

    def fail(self, w: Waiter, err: BrokerError) -> None:
        """``w`` fails with ``err``."""

    def cancel(self, w: Waiter) -> None:
        """The client of ``w`` went away while it waited."""

    def settle_overdue(self, k: KeyState, err: BrokerError | None = None) -> None:
        """Fail the waiters of ``k`` whose deadline passed while a start went on."""


class PlacementPart(Protocol):
    """Which slot a key or worker gets, and eviction
    (:class:`~dockerspaces.broker.placement.Placement`)."""

    lru: OrderedDict[Container, None]
    hungry: OrderedDict[Claimant, None]

    def gpus_in(self, k: KeyState, slot: Slot) -> int:
        """The GPUs a container of ``k`` gets in ``slot``."""

    def may_start(self, o: Owner, k: KeyState) -> bool:
        """True when ``o``'s quotas allow one more container of ``k``."""

    def may_take(self, w: Waiter, c: Container) -> bool:
        """True when ``w``'s quotas allow it a lease on ``c``."""

    def retry_after(self, k: KeyState) -> int:
        """Seconds a refused request of ``k`` is told to wait."""

    def usable_y(self, k: KeyState) -> Container | None:
        """A running y: container of ``k`` that can take one more lease."""

    def unhold(self, user: str, c: Container) -> None:
        """``user`` no longer holds ``c``; their waiters may be served now."""

    def kick(self, user: str) -> None:
        """Look at ``user``'s waiters again once the current entry point ends."""

    def consider(self, k: KeyState) -> None:
        """Serve ``k``'s line: hand out containers, start one, or wait for a slot."""

    def claim_worker(self, w: Waiter) -> None:
        """Find (or wait for) a slot for the worker launch ``w``."""

    def reclaim_worker(self, w: Waiter) -> None:
        """The worker launch ``w`` lost its container before it started: try again."""

    def slot_freed(self, s: Slot) -> None:
        """``s`` is free: give it to the first claimant that fits."""

    def feed(self) -> None:
        """Give free and evictable slots to the claimants waiting for one."""

    def slots_changed(self) -> None:
        """Slots came or went: recount GPUs, feed the waiting."""


class LeasesPart(Protocol):
    """Leases on running containers (:class:`~dockerspaces.broker.leases.Leases`)."""

    def assign(self, w: Waiter, c: Container) -> None:
        """Serve ``w`` with a lease on ``c``."""

    def became_idle(self, c: Container) -> None:
        """``c`` holds no lease any more."""

    def gone(self, c: Container) -> None:
        """``c`` went away: fail or hand back what it carried."""

    def exited(self, cid: str, at: float) -> None:
        """The engine says container ``cid`` exited at ``at``."""


class LifecyclePart(Protocol):
    """Starting and stopping containers (:class:`~dockerspaces.broker.containers.Lifecycle`)."""

    def start_container(
        self, k: KeyState, slot: Slot, worker: Waiter | None = None, owner: Owner | None = None
    ) -> Container:
        """Start a container of ``k`` in ``slot``."""

    def stop(self, c: Container, grace: float, evict: bool = False, quiet: bool = False) -> None:
        """Stop ``c`` (SIGTERM, then SIGKILL after ``grace``)."""

    def protection_over(self, c: Container) -> None:
        """``c``'s ``--release`` protection ended."""

    def forget(self, c: Container) -> None:
        """``c`` is gone: free its slot and its bookkeeping."""

    def lose(self, c: Container, why: str) -> None:
        """``c`` went away behind the broker's back (crash, host lost)."""

    def remove_owned(self, h: HostState, o: OwnedContainer) -> None:
        """Remove a container of ours that ``h`` lists but no slot can take."""


class HostsPart(Protocol):
    """Engine health (:class:`~dockerspaces.broker.hosts.Hosts`)."""

    def engine_failed(self, h: HostState, f: Failure) -> None:
        """An engine call on ``h`` failed with ``f``: down if unreachable."""

    def host_down(self, h: HostState, reason: str) -> None:
        """``h`` is unreachable: its containers are lost, its slots unusable."""
