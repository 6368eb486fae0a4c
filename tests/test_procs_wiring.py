"""``--workers``: a child's whole HTTP side (``build_child``) on in-memory transports,
talking AMP to the broker's end (``Hub``/``BrokerBox``) over an ``iosim`` pump; the
parent's service tree (``build_parent``); log relaying."""

from __future__ import annotations

import io
import os
import socket
from typing import Any

from twisted.application.service import IServiceCollection
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.app import ProxyService, build_service
from dockerspaces.broker.broker import Broker
from dockerspaces.broker.model import BrokerSettings
from dockerspaces.config import HostConfig
from dockerspaces.engine.fake import FakeEngine
from dockerspaces.logoutput import LineWriter, TextObserver
from dockerspaces.options import build_config
from dockerspaces.procs import childside
from dockerspaces.procs.brokerside import Hub
from dockerspaces.procs.child import AdoptedPort, Drain, build_child
from dockerspaces.procs.childside import RemoteBroker
from dockerspaces.procs.parent import RunDir, build_parent, relay_to
from dockerspaces.procs.pool import ChildPlan, WorkerPool
from dockerspaces.web.pages import ProgressBoard

CLIENT = IPv4Address("TCP", "10.9.8.7", 4000)
HOST = HostConfig("local", "unix:///fake.sock", 42000, 1, 0, "127.0.0.1")
Y = b"GET /y:team:app:1:8080/page HTTP/1.1\r\nHost: front\r\n\r\n"
X = b"GET /x:team:app:1:8080/page HTTP/1.1\r\nHost: front\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class _Endpoint:
    """The child proxy's backend connections, held for the test to answer."""

    def __init__(self, backends: list[Any], seen: list[str], description: str):
        self.backends, self.seen, self.description = backends, seen, description

    def connect(self, factory: Any) -> Any:
        self.seen.append(self.description)
        p = factory.buildProtocol(None)
        t = StringTransport()
        p.makeConnection(t)
        self.backends.append((p, t))
        return succeed(p)


