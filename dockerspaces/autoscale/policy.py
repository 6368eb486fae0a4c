"""The autoscaling rules, pure (no I/O, time passed in).

:class:`Policy` decides *how many* workers an entry wants from one queue reading;
:class:`IdleTracker` decides *which* running workers may be stopped.  Both keep only
the little state their rules need (when the queue became empty, recent
recommendations, since when each worker has looked idle).

How many (``Policy.decide``), in this order:

1. RabbitMQ unreachable (no reading): keep what runs (``desired = actual``).
2. ``depth = ready + unacked``; ``want = clamp(ceil(depth / target), min, max)``.
3. Activation (KEDA): from 0 workers, start only when ``depth >= activation``.
4. Cooldown (KEDA): from some workers to 0 only after the queue has been empty
   (``depth == 0``) for ``cooldown`` seconds; until then one worker stays.
5. Scaling up happens at once; scaling down takes the highest recommendation of the
   last ``stabilization`` seconds (Kubernetes HPA's scale-down stabilization window),
   never more than ``actual``.  The step to 0 after the cooldown is not stabilized
   again: the cooldown is its window.

Which ones (``IdleTracker``): a worker may be stopped only when the queue's consumers
at its address hold no unacknowledged message (any unacked message at its address
makes it busy); one without any consumer yet only once it has run longer than a
grace (it may still be connecting); one without a known address never.  A worker must
look idle for ``settle`` seconds (two readings across a statistics refresh) before it
is chosen, and the newest idle ones go first.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from attrs import define, field, frozen


@frozen
class Limits:
    """An entry's scaling parameters (see the module docstring)."""

    target: int = 10  # messages per worker
    activation: int = 1  # messages needed to go from 0 to 1
    min: int = 0
    max: int = 1
    cooldown: float = 300.0  # seconds of an empty queue before going to 0
    stabilization: float = 60.0  # the scale-down window, seconds


@frozen
class Reading:
    """What the queue held at ``at`` (clock seconds)."""

    ready: int
    unacked: int
    consumers: int
    at: float

    @property
    def depth(self) -> int:
        """Ready plus unacknowledged messages: the work not yet done."""
        return self.ready + self.unacked


@frozen
class Decision:
    """How many workers an entry wants, and why (a sentence for logs and the monitor)."""

    desired: int
    reason: str


@define
class Policy:
    """How many workers one entry wants; keeps when the queue became empty and the
    recommendations of the stabilization window."""

    limits: Limits
    _empty_since: float | None = field(default=None, alias="empty_since")
    _history: list[tuple[float, int]] = field(factory=list, alias="history")

    def decide(self, reading: Reading | None, actual: int, now: float) -> Decision:
        """The desired number of workers for ``reading`` when ``actual`` run (launches
        in flight included) at ``now``; see the module docstring for the rules."""
        lim = self.limits
        if reading is None:
            # Nothing known: the cooldown starts again once the queue can be read.
            self._empty_since = None
            return Decision(actual, f"RabbitMQ unreachable: keeping {actual}")
        depth = reading.depth
        if depth == 0:
            if self._empty_since is None:
                self._empty_since = now
        else:
            self._empty_since = None
        raw = math.ceil(depth / max(lim.target, 1))
        want = min(max(raw, lim.min), lim.max)
        why = f"ceil({depth}/{lim.target})={raw}"
        if want != raw:
            why += f", clamped to {'min' if want > raw else 'max'} {want}"
        to_zero = False
        if want == 0 and actual == 0:
            return self._record(now, 0, actual, why)
        if actual == 0 and depth < lim.activation and lim.min == 0:
            return self._record(now, 0, actual, f"{depth} message(s) below activation {lim.activation}")
        if actual == 0 and want > 0 and depth >= lim.activation:
            why += f", activation {lim.activation} reached"
        if want == 0 and actual > 0:
            empty_for = now - (self._empty_since if self._empty_since is not None else now)
            if empty_for >= lim.cooldown:
                why = f"queue empty for {empty_for:g}s >= cooldown {lim.cooldown:g}s"
                to_zero = True
            else:
                want = 1
                why = f"queue empty for {empty_for:g}s < cooldown {lim.cooldown:g}s: keep 1"
        return self._record(now, want, actual, why, to_zero)

    def _record(self, now: float, want: int, actual: int, why: str, to_zero: bool = False) -> Decision:
        """Remember ``want`` in the window, then stabilize a scale-down (HPA: the
        highest recommendation of the window, no higher than ``actual``)."""
        window = self.limits.stabilization
        self._history = [(t, n) for t, n in self._history if t > now - window]
        self._history.append((now, want))
        if want >= actual:
            return Decision(want, why + ("" if want == actual else ": scale up"))
        if to_zero:
            return Decision(0, why + ": scale to 0")
        highest = max(n for _, n in self._history)
        desired = min(actual, max(want, highest))
        if desired == actual:
            return Decision(
                actual, why + f"; highest in the last {window:g}s is {highest}: keep {actual} (stabilization)"
            )
        if desired > want:
            why += f"; highest in the last {window:g}s is {highest}"
        return Decision(desired, why + ": scale down")


