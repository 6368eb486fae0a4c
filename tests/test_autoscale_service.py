"""The autoscaler service (dockerspaces.autoscale.service) with a task.Clock, a fake
pool of workers and a fake queue reader."""

from __future__ import annotations

import itertools
from typing import Any, cast

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.autoscale import service as service_module
from dockerspaces.autoscale.config import Entry
from dockerspaces.autoscale.policy import WorkerContainer
from dockerspaces.autoscale.rabbit import QueueReading, QueueRef, RabbitUnreachable
from dockerspaces.autoscale.service import AutoscaleService

ENTRY = Entry(
    name="jobs",
    image="team/worker",
    tag="1",
    env=(),
    management="http://r:15672",
    amqp="amqp://r/",
    vhost="/",
    queue="jobs",
    user="u",
    password="secret",
    target=10,
    activation=1,
    min=0,
    max=5,
    interval=5,
    cooldown=30,
    stabilization=0,
    lag=5,
    connect_grace=30,
)


class FakePool:
    """Workers by worker spec key (as the broker keeps them); launches wait until
    fired (or fire at once)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.running: dict[str, list[WorkerContainer]] = {}
        self.pending: list[tuple[str, Deferred[object]]] = []
        self.stopped: list[str] = []
        self.auto = False
        self.down = False
        self.launch_error: Exception | None = None
        self._ids = itertools.count(1)

    def workers(self, entry: Entry) -> Deferred[list[WorkerContainer]]:
        if self.down:
            return fail(RuntimeError("broker says no"))
        return succeed(list(self.running.get(entry.spec.key, [])))

    def launch(self, entry: Entry) -> Deferred[object]:
        if self.launch_error is not None:
            return fail(self.launch_error)
        d: Deferred[object] = Deferred()
        self.pending.append((entry.spec.key, d))
        if self.auto:
            self.fire()
        return d

    def fire(self, n: int = 1000) -> list[str]:
        """Start up to ``n`` pending launches: workers with addresses 10.0.0.N."""
        started = []
        while self.pending and n:
            key, d = self.pending.pop(0)
            n -= 1
            if d.called:
                continue
            i = next(self._ids)
            w = WorkerContainer(f"w{i}", f"10.0.0.{i}", self.clock.seconds())
            self.running.setdefault(key, []).append(w)
            started.append(w.id)
            d.callback(w.id)
        return started

    def stop(self, entry: Entry, container_id: str) -> Deferred[None]:
        self.stopped.append(container_id)
        key = entry.spec.key
        self.running[key] = [w for w in self.running[key] if w.id != container_id]
        return succeed(None)

    def ids(self, entry: Entry = ENTRY) -> list[str]:
        return [w.id for w in self.running.get(entry.spec.key, [])]


class FakeReader:
    """Queue states by queue name; ``busy`` addresses hold one unacked message each;
    every running worker is a consumer unless ``silent``."""

    def __init__(self, clock: Clock, pool: FakePool) -> None:
        self.clock = clock
        self.pool = pool
        self.ready: dict[str, int] = {}
        self.busy: set[str] = set()
        self.silent: set[str] = set()
        self.error: Exception | None = None
        self.calls = 0

    def __call__(self, ref: QueueRef) -> Deferred[QueueReading]:
        self.calls += 1
        if self.error is not None:
            return fail(self.error)
        peers = {
            w.address: 1
            for ws in self.pool.running.values()
            for w in ws
            if w.address and w.address not in self.silent
        }
        unacked = {a: 1 for a in self.busy}
        return succeed(
            QueueReading(
                self.ready.get(ref.queue, 0), len(self.busy), len(peers), self.clock.seconds(), peers, unacked
            )
        )


class ServiceTests(SynchronousTestCase):
    """Ticks, launches, graceful scale-down, outages, logs, the snapshot."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = FakePool(self.clock)
        self.reader = FakeReader(self.clock, self.pool)
        self.events: list[dict[str, Any]] = []
        self.patch(service_module, "log", Logger(observer=cast(ILogObserver, self.events.append)))

    def start(self, *entries: Entry, log_every: int = 12) -> AutoscaleService:
        svc = AutoscaleService(entries or (ENTRY,), self.pool, self.reader, self.clock, log_every=log_every)
        svc.startService()
        self.addCleanup(svc.stopService)
        return svc

    def lines(self, level: LogLevel | None = None) -> list[str]:
        return [formatEvent(e) for e in self.events if level is None or e["log_level"] == level]

    def test_scale_up_counts_launches_in_flight(self) -> None:
        """25 messages, target 10: three launches at once; while they wait, the next
        ticks launch no more; the decision is logged with its inputs."""
        self.reader.ready["jobs"] = 25
        svc = self.start()
        self.assertEqual(len(self.pool.pending), 3)
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(len(self.pool.pending), 3)
        self.assertIn(
            "autoscale jobs: queue=jobs ready=25 unacked=0 consumers=0 desired=3 "
            "actual=0: ceil(25/10)=3, activation 1 reached: scale up",
            self.lines()[0],
        )
        snap = svc.snapshot()["jobs"]
        self.assertEqual((snap["Desired"], snap["Actual"], snap["Launching"]), (3, 3, 3))
        self.assertEqual(snap["LastDecision"], "keep 3")
        self.pool.fire()
        self.reader.ready["jobs"] = 45
        self.clock.advance(5)
        self.assertEqual(len(self.pool.pending), 2)  # 5 wanted, 3 running

    def test_scale_down_only_idle_after_lag(self) -> None:
        """Scale-down waits for a reading lag seconds after the last launch, stops only
        workers that hold no unacked message (newest first), and needs them idle over
        two readings (settle = lag)."""
        self.pool.auto = True
        self.reader.ready["jobs"] = 30
        self.start()
        self.assertEqual(self.pool.ids(), ["w1", "w2", "w3"])
        self.reader.ready["jobs"] = 0
        self.reader.busy = {"10.0.0.2", "10.0.0.3"}  # two in hand: want 1
        self.clock.advance(5)  # t=5: first reading after launches at t=0: observe only
        self.assertEqual(self.pool.stopped, [])
        self.clock.advance(5)  # t=10: w1 idle since t=5: stop it
        self.assertEqual(self.pool.stopped, ["w1"])
        self.assertIn("stopping 1 idle (2 busy)", self.lines()[-1])
        self.reader.busy = set()  # both finished: the queue is empty from t=15
        self.clock.advance(5)  # t=15: fresh after the stop at t=10; both idle from now
        self.assertEqual(self.pool.stopped, ["w1"])
        self.clock.advance(5)  # t=20: one goes (cooldown: one stays)
        self.assertEqual(len(self.pool.stopped), 2)
        for _ in range(4):
            self.clock.advance(5)
        self.assertEqual(len(self.pool.stopped), 2)
        self.clock.advance(5)  # t=45: empty since t=15 + cooldown 30
        self.assertEqual(len(self.pool.stopped), 3)
        self.assertIn("queue empty for 30s >= cooldown 30s: scale to 0", self.lines()[-1])
        self.assertEqual(self.pool.ids(), [])

    def test_busy_workers_never_stopped(self) -> None:
        """The queue empties by the numbers, but every worker holds a message: none is
        stopped, however long it lasts."""
        self.pool.auto = True
        self.reader.ready["jobs"] = 50
        self.start(attrs.evolve(ENTRY, cooldown=0))
        self.reader.ready["jobs"] = 0
        self.reader.busy = {f"10.0.0.{i}" for i in range(1, 6)}
        for _ in range(20):
            self.clock.advance(5)
        self.assertEqual(self.pool.stopped, [])
        self.assertIn("5 busy", self.lines()[-1])

    def test_unreachable_never_stops(self) -> None:
        """RabbitMQ unreachable: no launch, no stop, one warning per outage, counted;
        an info line when it answers again."""
        self.pool.auto = True
        self.reader.ready["jobs"] = 50
        svc = self.start(attrs.evolve(ENTRY, cooldown=0))
        self.assertEqual(len(self.pool.ids()), 5)
        self.reader.error = RabbitUnreachable("queue 'jobs': connection refused")
        for _ in range(10):
            self.clock.advance(5)
        self.assertEqual(self.pool.stopped, [])
        self.assertEqual(len(self.pool.ids()), 5)
        warnings = self.lines(LogLevel.warn)
        self.assertEqual(len(warnings), 1)
        self.assertIn("cannot read queue 'jobs' on vhost '/' at http://r:15672", warnings[0])
        self.assertEqual(svc.unreachable_total, 10)
        snap = svc.snapshot()["jobs"]
        self.assertEqual((snap["Unreachable"], snap["Errors"], snap["Ready"]), (10, 10, None))
        self.assertEqual(snap["LastDecision"], "unreachable, keep 5")
        self.reader.error = None
        self.reader.ready["jobs"] = 50
        self.clock.advance(5)
        self.assertIn("RabbitMQ answers again", "\n".join(self.lines(LogLevel.info)))
        self.reader.error = RabbitUnreachable("again")
        self.clock.advance(5)
        self.assertEqual(len(self.lines(LogLevel.warn)), 2)  # a new outage

    def test_cannot_list_workers(self) -> None:
        """No decision without the workers: warned, counted, nothing done."""
        self.pool.down = True
        self.reader.ready["jobs"] = 50
        svc = self.start()
        self.assertEqual(self.pool.pending, [])
        self.assertEqual(svc.snapshot()["jobs"]["Errors"], 1)
        self.assertIn("cannot list the workers: broker says no", self.lines(LogLevel.warn)[0])

    def test_cancel_waiting_launches_first(self) -> None:
        """Fewer wanted while launches still wait (slots busy): those are cancelled,
        no running worker is stopped."""
        self.reader.ready["jobs"] = 40
        self.start()
        self.assertEqual(len(self.pool.pending), 4)
        self.pool.fire(1)
        self.reader.ready["jobs"] = 15
        self.clock.advance(5)
        self.assertEqual([d.called for _, d in self.pool.pending], [False, True, True])
        self.assertEqual(self.pool.stopped, [])
        self.assertIn("cancelled 2 waiting launch(es)", self.lines()[-1])
        self.assertEqual(self.lines(LogLevel.warn), [])  # a cancel is not an error

    def test_launch_failure_logged_once(self) -> None:
        self.pool.launch_error = RuntimeError("no slot for 30 s")
        self.reader.ready["jobs"] = 20
        svc = self.start()
        self.clock.advance(5)
        self.clock.advance(5)
        self.assertEqual(len(self.lines(LogLevel.warn)), 1)
        self.assertIn("launching a worker failed: no slot", self.lines(LogLevel.warn)[0])
        self.assertEqual(svc.snapshot()["jobs"]["Errors"], 6)

    def test_log_every_n_ticks(self) -> None:
        """A tick that changes nothing is logged every log_every ticks."""
        self.start(log_every=4)
        for _ in range(6):
            self.clock.advance(5)
        self.assertEqual(len(self.lines()), 2)  # tick 1 (desired first known), tick 4...
        self.clock.advance(5)
        self.assertEqual(len(self.lines()), 3)  # ...and tick 8

    def test_snapshot_before_a_tick(self) -> None:
        svc = AutoscaleService([ENTRY], self.pool, self.reader, self.clock)
        snap = svc.snapshot()["jobs"]
        self.assertEqual((snap["Desired"], snap["At"], snap["Errors"]), (None, None, 0))
        self.assertEqual(
            set(snap),
            {
                "Queue",
                "Desired",
                "Actual",
                "Ready",
                "Unacked",
                "Consumers",
                "LastDecision",
                "Reason",
                "Errors",
                "Unreachable",
                "Launching",
                "Stopping",
                "Retiring",
                "At",
            },
        )

    def test_stop_loops(self) -> None:
        svc = self.start()
        svc.stopService()
        calls = self.reader.calls
        self.clock.advance(50)
        self.assertEqual(self.reader.calls, calls)


