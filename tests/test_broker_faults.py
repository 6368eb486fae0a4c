"""The broker under faults (issue 12): requests handed back unforwarded, crashes counted
once, the queue timeout paused while a start is under way, starts retried after a
removal from outside, worker limits, bounded key table, late creates removed."""

from __future__ import annotations

from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.broker.broker import MAX_RETRIES, START_RETRIES, redact
from dockerspaces.broker.errors import (
    BackendRefused,
    NoCapacity,
    QueueTimeout,
    StartFailed,
    StartTimeout,
)
from dockerspaces.engine.interface import ContainerExited, ContainerRemoved, RunOptions
from dockerspaces.spec import JobSpec

from .test_broker_harness import Harness, spec

A = "x:img:a:80"
B = "x:img:b:80"
Y = "y:img:y:80"
W = "x:img:worker:3"


def events(h: Harness, kind: str) -> list[tuple[object, ...]]:
    """The container hook's events of one kind."""
    return [e for e in h.container_events if e[0] == kind]


class RetryTests(SynchronousTestCase):
    """``Lease.retry``: a request that never reached its container is served again."""

    def test_retry_goes_to_another_idle_container(self) -> None:
        """The dead container is counted as a crash at once (not "stop"/"evict") and
        the request gets the other warm container; the later die event counts nothing."""
        h = Harness(slots=2)
        l1, d2 = self.successResultOf(h.acquire(A)), h.acquire(A)
        h.clock.advance(31)  # the scale-out rule starts a second container
        l2 = self.successResultOf(d2)
        l2.release()
        d = l1.retry()
        l3 = self.successResultOf(d)
        self.assertEqual(l3.container_id, l2.container_id)
        self.assertEqual(len(events(h, "crash")), 1)
        self.assertEqual((events(h, "stop"), events(h, "evict")), ([], []))
        self.assertNotIn(l1.container_id, h.engine.containers)  # removed at once
        self.assertEqual(
            h.broker.snapshot()["TargetSlots"][0]["LastError"],
            "refused or reset a connection before answering",
        )
        l3.release()
        self.assertTrue(h.broker.idle)

    def test_retry_starts_a_new_container(self) -> None:
        """With no other container, the dead one's slot is freed and a fresh one started."""
        h = Harness(slots=1)
        l1 = self.successResultOf(h.acquire(A))
        l2 = self.successResultOf(l1.retry())
        self.assertNotEqual(l2.container_id, l1.container_id)
        self.assertEqual(h.starts(), 2)
        self.assertEqual(len(events(h, "crash")), 1)

    def test_die_event_first_then_retry(self) -> None:
        """The engine's die event came first: one crash, and the request still goes on."""
        h = Harness(slots=1)
        l1 = self.successResultOf(h.acquire(A))
        h.engine.crash(l1.container_id)
        l2 = self.successResultOf(l1.retry())
        self.assertNotEqual(l2.container_id, l1.container_id)
        self.assertEqual(len(events(h, "crash")), 1)
        l2.release()
        self.assertTrue(h.broker.idle)

    def test_retry_goes_to_the_head_of_the_queue(self) -> None:
        """A handed-back request is served before those that arrived after it."""
        h = Harness(slots=1, ready_delay=5)
        d1 = h.acquire(A)
        h.clock.advance(5)
        l1 = self.successResultOf(d1)
        d2 = h.acquire(A)  # waits for the one container
        d1b = l1.retry()
        h.clock.advance(5)  # the replacement becomes ready
        l1b = self.successResultOf(d1b)
        self.assertNoResult(d2)
        l1b.release()
        self.successResultOf(d2)

    def test_retry_keeps_its_deadline(self) -> None:
        """The queue deadline still runs from arrival: no capacity by then -> 503."""
        h = Harness(slots=1, queue_timeout=10, ready_delay=0)
        l1 = self.successResultOf(h.acquire(A))
        other = h.acquire(B)  # takes the slot once the dead container is gone
        h.clock.advance(9)
        d = l1.retry()
        lb = self.successResultOf(other)
        self.assertNoResult(d)
        h.clock.advance(1)
        self.failureResultOf(d, QueueTimeout)
        lb.release()
        self.assertEqual(h.broker.waiting(), 0)

    def test_retry_is_bounded(self) -> None:
        """After MAX_RETRIES hand-backs the request ends with a 503, not a 502."""
        h = Harness(slots=1)
        lease = self.successResultOf(h.acquire(A))
        for _ in range(MAX_RETRIES):
            lease = self.successResultOf(lease.retry())
        err = self.failureResultOf(lease.retry(), BackendRefused).value
        self.assertEqual(err.status, 503)
        self.assertEqual(len(events(h, "crash")), MAX_RETRIES + 1)
        self.assertTrue(h.broker.idle)
        self.assertEqual(h.broker.snapshot()["Admission"]["Admitted"], 0)

    def test_cancel_while_handed_back(self) -> None:
        """The client leaves while its request waits again: it leaves the line and its
        admission; the next request is served."""
        h = Harness(slots=1, source=1, ready_delay=5)
        d1 = h.acquire(A)
        h.clock.advance(5)
        l1 = self.successResultOf(d1)
        d2 = h.acquire(A)  # waits for admission (--source 1)
        d = l1.retry()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        h.clock.advance(5)
        self.successResultOf(d2)

    def test_retry_of_a_live_container_releases_it(self) -> None:
        """``retry(failed=False)``: the container is alive (an unanswered GET): no
        crash, it stays warm and serves the request again from the head of the line."""
        h = Harness(slots=1)
        l1 = self.successResultOf(h.acquire(A))
        later = h.acquire(A)
        l2 = self.successResultOf(l1.retry(failed=False))
        self.assertEqual(l2.container_id, l1.container_id)
        self.assertNoResult(later)
        self.assertEqual(events(h, "crash"), [])
        l2.release()
        self.successResultOf(later).release()
        self.assertTrue(h.broker.idle)

    def test_retry_after_release_is_refused(self) -> None:
        h = Harness(slots=1)
        lease = self.successResultOf(h.acquire(A))
        lease.release()
        self.failureResultOf(lease.retry(), BackendRefused)

    def test_failed_counts_a_crash(self) -> None:
        """``Lease.failed`` (the client left): crash counted, container removed."""
        h = Harness(slots=1)
        lease = self.successResultOf(h.acquire(A))
        lease.failed()
        self.assertEqual(len(events(h, "crash")), 1)
        self.assertEqual(h.engine.own(), {})
        self.assertTrue(h.broker.idle)

    def test_y_container_failed_once_the_other_streams_end(self) -> None:
        """y: a crashed shared container takes no new leases; it is removed when its
        other lease ends and the handed-back request gets a new container."""
        h = Harness(slots=2)
        l1, l2 = self.successResultOf(h.acquire(Y)), self.successResultOf(h.acquire(Y))
        d = l1.retry()
        self.assertNoResult(d)  # waits: the old container still has l2 in flight
        self.assertIn(l2.container_id, h.engine.containers)
        l2.release()
        l3 = self.successResultOf(d)
        self.assertNotEqual(l3.container_id, l1.container_id)
        self.assertEqual(len(events(h, "crash")), 1)