class ChildOverAmpTests(SynchronousTestCase):
    """One child (``build_child``) and the broker's end, pumped in memory."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.engine = FakeEngine(self.reactor, HOST)
        self.engine.images.add("team/app:1")
        self.broker = Broker(self.reactor, [HOST], {"local": self.engine}, BrokerSettings())
        self.successResultOf(self.broker.start())
        self.hub = Hub(self.broker, ProgressBoard(self.reactor), self.reactor)
        config = build_config({"target": "1", "instance": "t", "port": ["tcp:0"], "workers": "2"})
        plan = ChildPlan(
            config, 0, (("tcp:0", 99, socket.AF_INET),), "/run/x/monitor.sock", b"k" * 32, ("local",), True
        )
        self.top, self.box = build_child(plan, self.reactor, io.StringIO(), amp_fd=None)
        services = list(IServiceCollection(self.top))
        self.site = next(s for s in services if isinstance(s, AdoptedPort)).factory
        self.remote: RemoteBroker = next(s for s in services if isinstance(s, Drain)).broker
        proxy = next(s.proxy for s in services if isinstance(s, ProxyService))
        self.backends: list[Any] = []
        self.seen: list[str] = []
        proxy._endpoint_factory = lambda b: _Endpoint(self.backends, self.seen, b.description)
        server = self.hub.box(0)
        self.pump: IOPump = connect(
            server, FakeTransport(server, isServer=True), self.box, FakeTransport(self.box, isServer=False)
        )

    def settle(self) -> None:
        for _ in range(5):
            self.pump.flush()
            self.reactor.advance(0)

    def request(self, raw: bytes) -> StringTransport:
        ch = self.site.buildProtocol(CLIENT)
        t = StringTransport(peerAddress=CLIENT)
        ch.makeConnection(t)
        ch.dataReceived(raw)
        self.settle()
        return t

    def test_x_request_is_leased_over_amp_and_given_back(self) -> None:
        t = self.request(X)
        self.assertEqual(len(self.backends), 1)
        p, bt = self.backends[0]
        self.assertTrue(bt.value().startswith(b"GET /page HTTP/1.1\r\n"))
        self.assertEqual(self.broker.state.leases, 1)
        p.dataReceived(OK)
        self.assertTrue(t.value().endswith(b"\r\n\r\nok"))
        self.settle()
        self.assertEqual(self.broker.state.leases, 1)  # parked for the next request
        self.reactor.advance(childside.LINGER)
        self.settle()
        self.assertEqual(self.broker.state.leases, 0)
        self.assertTrue(self.remote.idle)

    def test_next_x_request_takes_the_parked_lease(self) -> None:
        """Sequential x: requests of one child: one Acquire crosses, not two."""
        for _ in range(2):
            t = self.request(X)
            self.backends[-1][0].dataReceived(OK)
            self.assertTrue(t.value().endswith(b"ok"))
            self.settle()
        self.assertEqual(self.remote.joined, 1)
        self.assertEqual(self.hub.messages, 1)  # one lease handed out, none released yet
        self.assertEqual(self.engine.starts, 1)

    def test_y_requests_share_the_childs_lease(self) -> None:
        """The second y: request joins the share: no round trip, one broker lease;
        the lease goes back LINGER seconds after the last request."""
        t1 = self.request(Y)
        t2 = self.request(Y)
        self.assertEqual(self.remote.joined, 1)
        self.assertEqual(self.broker.state.leases, 1)
        for p, _ in self.backends:
            p.dataReceived(OK)
        self.assertTrue(t1.value().endswith(b"ok"))
        self.assertTrue(t2.value().endswith(b"ok"))
        self.settle()
        self.assertEqual(self.broker.state.leases, 1)  # lingering
        self.reactor.advance(childside.LINGER)
        self.settle()
        self.assertEqual(self.broker.state.leases, 0)

    def test_lost_child_gives_its_leases_back(self) -> None:
        self.request(X)
        self.request(Y)
        self.assertEqual(self.broker.state.leases, 1)  # x: and y: share one slot: y waits
        self.assertEqual(self.broker.waiting(), 1)
        self.box.transport.loseConnection()
        self.settle()
        self.assertEqual(self.broker.state.leases, 0)
        self.assertEqual(self.broker.waiting(), 0)

    def test_monitor_routes_go_to_the_parents_socket(self) -> None:
        t = self.request(b"GET /monitor:broker/ HTTP/1.1\r\nHost: front\r\n\r\n")
        self.assertEqual(self.seen, ["unix:/run/x/monitor.sock"])
        p, bt = self.backends[0]
        self.assertTrue(bt.value().startswith(b"GET /monitor:broker/ HTTP/1.1\r\n"))
        p.dataReceived(OK)
        self.assertTrue(t.value().endswith(b"ok"))

    def test_request_metrics_reach_the_parent(self) -> None:
        t = self.request(X)
        self.backends[0][0].dataReceived(OK)
        self.assertTrue(t.value().endswith(b"ok"))
        d = self.hub.gather_metrics()
        self.settle()
        metrics = self.successResultOf(d)
        self.assertEqual(metrics.requests.get("x", "200"), 1)

    def test_route_cookie_made_here_is_known_to_the_parent(self) -> None:
        cookies = self.site.resource.route_cookies
        ref = cookies.ref("y:team:app:1:8080")
        self.settle()
        self.assertEqual(self.hub.lookup("route", ref.decode()), "y:team:app:1:8080")


class ParentTreeTests(SynchronousTestCase):
    """``build_service`` with ``--workers 2``."""

    def test_split_needed(self) -> None:
        config = build_config({"target": "0", "instance": "t", "port": ["tcp:0"], "workers": "2"})
        with self.assertRaises(ValueError):
            build_service(config, MemoryReactorClock(), io.StringIO())

    def test_parent_has_pool_and_private_monitor_socket(self) -> None:
        config = build_config({"target": "0", "instance": "t", "port": ["tcp:0"], "workers": "2"})
        top = build_service(config, MemoryReactorClock(), io.StringIO(), split=build_parent)
        services = list(IServiceCollection(top))
        pool = next(s for s in services if isinstance(s, WorkerPool))
        run = next(s for s in services if isinstance(s, RunDir))
        self.assertEqual(pool.count, 2)
        self.assertEqual(pool.monitor, os.path.join(run.path, "monitor.sock"))
        self.assertEqual(os.stat(run.path).st_mode & 0o777, 0o700)
        self.assertIs(services[-1], pool)  # stops first: children drain before the broker
        run.stopService()
        self.assertFalse(os.path.exists(run.path))

    def test_auto_is_one_per_core(self) -> None:
        config = build_config({"port": ["tcp:0"], "workers": "auto"})
        self.assertEqual(config.worker_count, os.cpu_count() or 1)

    def test_ports_children_cannot_adopt(self) -> None:
        from dockerspaces.config import ConfigError

        with self.assertRaises(ConfigError):
            build_config({"port": ["systemd:domain=INET:index=0"], "workers": "2"})


class RelayTests(SynchronousTestCase):
    def test_text_lines_pass_as_they_are(self) -> None:
        reactor = MemoryReactorClock()
        out = io.StringIO()
        relay = relay_to(TextObserver(LineWriter(out, reactor)))
        relay("2026-12-04T06:00:00+0000 [dockerspaces.request#info] x … -> 200")
        self.assertEqual(out.getvalue(), "2026-12-04T06:00:00+0000 [dockerspaces.request#info] x … -> 200\n")


class _Shared:
    """The broker's process as an AuthGate sees it (a ``ChildBox``), in memory."""

    def __init__(self, hub: Hub):
        self.hub = hub

    def note(self, table: str, key: str, value: str) -> None:
        self.hub.note(None, table, key, value)

    def take(self, table: str, key: str) -> Any:
        return succeed(self.hub.lookup(table, key))


