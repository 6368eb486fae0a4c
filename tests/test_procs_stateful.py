"""The broker's state machine (``test_broker_stateful``) with the broker behind AMP:
every request goes through a :class:`~dockerspaces.procs.childside.RemoteBroker` of
one of two children connected over iosim to the same broker; children die (their
connection lost) and new ones connect. The broker's invariants are checked after
every step, and with them the reclaiming: leases held in the broker are the leases
held by connected children, and nothing of a dead child survives."""

from __future__ import annotations

from typing import Any

from attrs import define
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import invariant, rule
from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.broker.errors import BrokerError
from dockerspaces.procs.childside import RemoteLease

from .test_broker_harness import spec
from .test_broker_stateful import KEYS, WORKER, BrokerMachine, Request
from .test_procs import Child, Wire

CHILDREN = 2
VIA = st.integers(0, CHILDREN - 1)


@define(eq=False)
class Sent(Request):
    """A request as the test sees it, and the child it went through."""

    child: Child | None = None
    remote: RemoteLease | None = None  # the same as ``lease``, typed


class RemoteBrokerMachine(BrokerMachine):
    """:class:`BrokerMachine`'s traffic through two children (see module)."""

    def __init__(self) -> None:
        super().__init__()
        self.wire = Wire(self.h)
        self.live: list[Child] = [self.wire.connect() for _ in range(CHILDREN)]
        self.served: list[Sent] = []
        tick = self.wire.tick

        def advance(dt: float) -> None:  # time passes only with every byte delivered
            self.settle()
            tick(dt)
            self.settle()

        self.h.clock.advance = advance  # type: ignore[method-assign,assignment]

    # -- the wire --------------------------------------------------------------------

    def settle(self) -> None:
        """Deliver everything; then check FIFO per key for the requests served meanwhile
        (answers to two children arrive in the order their pumps run, so the check
        that an older request of the key was not left waiting comes after)."""
        self.wire.flush()
        served, self.served = self.served, []
        for r in served:
            for o in self.requests:
                if o.seq < r.seq and o.segment == r.segment and o.outcome is None:
                    self.violations.append(f"request {r.seq} served before older {o.seq}")

    def _track_via(self, via: int, segment: str, d: Deferred[Any]) -> None:
        self.seq += 1
        r = Sent(self.seq, segment, d, child=self.live[via])
        self.requests.append(r)

        def ok(result: object) -> None:
            r.ends += 1
            if isinstance(result, RemoteLease):
                r.outcome = "lease"
                r.lease = result  # type: ignore[assignment]  # a RemoteLease has Lease's API
                r.remote = result
                self.served.append(r)
            else:
                r.outcome = "handle"

        def err(f: Failure) -> None:
            r.ends += 1
            if f.check(CancelledError):
                r.outcome = "cancel"
            elif f.check(BrokerError):
                r.outcome = "error"
            else:
                self.violations.append(f"unexpected failure {f.value!r}")
                r.outcome = "error"

        d.addCallbacks(ok, err)

    def _sent(self) -> list[Sent]:
        return [r for r in self.requests if isinstance(r, Sent)]

    # -- the rules, through the children -----------------------------------------------

    @rule(key=st.sampled_from(KEYS), n=st.integers(1, 3), via=VIA)
    def arrive_via(self, key: str, n: int, via: int) -> None:
        """Requests arrive for a key at one child."""
        for _ in range(n):
            self._track_via(via, key, self.live[via].broker.acquire(spec(key)))
        self.settle()

    @rule(via=VIA)
    def launch_via(self, via: int) -> None:
        """A worker launch arrives at one child."""
        self._track_via(via, WORKER, self.live[via].broker.launch_worker(spec(WORKER)))
        self.settle()

    @rule(key=st.sampled_from(KEYS), n=st.integers(1, 3))
    def arrive(self, key: str, n: int) -> None:
        """(Every request goes through a child here.)"""
        self.arrive_via(key, n, 0)

    @rule()
    def launch(self) -> None:
        """(Every launch goes through a child here.)"""
        self.launch_via(1)

    @rule(i=st.integers(0, 50), failed=st.booleans())
    def release(self, i: int, failed: bool) -> None:
        """A request in flight ends; the release crosses."""
        super().release(i, failed)
        self.settle()

    @rule(i=st.integers(0, 50))
    def cancel(self, i: int) -> None:
        """A waiting client goes away; the Cancel crosses."""
        super().cancel(i)
        self.settle()

    @rule(i=st.integers(0, 50))
    def crash(self, i: int) -> None:
        """A running container dies."""
        super().crash(i)
        self.settle()

    @rule(host=st.sampled_from(["h0", "h1"]), down=st.booleans())
    def outage(self, host: str, down: bool) -> None:
        """An engine stops (or starts again) answering."""
        super().outage(host, down)
        self.settle()

    @rule(host=st.sampled_from(["h0", "h1"]), slots=st.integers(0, 3))
    def resize(self, host: str, slots: int) -> None:
        """A host's slot count changes."""
        super().resize(host, slots)
        self.settle()

    @rule(host=st.sampled_from(["h0", "h1"]), leave=st.booleans())
    def leave_or_join(self, host: str, leave: bool) -> None:
        """A host leaves or joins again."""
        super().leave_or_join(host, leave)
        self.settle()

    @rule(via=VIA)
    def kill(self, via: int) -> None:
        """A child dies (its requests in flight are lost with it); a new one connects."""
        dead = self.live[via]
        lost = [r for r in self._sent() if r.child is dead and r.remote is not None and not r.released]
        for r in lost:  # ended with the child: the broker may stop their containers now
            r.released = True
        dead.kill()
        self.settle()
        for r in lost:
            assert r.remote is not None
            r.remote.release()  # the child's side lets go; nothing crosses any more
        assert dead.broker.idle
        self.live[via] = self.wire.connect()
        self.settle()

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def leases_held_by_children(self) -> None:
        """The broker's leases are the connected children's, lease for lease."""
        boxes = [ch.server for ch in self.live]
        self.assertEqual({id(b) for b in self.wire.hub.boxes}, {id(b) for b in boxes})
        for ch in self.live:
            mine = {
                r.remote.id for r in self._sent() if r.child is ch and r.remote is not None and not r.released
            }
            assert set(ch.server.leases) == ch.broker.held == mine, (
                set(ch.server.leases),
                ch.broker.held,
                mine,
            )
        # a lease on a container that died is no longer counted by the broker, but its
        # holder still has it (until its request ends); every other one is the same
        held = sum(len(b.leases) for b in boxes)
        live = sum(1 for b in boxes for lease in b.leases.values() if not lease.released)
        assert live == held, (live, held)
        assert self.h.broker.state.leases <= held, (self.h.broker.state.leases, held)

    @invariant()
    def nothing_of_a_dead_child(self) -> None:
        """A dead child's box holds no lease and no ask; none of its requests waits."""
        for ch in self.wire.children:
            if ch not in self.live:
                assert not ch.server.connected
                assert ch.server.leases == {} and ch.server.asks == {}, (ch.server.leases, ch.server.asks)
                assert ch.broker.asks == {}
        for r in self._sent():
            if r.child not in self.live:
                assert r.outcome is not None, r

    @invariant()
    def x_exclusive_in_the_broker(self) -> None:
        """No container of an x: key is held twice, whichever children hold it."""
        seen: dict[str, int] = {}
        for ch in self.live:
            for lease in ch.server.leases.values():
                if lease.container is not None and lease.container.key.spec.mode == "x":
                    seen[lease.container_id] = seen.get(lease.container_id, 0) + 1
        assert all(n == 1 for n in seen.values()), seen

    def assertEqual(self, a: object, b: object) -> None:
        """Plain equality, for the invariants."""
        assert a == b, (a, b)

    def teardown(self) -> None:
        """The broker's teardown (every byte delivered before time passes), then: no
        child holds or waits for anything."""
        super().teardown()
        self.settle()
        for ch in self.live:
            assert ch.broker.idle and ch.server.leases == {} and ch.server.asks == {}
        assert not self.violations, self.violations


RemoteBrokerMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class TestRemoteBrokerMachine(RemoteBrokerMachine.TestCase):  # type: ignore[name-defined,misc,valid-type]
    """Run the state machine under trial."""

    def test_machine(self) -> None:
        """Random runs of the broker behind AMP keep every invariant."""
        self.runTest()


class Steps(SynchronousTestCase):
    """A few runs step by step (no hypothesis needed)."""

    def test_kill_while_holding_and_waiting(self) -> None:
        """A child dies holding x: leases with asks waiting behind them: the other
        child's waiters are served, in order, and the teardown finds nothing left."""
        m = RemoteBrokerMachine()
        m.arrive_via(key="x:img:a:80", n=3, via=0)
        m.arrive_via(key="x:img:a:80", n=2, via=1)
        m.advance(dt=5)
        m.leases_held_by_children()
        m.kill(via=0)
        m.leases_held_by_children()
        m.nothing_of_a_dead_child()
        m.x_exclusive_in_the_broker()
        served = [r for r in m._sent() if r.outcome == "lease"]
        self.assertTrue(served)
        self.assertTrue(all(r.child is m.live[1] for r in served if not r.released))
        m.teardown()