class QueueTimeoutDuringStartTests(SynchronousTestCase):
    """The queue timeout stops counting once a container is being started for a waiter."""

    def test_long_start_is_not_cut_by_the_queue_timeout(self) -> None:
        """Defaults' shape: queue timeout shorter than a slow pull; the start wins."""
        h = Harness(slots=1, pull_delay=240, queue_timeout=10, start_timeout=600)
        d = h.acquire(A)
        h.clock.advance(239)
        self.assertNoResult(d)
        h.clock.advance(1)
        self.successResultOf(d)

    def test_start_deadline_governs(self) -> None:
        h = Harness(slots=1, ready_delay=1000, queue_timeout=10, start_timeout=60)
        d = h.acquire(A)
        h.clock.advance(59)
        self.assertNoResult(d)
        h.clock.advance(1)
        self.assertEqual(self.failureResultOf(d, StartTimeout).value.status, 504)

    def test_waiter_not_covered_still_times_out(self) -> None:
        """Behind a busy container and no start for it: 503 at the queue timeout."""
        h = Harness(slots=1, queue_timeout=10)
        self.successResultOf(h.acquire(A))
        d = h.acquire(A)
        h.clock.advance(10)
        self.failureResultOf(d, QueueTimeout)

    def test_overdue_waiter_fails_with_the_starts_error(self) -> None:
        """A start that covered an overdue waiter fails while another container of the
        key runs: the waiter gets the start's error (504), not a late 503."""
        h = Harness(slots=2, ready_delay=100, queue_timeout=10, start_timeout=50)
        d1 = h.acquire(A)
        h.clock.advance(100)
        self.failureResultOf(d1, StartTimeout)  # first start timed out at 50
        h.engines["h0"].ready_delay = 0
        l1 = self.successResultOf(h.acquire(A))  # a running container, busy
        h.engines["h0"].ready_delay = 100
        d2 = h.acquire(A)  # covered by a second start
        h.clock.advance(20)
        self.assertNoResult(d2)
        h.clock.advance(100)
        self.failureResultOf(d2, StartTimeout)
        l1.release()