class AccountsAcrossChildrenTests(SynchronousTestCase):
    """A ticket handed out by one child is redeemed, once, by any; a sign-out in one
    child ends the session's cached credential in the others."""

    def setUp(self) -> None:
        from dockerspaces.accounts.identity import make_portal
        from dockerspaces.web.auth import AuthGate
        from tests.test_auth import FakeAccounts

        self.clock = MemoryReactorClock()
        self.clock.advance(1_800_000_000)
        broker = Broker(self.clock, [], {}, BrokerSettings())
        self.hub = Hub(broker, ProgressBoard(self.clock), self.clock)
        accounts = FakeAccounts(clock=self.clock)
        self.a = AuthGate(accounts, make_portal(accounts), self.clock, session_lifetime=60)  # type: ignore[arg-type]
        self.b = AuthGate(accounts, make_portal(accounts), self.clock, session_lifetime=60)  # type: ignore[arg-type]
        self.a.shared = self.b.shared = _Shared(self.hub)

    def test_ticket_from_one_child_redeemed_once_in_another(self) -> None:
        ticket = self.a.ticket("alice", "app-xyz")
        self.assertEqual(self.successResultOf(self.b.redeem_anywhere(ticket, "app-xyz")), "alice")
        self.assertIsNone(self.successResultOf(self.b.redeem_anywhere(ticket, "app-xyz")))
        self.assertIsNone(self.successResultOf(self.a.redeem_anywhere(ticket, "app-xyz")))

    def test_ticket_for_another_label_or_expired(self) -> None:
        t1 = self.a.ticket("alice", "app-xyz")
        self.assertIsNone(self.successResultOf(self.b.redeem_anywhere(t1, "app-other")))
        t2 = self.a.ticket("alice", "app-xyz")
        self.clock.advance(3600)
        self.assertIsNone(self.successResultOf(self.b.redeem_anywhere(t2, "app-xyz")))

    def test_sign_out_reaches_the_other_children(self) -> None:
        """Over the wire: child A notes ``forget``; child B's learner drops the key."""
        boxes = []
        forgotten: list[str] = []
        for i in range(2):
            child = childside.ChildBox()
            server = self.hub.box(i)
            pump = connect(
                server, FakeTransport(server, isServer=True), child, FakeTransport(child, isServer=False)
            )
            boxes.append((child, pump))
        boxes[1][0].learners["forget"] = lambda key, _: forgotten.append(key)
        boxes[0][0].note("forget", "Ssession-cookie", "")
        for _, pump in boxes:
            pump.flush()
        for _, pump in boxes:
            pump.flush()
        self.assertEqual(forgotten, ["Ssession-cookie"])
