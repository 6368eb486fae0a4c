"""Unit tests of :mod:`dockerspaces.procs`: the AMP commands between a child and the
broker's process over in-memory transports (``twisted.test.iosim``), the reclaiming of
a dead child's leases, and the pool's restarts (a memory reactor; no process spawned).

Every test is synchronous: a :class:`Wire` puts a real broker (``task.Clock`` and
``FakeEngine``, as in ``test_broker_harness``) behind a :class:`~dockerspaces.procs.
brokerside.Hub` and connects children to it; :meth:`Wire.flush` moves every byte.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, ClassVar

from attrs import define
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.broker.errors import (
    BackendRefused,
    BrokerError,
    Draining,
    Overloaded,
    OverQuota,
    QueueTimeout,
    StartFailed,
)
from dockerspaces.broker.model import Progress
from dockerspaces.broker.quota import Owner
from dockerspaces.config import Config
from dockerspaces.metrics import Metrics
from dockerspaces.procs import childside
from dockerspaces.procs import commands as c
from dockerspaces.procs import pool as poolmod
from dockerspaces.procs.brokerside import MAX_FACTS, NOTE_GRACE, BrokerBox, Hub
from dockerspaces.procs.childside import (
    BoardCallback,
    ChildBox,
    RemoteBoard,
    RemoteBroker,
    RemoteLease,
    RemoteNetworks,
)
from dockerspaces.procs.pool import ChildProcess, WorkerPool
from dockerspaces.web.pages import ProgressBoard

from .test_broker_harness import Harness, spec

A = "x:img:a:80"
B = "x:img:b:80"
Y = "y:img:y:80"
W = "x:img:worker:3"


# -- the set-up --------------------------------------------------------------------------


@define(eq=False)
class Child:
    """One child connected to the hub: its box and broker, the broker's box for it,
    and the pump between them."""

    box: ChildBox
    broker: RemoteBroker
    server: BrokerBox
    pump: IOPump
    lost: list[bool]

    def kill(self) -> None:
        """The child's process dies: its end of the socket closes."""
        self.pump.clientIO.loseConnection()


class Wire:
    """A :class:`Harness`'s broker behind a :class:`Hub` (wired to the broker's
    container hook as ``parent.build_parent`` does), children connected over iosim."""

    def __init__(self, harness: Harness | None = None, **settings: Any):
        self.h = harness if harness is not None else Harness(**settings)
        #: the clock's own advance (a test may wrap ``h.clock.advance`` to flush)
        self.tick = self.h.clock.advance
        self.board = ProgressBoard(self.h.clock)
        self.hub = Hub(self.h.broker, self.board, self.h.clock, engines=self.h.engines)
        told = self.h.broker.state.on_container

        def on_container(*args: Any, **kw: Any) -> None:
            if told is not None:
                told(*args, **kw)
            self.hub.containers_changed()

        self.h.broker.state.on_container = on_container
        self.children: list[Child] = []

    def connect(self, metrics: Metrics | None = None) -> Child:
        """A new child, connected and greeted."""
        server = self.hub.box(len(self.children))
        lost: list[bool] = []
        box = ChildBox(metrics, on_lost=lambda: lost.append(True))
        pump = connect(
            server,
            FakeTransport(server, isServer=True),
            box,
            FakeTransport(box, isServer=False),
        )
        child = Child(box, RemoteBroker(box), server, pump, lost)
        self.children.append(child)
        self.flush()
        return child

    def flush(self) -> None:
        """Move every byte (a fact one child noted reaches the others) and run what the
        clock has due now."""
        moved = True
        while moved:
            moved = False
            self.tick(0)
            for ch in self.children:
                while ch.pump.pump(advanceClock=False):
                    moved = True

    def acquire(self, child: Child, segment: str, **kw: Any) -> Deferred[RemoteLease]:
        """``child``'s ``acquire``, flushed."""
        d = child.broker.acquire(spec(segment), **kw)
        self.flush()
        return d


def watched(d: Deferred[Any]) -> Deferred[Any]:
    """A Deferred with ``d``'s outcome, attached now: an error AMP reports after the
    caller's callbacks is logged and swallowed by AMP (``unhandledError``)."""
    out: Deferred[Any] = Deferred()
    d.chainDeferred(out)
    return out


class Echo(amp.Command):
    """A command carrying :class:`~dockerspaces.procs.commands.BigBytes` both ways."""

    arguments: ClassVar[list[tuple[bytes, amp.Argument]]] = [(b"data", c.BigBytes())]
    response: ClassVar[list[tuple[bytes, amp.Argument]]] = [(b"data", c.BigBytes())]


class EchoBox(amp.AMP):
    """Answers :class:`Echo` with the value reversed."""

    @Echo.responder
    def echo(self, data: bytes) -> dict[str, bytes]:
        """The value, reversed."""
        return {"data": data[::-1]}


# -- values on the wire --------------------------------------------------------------------


