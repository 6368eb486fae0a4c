"""Deterministic tests of the broker's rules with task.Clock and the FakeEngine."""

from __future__ import annotations

import json

from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.broker.errors import (
    Draining,
    NoCapacity,
    Overloaded,
    QueueTimeout,
    StartFailed,
    StartTimeout,
)
from dockerspaces.broker.model import Lease, Progress
from dockerspaces.engine.interface import ContainerExited, ImageNotFound, PortAllocated

from .test_broker_harness import Harness, spec

A = "x:img:a:80"
B = "x:img:b:80"
C = "x:img:c:80"
Y = "y:img:y:80"
W = "x:img:worker:3"


class WarmAndColdTests(SynchronousTestCase):
    """Warm handover, free-slot starts, eviction, FIFO, release hand-over."""

    def test_warm_handover_immediately(self) -> None:
        """A released container is handed to the next request of its key at once."""
        h = Harness(slots=2, ready_delay=5)
        d = h.acquire(A)
        self.assertNoResult(d)
        h.clock.advance(5)
        first = self.successResultOf(d)
        self.assertEqual(first.queued_for, 5)
        first.release()
        second = self.successResultOf(h.acquire(A))
        self.assertEqual(second.container_id, first.container_id)
        self.assertEqual(second.queued_for, 0)
        self.assertEqual(h.starts(), 1)

    def test_free_slot_starts_new_container(self) -> None:
        """Different keys get containers in different free slots."""
        h = Harness(slots=2)
        la = self.successResultOf(h.acquire(A))
        lb = self.successResultOf(h.acquire(B))
        self.assertNotEqual(la.container_id, lb.container_id)
        self.assertEqual({la.endpoint, lb.endpoint}, {"tcp:127.0.0.1:9100", "tcp:127.0.0.1:9101"})
        self.assertEqual(h.starts(), 2)

    def test_lru_idle_container_of_other_key_is_evicted(self) -> None:
        """With no free slot, the least recently used idle container makes room."""
        h = Harness(slots=2)
        la = self.successResultOf(h.acquire(A))
        lb = self.successResultOf(h.acquire(B))
        h.clock.advance(1)
        la.release()
        h.clock.advance(1)
        lb.release()
        lc = self.successResultOf(h.acquire(C))
        self.assertEqual(lc.endpoint, la.endpoint)
        self.assertNotIn(la.container_id, h.engine.containers)
        self.assertIn(lb.container_id, h.engine.containers)
        self.assertEqual(h.engine.stops, 1)

    def test_eviction_waits_for_the_stop_grace(self) -> None:
        """The evicted container gets --stop seconds; the slot shows Stopping meanwhile."""
        h = Harness(slots=1, stop=5)
        self.successResultOf(h.acquire(A)).release()
        db = h.acquire(B)
        self.assertEqual(h.broker.snapshot()["TargetSlots"][0]["State"], "Stopping")
        h.clock.advance(4.9)
        self.assertNoResult(db)
        self.assertEqual(len(h.engine.running_on(9100)), 1)
        h.clock.advance(0.1)
        self.successResultOf(db)

    def test_start_timeout_while_evicting(self) -> None:
        """The start deadline also covers the wait for the evicted container's stop."""
        h = Harness(slots=1, stop=100, start_timeout=10)
        self.successResultOf(h.acquire(A)).release()
        db = h.acquire(B)
        h.clock.advance(10)
        self.failureResultOf(db, StartTimeout)
        h.clock.advance(90)
        self.assertEqual(h.engine.own(), {})
        self.assertEqual(h.broker.snapshot()["TargetSlots"][0]["State"], "Free")
        self.successResultOf(h.acquire(B))

    def test_busy_containers_are_never_evicted(self) -> None:
        """With every container busy, another key waits; it gets the first freed one."""
        h = Harness(slots=1)
        la = self.successResultOf(h.acquire(A))
        db = h.acquire(B)
        h.clock.advance(100)
        self.assertNoResult(db)
        self.assertIn(la.container_id, h.engine.containers)
        la.release()
        lb = self.successResultOf(db)
        self.assertEqual(lb.endpoint, la.endpoint)
        self.assertNotIn(la.container_id, h.engine.containers)

    def test_fifo_per_key_and_release_hands_over_at_once(self) -> None:
        """Waiters of a key are served oldest first, each on the previous release."""
        h = Harness(slots=1)
        first = self.successResultOf(h.acquire(A))
        ds = [h.acquire(A) for _ in range(3)]
        order: list[int] = []
        for i, d in enumerate(ds):
            d.addCallback(lambda lease, i=i: (order.append(i), lease)[1])
        for d in ds:
            self.assertNoResult(d)
        first.release()
        self.assertEqual(order, [0])
        self.successResultOf(ds[0]).release()
        self.assertEqual(order, [0, 1])
        self.successResultOf(ds[1]).release()
        self.assertEqual(order, [0, 1, 2])
        self.assertEqual(h.starts(), 1)

    def test_release_inside_callback_does_not_recurse(self) -> None:
        """Leases released from inside their own callback keep the broker consistent."""
        h = Harness(slots=1)
        first = self.successResultOf(h.acquire(A))
        got: list[str] = []
        ds = [h.acquire(A) for _ in range(200)]
        for d in ds:
            d.addCallback(lambda lease: (got.append(lease.container_id), lease.release()))
        first.release()
        self.assertEqual(len(got), 200)
        self.assertTrue(h.broker.idle)

    def test_release_is_idempotent(self) -> None:
        """Releasing twice does not hand the container out twice."""
        h = Harness(slots=1)
        first = self.successResultOf(h.acquire(A))
        d1, d2 = h.acquire(A), h.acquire(A)
        first.release()
        first.release()
        self.successResultOf(d1)
        self.assertNoResult(d2)

    def test_gpu_round_robin(self) -> None:
        """Slots get GPUs round-robin; containers inherit their slot's GPU."""
        h = Harness(slots=4, gpus=2)
        leases = [self.successResultOf(h.acquire(f"x:img:k{i}:80")) for i in range(4)]
        gpus = [h.engine.containers[le.container_id].gpu for le in leases]
        self.assertEqual(sorted(gpus), [0, 0, 1, 1])
        snap = h.broker.snapshot()
        self.assertEqual([s["Gpu"] for s in snap["TargetSlots"]], [0, 1, 0, 1])


