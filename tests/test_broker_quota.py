"""Per-user quotas and fair share in the broker (issue 13): ``Owner`` limits on
containers, GPUs and waiting requests, round-robin turns between users of one key,
exact per-user counts through every way a request or container can end."""

from __future__ import annotations

from typing import Any

from attrs import define, field
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.broker.errors import (
    BrokerError,
    Draining,
    OverQuota,
    QueueTimeout,
    StartFailed,
)
from dockerspaces.broker.model import Container, Lease, Owner, Waiter
from dockerspaces.engine.interface import ContainerExited, RunOptions

from .test_broker_harness import Harness, spec

A = "x:img:a:80"
B = "x:img:b:80"
C = "x:img:c:80"
Y = "y:img:y:80"
W = "x:img:worker:3"


def owner(user: str, **limits: Any) -> Owner:
    """An Owner with the given limits."""
    return Owner(user, group="staff", **limits)


class Served:
    """The order in which tracked requests are served, and their leases."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.leases: list[Lease] = []

    def track(self, d: Deferred[Lease], name: str) -> Deferred[Lease]:
        """Record ``name`` when ``d`` fires with a lease."""
        return d.addCallback(self._got, name)

    def _got(self, lease: Lease, name: str) -> Lease:
        self.order.append(name)
        self.leases.append(lease)
        return lease

    def release_last(self) -> None:
        """Release the lease served last (one slot: the next waiter gets it)."""
        self.leases[-1].release()


class ContainerQuotaTests(SynchronousTestCase):
    """``containers``: containers held at once."""

    def test_other_key_fails_at_once(self) -> None:
        """At the quota, a request for a key the user holds nothing of fails at once
        with 429, a Retry-After and a message naming the user and the quota."""
        h = Harness(slots=4)
        alice = owner("alice", containers=2)
        self.successResultOf(h.acquire(A, owner=alice))
        self.successResultOf(h.acquire(B, owner=alice))
        err = self.failureResultOf(h.acquire(C, owner=alice), OverQuota).value
        self.assertEqual(err.status, 429)
        self.assertGreaterEqual(err.retry_after, 1)
        self.assertEqual(str(err), "alice: quota of 2 containers at once reached (group quota)")
        self.assertEqual((err.user, err.quota), ("alice", "containers"))
        self.assertEqual(h.starts(), 2)
        self.successResultOf(h.acquire(C, owner=owner("bob", containers=2)))
        self.assertEqual(h.broker.quotas.table(), {"alice": (2, 0, 0), "bob": (1, 0, 0)})

    def test_same_key_waits_for_the_users_own_container(self) -> None:
        """At the quota, a request for a key the user holds waits for that container:
        no second one is started though slots are free."""
        h = Harness(slots=4)
        alice = owner("alice", containers=1)
        first = self.successResultOf(h.acquire(A, owner=alice))
        d = h.acquire(A, owner=alice)
        h.clock.advance(100)  # long service: the scale-out rule would start another
        self.assertNoResult(d)
        self.assertEqual(h.starts(), 1)
        first.release()
        self.assertEqual(self.successResultOf(d).container_id, first.container_id)

    def test_same_key_waits_while_its_container_starts(self) -> None:
        """A container starting for the user counts: the second request waits for it."""
        h = Harness(slots=4, ready_delay=5)
        alice = owner("alice", containers=1)
        d1, d2 = h.acquire(A, owner=alice), h.acquire(A, owner=alice)
        self.assertEqual(h.broker.quotas.table(), {"alice": (1, 0, 2)})
        self.failureResultOf(h.acquire(B, owner=alice), OverQuota)
        h.clock.advance(5)
        first = self.successResultOf(d1)
        self.assertNoResult(d2)
        first.release()
        self.successResultOf(d2).release()
        self.assertEqual(h.starts(), 1)
        self.assertEqual(h.broker.quotas.table(), {})

    def test_y_container_counts_once(self) -> None:
        """Any number of leases on one shared container count as one container."""
        h = Harness(slots=3)
        alice = owner("alice", containers=1)
        leases = [self.successResultOf(h.acquire(Y, owner=alice)) for _ in range(3)]
        self.assertEqual(h.broker.quotas.table(), {"alice": (1, 0, 0)})
        self.assertEqual(h.broker.snapshot()["TargetSlots"][0]["Users"], ["alice"])
        self.failureResultOf(h.acquire(A, owner=alice), OverQuota)
        for lease in leases:
            lease.release()
        self.assertEqual(h.broker.quotas.table(), {})
        self.successResultOf(h.acquire(A, owner=alice))

    def test_y_over_quota_and_not_holding_it(self) -> None:
        """A shared container someone else uses is still one more container."""
        h = Harness(slots=3)
        self.successResultOf(h.acquire(Y, owner=owner("bob")))
        alice = owner("alice", containers=1)
        self.successResultOf(h.acquire(A, owner=alice))
        self.failureResultOf(h.acquire(Y, owner=alice), OverQuota)

    def test_freed_container_goes_to_a_waiter_within_quota(self) -> None:
        """When a container frees, the next waiter that may take it gets it: one whose
        user is at the quota is passed over, and served when its own container frees."""
        h = Harness(slots=2)
        alice = owner("alice", containers=1)
        la = self.successResultOf(h.acquire(A, owner=alice))
        h.clock.advance(31)  # a long request: a second container of A starts for carol
        lc = self.successResultOf(h.acquire(A, owner=owner("carol")))
        da = h.acquire(A, owner=alice)  # alice's turn comes first, but she holds one
        db = h.acquire(A, owner=owner("bob"))
        lc.release()
        self.assertNoResult(da)
        self.assertEqual(self.successResultOf(db).container_id, lc.container_id)
        la.release()
        self.assertEqual(self.successResultOf(da).container_id, la.container_id)

    def test_retry_after_is_the_expected_service_time(self) -> None:
        """OverQuota's Retry-After: the key's expected service time, at least 1 s."""
        h = Harness(slots=2)
        alice = owner("alice", containers=1)
        la = self.successResultOf(h.acquire(A, owner=alice))
        self.assertEqual(self.failureResultOf(h.acquire(B, owner=alice), OverQuota).value.retry_after, 1)
        h.clock.advance(120)
        la.release()  # measured: 120 s
        self.successResultOf(h.acquire(A, owner=alice))
        err = self.failureResultOf(
            h.acquire(A, owner=owner("alice", containers=1, queued=0)), OverQuota
        ).value
        self.assertEqual((err.quota, err.retry_after), ("queued", 120))

    def test_waiter_served_when_its_user_frees_another_container(self) -> None:
        """A waiter at its user's quota is served by an idle container of its key as
        soon as the user frees a container of another key."""
        h = Harness(slots=4)
        alice = owner("alice", containers=2)
        la = self.successResultOf(h.acquire(A, owner=alice))
        lb = self.successResultOf(h.acquire(B, owner=alice))
        h.clock.advance(31)  # alice's request is long: a second container of A starts
        warm = self.successResultOf(h.acquire(A, owner=owner("carol")))
        warm.release()
        d = h.acquire(A, owner=alice)  # the warm container would be a third
        self.assertNoResult(d)
        lb.release()
        self.assertEqual(self.successResultOf(d).container_id, warm.container_id)
        la.release()

    def test_scale_out_never_starts_for_a_user_at_quota(self) -> None:
        """Starts of a key are for users who may hold one more: a user at quota with
        many waiters starts nothing, another user's waiter starts a container."""
        h = Harness(slots=4, ready_delay=5)
        alice = owner("alice", containers=1)
        d = h.acquire(A, owner=alice)
        h.clock.advance(5)
        first = self.successResultOf(d)
        h.clock.advance(300)  # long requests: the rule wants more containers
        waiting = [h.acquire(A, owner=alice) for _ in range(5)]
        self.assertEqual(h.starts(), 1)
        db = h.acquire(A, owner=owner("bob"))
        self.assertEqual(h.starts(), 2)
        snap = h.broker.snapshot()
        self.assertEqual(sorted(s["Users"] for s in snap["TargetSlots"] if s["Users"]), [["alice"], ["bob"]])
        h.clock.advance(5)
        self.successResultOf(db)
        for d in waiting:
            self.assertNoResult(d)
        first.release()
        self.successResultOf(waiting[0])


