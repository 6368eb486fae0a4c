"""Hosts that come and go while the broker runs (swarm nodes joining, leaving, their
slot labels changing): ``Broker.add_host``, ``resize_host``, ``remove_host``."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.config import HostConfig
from dockerspaces.engine.fake import FakeEngine
from dockerspaces.engine.interface import RunOptions, SlotInfo

from .test_broker_harness import Harness, spec

A = "x:img:a:80"
B = "x:img:b:80"
C = "x:img:c:80"
Y = "y:img:y:80"
W = "x:img:worker:3"


def node(h: Harness, name: str, slots: int, port: int = 9500) -> tuple[HostConfig, FakeEngine]:
    """A host config and a fake engine for a node joining ``h``'s broker."""
    hc = HostConfig(name, "unix:///var/run/docker.sock", port, slots)
    return hc, FakeEngine(h.clock, hc)


class AddHostTests(SynchronousTestCase):
    def test_a_joining_host_takes_waiting_work(self) -> None:
        """With the only slot busy, a request waits; a host joining serves it."""
        h = Harness(slots=1)
        la = self.successResultOf(h.acquire(A))
        db = h.acquire(B)
        self.assertNoResult(db)
        hc, engine = node(h, "n2", 2)
        self.successResultOf(h.broker.add_host(hc, engine))
        lb = self.successResultOf(db)
        self.assertEqual(lb.endpoint, "tcp:127.0.0.1:9500")
        self.assertEqual(h.broker.host_slots(), {"h0": 1, "n2": 2})
        la.release()
        lb.release()
        self.assertEqual(len(h.broker.snapshot()["TargetSlots"]), 3)

    def test_a_joining_host_adopts_our_containers(self) -> None:
        """Its labelled running containers are adopted before its slots are used."""
        h = Harness(slots=1)
        hc, engine = node(h, "n2", 1)
        handle = self.successResultOf(engine.create(spec(Y), SlotInfo("n2", 9500), RunOptions()))
        self.successResultOf(engine.start(handle))
        self.successResultOf(h.broker.add_host(hc, engine))
        ly = self.successResultOf(h.acquire(Y))
        self.assertEqual(ly.container_id, handle.id)  # warm: no new start
        self.assertEqual(engine.creates, 1)

    def test_gpu_slots_counted_when_a_host_joins(self) -> None:
        """A GPU host joining a GPU-less broker: its slots carry their GPU ids."""
        h = Harness(slots=1)
        hc = HostConfig("gpu", "unix:///x", 9600, 2, 2)
        self.successResultOf(h.broker.add_host(hc, FakeEngine(h.clock, hc)))
        gpus = {s["Port"]: s.get("Gpu") for s in h.broker.snapshot()["TargetSlots"]}
        self.assertEqual((gpus.get(9600), gpus.get(9601)), (0, 1))


