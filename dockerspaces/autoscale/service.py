"""The autoscaler: one ``LoopingCall`` per ``[[autoscale]]`` entry.

Every ``interval`` seconds an entry's tick reads its queue, lists its workers, asks
its :class:`~dockerspaces.autoscale.policy.Policy` how many it wants and acts:

- more: ``launch`` the difference at once (launches still in flight count as running);
- fewer: first cancel launches still waiting, then stop idle workers only (chosen by
  :class:`~dockerspaces.autoscale.policy.IdleTracker`), and only on a reading made at
  least ``lag`` seconds after the entry's last launch or stop (the management API's
  statistics lag: an older one may not show what changed);
- RabbitMQ unreachable: no change (never a mass stop), one warning per outage and a
  counter.

A decision is logged when it changes something, when the desired number changes, and
every ``log_every`` ticks otherwise::

    autoscale NAME: queue=Q ready=R unacked=U consumers=C desired=D actual=A: reason

:meth:`AutoscaleService.reconfigure` takes a new list of entries without a restart:
an entry whose worker spec is unchanged keeps its workers and state (only its limits
and interval change); an entry that is gone, or whose worker changed, *retires*: its
loop goes on with ``max = 0`` -- stopping its workers as they become idle -- until it
has none left.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .config import Entry
from .policy import IdleTracker, Limits, Policy
from .pool import WorkerPool
from .rabbit import QueueReading, QueueRef

log = Logger()

#: a decision that changes nothing is logged every this many ticks
LOG_EVERY = 12


class QueueReader(Protocol):
    """Reads one queue (``read_queue`` with its client, reactor and timeout bound)."""

    def __call__(self, ref: QueueRef) -> Deferred[QueueReading]:
        """A reading, or a failure (:class:`~dockerspaces.autoscale.rabbit.RabbitUnreachable`)."""


def retiring_limits(entry: Entry) -> Limits:
    """The limits of a retiring entry: none wanted, at once (idle ones only stop)."""
    return Limits(entry.target, entry.activation, 0, 0, 0.0, 0.0)


@define(eq=False)
class Scaler:
    """One entry's loop and state (owned by :class:`AutoscaleService`)."""

    entry: Entry
    policy: Policy
    idle: IdleTracker = field(factory=IdleTracker)
    retiring: bool = False
    loop: LoopingCall | None = None
    busy: bool = False
    launching: list[Deferred[object]] = field(factory=list)
    stopping: set[str] = field(factory=set)
    last_change: float = float("-inf")
    ticks: int = 0
    errors: int = 0
    failed_reads: int = 0
    outage: bool = False
    last_desired: int | None = None
    last_launch_error: str | None = None
    view: dict[str, object] = field(factory=dict)