class GpuQuotaTests(SynchronousTestCase):
    """``gpus``: GPUs of the containers held at once."""

    def test_gpu_quota(self) -> None:
        """Every slot has a GPU: the second container would be a second GPU."""
        h = Harness(slots=3, gpus=1)
        alice = owner("alice", gpus=1)
        self.successResultOf(h.acquire(A, owner=alice))
        err = self.failureResultOf(h.acquire(B, owner=alice), OverQuota).value
        self.assertEqual(str(err), "alice: quota of 1 GPU at once reached (group quota)")
        self.assertEqual(err.quota, "gpus")
        self.assertEqual(h.broker.quotas.table(), {"alice": (1, 1, 0)})

    def test_gpu_less_slots_are_used_within_the_quota(self) -> None:
        """A user without GPU quota is given GPU-less slots only (never a GPU slot,
        though it has more free slots), and waits when they are taken."""
        h = Harness(slots=2, hosts=2, host_gpus=(1, 0))
        alice = owner("alice", gpus=0)
        la = self.successResultOf(h.acquire(A, owner=alice))
        lb = self.successResultOf(h.acquire(B, owner=alice))
        self.assertEqual({la.endpoint, lb.endpoint}, {"tcp:127.0.0.1:9200", "tcp:127.0.0.1:9201"})
        self.assertEqual(h.broker.quotas.table(), {"alice": (2, 0, 0)})
        dc = h.acquire(C, owner=alice)
        self.assertNoResult(dc)  # h0's free GPU slots are not for alice
        lb.release()
        self.assertEqual(self.successResultOf(dc).endpoint, lb.endpoint)  # B evicted

    def test_idle_gpu_container_is_not_handed_over_the_quota(self) -> None:
        """A warm container with a GPU is not given to a user at the GPU quota: a
        container of the key starts for them in a GPU-less slot."""
        h = Harness(slots=1, hosts=2, host_gpus=(1, 0))
        warm = self.successResultOf(h.acquire(A, owner=owner("carol")))
        self.assertEqual(warm.endpoint, "tcp:127.0.0.1:9100")  # h0: a GPU
        warm.release()
        lb = self.successResultOf(h.acquire(A, owner=owner("bob", gpus=0)))
        self.assertEqual(lb.endpoint, "tcp:127.0.0.1:9200")
        self.assertEqual(h.broker.quotas.table(), {"bob": (1, 0, 0)})
        lc = self.successResultOf(h.acquire(A, owner=owner("carol", gpus=1)))
        self.assertEqual(lc.container_id, warm.container_id)

    def test_image_without_gpu(self) -> None:
        """An image whose profile says gpu = false costs no GPU in a GPU slot."""
        h = Harness(slots=2, gpus=1, run_options=lambda s: RunOptions(gpu=False))
        alice = owner("alice", gpus=0)
        self.successResultOf(h.acquire(A, owner=alice))
        self.successResultOf(h.acquire(B, owner=alice))
        self.assertEqual(h.broker.quotas.table(), {"alice": (2, 0, 0)})


