"""Running inside a container (:mod:`dockerspaces.inside`): detection, the sibling
gateway, the entrypoint's socket path -- on fake ``/proc`` trees, no Docker needed."""

from __future__ import annotations

import os

from twisted.trial.unittest import SynchronousTestCase


class InsideTests(SynchronousTestCase):
    """Container detection and the sibling gateway (no Docker needed)."""

    ROUTE = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth0\t00000000\t010011AC\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
        "eth0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
    )

    def fake_root(self, dockerenv: bool, route: str, cgroup: str = "0::/\n") -> str:
        root = self.mktemp()
        os.makedirs(os.path.join(root, "proc/net"))
        os.makedirs(os.path.join(root, "proc/1"))
        with open(os.path.join(root, "proc/net/route"), "w") as f:
            f.write(route)
        with open(os.path.join(root, "proc/1/cgroup"), "w") as f:
            f.write(cgroup)
        if dockerenv:
            open(os.path.join(root, ".dockerenv"), "w").close()
        return root

    def test_gateway_parsed(self) -> None:
        from dockerspaces.inside import parse_route_table

        self.assertEqual(parse_route_table(self.ROUTE), "172.17.0.1")
        self.assertIsNone(parse_route_table(self.ROUTE.splitlines()[0] + "\n"))

    def test_sibling_in_a_container(self) -> None:
        from dockerspaces.inside import sibling_gateway

        self.assertEqual(sibling_gateway(self.fake_root(True, self.ROUTE)), "172.17.0.1")
        cg = "12:pids:/docker/3f2a9c\n"
        self.assertEqual(sibling_gateway(self.fake_root(False, self.ROUTE, cg)), "172.17.0.1")

    def test_not_in_a_container(self) -> None:
        from dockerspaces.inside import sibling_gateway

        self.assertIsNone(sibling_gateway(self.fake_root(False, self.ROUTE)))

    def test_engine_beside_us(self) -> None:
        """docker-in-docker: a docker0 bridge here means published ports are local."""
        from dockerspaces.inside import sibling_gateway

        route = self.ROUTE + "docker0\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n"
        self.assertIsNone(sibling_gateway(self.fake_root(True, route)))

    def test_socket_path_from_args(self) -> None:
        from dockerspaces.inside import socket_path

        self.assertEqual(socket_path([]), "/var/run/docker.sock")
        self.assertEqual(socket_path(["-docker", "unix:///run/d.sock"]), "/run/d.sock")
        self.assertEqual(socket_path(["--docker=unix:///x.sock"]), "/x.sock")
        self.assertIsNone(socket_path(["--docker", "tcp://h:2375"]))