class ReconfigureTests(SynchronousTestCase):
    """reconfigure(): add, remove, change entries without a restart."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.pool = FakePool(self.clock)
        self.pool.auto = True
        self.reader = FakeReader(self.clock, self.pool)
        self.events: list[dict[str, Any]] = []
        self.patch(service_module, "log", Logger(observer=cast(ILogObserver, self.events.append)))
        self.reader.ready["jobs"] = 30
        self.svc = AutoscaleService([ENTRY], self.pool, self.reader, self.clock)
        self.svc.startService()
        self.addCleanup(self.svc.stopService)
        self.assertEqual(self.pool.ids(), ["w1", "w2", "w3"])

    def test_limits_changed_workers_kept(self) -> None:
        """Same worker, new max and interval: workers and state kept, the new limits
        apply at the next tick."""
        self.svc.reconfigure([attrs.evolve(ENTRY, max=2, interval=2)])
        self.assertEqual(self.svc.entries()[0].max, 2)
        self.assertIn("desired=2 actual=3", formatEvent(self.events[-1]))  # ticked at once
        self.assertIn("waiting for statistics 5s newer", formatEvent(self.events[-1]))
        self.clock.advance(4)  # t=4: the launches at t=0 are too recent (lag 5)
        self.assertEqual(self.pool.stopped, [])
        self.clock.advance(2)  # t=6: fresh: idle from now (settle 5 s)
        self.clock.advance(4)  # t=10
        self.assertEqual(self.pool.stopped, [])
        self.clock.advance(2)  # t=12
        self.assertEqual(len(self.pool.stopped), 1)
        self.assertEqual(len(self.pool.ids()), 2)

    def test_added(self) -> None:
        other = attrs.evolve(ENTRY, name="other", queue="other")
        self.reader.ready["other"] = 5
        self.svc.reconfigure([ENTRY, other])
        self.assertEqual(self.pool.ids(other), ["w4"])
        self.assertEqual(set(self.svc.snapshot()), {"jobs", "other"})

    def test_removed_retires_gracefully(self) -> None:
        """A removed entry's workers stop as they become idle, then its loop ends;
        a busy one is never stopped."""
        self.reader.busy = {"10.0.0.1"}
        self.svc.reconfigure([])
        self.assertEqual(set(self.svc.snapshot()), {"jobs (retiring)"})
        self.assertEqual(self.svc.entries(), ())
        for _ in range(4):
            self.clock.advance(5)
        self.assertEqual(sorted(self.pool.stopped), ["w2", "w3"])
        self.assertEqual(self.pool.ids(), ["w1"])
        self.reader.busy = set()
        for _ in range(3):
            self.clock.advance(5)
        self.assertEqual(self.pool.ids(), [])
        self.assertEqual(self.svc.snapshot(), {})
        calls = self.reader.calls
        self.clock.advance(50)
        self.assertEqual(self.reader.calls, calls)
        self.assertIn("retired (no worker left)", formatEvent(self.events[-1]))

    def test_worker_changed(self) -> None:
        """A new image: the old entry retires (its workers drain), the new one starts
        its own; bringing the old one back revives it."""
        new = attrs.evolve(ENTRY, tag="2")
        self.svc.reconfigure([new])
        self.assertEqual(set(self.svc.snapshot()), {"jobs", "jobs (retiring)"})
        self.assertEqual(self.svc.snapshot()["jobs (retiring)"]["Retiring"], True)
        self.assertEqual(self.pool.ids(new), ["w4", "w5", "w6"])
        self.svc.reconfigure([ENTRY])
        self.assertEqual(set(self.svc.snapshot()), {"jobs", "jobs (retiring)"})
        self.assertEqual(self.svc.entries(), (ENTRY,))
        for _ in range(4):
            self.clock.advance(5)
        self.assertEqual(self.pool.ids(), ["w1", "w2", "w3"])  # the revived kept its own
        self.assertEqual(self.pool.ids(new), [])  # tag 2 drained
        self.assertEqual(set(self.svc.snapshot()), {"jobs"})

    def test_reconfigure_before_start(self) -> None:
        svc = AutoscaleService([], self.pool, self.reader, self.clock)
        svc.reconfigure([attrs.evolve(ENTRY, name="later", queue="later")])
        self.assertEqual(self.reader.calls, 1)  # only setUp's service read
        svc.startService()
        self.addCleanup(svc.stopService)
        self.assertEqual(self.reader.calls, 2)