class QueuedQuotaTests(SynchronousTestCase):
    """``queued``: requests waiting at once."""

    def test_queued_quota(self) -> None:
        """The waiting request beyond the quota fails at once; served ones do not count."""
        h = Harness(slots=1)
        busy = self.successResultOf(h.acquire(A, owner=owner("bob")))
        alice = owner("alice", queued=2)
        d1, d2 = h.acquire(B, owner=alice), h.acquire(B, owner=alice)
        err = self.failureResultOf(h.acquire(B, owner=alice), OverQuota).value
        self.assertEqual(str(err), "alice: quota of 2 queued requests at once reached (group quota)")
        self.assertEqual(err.quota, "queued")
        self.assertEqual(h.broker.quotas.table()["alice"], (0, 0, 2))
        busy.release()
        self.successResultOf(d1).release()
        self.successResultOf(d2)
        self.assertEqual(h.broker.quotas.table()["alice"], (1, 0, 0))

    def test_served_at_once_does_not_count(self) -> None:
        """With no waiting allowed, a request served at once by a warm container is."""
        h = Harness(slots=1, ready_delay=5)
        alice = owner("alice", queued=0)
        self.failureResultOf(h.acquire(A, owner=alice), OverQuota)  # a cold start waits
        d = h.acquire(A)
        h.clock.advance(5)
        self.successResultOf(d).release()
        self.successResultOf(h.acquire(A, owner=alice))

    def test_admission_queue_counts(self) -> None:
        """Waiting for --source is waiting too."""
        h = Harness(slots=2, source=1, queue=5)
        self.successResultOf(h.acquire(A, owner=owner("bob")))
        alice = owner("alice", queued=1)
        d = h.acquire(B, owner=alice)
        self.failureResultOf(h.acquire(B, owner=alice), OverQuota)
        self.assertEqual(h.broker.snapshot()["QueueUsers"], {spec(B).display: {"alice": 1}})
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(h.broker.quotas.table(), {"bob": (1, 0, 0)})