class AutoscaleService(Service):
    """Scales the workers of every entry from its queue (see the module docstring)."""

    def __init__(
        self,
        entries: Iterable[Entry],
        pool: WorkerPool,
        reader: QueueReader,
        clock: IReactorTime,
        log_every: int = LOG_EVERY,
    ) -> None:
        self._pool = pool
        self._reader = reader
        self._clock = clock
        self._log_every = max(log_every, 1)
        self._scalers: dict[str, Scaler] = {}
        self._retiring: list[Scaler] = []
        #: failed queue readings, all entries (a metric)
        self.unreachable_total = 0
        for e in entries:
            self._scalers[e.name] = Scaler(e, Policy(e.limits))

    # ------------------------------------------------------------------ service

    def startService(self) -> None:
        """Start every entry's loop (a first tick at once)."""
        super().startService()
        for s in [*self._scalers.values(), *self._retiring]:
            self._start(s)

    def stopService(self) -> None:
        """Stop every loop (workers stay: the broker stops them at shutdown)."""
        super().stopService()
        for s in [*self._scalers.values(), *self._retiring]:
            self._stop_loop(s)

    def _start(self, s: Scaler) -> None:
        loop = LoopingCall(self.tick, s)
        loop.clock = self._clock
        s.loop = loop
        loop.start(s.entry.interval, now=True).addErrback(
            lambda f: log.failure("autoscale {name}: loop stopped", f, name=s.entry.name)
        )

    def _stop_loop(self, s: Scaler) -> None:
        if s.loop is not None and s.loop.running:
            s.loop.stop()
        s.loop = None

    # ------------------------------------------------------------------ reconfigure

    def reconfigure(self, entries: Iterable[Entry]) -> None:
        """Take a new list of entries (see the module docstring): same worker spec ⇒
        same workers and state; gone or changed ⇒ the old one retires."""
        by_key = {s.entry.spec.key: s for s in [*self._retiring, *self._scalers.values()]}
        new: dict[str, Scaler] = {}
        for e in entries:
            s = by_key.pop(e.spec.key, None)
            if s is None:
                s = Scaler(e, Policy(e.limits))
                log.info("autoscale {name}: added ({queue})", name=e.name, queue=e.display)
                if self.running:
                    self._start(s)
            else:
                old = s.entry
                s.entry = e
                if s.retiring:
                    s.retiring = False
                    self._retiring.remove(s)
                    s.policy = Policy(e.limits)
                else:
                    s.policy.limits = e.limits
                if old != e:
                    log.info("autoscale {name}: settings changed, workers kept", name=e.name)
                if self.running and (old.interval != e.interval or s.loop is None):
                    self._stop_loop(s)
                    self._start(s)
            new[e.name] = s
        for s in self._scalers.values():
            if s in new.values() or s.retiring:
                continue
            self._retire(s)
        self._scalers = new

    def _retire(self, s: Scaler) -> None:
        s.retiring = True
        s.policy = Policy(retiring_limits(s.entry))
        for d in list(s.launching):
            d.cancel()
        self._retiring.append(s)
        log.info(
            "autoscale {name}: removed or changed in the config: its workers stop as they become idle",
            name=s.entry.name,
        )

    # ------------------------------------------------------------------ one tick

    def tick(self, s: Scaler) -> Deferred[None]:
        """One round for one entry; never fails (errors are logged and counted)."""
        if s.busy:
            return succeed(None)
        s.busy = True

        def done(result: object) -> None:
            s.busy = False
            if isinstance(result, Failure):
                s.errors += 1
                log.failure("autoscale {name}: tick failed", result, name=s.entry.name)

        return Deferred.fromCoroutine(self._tick(s)).addBoth(done)

    async def _read(self, s: Scaler) -> QueueReading | None:
        e = s.entry
        try:
            reading = await self._reader(e.queue_ref)
        except Exception as ex:  # noqa: BLE001 - any failure: no change
            s.failed_reads += 1
            s.errors += 1
            self.unreachable_total += 1
            if not s.outage:
                s.outage = True
                log.warn(  # noqa: G010 - twisted.logger
                    "autoscale {name}: cannot read {queue}: {e} (no change until it answers)",
                    name=e.name,
                    queue=e.queue_ref.display,
                    e=str(ex),
                )
            return None
        if s.outage:
            s.outage = False
            log.info("autoscale {name}: RabbitMQ answers again", name=e.name)
        return reading

    async def _tick(self, s: Scaler) -> None:
        e = s.entry
        s.ticks += 1
        reading = await self._read(s)
        try:
            listed = await self._pool.workers(e)
        except Exception as ex:  # noqa: BLE001 - no decision without the workers
            s.errors += 1
            log.warn(  # noqa: G010 - twisted.logger
                "autoscale {name}: cannot list the workers: {e}", name=e.name, e=str(ex)
            )
            return
        now = self._clock.seconds()
        workers = [w for w in listed if w.id not in s.stopping]
        actual = len(workers) + len(s.launching)
        fresh = reading is not None and reading.at >= s.last_change + e.lag
        if reading is not None and fresh:
            s.idle.observe(workers, reading.occupancy(), reading.at, e.connect_grace)
        decision = s.policy.decide(reading.reading() if reading else None, actual, now)
        desired, reason = decision.desired, decision.reason
        changed = False
        if desired > actual:
            for _ in range(desired - actual):
                self._launch(s, now)
            changed = True
        elif desired < actual:
            excess = actual - desired
            cancelled = 0
            while excess and s.launching:
                s.launching.pop().cancel()
                excess -= 1
                cancelled += 1
            if cancelled:
                reason += f"; cancelled {cancelled} waiting launch(es)"
                changed = True
            if excess and reading is not None:
                if not fresh:
                    reason += f"; waiting for statistics {e.lag:g}s newer than the last launch/stop"
                else:
                    chosen = s.idle.choose(
                        workers, reading.occupancy(), excess, reading.at, e.connect_grace, settle=e.lag
                    )
                    reason += "; " + chosen.summary()
                    for cid in chosen.ids:
                        self._stop(s, cid, now)
                    changed |= bool(chosen.ids)
        self._report(s, reading, desired, actual, reason, now, changed)
        if s.retiring and not workers and not s.launching and not s.stopping:
            self._stop_loop(s)
            if s in self._retiring:
                self._retiring.remove(s)
            log.info("autoscale {name}: retired (no worker left)", name=e.name)

    def _launch(self, s: Scaler, now: float) -> None:
        d = self._pool.launch(s.entry)
        s.launching.append(d)
        s.last_change = now

        def ended(result: object) -> None:
            if d in s.launching:
                s.launching.remove(d)
            s.last_change = max(s.last_change, self._clock.seconds())
            if not isinstance(result, Failure):
                s.last_launch_error = None
                return
            if result.check(CancelledError):
                return
            s.errors += 1
            msg = result.getErrorMessage()
            if msg != s.last_launch_error:  # the same refusal again: logged once
                s.last_launch_error = msg
                log.warn(  # noqa: G010 - twisted.logger
                    "autoscale {name}: launching a worker failed: {e}", name=s.entry.name, e=msg
                )

        d.addBoth(ended)

    def _stop(self, s: Scaler, cid: str, now: float) -> None:
        s.stopping.add(cid)
        s.idle.forget(cid)
        s.last_change = now

        def ended(result: object) -> None:
            s.stopping.discard(cid)
            s.last_change = max(s.last_change, self._clock.seconds())
            if isinstance(result, Failure):
                s.errors += 1
                log.warn(  # noqa: G010 - twisted.logger
                    "autoscale {name}: stopping worker {id} failed: {e}",
                    name=s.entry.name,
                    id=cid[:12],
                    e=result.getErrorMessage(),
                )

        self._pool.stop(s.entry, cid).addBoth(ended)

    def _report(
        self,
        s: Scaler,
        reading: QueueReading | None,
        desired: int,
        actual: int,
        reason: str,
        now: float,
        changed: bool,
    ) -> None:
        e = s.entry
        if desired > actual:
            what = f"scale up {actual}->{desired}"
        elif desired < actual:
            what = f"scale down {actual}->{desired}"
        else:
            what = f"keep {actual}"
        if reading is None:
            what = f"unreachable, keep {actual}"
        if changed or desired != s.last_desired or s.ticks % self._log_every == 0:
            log.info(
                "autoscale {name}: queue={queue} ready={ready} unacked={unacked} "
                "consumers={consumers} desired={desired} actual={actual}: {reason}",
                name=e.name,
                queue=e.queue,
                ready="?" if reading is None else reading.ready,
                unacked="?" if reading is None else reading.unacked,
                consumers="?" if reading is None else reading.consumers,
                desired=desired,
                actual=actual,
                reason=reason,
            )
        s.last_desired = desired
        s.view = {
            "Queue": e.queue,
            "Desired": desired,
            "Actual": actual,
            "Ready": None if reading is None else reading.ready,
            "Unacked": None if reading is None else reading.unacked,
            "Consumers": None if reading is None else reading.consumers,
            "LastDecision": what,
            "Reason": reason,
            "Errors": s.errors,
            "Unreachable": s.failed_reads,
            "Launching": len(s.launching),
            "Stopping": len(s.stopping),
            "Retiring": s.retiring,
            "At": now,
        }

    # ------------------------------------------------------------------ views

    def snapshot(self) -> dict[str, dict[str, object]]:
        """Per entry (retiring ones as ``NAME (retiring)``): Desired, Actual, Ready,
        Unacked, Consumers, LastDecision, Reason, Errors, Unreachable, Launching,
        Stopping, Retiring, At (clock seconds of the last tick; None before one)."""
        out: dict[str, dict[str, object]] = {}
        for name, s in self._scalers.items():
            out[name] = self._view(s)
        for i, s in enumerate(self._retiring):
            label = f"{s.entry.name} (retiring)"
            out[label if label not in out else f"{label} #{i + 1}"] = self._view(s)
        return out

    def _view(self, s: Scaler) -> dict[str, object]:
        if s.view:
            return dict(
                s.view,
                Errors=s.errors,
                Unreachable=s.failed_reads,
                Launching=len(s.launching),
                Stopping=len(s.stopping),
                Retiring=s.retiring,
            )
        return {
            "Queue": s.entry.queue,
            "Desired": None,
            "Actual": None,
            "Ready": None,
            "Unacked": None,
            "Consumers": None,
            "LastDecision": "",
            "Reason": "",
            "Errors": s.errors,
            "Unreachable": s.failed_reads,
            "Launching": len(s.launching),
            "Stopping": len(s.stopping),
            "Retiring": s.retiring,
            "At": None,
        }

    def entries(self) -> tuple[Entry, ...]:
        """The current (not retiring) entries."""
        return tuple(s.entry for s in self._scalers.values())
