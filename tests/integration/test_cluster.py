"""A cluster of two dockerspaces processes on loopback: a front and a peer.

The peer runs ``--target 0 --docker-api`` (it schedules nothing itself and lends its
engine through ``/docker:local``); the front runs two ``--cluster`` entries: the peer
(``http://127.0.0.1:PEERPORT/docker:local``) and its own socket
(``unix:///var/run/docker.sock``). On this machine both are **the same engine reached
two ways with distinct host labels**: the broker labels every container with its host
name (``dockerspaces.host``), so the two hosts' containers do not collide, and the two
slot port ranges differ. Both processes share one token file (the front sends the token
to the peer).
"""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.trial.unittest import TestCase

from .dockerutil import docker_available, free_port
from .images import WEB, ensure_test_images
from .procs import Server, _free_range
from .wait import eventually

HOST_LABEL = "dockerspaces.host"


def web_path(name: str, rest: str = "cgi-bin/sleep?2") -> str:
    """An x: path of the web image with its own key (env ``name=1``; keys show env names)."""
    return f"/x:dockerspaces-test:web:1:8080:{name}=1/{rest}"


class Cluster(TestCase):
    """Front + peer: both hosts used, capacity adds up, a lost peer is routed around."""

    skip = docker_available()
    timeout = 300

    def setUp(self) -> None:
        ensure_test_images(WEB)
        self.token_file = os.path.abspath(self.mktemp())
        with open(self.token_file, "w") as f:
            f.write("cluster-" + uuid.uuid4().hex + "\n")
        self.peer_port = free_port()
        self.peer = self.start_peer()
        self.peer_slots = _free_range(2)
        self.local_slots = _free_range(2)
        while set(range(self.local_slots, self.local_slots + 2)) & set(
            range(self.peer_slots, self.peer_slots + 2)
        ):
            self.local_slots = _free_range(2)
        self.peer_url = f"http://127.0.0.1:{self.peer_port}/docker:local"
        self.peer_host = f"127.0.0.1:{self.peer_port}"
        self.front = Server(
            "--cluster",
            f"{self.peer_slots}:2:{self.peer_url}",
            "--cluster",
            f"{self.local_slots}:2:unix:///var/run/docker.sock",
            "--docker-api-token-file",
            self.token_file,
            "--start-timeout",
            "60",
            "--queue-timeout",
            "120",
            slots=4,
        )
        self.addCleanup(self.front.cleanup)
        self.front.start()

    def start_peer(self) -> Server:
        peer = Server(
            "--docker-api", "--docker-api-token-file", self.token_file, slots=0, port=self.peer_port
        )
        self.addCleanup(peer.stop)
        return peer.start()

    def hosts(self) -> dict[str, dict[str, Any]]:
        return {h["Name"]: h for h in self.front.snapshot()["Hosts"]}

    def wait_for(self, what: str, pred: Any, timeout: float = 30.0) -> None:
        try:
            eventually(pred, timeout, what, interval=0.3)
        except AssertionError:
            self.fail(f"timed out waiting for {what}; hosts: {self.hosts()}")

    def container_hosts(self) -> dict[str, str]:
        """Container id -> host label of the front's running containers."""
        return {c["Id"]: c["Labels"].get(HOST_LABEL, "") for c in self.front.containers()}

    def fire(self, paths: list[str]) -> list[tuple[int, dict[str, str], bytes]]:
        with ThreadPoolExecutor(len(paths)) as pool:
            return list(pool.map(lambda p: self.front.get(p, timeout=150), paths))

    def test_cluster(self) -> None:
        """Both hosts serve; the peer's loss moves new work to the socket; its return restores it."""
        snap = self.front.snapshot()
        slots = snap["TargetSlots"]
        self.assertEqual(len(slots), 4)  # capacity is the sum of both hosts' slots
        self.assertEqual(
            sorted((s["Host"], s["Port"]) for s in slots),
            sorted(
                [
                    (self.peer_host, self.peer_slots),
                    (self.peer_host, self.peer_slots + 1),
                    ("local", self.local_slots),
                    ("local", self.local_slots + 1),
                ]
            ),
        )
        self.wait_for("both hosts up", lambda: all(h["Up"] for h in self.hosts().values()))

        # four keys at once fill all four slots: two on each host
        results = self.fire([web_path(f"P{n}") for n in range(4)])
        self.assertEqual([r[0] for r in results], [200] * 4, [r[2][:300] for r in results if r[0] != 200])
        for _, _, body in results:
            self.assertIn(b"slept 2", body)
        by_host = sorted(self.container_hosts().values())
        self.assertEqual(by_host, sorted([self.peer_host] * 2 + ["local"] * 2))
        busy = {(s["Host"], s["Port"]) for s in self.front.snapshot()["TargetSlots"] if s["Container"]}
        self.assertEqual(len(busy), 4)
        self.assertIn("docker-api: POST /v1.", self.peer.output())  # created via the peer
        self.assertNotIn("refused", self.peer.output())

        # the peer goes away while two requests run in its containers and four new keys
        # arrive at once: nothing is lost, new work lands on the socket
        on_peer = [
            s["Key"] for s in self.front.snapshot()["TargetSlots"] if s["Host"] == self.peer_host and s["Key"]
        ]
        self.assertEqual(len(on_peer), 2, on_peer)
        names = [k.split("env[", 1)[1].split("]", 1)[0] for k in on_peer]
        with ThreadPoolExecutor(2) as pool:
            inflight = [
                pool.submit(self.front.get, web_path(n, "cgi-bin/sleep?4"), timeout=150) for n in names
            ]
            self.wait_for(
                "both requests in flight on the peer",
                lambda: (
                    sum(
                        int(s.get("InFlight") or 0)
                        for s in self.front.snapshot()["TargetSlots"]
                        if s["Host"] == self.peer_host
                    )
                    == 2
                ),
            )
            self.assertIn(self.peer.stop(), (0, -15))  # twistd re-raises SIGTERM at exit
            results = self.fire([web_path(f"Q{n}", "") for n in range(4)])
            done = [f.result() for f in inflight]
        self.assertEqual([r[0] for r in done], [200, 200], [r[2][:300] for r in done])
        for _, _, body in done:
            self.assertIn(b"slept 4", body)
        self.assertEqual([r[0] for r in results], [200] * 4, [r[2][:300] for r in results if r[0] != 200])
        self.wait_for("the peer marked down", lambda: not self.hosts()[self.peer_host]["Up"])
        self.assertTrue(self.hosts()["local"]["Up"])
        snap = self.front.snapshot()
        for s in snap["TargetSlots"]:
            if s["Host"] == self.peer_host:
                self.assertFalse(s["HostUp"])
        q_hosts = {s["Host"] for s in snap["TargetSlots"] if "env[Q" in (s["Key"] or "")}
        self.assertEqual(q_hosts, {"local"}, snap["TargetSlots"])

        # the peer returns on the same port: its slots come back and take work again
        self.peer = self.start_peer()
        self.wait_for("the peer back up", lambda: self.hosts()[self.peer_host]["Up"])
        results = self.fire([web_path(f"R{n}", "cgi-bin/sleep?1") for n in range(4)])
        self.assertEqual([r[0] for r in results], [200] * 4, [r[2][:300] for r in results if r[0] != 200])
        snap = self.front.snapshot()
        keys_on_peer = [s["Key"] or "" for s in snap["TargetSlots"] if s["Host"] == self.peer_host]
        self.assertTrue(any("env[R" in k for k in keys_on_peer), snap["TargetSlots"])
        self.assertIn(self.peer_host, self.container_hosts().values())