class ScaleOutTests(SynchronousTestCase):
    """The scale-out rule: bursts of short requests share, long queues scale."""

    def _serve_for(self, h: Harness, d, seconds: float, done: list[Lease]) -> None:
        def got(lease: Lease) -> Lease:
            done.append(lease)
            h.clock.callLater(seconds, lease.release)
            return lease

        d.addCallback(got)

    def test_burst_of_short_requests_does_not_start_20(self) -> None:
        """One page firing 20 short asset requests is served by a single container."""
        h = Harness(slots=20, ready_delay=5)
        done: list[Lease] = []
        for _ in range(20):
            self._serve_for(h, h.acquire(A), 0.05, done)
        for _ in range(200):
            h.clock.advance(0.05)
        self.assertEqual(len(done), 20)
        self.assertEqual(h.starts(), 1)

    def test_queue_of_long_requests_scales_out(self) -> None:
        """Requests that turn out long make further containers start (before any ends)."""
        h = Harness(slots=10, ready_delay=5)
        done: list[Lease] = []
        for _ in range(4):
            self._serve_for(h, h.acquire(A), 300, done)
        for _ in range(60):
            h.clock.advance(1)
        self.assertEqual(len(done), 4)
        self.assertEqual(h.starts(), 4)

    def test_measured_long_service_scales_at_once(self) -> None:
        """With a measured service time above the cold start, a waiter starts a container."""
        h = Harness(slots=10, ready_delay=5)
        lease = self.successResultOf(self._first(h))
        h.clock.advance(120)
        lease.release()  # measured: service 120 s, cold start 5 s
        l1 = self.successResultOf(h.acquire(A))
        d2 = h.acquire(A)
        self.assertEqual(h.starts(), 2)  # started at once for the second request
        h.clock.advance(5)
        self.assertNotEqual(self.successResultOf(d2).container_id, l1.container_id)

    def test_measured_short_service_does_not_scale(self) -> None:
        """With a short measured service time, waiters wait for the busy container."""
        h = Harness(slots=10, ready_delay=5)
        lease = self.successResultOf(self._first(h))
        h.clock.advance(0.1)
        lease.release()
        self.successResultOf(h.acquire(A))
        for _ in range(10):
            h.acquire(A)
        self.assertEqual(h.starts(), 1)

    def test_scale_out_evicts_idle_other_key(self) -> None:
        """The rule applies to evictable slots as well as free ones."""
        h = Harness(slots=2, ready_delay=5)
        h.clock.advance(5)
        db = h.acquire(B)
        h.clock.advance(5)
        self.successResultOf(db).release()
        lease = self.successResultOf(self._first(h))
        h.clock.advance(120)
        lease.release()
        self.successResultOf(h.acquire(A))
        h.acquire(A)
        self.assertEqual(h.engine.stops, 1)  # B's idle container made room
        self.assertEqual(h.starts(), 3)

    def _first(self, h: Harness):
        d = h.acquire(A)
        h.clock.advance(5)
        return d