class WorkerQuotaTests(SynchronousTestCase):
    """Worker launches hold their container from start until it is gone."""

    def test_worker_launch_over_quota_fails_at_once(self) -> None:
        h = Harness(slots=3, worker_slots=3, ready_delay=2)
        alice = owner("alice", containers=1)
        dw = h.broker.launch_worker(spec(W), owner=alice)
        self.assertEqual(h.broker.quotas.table(), {"alice": (1, 0, 1)})
        err = self.failureResultOf(h.broker.launch_worker(spec(W), owner=alice), OverQuota).value
        self.assertEqual(err.status, 429)
        h.clock.advance(2)
        handle = self.successResultOf(dw)
        self.assertEqual(h.broker.quotas.table(), {"alice": (1, 0, 0)})
        self.failureResultOf(h.acquire(A, owner=alice), OverQuota)
        h.engine.crash(handle.id)
        self.assertEqual(h.broker.quotas.table(), {})
        d = h.acquire(A, owner=alice)
        h.clock.advance(2)
        self.successResultOf(d)

    def test_evicted_worker_is_no_longer_held(self) -> None:
        """A worker evicted after its protection no longer counts for its launcher."""
        h = Harness(slots=1, release=10)
        alice = owner("alice", containers=1)
        self.successResultOf(h.broker.launch_worker(spec(W), owner=alice))
        d = h.acquire(A, owner=owner("bob"))
        h.clock.advance(10)
        self.successResultOf(d)
        self.assertEqual(h.broker.quotas.table(), {"bob": (1, 0, 0)})

    def test_waiting_launch_over_quota_when_its_turn_comes(self) -> None:
        """A launch that waited for the workers' share fails with OverQuota when its
        turn comes if its user reached the quota meanwhile."""
        h = Harness(slots=3, worker_slots=1, worker_timeout=100)
        bobs = self.successResultOf(h.broker.launch_worker(spec(W), owner=owner("bob")))
        alice = owner("alice", containers=1)
        dw = h.broker.launch_worker(spec(W), owner=alice)
        self.assertNoResult(dw)  # the workers' share is taken
        self.successResultOf(h.acquire(A, owner=alice))
        h.engine.crash(bobs.id)
        err = self.failureResultOf(dw, OverQuota).value
        self.assertEqual(err.quota, "containers")
        self.assertEqual(h.broker.quotas.table(), {"alice": (1, 0, 0)})


class FairShareTests(SynchronousTestCase):
    """Waiters of one key are served round-robin between users."""

    def test_burst_does_not_starve_another_user(self) -> None:
        """A queues 10, then B queues 2, one slot: B's are served after at most one
        more of A's; each user's requests in order."""
        h = Harness(slots=1)
        a, b = owner("A"), owner("B")
        served = Served()
        served.track(h.acquire(A, owner=a), "first")
        for i in range(10):
            served.track(h.acquire(A, owner=a), f"a{i}")
        for i in range(2):
            served.track(h.acquire(A, owner=b), f"b{i}")
        self.assertEqual(h.broker.snapshot()["QueueUsers"], {spec(A).display: {"A": 10, "B": 2}})
        for _ in range(12):
            served.release_last()
        self.assertEqual(served.order[:5], ["first", "a0", "b0", "a1", "b1"])
        self.assertEqual(served.order[5:], [f"a{i}" for i in range(2, 10)])
        self.assertEqual(h.broker.snapshot()["QueueUsers"], {})

    def test_user_who_starts_waiting_joins_the_back_of_the_round(self) -> None:
        """A user's turn is the later of their last service and their oldest waiting
        request: one who was just served and asks again waits for the others."""
        h = Harness(slots=1)
        a, b, c = owner("A"), owner("B"), owner("C")
        served = Served()
        served.track(h.acquire(A, owner=a), "a0")
        served.track(h.acquire(A, owner=b), "b0")
        served.track(h.acquire(A, owner=c), "c0")
        served.release_last()  # to b0, who arrived before c0
        served.track(h.acquire(A, owner=b), "b1")  # b's turn: after c0's arrival
        served.track(h.acquire(A, owner=a), "a1")
        for _ in range(3):
            served.release_last()
        self.assertEqual(served.order, ["a0", "b0", "c0", "b1", "a1"])

    def test_handed_back_request_still_goes_first(self) -> None:
        """A request handed back unforwarded is served before every other user's."""
        h = Harness(slots=1)
        a, b = owner("A"), owner("B")
        served = Served()
        la = self.successResultOf(h.acquire(A, owner=a))
        served.track(h.acquire(A, owner=b), "b0")
        served.track(la.retry(), "a-again")
        self.assertEqual(served.order, ["a-again"])
        served.release_last()
        self.assertEqual(served.order, ["a-again", "b0"])

    def test_owner_none_is_fifo(self) -> None:
        """Without owners the line is plain FIFO, as before accounts."""
        h = Harness(slots=1)
        served = Served()
        for i in range(5):
            served.track(h.acquire(A), str(i))
        for _ in range(4):
            served.release_last()
        self.assertEqual(served.order, ["0", "1", "2", "3", "4"])


