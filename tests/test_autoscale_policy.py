"""The autoscaling rules (dockerspaces.autoscale.policy): how many workers, which ones
may stop. Time comes from a task.Clock; readings are made by hand."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.autoscale.policy import (
    Decision,
    IdleTracker,
    Limits,
    Occupancy,
    Policy,
    Reading,
    WorkerContainer,
    worker_state,
)

LIMITS = Limits(target=10, activation=1, min=0, max=5, cooldown=300, stabilization=60)


class PolicyTests(SynchronousTestCase):
    """Policy.decide through time."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.policy = Policy(LIMITS)

    def decide(self, depth: int, actual: int, unacked: int = 0, after: float = 5) -> Decision:
        self.clock.advance(after)
        now = self.clock.seconds()
        return self.policy.decide(Reading(depth - unacked, unacked, actual, now), actual, now)

    def test_scale_up_at_once(self) -> None:
        """ceil((ready + unacked) / target) at once, unacked counted (KEDA counts only
        ready messages)."""
        d = self.decide(25, 1)
        self.assertEqual(d.desired, 3)
        self.assertIn("ceil(25/10)=3", d.reason)
        self.assertIn("scale up", d.reason)
        d = self.decide(30, 3, unacked=30)  # all in hand: still 3 wanted
        self.assertEqual(d.desired, 3)

    def test_max_and_min(self) -> None:
        """Clamped to max; min is kept even with an empty queue (no activation needed)."""
        d = self.decide(1000, 1)
        self.assertEqual(d.desired, 5)
        self.assertIn("clamped to max 5", d.reason)
        p = Policy(Limits(target=10, min=2, max=5, cooldown=0, stabilization=0))
        d = p.decide(Reading(0, 0, 0, 0), 0, 0)
        self.assertEqual(d.desired, 2)
        self.assertIn("clamped to min 2", d.reason)
        self.assertEqual(p.decide(Reading(0, 0, 2, 1000), 2, 1000).desired, 2)

    def test_activation(self) -> None:
        """From 0, start only when ready + unacked >= activation; then follow the queue
        (a few messages below activation keep running workers)."""
        self.policy.limits = Limits(target=10, activation=5, max=5)
        d = self.decide(4, 0)
        self.assertEqual(d.desired, 0)
        self.assertIn("below activation 5", d.reason)
        d = self.decide(5, 0)
        self.assertEqual(d.desired, 1)
        self.assertIn("activation 5 reached", d.reason)
        self.assertEqual(self.decide(3, 1).desired, 1)

    def test_cooldown_to_zero(self) -> None:
        """With workers running, 0 only after the queue has been empty for cooldown
        seconds; one stays until then; a message restarts the cooldown."""
        self.assertEqual(self.decide(20, 0).desired, 2)
        self.clock.advance(100)  # stabilization window passed
        d = self.decide(0, 2)
        self.assertEqual(d.desired, 1)
        self.assertIn("< cooldown 300s: keep 1", d.reason)
        self.assertEqual(self.decide(0, 1, after=200).desired, 1)
        self.assertEqual(self.decide(1, 1, after=50).desired, 1)  # a message: restart
        self.assertEqual(self.decide(0, 1, after=5).desired, 1)
        self.assertEqual(self.decide(0, 1, after=299).desired, 1)
        d = self.decide(0, 1, after=1)
        self.assertEqual(d.desired, 0)
        self.assertIn("queue empty for 300s >= cooldown 300s: scale to 0", d.reason)
        self.assertEqual(self.decide(0, 0).desired, 0)

    def test_stabilization(self) -> None:
        """Scaling down takes the highest recommendation of the last 60 s (HPA)."""
        self.assertEqual(self.decide(50, 0, after=0).desired, 5)  # t=0
        self.assertEqual(self.decide(20, 5, after=10).desired, 5)  # t=10: 2 wanted
        d = self.decide(20, 5, after=45)  # t=55: 5 still in the window
        self.assertEqual(d.desired, 5)
        self.assertIn("keep 5 (stabilization)", d.reason)
        d = self.decide(20, 5, after=10)  # t=65: the 5 of t=0 left the window
        self.assertEqual(d.desired, 2)
        self.assertIn("scale down", d.reason)
        # a recommendation between the two: down to it first
        self.assertEqual(self.decide(35, 2, after=5).desired, 4)  # t=70 up at once
        self.assertEqual(self.decide(10, 4, after=5).desired, 4)  # t=75
        self.assertEqual(self.decide(30, 4, after=30).desired, 4)  # t=105: 3
        d = self.decide(10, 4, after=31)  # t=136: window (76, 136]: 3 and 1
        self.assertEqual(d.desired, 3)
        self.assertIn("highest in the last 60s is 3", d.reason)

    def test_stabilization_never_above_actual(self) -> None:
        """The window's highest recommendation does not scale up by itself."""
        self.assertEqual(self.decide(50, 0).desired, 5)
        self.assertEqual(self.decide(10, 2).desired, 2)  # only 2 run (slots): keep 2

    def test_unreachable_keeps_actual(self) -> None:
        """No reading: desired = actual, whatever the history; the cooldown restarts."""
        self.decide(50, 0)
        d = self.policy.decide(None, 4, self.clock.seconds())
        self.assertEqual(d.desired, 4)
        self.assertIn("RabbitMQ unreachable", d.reason)
        self.clock.advance(100)
        self.assertEqual(self.decide(0, 1).desired, 1)  # empty from now on
        self.assertEqual(self.decide(0, 1, after=250).desired, 1)
        self.policy.decide(None, 1, self.clock.seconds())  # outage: cooldown restarts
        self.assertEqual(self.decide(0, 1, after=100).desired, 1)
        self.assertEqual(self.decide(0, 1, after=295).desired, 1)
        self.assertEqual(self.decide(0, 1, after=5).desired, 0)

    def test_zero_stays_zero(self) -> None:
        """An empty queue with no worker: 0, nothing to do."""
        d = self.decide(0, 0)
        self.assertEqual(d.desired, 0)
        self.assertNotIn("scale", d.reason)