class SharedAndWorkerTests(SynchronousTestCase):
    """y: sharing and workers."""

    def test_y_shares_one_container(self) -> None:
        """Every y: request goes to the one container at once, no queue."""
        h = Harness(slots=3, ready_delay=5)
        ds = [h.acquire(Y) for _ in range(5)]
        h.clock.advance(5)
        leases = [self.successResultOf(d) for d in ds]
        self.assertEqual({le.container_id for le in leases}, {leases[0].container_id})
        self.assertEqual(h.starts(), 1)
        more = self.successResultOf(h.acquire(Y))
        self.assertEqual(more.container_id, leases[0].container_id)
        self.assertEqual(h.broker.snapshot()["TargetSlots"][0]["InFlight"], 6)

    def test_y_not_evictable_while_in_flight(self) -> None:
        """A y: container with a stream in flight is not evicted; it is once idle."""
        h = Harness(slots=1, queue_timeout=5000)
        l1 = self.successResultOf(h.acquire(Y))
        l2 = self.successResultOf(h.acquire(Y))
        dx = h.acquire(A)
        h.clock.advance(1000)
        self.assertNoResult(dx)
        l1.release()
        self.assertNoResult(dx)
        l2.release()
        self.successResultOf(dx)
        self.assertNotIn(l1.container_id, h.engine.containers)

    def test_y_not_counted_in_source(self) -> None:
        """y: requests are not limited by --source."""
        h = Harness(slots=1, source=1, queue=0)
        leases = [self.successResultOf(h.acquire(Y)) for _ in range(5)]
        self.assertEqual(len(leases), 5)

    def test_worker_fires_once_started_and_is_protected(self) -> None:
        """A worker is protected for --release seconds, then evictable."""
        h = Harness(slots=1, ready_delay=2, release=100)
        dw = h.broker.launch_worker(spec(W))
        self.assertNoResult(dw)
        h.clock.advance(2)
        handle = self.successResultOf(dw)
        self.assertIn(handle.id, h.engine.containers)
        dx = h.acquire(A)
        h.clock.advance(99)
        self.assertNoResult(dx)
        self.assertIn(handle.id, h.engine.containers)
        h.clock.advance(1)
        self.assertNotIn(handle.id, h.engine.containers)
        h.clock.advance(2)
        self.successResultOf(dx)

    def test_each_worker_launch_starts_one_more(self) -> None:
        """Worker launches of the same spec each start their own container."""
        h = Harness(slots=3, worker_slots=3)
        handles = [self.successResultOf(h.broker.launch_worker(spec(W))) for _ in range(3)]
        self.assertEqual(len({hd.id for hd in handles}), 3)
        self.assertEqual(h.starts(), 3)

    def test_worker_timeout_503(self) -> None:
        """A worker launch with no slot for --worker-timeout fails with NoCapacity."""
        h = Harness(slots=1, worker_timeout=10)
        self.successResultOf(h.acquire(A))
        dw = h.broker.launch_worker(spec(W))
        h.clock.advance(9.9)
        self.assertNoResult(dw)
        h.clock.advance(0.1)
        err = self.failureResultOf(dw, NoCapacity).value
        self.assertEqual(err.status, 503)
        self.assertIsNotNone(err.retry_after)
        self.assertIn("worker", str(err))

    def test_worker_views_list_running_workers_oldest_first(self) -> None:
        """worker_views names the running workers of a spec with host and start time;
        x: containers and other specs are not listed."""
        h = Harness(slots=3, worker_slots=3)
        first = self.successResultOf(h.broker.launch_worker(spec(W)))
        h.clock.advance(7)
        second = self.successResultOf(h.broker.launch_worker(spec(W)))
        self.successResultOf(h.acquire(A))
        views = h.broker.worker_views(spec(W))
        self.assertEqual([v.id for v in views], [first.id, second.id])
        t0 = h.clock.seconds() - 7
        self.assertEqual([v.since for v in views], [t0, t0 + 7])
        self.assertEqual({v.host for v in views}, {"h0"})
        self.assertEqual(h.broker.worker_views(spec("x:img:other:3")), [])

    def test_stop_worker_terms_with_grace_and_frees_the_slot(self) -> None:
        """stop_worker stops one worker with the --stop grace; it fires once the slot
        is free, and the worker is no longer listed."""
        h = Harness(slots=1, stop=10)
        handle = self.successResultOf(h.broker.launch_worker(spec(W)))
        d = h.broker.stop_worker(handle.id)
        self.assertEqual(h.broker.worker_views(spec(W)), [])
        dx = h.acquire(A)
        h.clock.advance(9.9)  # SIGTERM sent; the fake worker ignores it until the grace
        self.assertNoResult(d)
        self.assertIn(handle.id, h.engine.containers)
        h.clock.advance(0.1)
        self.successResultOf(d)
        self.assertNotIn(handle.id, h.engine.containers)
        self.successResultOf(dx)
        self.successResultOf(h.broker.stop_worker(handle.id))  # gone already: nothing to do

    def test_stop_worker_refuses_other_containers(self) -> None:
        """Only workers are stopped through stop_worker."""
        h = Harness(slots=1)
        lease = self.successResultOf(h.acquire(A))
        self.assertRaises(ValueError, h.broker.stop_worker, lease.container_id)

    def test_worker_dying_frees_its_slot(self) -> None:
        """A worker that exits frees its slot for others."""
        h = Harness(slots=1, release=1000)
        handle = self.successResultOf(h.broker.launch_worker(spec(W)))
        dx = h.acquire(A)
        self.assertNoResult(dx)
        h.engine.crash(handle.id)
        self.successResultOf(dx)