class ValuesTests(SynchronousTestCase):
    """Owners, specs, broker errors and long values as they cross."""

    def test_owner_round_trip(self) -> None:
        """An owner comes back equal; no owner is the empty string."""
        alice = Owner("alice", containers=2, gpus=None, queued=3, group="staff")
        self.assertEqual(c.owner_of(c.owner_json(alice)), alice)
        self.assertEqual(c.owner_json(None), "")
        self.assertIsNone(c.owner_of(""))

    def test_spec_of_refuses_anything_but_x_and_y(self) -> None:
        """A host: route or a malformed segment is a 400 refusal."""
        self.assertEqual(c.spec_of(A), spec(A))
        for bad in ("host:example.org", "x:"):
            with self.assertRaises(c.Refused) as caught:
                c.spec_of(bad)
            self.assertEqual(c.error_of(str(caught.exception)).status, 400)

    def test_errors_keep_class_status_and_retry_after(self) -> None:
        """Every broker error comes back as its class with its status and Retry-After."""
        for err in (
            Overloaded("full"),
            OverQuota("too many", 7, user="alice", quota="containers"),
            QueueTimeout("late", 12),
            StartFailed("no image"),
            Draining("bye"),
        ):
            back = c.error_of(c.refusal(err))
            self.assertIs(type(back), type(err))
            self.assertEqual(
                (back.status, back.retry_after, str(back)), (err.status, err.retry_after, str(err))
            )

    def test_unknown_kinds_become_remote_errors(self) -> None:
        """An engine's error (no class here) or garbage: a RemoteError (502 unless told)."""
        back = c.error_of(c.refusal(ValueError("odd"), 418))
        self.assertIs(type(back), c.RemoteError)
        self.assertEqual((back.status, str(back)), (418, "odd"))
        junk = c.error_of("not json")
        self.assertEqual((type(junk), junk.status, str(junk)), (c.RemoteError, 502, "not json"))

    def test_big_bytes_round_trip(self) -> None:
        """Values longer than AMP's 64 KiB cross whole, both ways; so do edge lengths."""
        server, client = EchoBox(), amp.AMP()
        pump = connect(server, FakeTransport(server, True), client, FakeTransport(client, False))
        for n in (0, 1, c.CHUNK, c.CHUNK + 1, 3 * c.CHUNK + 5, 300_000):
            value = bytes(i % 251 for i in range(n))
            d = client.callRemote(Echo, data=value)
            pump.flush()
            self.assertEqual(self.successResultOf(d)["data"], value[::-1], n)


# -- leases ----------------------------------------------------------------------------