class StartRetryTests(SynchronousTestCase):
    """A container removed from outside while starting is started again (bounded)."""

    def test_removed_while_starting_is_started_again(self) -> None:
        h = Harness(slots=1)
        h.engine.fail_next_ready(ContainerRemoved("removed from outside while starting"))
        lease = self.successResultOf(h.acquire(A))
        self.assertEqual(h.starts(), 2)
        self.assertEqual(events(h, "fail"), [])
        self.assertEqual(len(h.engine.own()), 1)
        lease.release()

    def test_removal_retries_are_bounded(self) -> None:
        h = Harness(slots=1)
        for _ in range(START_RETRIES + 1):
            h.engine.fail_next_ready(ContainerRemoved("removed from outside"))
        err = self.failureResultOf(h.acquire(A), StartFailed).value
        self.assertEqual(err.status, 502)
        self.assertEqual(h.starts(), START_RETRIES + 1)
        self.successResultOf(h.acquire(A))  # the count starts again for a new arrival

    def test_own_exit_fails_at_once_and_monitor_shows_first_line(self) -> None:
        """The image's own exit: no retry; the log tail goes to the requester and the
        log, the unauthenticated monitor shows only the first line."""
        h = Harness(slots=1)
        h.engine.fail_next_ready(
            ContainerExited("container exited with code 3", 3, "Traceback\nTOKEN=hunter22 leaked")
        )
        err = self.failureResultOf(h.acquire(A), StartFailed).value
        self.assertIn("hunter22", str(err))
        self.assertEqual(h.starts(), 1)
        last = h.broker.snapshot()["TargetSlots"][0]["LastError"]
        self.assertIn("exit", last)
        self.assertNotIn("hunter22", last)
        self.assertNotIn("\n", last)

    def test_redact(self) -> None:
        s = JobSpec("x", ("img",), "1", 80, (("TOKEN", "hunter22"), ("N", "1")))
        self.assertEqual(redact("TOKEN=hunter22 N=1", s), "TOKEN=*** N=1")

    def test_create_after_the_deadline_is_removed(self) -> None:
        """engine.create (a thread) still running at the start deadline: the container
        it makes is removed when it returns, not leaked until the next reconcile."""
        h = Harness(slots=1, create_delay=100, start_timeout=50)
        d = h.acquire(A)
        h.clock.advance(50)
        self.failureResultOf(d, StartTimeout)
        h.clock.advance(50)  # the create returns now
        self.assertEqual(h.engine.own(), {})
        self.assertTrue(h.broker.idle)