W_OLD = WorkerContainer("old", "10.0.0.1", 0)
W_MID = WorkerContainer("mid", "10.0.0.2", 10)
W_NEW = WorkerContainer("new", "10.0.0.3", 20)


class IdleTests(SynchronousTestCase):
    """Which workers may stop: never one holding an unacknowledged message."""

    def test_states(self) -> None:
        occ = Occupancy({"10.0.0.1": 1, "10.0.0.2": 1}, {"10.0.0.2": 1})
        self.assertEqual(worker_state(W_OLD, occ, 100, 30), "idle")
        self.assertEqual(worker_state(W_MID, occ, 100, 30), "busy")
        self.assertEqual(worker_state(W_NEW, occ, 40, 30), "connecting")
        self.assertEqual(worker_state(W_NEW, occ, 51, 30), "idle")  # no consumer, grace over
        self.assertEqual(worker_state(WorkerContainer("x", None, 0), occ, 100, 30), "unknown")

    def test_busy_workers_never_chosen(self) -> None:
        """Asked for 3 with every worker busy but one: only the idle one."""
        occ = Occupancy({"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 1}, {"10.0.0.1": 1, "10.0.0.3": 2})
        t = IdleTracker()
        workers = [W_OLD, W_MID, W_NEW]
        t.observe(workers, occ, 100, 30)
        sel = t.choose(workers, occ, 3, 100, 30, settle=0)
        self.assertEqual(sel.ids, ("mid",))
        self.assertEqual(sel.busy, 2)
        self.assertEqual(sel.summary(), "stopping 1 idle (2 busy)")
        busy = Occupancy(
            {"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 1}, {"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 1}
        )
        t.observe(workers, busy, 105, 30)
        self.assertEqual(t.choose(workers, busy, 3, 105, 30, settle=0).ids, ())

    def test_unacked_on_any_channel_of_the_address(self) -> None:
        """Unacked messages at the worker's address on a channel that is not the
        consumer's still make it busy; so does an address shared by two workers."""
        shared = [WorkerContainer("a", "10.0.0.9", 0), WorkerContainer("b", "10.0.0.9", 5)]
        occ = Occupancy({"10.0.0.9": 2}, {"10.0.0.9": 1})
        t = IdleTracker()
        t.observe(shared, occ, 100, 30)
        self.assertEqual(t.choose(shared, occ, 2, 100, 30, settle=0).ids, ())

    def test_newest_first_and_count(self) -> None:
        occ = Occupancy({"10.0.0.1": 1, "10.0.0.2": 1, "10.0.0.3": 1}, {})
        t = IdleTracker()
        workers = [W_OLD, W_MID, W_NEW]
        t.observe(workers, occ, 100, 30)
        self.assertEqual(t.choose(workers, occ, 2, 100, 30, settle=0).ids, ("new", "mid"))
        self.assertEqual(t.choose(workers, occ, 0, 100, 30, settle=0).ids, ())

    def test_connecting_within_grace(self) -> None:
        """A worker without a consumer is left alone during the grace, then may stop."""
        occ = Occupancy({"10.0.0.1": 1}, {})
        t = IdleTracker()
        workers = [W_OLD, W_NEW]
        t.observe(workers, occ, 45, 30)
        sel = t.choose(workers, occ, 2, 45, 30, settle=0)
        self.assertEqual((sel.ids, sel.connecting), (("old",), 1))
        t.observe(workers, occ, 55, 30)
        self.assertEqual(t.choose(workers, occ, 2, 55, 30, settle=0).ids, ("new", "old"))

    def test_settle(self) -> None:
        """Idle must hold across readings ``settle`` seconds apart; busy in between
        starts over."""
        idle = Occupancy({"10.0.0.1": 1}, {})
        busy = Occupancy({"10.0.0.1": 1}, {"10.0.0.1": 1})
        t = IdleTracker()
        t.observe([W_OLD], idle, 100, 30)
        sel = t.choose([W_OLD], idle, 1, 100, 30, settle=5)
        self.assertEqual((sel.ids, sel.settling), ((), 1))
        t.observe([W_OLD], busy, 105, 30)
        t.observe([W_OLD], idle, 110, 30)
        self.assertEqual(t.choose([W_OLD], idle, 1, 110, 30, settle=5).ids, ())
        t.observe([W_OLD], idle, 115, 30)
        self.assertEqual(t.choose([W_OLD], idle, 1, 115, 30, settle=5).ids, ("old",))
        t.forget("old")
        self.assertEqual(t.choose([W_OLD], idle, 1, 115, 30, settle=5).ids, ())

    def test_unknown_address_never(self) -> None:
        w = WorkerContainer("x", None, 0)
        t = IdleTracker()
        occ = Occupancy({}, {})
        t.observe([w], occ, 100, 30)
        sel = t.choose([w], occ, 1, 100, 30, settle=0)
        self.assertEqual((sel.ids, sel.unknown), ((), 1))
        self.assertIn("1 without address", sel.summary())

    def test_unmapped_consumers_stop_nothing(self) -> None:
        """Consumers exist but none at a worker's address (NAT: every worker would look
        like one without a consumer): nobody is chosen."""
        occ = Occupancy({"192.168.1.10": 3}, {})
        t = IdleTracker()
        workers = [W_OLD, W_MID]
        t.observe(workers, occ, 100, 30)
        sel = t.choose(workers, occ, 2, 100, 30, settle=0)
        self.assertTrue(sel.unmapped)
        self.assertEqual(sel.ids, ())
        self.assertIn("NAT", sel.summary())