class AdmissionTests(SynchronousTestCase):
    """--source, --queue, --queue-timeout, --start-timeout."""

    def test_source_queue_and_overflow(self) -> None:
        """Beyond --source requests queue; beyond --queue they fail at once."""
        h = Harness(slots=1, source=2, queue=1)
        l1 = self.successResultOf(h.acquire(A))
        d2 = h.acquire(A)  # admitted, waiting for the container
        d3 = h.acquire(A)  # admission queue
        d4 = h.acquire(A)
        err = self.failureResultOf(d4, Overloaded).value
        self.assertEqual((err.status, err.retry_after is not None), (503, True))
        self.assertEqual(h.broker.snapshot()["Admission"]["Queued"], 1)
        l1.release()
        l2 = self.successResultOf(d2)
        self.assertNoResult(d3)
        l2.release()
        self.successResultOf(d3)

    def test_source_counts_workers(self) -> None:
        """Worker launches waiting for a slot count against --source."""
        h = Harness(slots=1, source=2, queue=0)
        self.successResultOf(h.acquire(A))
        dw = h.broker.launch_worker(spec(W))
        self.failureResultOf(h.acquire(A), Overloaded)
        dw.cancel()
        self.failureResultOf(dw, CancelledError)

    def test_queue_timeout(self) -> None:
        """No container within --queue-timeout: 503 with Retry-After."""
        h = Harness(slots=1, queue_timeout=10)
        self.successResultOf(h.acquire(A))
        d = h.acquire(A)
        h.clock.advance(9)
        self.assertNoResult(d)
        h.clock.advance(1)
        err = self.failureResultOf(d, QueueTimeout).value
        self.assertEqual(err.status, 503)
        self.assertIsNotNone(err.retry_after)

    def test_queue_timeout_in_admission_queue(self) -> None:
        """The queue timeout also covers the wait for admission."""
        h = Harness(slots=1, source=1, queue=5, queue_timeout=10)
        self.successResultOf(h.acquire(A))
        d = h.acquire(B)
        h.clock.advance(10)
        self.failureResultOf(d, QueueTimeout)
        self.assertEqual(h.broker.waiting(), 0)

    def test_start_timeout_504(self) -> None:
        """pull + start + ready beyond --start-timeout: 504, container removed, slot free
        (the shorter queue timeout stopped counting once the start was under way)."""
        h = Harness(slots=1, ready_delay=1000, start_timeout=60, queue_timeout=10)
        d = h.acquire(A)
        h.clock.advance(60)
        err = self.failureResultOf(d, StartTimeout).value
        self.assertEqual(err.status, 504)
        self.assertEqual(h.engine.own(), {})
        self.assertEqual(h.broker.snapshot()["TargetSlots"][0]["State"], "Free")
        self.assertIsNotNone(h.broker.snapshot()["TargetSlots"][0]["LastError"])

    def test_cancel_leaves_the_queue(self) -> None:
        """A cancelled waiter is skipped: the next one gets the container."""
        h = Harness(slots=1)
        l1 = self.successResultOf(h.acquire(A))
        d2, d3 = h.acquire(A), h.acquire(A)
        d2.cancel()
        self.failureResultOf(d2, CancelledError)
        self.assertEqual(h.broker.snapshot()["Queues"], {spec(A).display: 1})
        l1.release()
        self.successResultOf(d3)

    def test_cancel_in_admission_queue(self) -> None:
        """A cancelled request in the admission queue frees its place."""
        h = Harness(slots=1, source=1, queue=1)
        self.successResultOf(h.acquire(A))
        d2 = h.acquire(A)
        d2.cancel()
        self.failureResultOf(d2, CancelledError)
        self.assertNoResult(h.acquire(A))

    def test_abandoned_cold_start_finishes_and_stays_warm(self) -> None:
        """A cold start every waiter abandoned still finishes; the next request is warm."""
        h = Harness(slots=1, ready_delay=5)
        d = h.acquire(A)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        h.clock.advance(5)
        self.assertEqual(len(h.engine.own()), 1)
        lease = self.successResultOf(h.acquire(A))
        self.assertEqual(lease.queued_for, 0)
        self.assertEqual(h.starts(), 1)
        self.assertTrue(h.broker.idle is False)
        lease.release()
        self.assertTrue(h.broker.idle)