# --------------------------------------------------------------------- which ones


@frozen
class WorkerContainer:
    """A running worker of an entry: its container id, its address on its network
    (None when unknown) and when it was created (clock seconds)."""

    id: str
    address: str | None
    since: float


@frozen
class Occupancy:
    """The queue's consumers and the unacknowledged messages of the vhost's channels,
    by the peer address of their connection (a container's address on its network)."""

    consumers: Mapping[str, int] = field(factory=dict)
    unacked: Mapping[str, int] = field(factory=dict)


@frozen
class Selection:
    """Workers chosen to stop (newest first) and why the others were not."""

    ids: tuple[str, ...]
    busy: int = 0  # an unacknowledged message at their address
    connecting: int = 0  # no consumer yet, within the grace
    unknown: int = 0  # no address known
    settling: int = 0  # idle, but not yet for ``settle`` seconds
    unmapped: bool = False  # the queue has consumers, none at any worker's address

    def summary(self) -> str:
        """E.g. ``stopping 2 idle (busy 3, connecting 1)``."""
        if self.unmapped:
            return (
                "no consumer of the queue is at a worker's address (NAT between "
                "workers and RabbitMQ?): stopping none"
            )
        others = [
            f"{n} {what}"
            for n, what in (
                (self.busy, "busy"),
                (self.connecting, "connecting"),
                (self.settling, "settling"),
                (self.unknown, "without address"),
            )
            if n
        ]
        tail = f" ({', '.join(others)})" if others else ""
        return f"stopping {len(self.ids)} idle{tail}"


def worker_state(worker: WorkerContainer, occupancy: Occupancy, now: float, grace: float) -> str:
    """``idle``, ``busy``, ``connecting`` or ``unknown`` for one worker (the rules of
    the module docstring, without the settle time)."""
    if worker.address is None:
        return "unknown"
    if occupancy.unacked.get(worker.address, 0) > 0:
        return "busy"
    if occupancy.consumers.get(worker.address, 0) > 0:
        return "idle"
    return "idle" if now - worker.since > grace else "connecting"


@define
class IdleTracker:
    """Since when each worker has looked idle; picks the workers that may be stopped."""

    _idle_since: dict[str, float] = field(factory=dict, alias="idle_since")

    def observe(
        self, workers: Iterable[WorkerContainer], occupancy: Occupancy, at: float, grace: float
    ) -> None:
        """Take one (fresh) reading made at ``at`` into account."""
        seen: dict[str, float] = {}
        for w in workers:
            if worker_state(w, occupancy, at, grace) == "idle":
                seen[w.id] = self._idle_since.get(w.id, at)
        self._idle_since = seen

    def forget(self, container_id: str) -> None:
        """The worker is being stopped or gone."""
        self._idle_since.pop(container_id, None)

    def choose(
        self,
        workers: Sequence[WorkerContainer],
        occupancy: Occupancy,
        count: int,
        now: float,
        grace: float,
        settle: float,
    ) -> Selection:
        """Up to ``count`` workers that may be stopped, newest first: idle in the
        latest observation and for at least ``settle`` seconds.  None at all when the
        queue has consumers but none at any worker's address (the mapping does not
        work, e.g. NAT: every worker would look idle)."""
        mapped = any(
            w.address is not None
            and (occupancy.consumers.get(w.address, 0) or occupancy.unacked.get(w.address, 0))
            for w in workers
        )
        if not mapped and any(occupancy.consumers.values()) and workers:
            return Selection((), unmapped=True)
        counts = {"busy": 0, "connecting": 0, "unknown": 0, "settling": 0}
        ready: list[WorkerContainer] = []
        for w in workers:
            state = worker_state(w, occupancy, now, grace)
            if state != "idle":
                counts[state] += 1
                continue
            since = self._idle_since.get(w.id)
            if since is None or now - since < settle:
                counts["settling"] += 1
                continue
            ready.append(w)
        ready.sort(key=lambda w: w.since, reverse=True)
        return Selection(
            tuple(w.id for w in ready[: max(count, 0)]),
            busy=counts["busy"],
            connecting=counts["connecting"],
            unknown=counts["unknown"],
            settling=counts["settling"],
        )
