"""``SwarmHosts``: the swarm's ready nodes as the broker's hosts, while running (a node
joining, its slot label changing, draining, going down, leaving; the manager away)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.config import HostConfig
from dockerspaces.engine.fake import FakeEngine
from dockerspaces.engine.interface import EngineUnreachable, IEngine
from dockerspaces.engine.swarm import NodeInfo
from dockerspaces.engine.swarmhosts import SwarmHosts

from .test_broker_harness import Harness


def node(
    nid: str, host: str, slots: str | None = None, state: str = "ready", availability: str = "active"
) -> NodeInfo:
    """A node as the manager lists it."""
    labels = {} if slots is None else {"dockerspaces.slots": slots}
    return NodeInfo(nid, host, f"10.0.0.{len(nid)}", state, availability, "worker", labels)


class Source:
    """The manager's node list, set by the test (``None``: the manager is away)."""

    def __init__(self) -> None:
        self.listing: list[NodeInfo] | None = []

    def nodes(self) -> Deferred[list[NodeInfo]]:
        if self.listing is None:
            return fail(EngineUnreachable("manager away"))
        return succeed(list(self.listing))


class SwarmHostsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.h = Harness(slots=0, hosts=0)
        self.source = Source()
        self.engines: dict[str, FakeEngine] = {}
        self.forgotten: list[str] = []

        def make_host(n: NodeInfo, slots: int, gpus: int, name: str) -> tuple[HostConfig, IEngine]:
            hc = HostConfig(
                name, "unix:///var/run/docker.sock", 9100, slots, gpus, address_override=n.address
            )
            e = self.engines[name] = FakeEngine(self.h.clock, hc)
            return hc, e

        self.sh = SwarmHosts(
            self.source,
            self.h.broker,
            self.h.clock,
            make_host,
            default_slots=2,
            default_gpus=0,
            interval=5,
            forget=self.forgotten.append,
        )
        self.sh.startService()
        self.addCleanup(self.sh.stopService)

    def read(self, *nodes: NodeInfo) -> dict[str, int]:
        self.source.listing = list(nodes)
        self.h.clock.advance(5)
        return self.h.broker.host_slots()

    def test_nodes_join_with_labelled_or_default_slots(self) -> None:
        self.assertEqual(self.h.broker.host_slots(), {})  # nothing yet
        got = self.read(node("n1", "gpu1", "3"), node("n22", "gpu2"))
        self.assertEqual(got, {"gpu1": 3, "gpu2": 2})
        lease = self.successResultOf(self.h.acquire("x:img:a:80"))
        self.assertIn(lease.endpoint, {"tcp:10.0.0.2:9100", "tcp:10.0.0.3:9100"})

    def test_label_change_resizes_without_restart(self) -> None:
        self.read(node("n1", "gpu1", "2"))
        self.assertEqual(self.read(node("n1", "gpu1", "3")), {"gpu1": 3})
        self.assertEqual(self.read(node("n1", "gpu1", "1")), {"gpu1": 1})

    def test_drained_down_or_gone_nodes_leave(self) -> None:
        self.read(node("n1", "a"), node("n22", "b"), node("n333", "c"))
        got = self.read(node("n1", "a", availability="drain"), node("n22", "b", state="down"))
        self.assertEqual(got, {})
        self.assertEqual(sorted(self.forgotten), ["a", "b", "c"])
        # the drained one comes back
        self.assertEqual(self.read(node("n1", "a")), {"a": 2})

    def test_manager_away_changes_nothing(self) -> None:
        self.read(node("n1", "a"))
        self.source.listing = None
        self.h.clock.advance(5)
        self.assertEqual(self.h.broker.host_slots(), {"a": 2})
        self.assertEqual(self.sh.errors, 1)
        self.assertEqual(self.read(node("n1", "a"), node("n22", "b")), {"a": 2, "b": 2})
        self.assertEqual(self.sh.errors, 0)

    def test_same_hostname_twice_gets_distinct_names(self) -> None:
        got = self.read(node("aaaaaaaa1", "box"), node("bbbbbbbb2", "box"))
        self.assertEqual(got, {"box": 2, "box-bbbbbb": 2})

    def test_a_reading_under_way_is_not_started_again(self) -> None:
        pending: Deferred[list[NodeInfo]] = Deferred()
        calls: list[Any] = []

        def slow() -> Deferred[list[NodeInfo]]:
            calls.append(1)
            return pending

        self.source.nodes = slow  # type: ignore[method-assign]
        self.h.clock.advance(5)
        self.h.clock.advance(5)
        self.assertEqual(len(calls), 1)
        pending.callback([node("n1", "a")])
        self.assertEqual(self.h.broker.host_slots(), {"a": 2})