class ExactCountTests(SynchronousTestCase):
    """The per-user table ends empty however requests and containers end."""

    def test_cancel_while_waiting(self) -> None:
        h = Harness(slots=1)
        la = self.successResultOf(h.acquire(A, owner=owner("alice")))
        d = h.acquire(A, owner=owner("bob"))
        self.assertEqual(h.broker.quotas.table(), {"alice": (1, 0, 0), "bob": (0, 0, 1)})
        d.cancel()
        self.failureResultOf(d, CancelledError)
        la.release()
        self.assertEqual(h.broker.quotas.table(), {})

    def test_queue_timeout(self) -> None:
        h = Harness(slots=1, queue_timeout=10)
        la = self.successResultOf(h.acquire(A, owner=owner("alice")))
        d = h.acquire(B, owner=owner("bob"))
        h.clock.advance(10)
        self.failureResultOf(d, QueueTimeout)
        la.release()
        self.assertEqual(h.broker.quotas.table(), {})

    def test_retry(self) -> None:
        h = Harness(slots=1)
        la = self.successResultOf(h.acquire(A, owner=owner("alice", containers=1)))
        again = self.successResultOf(la.retry())
        self.assertEqual(h.broker.quotas.table(), {"alice": (1, 0, 0)})
        self.assertNotEqual(again.container_id, la.container_id)
        again.release()
        self.assertEqual(h.broker.quotas.table(), {})

    def test_crash_mid_request(self) -> None:
        h = Harness(slots=1)
        la = self.successResultOf(h.acquire(Y, owner=owner("alice")))
        self.successResultOf(h.acquire(Y, owner=owner("bob")))
        h.engine.crash(la.container_id)
        self.assertEqual(h.broker.quotas.table(), {})
        la.release()
        self.assertEqual(h.broker.quotas.table(), {})

    def test_failed_start(self) -> None:
        h = Harness(slots=1)
        h.engine.fail_next_ready(ContainerExited("exited with code 1", 1, "boom"))
        self.failureResultOf(h.acquire(A, owner=owner("alice")), StartFailed)
        self.assertEqual(h.broker.quotas.table(), {})

    def test_eviction(self) -> None:
        """An idle container evicted for another key is held by nobody."""
        h = Harness(slots=1)
        self.successResultOf(h.acquire(A, owner=owner("alice"))).release()
        lb = self.successResultOf(h.acquire(B, owner=owner("bob")))
        self.assertEqual(h.broker.quotas.table(), {"bob": (1, 0, 0)})
        lb.release()
        self.assertEqual(h.broker.quotas.table(), {})

    def test_drain(self) -> None:
        h = Harness(slots=1, ready_delay=5)
        dw = h.acquire(A, owner=owner("alice"))
        h.clock.advance(5)
        la = self.successResultOf(dw)
        waiting = h.acquire(A, owner=owner("bob"))
        done = h.broker.shutdown(keep_containers=False, drain_timeout=30)
        self.failureResultOf(waiting, Draining)
        self.assertEqual(h.broker.quotas.table(), {"alice": (1, 0, 0)})
        la.release()
        self.successResultOf(done)
        self.assertEqual(h.broker.quotas.table(), {})

    def test_drain_timeout_drops_leases(self) -> None:
        h = Harness(slots=1)
        self.successResultOf(h.acquire(A, owner=owner("alice")))
        done = h.broker.shutdown(keep_containers=False, drain_timeout=5)
        h.clock.advance(5)
        self.successResultOf(done)
        self.assertEqual(h.broker.quotas.table(), {})