class FailureTests(SynchronousTestCase):
    """Crashes, failed starts, host outages."""

    def test_crash_mid_request_frees_slot(self) -> None:
        """A container dying mid-request frees its slot; its lease's release is a no-op."""
        h = Harness(slots=1)
        la = self.successResultOf(h.acquire(A))
        db = h.acquire(B)
        self.assertNoResult(db)
        h.engine.crash(la.container_id)
        lb = self.successResultOf(db)
        self.assertEqual(lb.endpoint, la.endpoint)
        la.release()
        self.assertEqual(h.broker.containers()[0].id, lb.container_id)
        self.assertEqual(h.engine.running_on(9100)[0].id, lb.container_id)

    def test_idle_container_dying_is_forgotten(self) -> None:
        """An idle container that dies is forgotten and removed; the next request starts anew."""
        h = Harness(slots=1)
        la = self.successResultOf(h.acquire(A))
        la.release()
        h.engine.crash(la.container_id)
        self.assertEqual(h.engine.own(), {})
        lb = self.successResultOf(h.acquire(A))
        self.assertNotEqual(lb.container_id, la.container_id)

    def test_failed_start_fails_waiters_and_next_retries(self) -> None:
        """An exit while starting fails every waiter with the log tail; the next retries."""
        h = Harness(slots=1)
        h.engine.fail_next_ready(ContainerExited("exited with code 1", 1, "Traceback: boom"))
        seen: list[Progress] = []
        d1 = h.acquire(A, progress=seen.append)
        err = self.failureResultOf(d1, StartFailed).value
        self.assertEqual(err.status, 502)
        self.assertIn("boom", str(err))
        self.assertEqual(seen[-1].state, "failed")
        self.assertEqual(h.engine.own(), {})
        self.successResultOf(h.acquire(A))

    def test_failed_start_fails_all_its_waiters(self) -> None:
        """Waiters queued behind a cold start that fails all get the reason."""
        h = Harness(slots=1, ready_delay=5)
        ds = [h.acquire(A) for _ in range(3)]
        h.engine.crash(next(iter(h.engine.containers)), log_tail="OOM in model load")
        for d in ds:
            self.assertIn("OOM in model load", str(self.failureResultOf(d, StartFailed).value))
        self.assertEqual(h.broker.snapshot()["TargetSlots"][0]["State"], "Free")

    def test_pull_failure(self) -> None:
        """A pull error fails the waiters with StartFailed naming the engine's message."""
        h = Harness(slots=1)
        h.engine.fail_pull("img:a", ImageNotFound("manifest for img:a not found"))
        err = self.failureResultOf(h.acquire(A), StartFailed).value
        self.assertIn("manifest for img:a not found", str(err))
        h.engine.fail_pull("img:a", None)
        self.successResultOf(h.acquire(A))

    def test_lease_failed_replaces_container(self) -> None:
        """Lease.failed() has the container stopped; the next request gets a fresh one."""
        h = Harness(slots=1)
        la = self.successResultOf(h.acquire(A))
        la.failed()
        self.assertNotIn(la.container_id, h.engine.containers)
        lb = self.successResultOf(h.acquire(A))
        self.assertNotEqual(lb.container_id, la.container_id)

    def test_host_down_and_up(self) -> None:
        """A host failing ping is not used; when it answers again its containers are adopted."""
        h = Harness(slots=1, hosts=2)
        la = self.successResultOf(h.acquire(A))
        host_a = "h0" if la.endpoint.endswith(":9100") else "h1"
        other = "h1" if host_a == "h0" else "h0"
        la.release()
        h.engines[host_a].set_down(True)
        h.clock.advance(5)
        snap = h.broker.snapshot()
        self.assertEqual({x["Name"]: x["Up"] for x in snap["Hosts"]}, {host_a: False, other: True})
        lb = self.successResultOf(h.acquire(A))  # served on the other host
        self.assertIn(lb.container_id, h.engines[other].containers)
        h.engines[host_a].set_down(False)
        h.clock.advance(5)
        self.assertTrue(all(x["Up"] for x in h.broker.snapshot()["Hosts"]))
        lc = self.successResultOf(h.acquire(A))  # the adopted container on the first host
        self.assertEqual(lc.container_id, la.container_id)
        self.assertEqual(h.starts(), 2)

    def test_every_host_down_is_503_at_once(self) -> None:
        """With every host down a request fails at once with NoCapacity."""
        h = Harness(slots=1)
        h.engine.set_down(True)
        h.clock.advance(5)
        err = self.failureResultOf(h.acquire(A), NoCapacity).value
        self.assertEqual(err.status, 503)

    def test_no_slots_is_503(self) -> None:
        """--target 0: every x:/y: request fails with NoCapacity."""
        h = Harness(slots=0)
        self.failureResultOf(h.acquire(A), NoCapacity)

    def test_start_on_down_host_moves_elsewhere(self) -> None:
        """A cold start failing with EngineUnreachable marks the host down; work moves."""
        h = Harness(slots=1, hosts=2)
        h.engines["h0"].set_down(True)
        lease = self.successResultOf(h.acquire(A))
        self.assertIn(lease.container_id, h.engines["h1"].containers)