class WorkerLimitTests(SynchronousTestCase):
    """Workers cannot pin every slot."""

    def test_default_share_keeps_a_slot_for_requests(self) -> None:
        h = Harness(slots=3)
        self.successResultOf(h.broker.launch_worker(spec(W)))
        self.successResultOf(h.broker.launch_worker(spec(W)))
        third = h.broker.launch_worker(spec(W))
        self.assertNoResult(third)
        self.successResultOf(h.acquire(A))  # x: still gets the last slot

    def test_worker_share_waits_then_times_out(self) -> None:
        h = Harness(slots=2, worker_timeout=10)
        self.successResultOf(h.broker.launch_worker(spec(W)))
        second = h.broker.launch_worker(spec(W))
        h.clock.advance(10)
        self.failureResultOf(second, NoCapacity)

    def test_release_max_per_key(self) -> None:
        h = Harness(slots=4, worker_release_max=1)
        self.successResultOf(h.broker.launch_worker(spec(W)))
        err = self.failureResultOf(h.broker.launch_worker(spec(W)), NoCapacity).value
        self.assertIn("--worker-release-max", str(err))
        self.successResultOf(h.broker.launch_worker(spec("x:img:other:3")))

    def test_release_max_per_profile(self) -> None:
        def opts(s: JobSpec) -> RunOptions:
            return RunOptions(worker_release_max=2 if s.image == "img" else None)

        h = Harness(slots=4, worker_release_max=1, run_options=opts)
        self.successResultOf(h.broker.launch_worker(spec(W)))
        self.successResultOf(h.broker.launch_worker(spec(W)))
        self.failureResultOf(h.broker.launch_worker(spec(W)), NoCapacity)

    def test_worker_slots_zero_refuses(self) -> None:
        h = Harness(slots=2, worker_slots=0)
        self.failureResultOf(h.broker.launch_worker(spec(W)), NoCapacity)


class KeyTableTests(SynchronousTestCase):
    """The broker forgets keys nobody uses."""

    def test_idle_keys_are_forgotten(self) -> None:
        h = Harness(slots=1)
        for i in range(50):
            self.successResultOf(h.acquire(f"x:img:{i}:80")).release()
        self.assertLessEqual(len(h.broker.state.keys), 2)

    def test_keys_of_failed_starts_are_forgotten(self) -> None:
        h = Harness(slots=1)
        for i in range(20):
            h.engine.fail_next_ready(ContainerExited("exit 1", 1, ""))
            self.failureResultOf(h.acquire(f"x:img:{i}:80"), StartFailed)
        self.assertEqual(len(h.broker.state.keys), 0)

    def test_a_key_waiting_for_admission_is_kept(self) -> None:
        """A waiter still in the admission queue holds its key: forgetting it would
        put a later arrival of the same key in a new line, served first (found by the
        state machine)."""
        h = Harness(slots=1, source=1, queue=5)
        la = self.successResultOf(h.acquire(A))
        db1 = h.acquire(B)
        kb = h.broker.state.keys[spec(B).key]
        h.broker.admission.maybe_forget(kb)
        self.assertIs(h.broker.state.keys.get(spec(B).key), kb)
        db2 = h.acquire(B)
        la.release()
        lb1 = self.successResultOf(db1)
        self.assertNoResult(db2)
        lb1.release()
        self.successResultOf(db2).release()

    def test_adopted_key_takes_the_requests_env(self) -> None:
        """A container adopted from a label without env values serves its key; a second
        container started for that key gets the request's env."""
        full = spec("x:img:a:80:TOKEN=secret1")
        h = Harness(slots=2, start=False)
        cid = h.engine.seed(JobSpec("x", ("img",), "a", 80), 9100)
        c = h.engine.containers[cid]
        c.labels["dockerspaces.key"] = full.key
        c.labels["dockerspaces.display"] = full.display
        self.assertTrue(h.broker.start().called)
        l1 = self.successResultOf(h.broker.acquire(full))
        self.assertEqual(l1.container_id, cid)
        d2 = h.broker.acquire(full)
        h.clock.advance(31)  # scale-out: a second container, started for this key
        l2 = self.successResultOf(d2)
        started = h.engine.containers[l2.container_id].spec
        self.assertEqual(started, full)