class ViewTests(SynchronousTestCase):
    """What the monitor and the usage hook see."""

    def test_snapshot_users(self) -> None:
        """Each slot names who holds its container; QueueUsers who waits, per key."""
        h = Harness(slots=1)
        self.successResultOf(h.acquire(A, owner=owner("alice")))
        h.acquire(A, owner=owner("bob"))
        h.acquire(A, owner=owner("bob"))
        h.acquire(A)
        snap = h.broker.snapshot()
        self.assertEqual(snap["TargetSlots"][0]["Users"], ["alice"])
        self.assertEqual(snap["Queues"], {spec(A).display: 3})
        self.assertEqual(snap["QueueUsers"], {spec(A).display: {"bob": 2}})

    def test_snapshot_without_owners(self) -> None:
        h = Harness(slots=1)
        self.successResultOf(h.acquire(A))
        h.acquire(A)
        snap = h.broker.snapshot()
        self.assertEqual(snap["TargetSlots"][0]["Users"], [])
        self.assertEqual(snap["QueueUsers"], {})
        self.assertEqual(snap["Queues"], {spec(A).display: 1})

    def test_hook_gets_owner_and_gpus(self) -> None:
        h = Harness(slots=1, gpus=1)
        self.successResultOf(h.acquire(A, owner=owner("alice")))
        events = [(e[0], e[5], e[6]) for e in h.container_events]
        self.assertEqual(
            events,
            [
                ("pull-start", "alice", 1),
                ("pull-end", "alice", 1),
                ("create", "alice", 1),
                ("start", "alice", 1),
                ("ready", "alice", 1),
            ],
        )
        h2 = Harness(slots=1)
        self.successResultOf(h2.acquire(A))
        self.assertEqual({(e[5], e[6]) for e in h2.container_events}, {(None, 0)})


USERS = ("u0", "u1", "u2")
KEYS = (A, B, Y)
LIMITS = st.fixed_dictionaries(
    {
        "containers": st.sampled_from([None, 1, 2, 3]),
        "gpus": st.sampled_from([None, 0, 1, 2]),
        "queued": st.sampled_from([None, None, 1, 3, 6]),
    }
)
ARRIVE = st.tuples(
    st.just("arrive"), st.sampled_from(USERS), st.sampled_from((A, A, B, Y)), st.integers(1, 3)
)
STEPS = st.lists(
    st.one_of(
        ARRIVE,
        ARRIVE,
        ARRIVE,
        ARRIVE,
        st.tuples(st.just("launch"), st.sampled_from(USERS)),
        st.tuples(st.just("release"), st.integers(0, 50), st.booleans()),
        st.tuples(st.just("release"), st.integers(0, 50), st.just(False)),
        st.tuples(st.just("retry"), st.integers(0, 50), st.booleans()),
        st.tuples(st.just("cancel"), st.integers(0, 50)),
        st.tuples(st.just("crash"), st.integers(0, 50)),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 1, 2, 5, 12])),
    ),
    min_size=10,
    max_size=40,
)


@define(eq=False)
class Request:
    """One acquire/launch as the test sees it (a handed-back one gets a new Deferred)."""

    user: str
    segment: str
    d: Deferred[Any]
    stamp: int  # the test's counter at arrival
    outcome: str | None = None
    lease: Lease | None = None
    released: bool = False
    handed_back: bool = False