class LifecycleTests(SynchronousTestCase):
    """Adoption at start-up, shutdown and the monitor snapshot."""

    def test_adoption(self) -> None:
        """Ours are adopted (matching slot) or removed; other instances' are untouched."""
        h = Harness(slots=2, start=False)
        e = h.engine
        ours = e.seed(spec(A), 9100)
        stopped = e.seed(spec(B), 9101, running=False)
        no_slot = e.seed(spec(B), 9555)
        no_spec = e.seed(None, 9101)
        theirs = e.seed(spec(C), 9300, instance="other")
        self.successResultOf(h.broker.start())
        self.assertEqual(set(e.containers), {ours, theirs})
        lease = self.successResultOf(h.acquire(A))
        self.assertEqual(lease.container_id, ours)
        self.assertEqual(h.starts(), 0)
        self.assertNotIn(stopped, e.containers)
        self.assertNotIn(no_slot, e.containers)
        self.assertNotIn(no_spec, e.containers)

    def test_adopted_workers_then_evictable(self) -> None:
        """An adopted worker is protected for --release from adoption, then evictable."""
        h = Harness(slots=1, release=50, start=False)
        wid = h.engine.seed(spec(W), 9100)
        self.successResultOf(h.broker.start())
        d = h.acquire(A)
        h.clock.advance(49)
        self.assertNoResult(d)
        h.clock.advance(1)
        self.successResultOf(d)
        self.assertNotIn(wid, h.engine.containers)

    def test_shutdown_drains_then_stops(self) -> None:
        """Shutdown refuses new work, waits for leases, then stops our containers."""
        h = Harness(slots=2)
        la = self.successResultOf(h.acquire(A))
        waiting = h.acquire(A)
        self.successResultOf(h.acquire(B)).release()
        theirs = h.engine.seed(spec(C), 9300, instance="other")
        d = h.broker.shutdown(keep_containers=False, drain_timeout=30)
        self.failureResultOf(waiting, Draining)
        err = self.failureResultOf(h.acquire(A), Draining).value
        self.assertEqual(err.status, 503)
        self.assertNoResult(d)
        h.clock.advance(10)
        self.assertNoResult(d)
        la.release()
        self.successResultOf(d)
        self.assertEqual(set(h.engine.containers), {theirs})

    def test_shutdown_keep_containers(self) -> None:
        """keep_containers leaves them running for the next start to adopt."""
        h = Harness(slots=2)
        self.successResultOf(h.acquire(A)).release()
        self.successResultOf(h.broker.shutdown(keep_containers=True))
        self.assertEqual(len(h.engine.own()), 1)

    def test_shutdown_drain_is_bounded(self) -> None:
        """A lease never released does not hold shutdown beyond drain_timeout."""
        h = Harness(slots=1, stop=3)
        self.successResultOf(h.acquire(A))
        d = h.broker.shutdown(keep_containers=False, drain_timeout=30)
        h.clock.advance(30)
        self.assertNoResult(d)  # SIGTERM sent, SIGKILL after --stop 3 s
        h.clock.advance(3)
        self.successResultOf(d)
        self.assertEqual(h.engine.own(), {})

    def test_snapshot_shape(self) -> None:
        """The monitor JSON has SPEC's shape, fixed-length arrays, and no env values."""
        h = Harness(slots=3, source=4, ready_delay=5)
        secret = "x:img:a:80:TOKEN=hunter2;MODE=fast"
        d = h.acquire(secret)
        h.clock.advance(5)
        self.successResultOf(d)
        h.acquire(secret)
        snap = h.broker.snapshot()
        text = json.dumps(snap)
        self.assertNotIn("hunter2", text)
        self.assertNotIn("fast", text)
        self.assertEqual(
            {k: snap[k] for k in ("SourceName", "TargetName", "LoopSleep", "ReleaseTimeout")},
            {"SourceName": "TCP", "TargetName": "Docker", "LoopSleep": 0, "ReleaseTimeout": 1800},
        )
        self.assertEqual(len(snap["SourceSlots"]), 4)
        self.assertEqual(len(snap["TargetSlots"]), 3)
        src = snap["SourceSlots"]
        self.assertEqual([s["State"] for s in src], ["Run", "Wait", "Free", "Free"])
        for s in src:
            self.assertEqual(set(s), {"State", "Since", "SlotType", "RunInfo", "RefInfo", "Key"})
        self.assertEqual(src[0]["RefInfo"], "127.0.0.1:9100")
        self.assertEqual(src[0]["SlotType"], "x:img:a")
        self.assertEqual(src[0]["Key"], spec(secret).display)
        self.assertIsInstance(src[0]["Since"], int)
        tgt = snap["TargetSlots"]
        for s in tgt:
            self.assertLessEqual(
                {
                    "State",
                    "Since",
                    "SlotType",
                    "RunInfo",
                    "RefInfo",
                    "Host",
                    "Port",
                    "Gpu",
                    "Container",
                    "Key",
                    "InFlight",
                    "LastError",
                },
                set(s),
            )
        self.assertEqual(tgt[0]["State"], "Run")
        self.assertEqual(tgt[0]["InFlight"], 1)
        self.assertEqual([t["Port"] for t in tgt], [9100, 9101, 9102])
        self.assertEqual(tgt[1]["State"], "Free")
        self.assertEqual(snap["Queues"], {spec(secret).display: 1})

    def test_progress_is_published(self) -> None:
        """Waiters see queued, pulling, starting and ready."""
        h = Harness(slots=1, pull_delay=3, ready_delay=2)
        seen: list[Progress] = []
        d = h.acquire(A, progress=seen.append)
        h.clock.advance(3)
        h.clock.advance(2)
        self.successResultOf(d)
        states = [p.state for p in seen]
        self.assertEqual(states[0], "queued")
        self.assertIn("pulling", states)
        self.assertIn("starting", states)
        self.assertEqual(states[-1], "ready")
        self.assertLess(states.index("pulling"), states.index("starting"))

    def test_queue_positions(self) -> None:
        """A waiter's position moves up as those ahead are served."""
        h = Harness(slots=1)
        first = self.successResultOf(h.acquire(A))
        seen: list[Progress] = []
        h.acquire(A)
        h.acquire(A, progress=seen.append)
        self.assertEqual(seen[-1].position, 2)
        first.release()
        self.assertEqual(seen[-1].position, 1)