class ConfirmTests(SynchronousTestCase):
    """``Lease.confirm``: was a clean close the app's end or the container's death?"""

    def test_alive_after_the_grace(self) -> None:
        h = Harness(slots=1)
        lease = self.successResultOf(h.acquire(A))
        d = lease.confirm(0.25)
        self.assertNoResult(d)
        h.clock.advance(0.25)
        self.assertIs(self.successResultOf(d), True)
        lease.release()

    def test_die_event_within_the_grace(self) -> None:
        h = Harness(slots=1)
        lease = self.successResultOf(h.acquire(A))
        d = lease.confirm(0.25)
        h.clock.advance(0.05)
        h.engine.crash(lease.container_id)
        self.assertIs(self.successResultOf(d), False)
        h.clock.advance(1)  # the grace timer was cancelled: nothing fires twice
        self.assertEqual(len(events(h, "crash")), 1)

    def test_already_dead(self) -> None:
        h = Harness(slots=1)
        lease = self.successResultOf(h.acquire(A))
        h.engine.crash(lease.container_id)
        self.assertIs(self.successResultOf(lease.confirm(0.25)), False)

    def test_y_crash_by_another_request(self) -> None:
        """Another request on the shared container found it dead: the stream's clean
        close is not taken as complete."""
        h = Harness(slots=1)
        l1, l2 = self.successResultOf(h.acquire(Y)), self.successResultOf(h.acquire(Y))
        d = l1.confirm(0.25)
        l2.retry()
        self.assertIs(self.successResultOf(d), False)


class DiedBeforeTests(SynchronousTestCase):
    """``Lease.died_before``: had the container's process ended before a request was
    sent? (Then the app never read it, whatever its method.)"""

    def test_exit_before_the_send(self) -> None:
        h = Harness(slots=1)
        lease = self.successResultOf(h.acquire(A))
        d = lease.died_before(h.clock.seconds() + 0.01, 1.0)
        self.assertNoResult(d)
        h.clock.advance(0.05)
        h.engine.crash(lease.container_id, exited_at=h.clock.seconds() - 0.05)
        self.assertIs(self.successResultOf(d), True)
        self.assertEqual(len(events(h, "crash")), 1)
        # the hand-back that follows counts nothing twice and is served again
        again = lease.retry()
        h.clock.advance(1)
        self.assertNotEqual(self.successResultOf(again).container_id, lease.container_id)
        self.assertEqual(len(events(h, "crash")), 1)

    def test_exit_after_the_send(self) -> None:
        h = Harness(slots=1)
        lease = self.successResultOf(h.acquire(A))
        sent = h.clock.seconds()
        h.clock.advance(0.05)
        h.engine.crash(lease.container_id, exited_at=h.clock.seconds())
        self.assertIs(self.successResultOf(lease.died_before(sent, 1.0)), False)

    def test_no_exit_time_within_the_grace(self) -> None:
        """Alive, or an engine whose clock is not ours (no exit time): False."""
        h = Harness(slots=1)
        lease = self.successResultOf(h.acquire(A))
        d = lease.died_before(h.clock.seconds() + 1, 1.0)
        h.clock.advance(0.5)
        h.engine.crash(lease.container_id)  # a die event without an exit time
        self.assertNoResult(d)
        h.clock.advance(0.5)
        self.assertIs(self.successResultOf(d), False)