@define
class Run:
    """Random traffic of several users against one broker, checking after every step
    (and at every hand-over and start) that quotas hold and turns are taken in order."""

    limits: dict[str, dict[str, int | None]]
    h: Harness = field(
        factory=lambda: Harness(
            slots=1,
            hosts=2,
            host_gpus=(1, 0),
            ready_delay=2,
            source=200,
            queue=10,
            queue_timeout=30,
            start_timeout=20,
            worker_timeout=25,
            release=15,
            stop=1,
            worker_slots=1,
        )
    )
    requests: list[Request] = field(factory=list)
    by_deferred: dict[int, Request] = field(factory=dict)
    violations: list[str] = field(factory=list)
    clock: int = 0  # stamps arrivals and hand-overs, in order
    arriving: int = 0  # the stamp of the request being admitted right now
    last_served: dict[tuple[str, str], int] = field(factory=dict)  # (key, user) -> stamp

    def __attrs_post_init__(self) -> None:
        broker = self.h.broker
        assign, start = broker.leases.assign, broker.lifecycle.start_container

        def checked_assign(w: Waiter, c: Container) -> None:
            self.check_turn(w, c)
            assign(w, c)
            if w.owner is not None:
                self.check_user(w.owner.user, "hand-over")

        def checked_start(*a: Any, **kw: Any) -> Container:
            c = start(*a, **kw)
            if c.owner is not None:
                self.check_user(c.owner, "start")
            return c

        broker.leases.assign = checked_assign  # type: ignore[method-assign]
        broker.lifecycle.start_container = checked_start  # type: ignore[method-assign]

    def owner(self, user: str) -> Owner:
        """The user's Owner (the same limits on every request)."""
        return Owner(user, **self.limits[user])  # type: ignore[arg-type]

    # -- the fairness oracle ------------------------------------------------------------

    def stamp_of(self, w: Waiter) -> int:
        """The test's arrival stamp of a waiter (the one arriving now if unknown yet)."""
        r = self.by_deferred.get(id(w.deferred))
        return r.stamp if r is not None else self.arriving

    def check_turn(self, w: Waiter, c: Container) -> None:
        """A container of an x: key goes to a handed-back request that may take it
        first; else to the oldest request of the user whose turn is earliest among
        those whose oldest request may take it, where a user's turn is the later of
        their last hand-over on this key and the arrival of their oldest request
        waiting on it."""
        k = w.key
        if k.spec.mode != "x" or w.owner is None:
            return
        self.clock += 1
        quotas = self.h.broker.quotas

        def may(q: Waiter) -> bool:
            return q.owner is None or quotas.may_hold(q.owner, c)

        waiting = [q for q in k.waiters if q is not w]
        if w.retries:
            return  # handed back: served first, its user's turn unchanged
        if any(q.retries and may(q) for q in waiting):
            self.violations.append(f"{k.key}: a handed-back request was passed over")
        heads: dict[str, int] = {}
        for q in [*waiting, w]:
            if not q.retries and q.owner is not None:
                user, s = q.owner.user, self.stamp_of(q)
                heads[user] = min(heads.get(user, s), s)
        user = w.owner.user
        if heads[user] != self.stamp_of(w):
            self.violations.append(f"{k.key}: {user}'s requests served out of order")

        def turn(u: str) -> int:
            return max(self.last_served.get((k.key, u), -1), heads[u])

        for q in waiting:
            v = q.owner.user if q.owner is not None else None
            if (
                v is not None
                and v != user
                and not q.retries
                and self.stamp_of(q) == heads[v]
                and may(q)
                and turn(v) < turn(user)
            ):
                self.violations.append(f"{k.key}: {user} served before {v}, whose turn it was")
        self.last_served[(k.key, user)] = self.clock

    # -- quotas -------------------------------------------------------------------------

    def check_user(self, user: str, when: str) -> None:
        """``user`` holds no more containers and GPUs than allowed."""
        held, gpus, _ = self.h.broker.quotas.table().get(user, (0, 0, 0))
        lim = self.limits[user]
        if lim["containers"] is not None and held > lim["containers"]:
            self.violations.append(f"{when}: {user} holds {held} containers")
        if lim["gpus"] is not None and gpus > lim["gpus"]:
            self.violations.append(f"{when}: {user} holds {gpus} GPUs")

    def check(self) -> None:
        """After a step: the monitor's view, the broker's table and the test's own
        record agree, and every quota holds."""
        assert not self.violations, self.violations
        snap = self.h.broker.snapshot()
        table = self.h.broker.quotas.table()
        seen: dict[str, list[int]] = {}
        for s in snap["TargetSlots"]:
            for u in s["Users"]:
                seen.setdefault(u, [0, 0])
                seen[u][0] += 1
                seen[u][1] += s["Gpu"] is not None
        pending = {u: 0 for u in USERS}
        back = {u: 0 for u in USERS}
        for r in self.requests:
            if r.outcome is None:
                pending[r.user] += 1
                back[r.user] += r.handed_back
            elif r.lease is not None and not r.released:
                slot = [s for s in snap["TargetSlots"] if s["Container"] == r.lease.container_id]
                if slot and slot[0]["State"] == "Run":
                    assert r.user in slot[0]["Users"], (r, slot)
        for u in USERS:
            held, gpus, queued = table.get(u, (0, 0, 0))
            shown = seen.get(u, [0, 0])
            if any(s["State"] == "Stopping" for s in snap["TargetSlots"]):
                # a slot shows the container being stopped, not the one starting there
                assert held >= shown[0] and gpus >= shown[1], (u, table, seen)
            else:
                assert [held, gpus] == shown, (u, table, seen)
            assert queued == pending[u], (u, queued, pending)
            self.check_user(u, "after the step")
            lim = self.limits[u]["queued"]
            assert lim is None or queued - back[u] <= lim, (u, queued, lim)
        for k in self.h.broker.state.keys.values():  # the broker's own tables, read only
            if k.spec.mode == "x":
                for c in k.idle:
                    left = [
                        w for w in k.waiters if w.owner is None or self.h.broker.quotas.may_hold(w.owner, c)
                    ]
                    assert not left, f"{k.key}: an idle container and a waiter for it"
        assert not self.violations, self.violations

    # -- steps --------------------------------------------------------------------------

    def track(self, r: Request) -> None:
        """Follow ``r``'s current Deferred."""
        self.by_deferred[id(r.d)] = r

        def ok(result: object) -> None:
            if isinstance(result, Lease):
                r.outcome, r.lease, r.released = "lease", result, False
            else:
                r.outcome = "handle"

        def err(f: Failure) -> None:
            r.outcome = "cancel" if f.check(CancelledError) else "error:" + type(f.value).__name__
            if not f.check(CancelledError, BrokerError):
                self.violations.append(f"unexpected {f.value!r}")

        r.d.addCallbacks(ok, err)

    def arrive(self, user: str, segment: str) -> None:
        """A request (or worker launch) of ``user``."""
        self.clock += 1
        self.arriving = self.clock
        if segment == W:
            d: Deferred[Any] = self.h.broker.launch_worker(spec(W), owner=self.owner(user))
        else:
            d = self.h.acquire(segment, owner=self.owner(user))
        r = Request(user, segment, d, self.clock)
        self.requests.append(r)
        self.track(r)

    def held(self) -> list[Request]:
        """Requests holding a lease."""
        return [r for r in self.requests if r.lease is not None and not r.released]

    def step(self, op: tuple[Any, ...]) -> None:
        """Apply one random step."""
        kind = op[0]
        held = self.held()
        pending = [r for r in self.requests if r.outcome is None]
        if kind == "arrive":
            for _ in range(op[3]):
                self.arrive(op[1], op[2])
        elif kind == "launch":
            self.arrive(op[1], W)
        elif kind == "release" and held:
            r = held[op[1] % len(held)]
            r.released = True
            assert r.lease is not None
            r.lease.failed() if op[2] else r.lease.release()
        elif kind == "retry" and held:
            r = held[op[1] % len(held)]
            assert r.lease is not None
            lease, r.lease, r.released, r.outcome = r.lease, None, False, None
            r.d, r.handed_back = lease.retry(op[2]), True
            self.track(r)
        elif kind == "cancel" and pending:
            pending[op[1] % len(pending)].d.cancel()
        elif kind == "crash":  # of a started container (failed starts are tested above)
            running = [c for c in self.h.broker.containers() if c.state in ("idle", "busy", "worker")]
            if running:
                c = running[op[1] % len(running)]
                self.h.engines[c.host].crash(c.id)
        elif kind == "advance":
            self.h.clock.advance(op[1])

    def finish(self) -> None:
        """Release everything, let every wait end, drain: the table is empty."""
        for _ in range(30):
            for r in self.held():
                r.released = True
                assert r.lease is not None
                r.lease.release()
            self.h.clock.advance(5)
            self.check()
        assert all(r.outcome is not None for r in self.requests)
        assert self.h.broker.waiting() == 0
        launchers = {r.user for r in self.requests if r.segment == W}
        assert all(u in launchers for u in self.h.broker.quotas.table()), (
            self.h.broker.quotas.table()
        )  # running workers, until the drain stops them
        d = self.h.broker.shutdown(keep_containers=False, drain_timeout=5)
        self.h.clock.advance(5)
        self.h.clock.advance(5)
        assert d.called
        assert self.h.broker.quotas.table() == {}, self.h.broker.quotas.table()
        assert not self.violations, self.violations


class PropertyTests(SynchronousTestCase):
    """Random interleavings keep every quota and the turn order."""

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(limits=st.fixed_dictionaries({u: LIMITS for u in USERS}), steps=STEPS)
    def test_quotas_and_turns_hold(
        self, limits: dict[str, dict[str, int | None]], steps: list[tuple[Any, ...]]
    ) -> None:
        """After every step no user holds more containers or GPUs than their quota
        (nor at any hand-over or start), no user has more requests waiting than their
        quota (handed-back ones aside), the per-user table matches the monitor and the
        requests in flight, hand-overs follow the turns, and it all ends empty."""
        run = Run(limits)
        for op in steps:
            run.step(op)
            run.check()
        run.finish()