class ContainerEventHookTests(SynchronousTestCase):
    """The broker reports container events (for logs and metrics) through its hook."""

    def test_lifecycle_events(self) -> None:
        h = Harness(slots=1, pull_delay=2, ready_delay=3)
        d = h.acquire(A)
        h.clock.advance(2)
        h.clock.advance(3)
        lease = self.successResultOf(d)
        lease.release()
        events = [e[0] for e in h.container_events]
        self.assertEqual(events, ["pull-start", "pull-end", "create", "start", "ready"])
        pull_end = h.container_events[1]
        self.assertEqual(pull_end[3], 2)
        ready = h.container_events[4]
        self.assertEqual((ready[2], ready[3]), (9100, 3))
        self.assertNoResult(h.acquire(B))  # evicts A's idle container, starts B
        self.assertIn("evict", [e[0] for e in h.container_events])

    def test_crash_event(self) -> None:
        h = Harness(slots=1)
        lease = self.successResultOf(h.acquire(A))
        h.engine.crash(lease.container_id, exit_code=137)
        crash = [e for e in h.container_events if e[0] == "crash"]
        self.assertEqual(len(crash), 1)
        self.assertEqual(crash[0][4], "exit 137")
        self.assertNotIn("secret", str(h.container_events))


class PortTakenTests(SynchronousTestCase):
    """A slot whose port something else holds is quarantined; waiters go elsewhere."""

    def test_waiter_served_by_another_slot(self) -> None:
        h = Harness(slots=2)
        h.engine.fail_next_start(PortAllocated("port 9100 on h0 is already in use by something else"))
        lease = self.successResultOf(h.acquire(A))
        self.assertEqual(lease.endpoint, "tcp:127.0.0.1:9101")
        snap = h.broker.snapshot()
        self.assertIn("already in use", snap["TargetSlots"][0]["LastError"])
        lease.release()
        # while quarantined, a second key evicts rather than using the blocked slot
        lb = self.successResultOf(h.acquire(B))
        self.assertEqual(lb.endpoint, "tcp:127.0.0.1:9101")
        lb.release()
        h.clock.advance(61)  # quarantine over: the slot is used again
        la = self.successResultOf(h.acquire(A))
        self.assertEqual(la.endpoint, "tcp:127.0.0.1:9100")
