"""dockerspaces.hostguard: the ranges of the engines' container networks, and the
service that keeps the host: policy current (engines' networks, this machine's
addresses)."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.config import HostConfig
from dockerspaces.engine.interface import NetworkInfo
from dockerspaces.hostguard import HostPolicyService, container_ranges
from dockerspaces.testing import FakeEngine
from dockerspaces.web.routing import HostPolicy


class ContainerRangesTests(SynchronousTestCase):
    """Which addresses of an engine's networks are containers' (refused to host:)."""

    def test_container_ranges(self) -> None:
        nets = [
            NetworkInfo("bridge", "bridge", ("172.17.0.0/16",)),
            NetworkInfo("slots", "bridge", ("10.77.0.0/24", "fd00:77::/64"), ("10.77.0.128/25",)),
            NetworkInfo("lan", "macvlan", ("192.168.1.0/24",), ("192.168.1.192/27",)),
            NetworkInfo("lan2", "ipvlan", ("192.168.2.0/24",)),
            NetworkInfo("host", "host"),
            NetworkInfo("odd", "bridge", ("not-a-cidr",)),
        ]
        self.assertEqual(
            container_ranges(nets),
            {
                ipaddress.ip_network(n)
                for n in (
                    "172.17.0.0/16",
                    "10.77.0.0/24",
                    "fd00:77::/64",
                    "192.168.1.192/27",
                    "192.168.2.0/24",
                )
            },
        )


class HostPolicyServiceTests(SynchronousTestCase):
    """The engines' networks and this machine's addresses, asked at start and every
    interval; an engine that fails keeps its last answer and is warned about once."""

    def test_refresh(self) -> None:
        clock = Clock()
        policy = HostPolicy(allow=(), own_ports=set(), local=frozenset({"192.168.1.20"}))
        gpu = FakeEngine(clock, HostConfig("gpu1", "tcp://10.1.2.3:2375", 9100, 1))
        gpu.network_list = [NetworkInfo("slots", "bridge", ("10.77.0.0/24",))]
        local = FakeEngine(clock, HostConfig("local", "unix:///var/run/docker.sock", 9200, 1))
        addresses = {"192.168.1.20"}
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        svc = HostPolicyService(
            policy, {"gpu1": gpu, "local": local}, clock, interval=60, read_local=lambda: set(addresses)
        )
        svc.startService()
        self.assertEqual(
            policy.blocked_now, {ipaddress.ip_network("10.77.0.0/24"), ipaddress.ip_network("172.17.0.0/16")}
        )
        self.assertEqual(policy.generation, 2)  # one per engine; the addresses as given
        gpu.set_down(True)
        gpu.network_list = []
        addresses.add("10.8.0.1")  # an interface came up
        clock.advance(60)
        clock.advance(60)
        self.assertIn(ipaddress.ip_network("10.77.0.0/24"), policy.blocked_now)  # kept
        self.assertIn("10.8.0.1", policy.local_now)
        down = [e for e in events if "cannot list the networks" in str(e.get("log_format"))]
        self.assertEqual(len(down), 1)  # once per outage
        gpu.set_down(False)
        clock.advance(60)
        self.assertEqual(policy.blocked_now, {ipaddress.ip_network("172.17.0.0/16")})
        svc.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