class LeaseTests(SynchronousTestCase):
    """The broker's lease API, one AMP message each."""

    def test_acquire_gives_the_brokers_lease(self) -> None:
        """A RemoteLease with the broker's lease's endpoint, display and container."""
        w = Wire(slots=2)
        ch = w.connect()
        lease = self.successResultOf(w.acquire(ch, A))
        self.assertIsInstance(lease, RemoteLease)
        held = ch.server.leases[lease.id]
        self.assertEqual(
            (lease.endpoint, lease.display, lease.container_id, lease.queued_for),
            (held.endpoint, held.display, held.container_id, held.queued_for),
        )
        self.assertEqual(lease.endpoint, "tcp:127.0.0.1:9100")
        self.assertEqual((w.h.broker.state.leases, w.hub.leases, ch.broker.held), (1, 1, {lease.id}))

    def test_x_exclusive_across_children(self) -> None:
        """A second child's x: request waits until the first one's release crossed."""
        w = Wire(slots=1)
        one, two = w.connect(), w.connect()
        first = self.successResultOf(w.acquire(one, A))
        d = w.acquire(two, A)
        self.assertNoResult(d)
        self.assertEqual(w.h.broker.waiting(), 1)
        first.release()
        self.assertNoResult(d)  # the release has not crossed yet
        self.assertEqual(w.h.broker.state.leases, 1)
        w.flush()
        second = self.successResultOf(d)
        self.assertEqual(second.container_id, first.container_id)
        self.assertEqual((one.server.leases, list(two.server.leases)), ({}, [second.id]))
        self.assertEqual(w.h.starts(), 1)

    def test_release_is_idempotent(self) -> None:
        """A second release sends nothing (the broker's count stays right)."""
        w = Wire(slots=1)
        ch = w.connect()
        lease = self.successResultOf(w.acquire(ch, A))
        lease.release()
        lease.release()
        lease.failed()
        w.flush()
        self.assertEqual((w.h.broker.state.leases, w.hub.leases, ch.broker.held), (0, 0, set()))
        self.assertEqual(w.hub.messages, 2)  # one lease out, one release in

    def test_failed_takes_the_container_out(self) -> None:
        """``failed()``: the container counts as crashed; the next request gets a new one."""
        w = Wire(slots=1)
        ch = w.connect()
        lease = self.successResultOf(w.acquire(ch, A))
        lease.failed()
        w.flush()
        again = self.successResultOf(w.acquire(ch, A))
        self.assertNotEqual(again.container_id, lease.container_id)
        self.assertEqual(w.h.starts(), 2)

    def test_retry_released_and_failed(self) -> None:
        """``retry(False)``: the same container again; ``retry()``: a new one; the old
        lease numbers are no longer held on either side."""
        w = Wire(slots=1)
        ch = w.connect()
        lease = self.successResultOf(w.acquire(ch, A))
        d = lease.retry(failed=False)
        w.flush()
        same = self.successResultOf(d)
        self.assertEqual(same.container_id, lease.container_id)
        self.assertNotEqual(same.id, lease.id)
        d = same.retry()
        w.flush()
        other = self.successResultOf(d)
        self.assertNotEqual(other.container_id, lease.container_id)
        self.assertEqual((set(ch.server.leases), ch.broker.held), ({other.id}, {other.id}))
        self.assertEqual(w.h.broker.state.leases, 1)
        self.failureResultOf(same.retry(), BackendRefused)  # retried already

    def test_retry_of_a_lease_the_broker_no_longer_holds(self) -> None:
        """A Retry naming an unknown lease is refused (503), not crashed on."""
        w = Wire(slots=1)
        ch = w.connect()
        d = watched(ch.box.callRemote(c.Retry, ask=99, lease=42, failed=True))
        w.flush()
        err = c.error_of(str(self.failureResultOf(d, c.Refused).value))
        self.assertEqual(err.status, 503)

    def test_confirm(self) -> None:
        """Alive after the grace; dead once crashed; a released lease: not alive, asked
        of nobody."""
        w = Wire(slots=1)
        ch = w.connect()
        lease = self.successResultOf(w.acquire(ch, A))
        d = lease.confirm(0.25)
        w.flush()
        self.assertNoResult(d)
        w.h.clock.advance(0.25)
        w.flush()
        self.assertIs(self.successResultOf(d), True)
        w.h.engine.crash(lease.container_id)
        d = lease.confirm(0.25)
        w.flush()
        self.assertIs(self.successResultOf(d), False)
        lease.release()
        self.assertIs(self.successResultOf(lease.confirm(0.25)), False)

    def test_died_before(self) -> None:
        """True when the engine reports an exit before ``when``; False when alive."""
        w = Wire(slots=1)
        ch = w.connect()
        lease = self.successResultOf(w.acquire(ch, A))
        d = lease.died_before(w.h.clock.seconds() + 1, 1.0)
        w.flush()
        w.h.clock.advance(1)
        w.flush()
        self.assertIs(self.successResultOf(d), False)
        d = lease.died_before(w.h.clock.seconds() + 0.01, 1.0)
        w.flush()
        w.h.clock.advance(0.05)
        w.h.engine.crash(lease.container_id, exited_at=w.h.clock.seconds() - 0.05)
        w.flush()
        self.assertIs(self.successResultOf(d), True)

    def test_cancel_withdraws_the_ask(self) -> None:
        """A waiting acquire cancelled: it leaves the broker's line once the Cancel crossed."""
        w = Wire(slots=1)
        ch = w.connect()
        held = self.successResultOf(w.acquire(ch, A))
        d = w.acquire(ch, A)
        self.assertEqual(w.h.broker.waiting(), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(ch.broker.asks, {})
        w.flush()
        self.assertEqual((w.h.broker.waiting(), ch.server.asks), (0, {}))
        held.release()
        w.flush()
        self.assertEqual((w.h.broker.state.leases, ch.broker.held), (0, set()))

    def test_lease_answered_after_the_cancel_is_given_back(self) -> None:
        """The broker answered before the Cancel arrived: the child gives the lease
        back, and the next waiter gets the container."""
        w = Wire(slots=1)
        one, two = w.connect(), w.connect()
        held = self.successResultOf(w.acquire(one, A))
        d = w.acquire(one, A)
        later = w.acquire(two, A)
        held.release()
        one.pump.pump()  # the release reaches the broker; the answer is on its way back
        self.assertNoResult(d)
        self.assertEqual(len(one.server.leases), 1)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        w.flush()
        self.assertEqual((one.server.leases, one.broker.held), ({}, set()))
        got = self.successResultOf(later)
        self.assertEqual(got.container_id, held.container_id)
        self.assertEqual(w.h.broker.state.leases, 1)

    def test_launch_worker(self) -> None:
        """Answered once the worker started; the broker counts it; no lease is held."""
        w = Wire(slots=1, start_delay=3)
        ch = w.connect()
        d = ch.broker.launch_worker(spec(W))
        w.flush()
        self.assertNoResult(d)
        self.assertFalse(ch.broker.idle)
        w.h.clock.advance(3)
        w.flush()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(len(w.h.broker.worker_views(spec(W))), 1)
        self.assertTrue(ch.broker.idle)
        self.assertEqual(ch.server.asks, {})

    def test_launch_worker_refused(self) -> None:
        """A worker launch over the owner's quota fails as OverQuota."""
        w = Wire(slots=1)
        ch = w.connect()
        d = ch.broker.launch_worker(spec(W), owner=Owner("alice", containers=0))
        w.flush()
        self.assertEqual(self.failureResultOf(d, OverQuota).value.status, 429)


class ErrorTests(SynchronousTestCase):
    """Broker errors arrive as the same class with the same status and Retry-After."""

    def assertSameError(self, remote: Deferred[Any], local: Deferred[Any], cls: type[BrokerError]) -> None:
        """Both failed with ``cls``, same status, Retry-After and message."""
        r = self.failureResultOf(remote, cls).value
        lo = self.failureResultOf(local, cls).value
        self.assertIs(type(r), type(lo))
        self.assertEqual((r.status, r.retry_after, str(r)), (lo.status, lo.retry_after, str(lo)))

    def test_overloaded(self) -> None:
        """--queue 0 and --source 1 taken: Overloaded (503, Retry-After)."""
        w = Wire(slots=1, source=1, queue=0)
        ch = w.connect()
        self.successResultOf(w.acquire(ch, A))
        remote = w.acquire(ch, A)
        self.assertSameError(remote, w.h.acquire(A), Overloaded)

    def test_over_quota(self) -> None:
        """An owner with no container allowed: OverQuota (429, Retry-After ≥ 1)."""
        w = Wire(slots=1)
        ch = w.connect()
        broke = Owner("alice", containers=0)
        remote = w.acquire(ch, A, owner=broke)
        self.assertSameError(remote, w.h.acquire(A, owner=broke), OverQuota)
        self.assertEqual(self.failureResultOf(w.h.acquire(A, owner=broke)).value.status, 429)

    def test_draining(self) -> None:
        """A broker shutting down refuses with Draining."""
        w = Wire(slots=1)
        ch = w.connect()
        w.h.broker.shutdown(keep_containers=True)
        self.assertSameError(w.acquire(ch, A), w.h.acquire(A), Draining)

    def test_queue_timeout_of_a_waiting_ask(self) -> None:
        """An ask that waited too long fails with QueueTimeout; its ask is forgotten."""
        w = Wire(slots=1, queue_timeout=10)
        ch = w.connect()
        self.successResultOf(w.acquire(ch, A))
        d = w.acquire(ch, A)
        w.h.clock.advance(10)
        w.flush()
        self.assertEqual(self.failureResultOf(d, QueueTimeout).value.status, 503)
        self.assertEqual((ch.server.asks, ch.broker.asks), ({}, {}))

    def test_a_bad_segment(self) -> None:
        """A segment that is not x:/y: is refused with 400."""
        w = Wire(slots=1)
        ch = w.connect()
        d = watched(
            ch.box.callRemote(
                c.Acquire, ask=1, segment="host:example.org", owner="", board="", progress=False
            )
        )
        w.flush()
        self.assertEqual(c.error_of(str(self.failureResultOf(d, c.Refused).value)).status, 400)


# -- progress and the board --------------------------------------------------------------


class ProgressTests(SynchronousTestCase):
    """Progress pushed to a child, and the waiting pages' board kept with the broker."""

    def test_progress_pushed(self) -> None:
        """The child's callback gets the very Progress values a local caller would."""
        w = Wire(slots=1, ready_delay=5, pull_delay=2)
        ch = w.connect()
        got: list[Progress] = []
        d = w.acquire(ch, A, progress=got.append)
        for _ in range(8):
            w.h.clock.advance(1)
            w.flush()
        self.successResultOf(d)
        local = Harness(slots=1, ready_delay=5, pull_delay=2)
        seen: list[Progress] = []
        dl = local.acquire(A, progress=seen.append)
        for _ in range(8):
            local.clock.advance(1)
        self.successResultOf(dl)
        self.assertTrue(got)
        self.assertTrue(all(isinstance(p, Progress) for p in got))
        self.assertEqual(got, seen)
        self.assertEqual(ch.box.progress, {})  # forgotten once answered

    def test_no_progress_asked_none_pushed(self) -> None:
        """Without a callback the broker pushes nothing."""
        w = Wire(slots=1, ready_delay=5)
        ch = w.connect()
        d = w.acquire(ch, A)
        w.h.clock.advance(5)
        w.flush()
        self.successResultOf(d)
        self.assertEqual(ch.box.progress, {})

    def test_board(self) -> None:
        """A page registered by a child lives in the hub's board; an acquire naming its
        token publishes there; finish, last poll and discard cross."""
        w = Wire(slots=1, ready_delay=5)
        ch = w.connect()
        board = RemoteBoard(ch.box)
        token = board.new("a display", "/x:img:a:80/")
        w.flush()
        self.assertIn(token, w.board.entries)
        cb = board.callback(token)
        self.assertIsInstance(cb, BoardCallback)
        cb(Progress("starting"))  # nothing here: the broker's process publishes
        d = w.acquire(ch, A, progress=cb)
        self.assertEqual(ch.box.progress, {})  # not pushed to the child
        view = w.board.get(token)
        assert view is not None
        self.assertEqual((view["display"], view["url"]), ("a display", "/x:img:a:80/"))
        self.assertIn(view["state"], ("starting", "pulling"))
        polled = board.last_poll(token)
        w.flush()
        self.assertEqual(self.successResultOf(polled), w.h.clock.seconds())
        w.h.clock.advance(5)
        w.flush()
        self.successResultOf(d)
        board.finish(token, "ready")
        w.flush()
        view = w.board.get(token)
        assert view is not None
        self.assertEqual(view["state"], "ready")
        board.discard(token)
        w.flush()
        self.assertNotIn(token, w.board.entries)
        polled = board.last_poll(token)
        w.flush()
        self.assertIsNone(self.successResultOf(polled))


# -- facts, containers, metrics, networks -------------------------------------------------


class SharedTests(SynchronousTestCase):
    """What every child needs to know."""

    def test_note_reaches_every_other_child(self) -> None:
        """A route/app fact goes to every other child's learner, not back to its sender."""
        w = Wire()
        one, two, three = w.connect(), w.connect(), w.connect()
        learnt: dict[int, list[tuple[str, str, str]]] = {0: [], 1: [], 2: []}

        def learner(i: int, table: str) -> Callable[[str, str], None]:
            return lambda k, v: learnt[i].append((table, k, v))

        for i, ch in enumerate((one, two, three)):
            for table in ("route", "app", "origin"):
                ch.box.learners[table] = learner(i, table)
        one.box.note("route", "ref1", A)
        two.box.note("app", "label-a", A)
        w.flush()
        self.assertEqual(learnt[0], [("app", "label-a", A)])
        self.assertEqual(learnt[1], [("route", "ref1", A)])
        self.assertEqual(learnt[2], [("route", "ref1", A), ("app", "label-a", A)])
        self.assertEqual(dict(w.hub.tables["route"]), {"ref1": A})

    def test_origin_goes_to_the_hub_only(self) -> None:
        """An origin names a key's public URL: kept in the hub's apps, told to nobody."""
        w = Wire()
        one, two = w.connect(), w.connect()
        learnt: list[tuple[str, str]] = []
        two.box.learners["origin"] = lambda k, v: learnt.append((k, v))
        s = spec(A)
        one.box.note("origin", s.key, json.dumps([True, "apps.example.org:8443"]))
        one.box.note("origin", "bad", "not json")  # logged, ignored
        one.box.note("nope", "k", "v")  # no such table
        w.flush()
        self.assertEqual(learnt, [])
        self.assertTrue(
            w.hub.apps.url_for(s).startswith("https://apps.example.org:8443/"), w.hub.apps.url_for(s)
        )
        self.assertNotIn("nope", w.hub.tables)
        self.flushLoggedErrors()

    def test_lookup(self) -> None:
        """A fact a child missed (connected later); an app label of the hub's apps;
        None for anything unknown."""
        w = Wire()
        one = w.connect()
        one.box.note("route", "ref1", A)
        w.flush()
        late = w.connect()
        label = w.hub.apps.remember(spec(B))
        asked = [
            late.box.lookup("route", "ref1"),
            late.box.lookup("app", label),
            late.box.lookup("route", "nothing"),
            late.box.lookup("nope", "x"),
        ]
        w.flush()
        self.assertEqual([self.successResultOf(d) for d in asked[:2]], [A, B])
        self.assertIsNone(self.successResultOf(asked[3]))  # no such table: at once
        self.assertNoResult(asked[2])  # a miss is asked again NOTE_GRACE s later
        w.tick(NOTE_GRACE)
        w.flush()
        self.assertIsNone(self.successResultOf(asked[2]))

    def test_lookup_waits_for_a_note_on_its_way(self) -> None:
        """A fact noted just after another child asked for it is still found."""
        w = Wire()
        one, other = w.connect(), w.connect()
        asked = other.box.lookup("route", "ref2")
        w.flush()
        one.box.note("route", "ref2", A)
        w.flush()
        w.tick(NOTE_GRACE)
        w.flush()
        self.assertEqual(self.successResultOf(asked), A)

    def test_facts_are_bounded(self) -> None:
        """At most MAX_FACTS per table; the oldest go first."""
        w = Wire()
        for i in range(MAX_FACTS + 3):
            w.hub.note(None, "route", f"r{i}", A)
        t = w.hub.tables["route"]
        self.assertEqual((len(t), next(iter(t))), (MAX_FACTS, "r3"))

    def test_containers_pushed(self) -> None:
        """A child knows the containers when it connects and after every change."""
        w = Wire(slots=2)
        one = w.connect()
        self.assertEqual(one.broker.containers(), [])
        lease = self.successResultOf(w.acquire(one, A))
        views = one.broker.containers()
        self.assertEqual([(v.key, v.spec) for v in views], [(spec(A).key, spec(A))])
        local = w.h.broker.containers()[0]
        self.assertEqual((views[0].display, views[0].state), (local.display, local.state))
        two = w.connect()
        self.assertEqual([v.spec for v in two.broker.containers()], [spec(A)])
        lease.release()
        self.successResultOf(w.acquire(two, B))
        for ch in (one, two):
            self.assertEqual(
                sorted(v.key for v in ch.broker.containers()), sorted([spec(A).key, spec(B).key])
            )

    def test_metrics_gathered(self) -> None:
        """``/monitor:metrics`` of the broker's process: its own plus every child's."""
        w = Wire()
        m1, m2 = Metrics(), Metrics()
        m1.request_done("x", 200, 0.1)
        m2.request_done("x", 200, 0.2)
        m2.request_done("host", 502, 0.3)
        w.hub.metrics.container_event("start", "h0")
        w.connect(m1)
        w.connect(m2)
        d = w.hub.gather_metrics()
        w.flush()
        m = self.successResultOf(d)
        self.assertEqual((m.requests.get("x", "200"), m.requests.get("host", "502")), (2, 1))
        self.assertEqual(m.starts.get("h0"), 1)
        self.assertEqual(sum(s.count for s in m.request_seconds.series.values()), 3)

    def test_metrics_of_a_child_gone_are_left_out(self) -> None:
        """A child whose connection is lost while asked: the others still count."""
        w = Wire()
        m1, m2 = Metrics(), Metrics()
        m1.request_done("x", 200, 0.1)
        m2.request_done("x", 200, 0.2)
        w.connect(m1)
        two = w.connect(m2)
        d = w.hub.gather_metrics()
        two.kill()
        w.flush()
        self.assertEqual(self.successResultOf(d).requests.get("x", "200"), 1)

    def test_metrics_beyond_64_kib(self) -> None:
        """A child's metrics longer than one AMP value cross whole."""
        w = Wire()
        big = Metrics()
        for i in range(3000):
            big.request_done(f"kind-{i:05d}", 200, 0.1)
        self.assertGreater(len(json.dumps(big.export())), 3 * c.CHUNK)
        w.connect(big)
        d = w.hub.gather_metrics()
        w.flush()
        m = self.successResultOf(d)
        self.assertEqual(m.export(), Metrics().merged([big.export()]).export())

    def test_networks(self) -> None:
        """An engine's networks as the engine says; unknown engine 404; engine down 502."""
        w = Wire()
        ch = w.connect()
        d = RemoteNetworks(ch.box, "h0").networks()
        w.flush()
        self.assertEqual(self.successResultOf(d), w.h.engine.network_list)
        d = watched(RemoteNetworks(ch.box, "nowhere").networks())
        w.flush()
        self.assertEqual(self.failureResultOf(d, c.RemoteError).value.status, 404)
        w.h.engine.set_down(True)
        d = watched(RemoteNetworks(ch.box, "h0").networks())
        w.flush()
        self.assertEqual(self.failureResultOf(d, c.RemoteError).value.status, 502)


# -- a child that dies --------------------------------------------------------------------


class ReclaimTests(SynchronousTestCase):
    """The broker reclaims a dead child's leases at once and withdraws its asks."""

    def test_dead_childs_leases_and_asks(self) -> None:
        """Its leases come back, its waiting asks leave their lines, another child's
        waiter gets the container; the other child's leases stay."""
        w = Wire(slots=2)
        dead, alive = w.connect(), w.connect()
        la = self.successResultOf(w.acquire(dead, A))
        lb = self.successResultOf(w.acquire(alive, B))
        lost_ask = w.acquire(dead, A)
        waiter = w.acquire(alive, A)
        self.assertEqual((w.h.broker.waiting(), w.h.broker.state.leases), (2, 2))
        dead.kill()
        w.flush()
        got = self.successResultOf(waiter)
        self.assertEqual(got.container_id, la.container_id)
        self.failureResultOf(lost_ask, Draining)
        self.assertEqual(w.h.broker.waiting(), 0)
        self.assertEqual((dead.server.leases, dead.server.asks), ({}, {}))
        self.assertEqual(set(alive.server.leases), {lb.id, got.id})
        self.assertEqual(w.h.broker.state.leases, 2)
        self.assertEqual(w.hub.boxes, [alive.server])
        inflight = {v.id: v.inflight for v in w.h.broker.containers()}
        self.assertEqual(inflight, {la.container_id: 1, lb.container_id: 1})
        self.assertFalse(dead.server.connected)
        self.assertEqual(dead.lost, [True])

    def test_dead_childs_lease_with_nobody_waiting(self) -> None:
        """Released at once: the container is idle, nobody's lease was touched."""
        w = Wire(slots=2)
        dead, alive = w.connect(), w.connect()
        self.successResultOf(w.acquire(dead, Y))
        keep = self.successResultOf(w.acquire(alive, Y))
        self.assertEqual(w.h.broker.state.leases, 2)
        dead.kill()
        w.flush()
        self.assertEqual(w.h.broker.state.leases, 1)
        self.assertEqual([v.inflight for v in w.h.broker.containers()], [1])
        self.assertEqual(list(alive.server.leases), [keep.id])
        self.assertTrue(w.h.broker.idle is False)
        keep.release()
        w.flush()
        self.assertTrue(w.h.broker.idle)

    def test_broker_side_loss(self) -> None:
        """The broker's end closing has the same effect as the child's."""
        w = Wire(slots=1)
        ch = w.connect()
        self.successResultOf(w.acquire(ch, A))
        ch.pump.serverIO.loseConnection()
        w.flush()
        self.assertEqual((w.h.broker.state.leases, w.hub.boxes, ch.lost), (0, [], [True]))

    def test_dead_childs_worker_launch_withdrawn(self) -> None:
        """A worker launch still waiting for a slot leaves the line with its child."""
        w = Wire(slots=1)
        dead = w.connect()
        self.successResultOf(w.acquire(dead, A))
        d = dead.broker.launch_worker(spec(W))
        w.flush()
        self.assertEqual(w.h.broker.waiting(), 1)
        dead.kill()
        w.flush()
        self.failureResultOf(d, Draining)
        self.assertEqual((w.h.broker.waiting(), w.h.broker.state.leases), (0, 0))


class IdleTests(SynchronousTestCase):
    """``RemoteBroker.idle`` / ``when_idle``: a draining child waits for these."""

    def test_idle_after_release(self) -> None:
        """Not idle while asking or holding; fires when the last lease goes."""
        w = Wire(slots=1, ready_delay=2)
        ch = w.connect()
        self.assertTrue(ch.broker.idle)
        self.successResultOf(ch.broker.when_idle())
        d = w.acquire(ch, A)
        self.assertFalse(ch.broker.idle)
        idle = ch.broker.when_idle()
        w.h.clock.advance(2)
        w.flush()
        lease = self.successResultOf(d)
        self.assertNoResult(idle)
        lease.release()
        self.successResultOf(idle)  # at once: the Release need not have crossed
        self.assertTrue(ch.broker.idle)

    def test_idle_after_cancel_and_after_refusal(self) -> None:
        """A withdrawn ask and a refused one both end the wait."""
        w = Wire(slots=1)
        ch = w.connect()
        lease = self.successResultOf(w.acquire(ch, A))
        d = w.acquire(ch, A)
        lease.release()
        idle = ch.broker.when_idle()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        w.flush()
        self.successResultOf(idle)
        self.assertEqual(w.h.broker.state.leases, 0)
        refused = ch.broker.acquire(spec(A), owner=Owner("alice", containers=0))
        idle = ch.broker.when_idle()
        self.assertNoResult(idle)
        w.flush()
        self.failureResultOf(refused, OverQuota)
        self.successResultOf(idle)

    def test_retry_keeps_it_busy(self) -> None:
        """A retry under way holds the child busy until its new lease is released."""
        w = Wire(slots=1)
        ch = w.connect()
        lease = self.successResultOf(w.acquire(ch, A))
        d = lease.retry(failed=False)
        idle = ch.broker.when_idle()
        w.flush()
        self.assertNoResult(idle)
        self.successResultOf(d).release()
        self.successResultOf(idle)

    def test_broker_process_gone(self) -> None:
        """Waiting asks fail with Draining (503); new ones at once; a lease still held
        can be released (nothing sent) and the child becomes idle; the other calls
        answer as harmlessly as they can."""
        w = Wire(slots=1)
        ch = w.connect()
        lease = self.successResultOf(w.acquire(ch, A))
        waiting = w.acquire(ch, A)
        idle = ch.broker.when_idle()
        ch.pump.serverIO.loseConnection()
        w.flush()
        err = self.failureResultOf(waiting, Draining).value
        self.assertEqual((err.status, err.retry_after), (503, 5))
        self.assertIn("the broker's process is gone", str(err))
        self.assertEqual(ch.lost, [True])
        self.failureResultOf(ch.broker.acquire(spec(A)), Draining)
        self.failureResultOf(ch.broker.launch_worker(spec(W)), Draining)
        self.assertIs(self.successResultOf(lease.confirm(0.25)), False)
        self.assertIs(self.successResultOf(lease.died_before(0.0, 1.0)), False)
        self.assertIsNone(self.successResultOf(ch.box.lookup("route", "r")))
        self.assertIsNone(self.successResultOf(RemoteBoard(ch.box).last_poll("t")))
        self.failureResultOf(RemoteNetworks(ch.box, "h0").networks(), Draining)
        ch.box.note("route", "r", A)  # dropped
        self.assertNoResult(idle)
        lease.release()
        self.successResultOf(idle)
        self.assertEqual(w.h.broker.state.leases, 0)  # reclaimed on the broker's side


# -- the pool's restarts -------------------------------------------------------------------


class PoolRestartTests(SynchronousTestCase):
    """``WorkerPool.ended``: replaced at once after a long life, else after a growing
    delay; nothing once stopping. ``spawn`` is replaced: no process is started."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1000)
        w = Wire()
        self.relayed: list[str] = []
        self.pool = WorkerPool(
            Config(ports=()),
            self.reactor,
            w.hub,
            2,
            monitor="",
            cookie_key=b"k",
            engines=(),
            has_slots=True,
            relay=self.relayed.append,
        )
        self.spawned: list[int] = []
        self.pool.spawn = self.spawned.append  # type: ignore[method-assign,assignment]
        self.pool.startService()  # no port to bind; "spawns" both children
        self.assertEqual(self.spawned, [0, 1])
        del self.spawned[:]

    def child(self, index: int = 0, lived: float = 0.0) -> ChildProcess:
        """A child of the pool that started ``lived`` seconds ago."""
        proc = ChildProcess(self.pool, index, self.reactor.seconds() - lived)
        self.pool.children[index] = proc
        return proc

    def killed(self) -> Failure:
        """How a child killed by SIGKILL ends."""
        return Failure(ProcessTerminated(exitCode=None, signal=9))

    def delays(self) -> list[float]:
        """The pending restarts' delays."""
        return [round(dc.getTime() - self.reactor.seconds(), 6) for dc in self.reactor.getDelayedCalls()]

    def test_short_lives_restart_later_and_later(self) -> None:
        """1, 2, 4, … s, at most MAX_DELAY; each restart at its time."""
        seen = []
        for _ in range(7):
            self.pool.ended(self.child(0), self.killed())
            seen.extend(self.delays())
            self.reactor.advance(seen[-1] - 0.5)
            self.assertEqual(self.spawned, [0] * (len(seen) - 1))
            self.reactor.advance(0.5)
            self.assertEqual(self.spawned, [0] * len(seen))
        self.assertEqual(seen, [1.0, 2.0, 4.0, 8.0, 16.0, poolmod.MAX_DELAY, poolmod.MAX_DELAY])
        self.assertEqual(self.pool.restarts, 7)

    def test_long_life_restarts_at_once_and_resets(self) -> None:
        """A child that lived SHORT_LIFE or more is replaced at once; the next short
        life starts the delays over."""
        self.pool.ended(self.child(0), self.killed())
        self.reactor.advance(1)
        self.pool.ended(self.child(0), self.killed())
        self.assertEqual(self.delays(), [2.0])
        self.reactor.advance(2)
        self.pool.ended(self.child(0, lived=poolmod.SHORT_LIFE), self.killed())
        self.assertEqual(self.delays(), [0.0])
        self.reactor.advance(0)
        self.pool.ended(self.child(0), self.killed())
        self.assertEqual(self.delays(), [1.0])
        self.assertEqual(self.spawned, [0, 0, 0])

    def test_clean_exit_waits_a_second(self) -> None:
        """A clean exit (status 0) is a child told to stop: even after a long life its
        replacement waits a second (the whole process group may be stopping)."""
        self.pool.ended(self.child(0, lived=2 * poolmod.SHORT_LIFE), Failure(ProcessDone(0)))
        self.assertEqual(self.delays(), [1.0])

    def test_no_restart_once_the_reactor_shuts_down(self) -> None:
        """Told to shut down (before the pool's own turn to stop): an exit is final."""
        for f, args, kw in self.reactor.triggers["before"]["shutdown"]:
            f(*args, **kw)
        self.pool.ended(self.child(0), self.killed())
        self.assertEqual((self.reactor.getDelayedCalls(), self.pool.restarts), ([], 0))

    def test_no_restart_after_the_service_stopped(self) -> None:
        """A restart timer that fires once the pool no longer runs starts nothing."""
        self.pool.ended(self.child(0), self.killed())
        self.pool.running = False
        self.reactor.advance(1)
        self.assertEqual(self.spawned, [])

    def test_delays_per_index(self) -> None:
        """Each child index has its own delay; the pool forgets the ended child."""
        self.pool.ended(self.child(0), self.killed())
        self.reactor.advance(1)
        self.pool.ended(self.child(0), self.killed())
        self.pool.ended(self.child(1), self.killed())
        self.assertEqual(sorted(self.delays()), [1.0, 2.0])
        self.assertEqual(self.pool.children, {})

    def test_a_stale_child_does_not_unregister_its_successor(self) -> None:
        """An ended() for a child that was already replaced leaves the new one."""
        old = ChildProcess(self.pool, 0, self.reactor.seconds())
        new = self.child(0)
        self.pool.ended(old, self.killed())
        self.assertIs(self.pool.children[0], new)

    def test_no_restart_once_stopping(self) -> None:
        """While stopping an exit is only logged; a restart already pending is cancelled."""
        self.pool.ended(self.child(0), self.killed())
        self.assertEqual(self.delays(), [1.0])
        d = self.pool.stopService()
        self.successResultOf(d)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.pool.ended(self.child(1), self.killed())
        self.reactor.advance(100)
        self.assertEqual((self.spawned, self.pool.restarts, self.pool.children), ([], 1, {}))

    def test_process_ended_relays_the_last_line(self) -> None:
        """A child's stdout reaches the relay line by line, a last partial line at exit,
        and its end reaches the pool."""
        proc = self.child(0)
        proc.childDataReceived(1, b"one\ntw")
        proc.childDataReceived(1, b"o\nthr")
        self.assertEqual(self.relayed, ["one", "two"])
        proc.childDataReceived(1, b"")  # nothing whole: nothing relayed
        self.assertEqual(self.relayed, ["one", "two"])
        proc.processEnded(self.killed())
        self.assertEqual(self.relayed[:3], ["one", "two", "thr"])
        many = self.child(1)
        many.childDataReceived(1, b"a\nb\nc")  # the whole lines of a chunk in one piece
        self.assertEqual(self.relayed[3:], ["a\nb"])
        self.successResultOf(proc.ended)
        self.assertEqual(self.delays(), [1.0])


# -- parked x: leases ------------------------------------------------------------------------


class ParkTests(SynchronousTestCase):
    """A child keeps an x: lease LINGER seconds after its request; the broker takes it
    back at once when another child asks for that key or when a request has to wait."""

    def child(self, w: Wire) -> Child:
        """A child whose RemoteBroker parks (it has a clock)."""
        ch = w.connect()
        ch.broker = RemoteBroker(ch.box, w.h.clock)
        return ch

    def served(self, w: Wire, ch: Child, segment: str) -> RemoteLease:
        lease = self.successResultOf(w.acquire(ch, segment))
        w.h.clock.advance(0)
        w.flush()
        return lease

    def test_parked_lease_serves_the_next_request_without_asking(self) -> None:
        w = Wire(slots=1)
        one = self.child(w)
        first = self.served(w, one, A)
        first.release()
        w.flush()
        self.assertEqual(w.h.broker.state.leases, 1)  # still held: parked
        again = self.successResultOf(one.broker.acquire(spec(A)))
        self.assertIs(again, first)
        self.assertEqual(one.broker.joined, 1)
        again.release()
        w.h.clock.advance(childside.LINGER)
        w.flush()
        self.assertEqual(w.h.broker.state.leases, 0)
        self.assertEqual(w.h.starts(), 1)

    def test_another_child_gets_the_parked_container(self) -> None:
        """No second container: the parked lease comes back before the broker looks."""
        w = Wire(slots=2)
        one, two = self.child(w), self.child(w)
        first = self.served(w, one, A)
        first.release()
        w.flush()
        second = self.served(w, two, A)
        self.assertEqual(second.container_id, first.container_id)
        self.assertEqual(w.h.starts(), 1)
        self.assertEqual(one.broker.parked, {})
        self.assertEqual(w.h.broker.state.leases, 1)

    def test_a_lease_in_use_is_not_given_back_until_its_request_ends(self) -> None:
        w = Wire(slots=1)
        one, two = self.child(w), self.child(w)
        first = self.served(w, one, A)
        waiting = w.acquire(two, A)
        self.assertNoResult(waiting)
        first.release()  # asked back while in use: not parked, released
        w.flush()
        self.assertEqual(self.successResultOf(waiting).container_id, first.container_id)
        self.assertEqual(one.broker.parked, {})

    def test_a_waiting_request_takes_back_parked_leases_of_other_keys(self) -> None:
        """One slot: the parked A container is evicted for B at once, not after LINGER."""
        w = Wire(slots=1)
        one, two = self.child(w), self.child(w)
        first = self.served(w, one, A)
        first.release()
        w.flush()
        waiting = w.acquire(two, B)
        w.h.clock.advance(0)
        w.flush()
        w.h.clock.advance(0)
        w.flush()
        self.assertEqual(one.broker.parked, {})
        self.assertEqual(self.successResultOf(waiting).display, spec(B).display)

    def test_a_draining_child_gives_parked_leases_back(self) -> None:
        w = Wire(slots=1)
        one = self.child(w)
        self.served(w, one, A).release()
        w.flush()
        self.assertFalse(one.broker.idle)
        done = one.broker.when_idle()
        one.broker.give_back_idle()
        w.flush()
        self.successResultOf(done)
        self.assertEqual(w.h.broker.state.leases, 0)