class ResizeTests(SynchronousTestCase):
    def test_grow_feeds_the_waiting(self) -> None:
        h = Harness(slots=1)
        la = self.successResultOf(h.acquire(A))
        db = h.acquire(B)
        h.broker.resize_host("h0", 2)
        lb = self.successResultOf(db)
        self.assertEqual(lb.endpoint, "tcp:127.0.0.1:9101")
        self.assertEqual(h.broker.host_slots(), {"h0": 2})
        la.release()

    def test_shrink_stops_idle_keeps_busy_until_released(self) -> None:
        """Slots beyond the new count take nothing new: an idle container there stops
        at once, a busy one when its request ends; then the slot is gone."""
        h = Harness(slots=3)
        la = self.successResultOf(h.acquire(A))
        lb = self.successResultOf(h.acquire(B))
        lc = self.successResultOf(h.acquire(C))
        ports = {la.endpoint[-4:]: la, lb.endpoint[-4:]: lb, lc.endpoint[-4:]: lc}
        ports["9102"].release()  # idle in a slot about to be retired
        h.broker.resize_host("h0", 1)
        self.assertEqual(h.broker.host_slots(), {"h0": 1})
        self.assertEqual(len(h.engine.running_on(9102)), 0)  # stopped at once
        self.assertEqual(len(h.engine.running_on(9101)), 1)  # busy: runs on
        # a new key cannot start in a retired slot: it waits for the one slot left
        dd = h.acquire("x:img:d:80")
        self.assertNoResult(dd)
        ports["9101"].release()  # the busy one ends: stopped, its slot goes
        self.assertEqual(len(h.engine.running_on(9101)), 0)
        self.assertEqual([s["Port"] for s in h.broker.snapshot()["TargetSlots"]], [9100])
        ports["9100"].release()  # the remaining slot: the waiting request evicts A
        ld = self.successResultOf(dd)
        self.assertEqual(ld.endpoint, "tcp:127.0.0.1:9100")

    def test_shrink_then_grow_reuses_a_retired_slot(self) -> None:
        h = Harness(slots=2)
        la = self.successResultOf(h.acquire(A))
        lb = self.successResultOf(h.acquire(B))
        h.broker.resize_host("h0", 1)
        h.broker.resize_host("h0", 2)  # back before the busy one ended
        self.assertEqual(h.broker.host_slots(), {"h0": 2})
        ports = sorted(s["Port"] for s in h.broker.snapshot()["TargetSlots"])
        self.assertEqual(ports, [9100, 9101])
        la.release()
        lb.release()
        self.successResultOf(h.acquire(C))  # a slot is free or evictable again

    def test_a_y_container_in_a_retired_slot_takes_no_new_leases(self) -> None:
        h = Harness(slots=2)
        lx = self.successResultOf(h.acquire(A))
        ly = self.successResultOf(h.acquire(Y))
        self.assertTrue(ly.endpoint.endswith("9101"))
        h.broker.resize_host("h0", 1)
        d2 = h.acquire(Y)
        self.assertNoResult(d2)  # not the suspect one; waits for capacity
        ly.release()  # the old one stops; its slot goes
        self.assertEqual(len(h.engine.running_on(9101)), 0)
        lx.release()  # slot 9100 idle: the y: request evicts A there
        self.assertTrue(self.successResultOf(d2).endpoint.endswith("9100"))


class RemoveHostTests(SynchronousTestCase):
    def test_leaving_host_stops_idle_and_workers_then_goes(self) -> None:
        h = Harness(slots=1, hosts=2, release=0)
        la = self.successResultOf(h.acquire(A))
        self.assertTrue(la.endpoint.endswith(":9100"))
        lb = self.successResultOf(h.acquire(B))  # on h1
        self.assertTrue(lb.endpoint.endswith(":9200"))
        lb.release()  # idle on h1
        h.broker.remove_host("h1", "node drained")
        self.assertEqual(h.engines["h1"].own(), {})  # its idle container stopped
        self.assertEqual(h.broker.host_slots(), {"h0": 1})
        self.assertEqual([x["Name"] for x in h.broker.snapshot()["Hosts"]], ["h0"])
        # a request for B now waits for h0's slot
        db = h.acquire(B)
        self.assertNoResult(db)
        la.release()
        self.assertTrue(self.successResultOf(db).endpoint.endswith(":9100"))

    def test_busy_container_on_a_leaving_host_finishes(self) -> None:
        h = Harness(slots=1, hosts=2)
        self.successResultOf(h.acquire(A))
        lb = self.successResultOf(h.acquire(B))
        h.broker.remove_host("h1", "node down")
        self.assertEqual(len(h.engines["h1"].running_on(9200)), 1)  # its request carries on
        self.assertIn("h1", [x["Name"] for x in h.broker.snapshot()["Hosts"]])
        lb.release()
        self.assertEqual(h.engines["h1"].own(), {})
        self.assertNotIn("h1", [x["Name"] for x in h.broker.snapshot()["Hosts"]])

    def test_a_host_rejoining_while_leaving(self) -> None:
        h = Harness(slots=1, hosts=2)
        lb = self.successResultOf(h.acquire("x:img:b:80"))
        self.successResultOf(h.acquire("x:img:c:80"))
        h.broker.remove_host("h1", "node down")
        hc = h.hosts[1]
        self.successResultOf(h.broker.add_host(hc, h.engines["h1"]))
        self.assertEqual(h.broker.host_slots(), {"h0": 1, "h1": 1})
        lb.release()
        self.successResultOf(h.acquire("x:img:d:80"))
