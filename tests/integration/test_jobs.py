"""x:, y: and worker routes end to end: real dockerspaces process, real containers."""

from __future__ import annotations

import re
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from twisted.trial.unittest import TestCase

from .dockerutil import docker_available, docker_client
from .images import SLOWHTTP, TTS, WEB, WORKER, ensure_test_images
from .procs import Server
from .wait import eventually

SKIP = docker_available()


def hostname_of(body: bytes) -> str:
    m = re.search(rb"hostname=(\S+)", body)
    assert m, body[:300]
    return m.group(1).decode()


class JobsTestCase(TestCase):
    """Shared set-up: test images and a server factory with cleanup."""

    skip = SKIP
    timeout = 240

    def setUp(self) -> None:
        ensure_test_images(TTS, WEB, SLOWHTTP, WORKER)

    def server(self, *args: str, slots: int = 2, **kw: object) -> Server:
        s = Server(*args, slots=slots, **kw)  # type: ignore[arg-type]
        self.addCleanup(s.cleanup)
        return s.start()


class Exclusive(JobsTestCase):
    """--target 2, three images, 30 concurrent requests."""

    def test_thirty_requests_three_images_two_slots(self) -> None:
        srv = self.server("--queue-timeout", "180", "--start-timeout", "60", slots=2)
        paths = [
            "/x:selmaproject:tts:777:5002/cgi-bin/sleep?0.3",
            "/x:dockerspaces-test:web:1:8080/cgi-bin/sleep?0.3",
            "/x:dockerspaces-test:slowhttp:1:8080/cgi-bin/sleep?0.3",
        ] * 10
        running_max = 0
        stop = threading.Event()

        def sample() -> None:
            nonlocal running_max
            c = docker_client()
            try:
                while not stop.is_set():
                    n = len(
                        c.containers(
                            filters={"label": f"dockerspaces.instance={srv.instance}", "status": "running"}
                        )
                    )
                    running_max = max(running_max, n)
                    time.sleep(0.1)  # pacing of the sampler, not synchronisation
            finally:
                c.close()

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            with ThreadPoolExecutor(30) as pool:
                results = list(pool.map(lambda p: srv.get(p, timeout=200), paths))
        finally:
            stop.set()
            sampler.join()
        statuses = [r[0] for r in results]
        self.assertEqual(statuses, [200] * 30, [r[2][:200] for r in results if r[0] != 200])
        for (_, _, body), _path in zip(results, paths):
            self.assertIn(b"slept 0.3", body)
        self.assertLessEqual(running_max, 2)
        self.assertGreaterEqual(running_max, 1)
        snap = srv.snapshot()
        self.assertEqual(sum(snap["Queues"].values()) if snap["Queues"] else 0, 0)
        self.assertTrue(all(s["InFlight"] == 0 for s in snap["TargetSlots"]))

    def test_missing_slash_redirects(self) -> None:
        srv = self.server(slots=1)
        status, headers, _ = srv.get("/x:selmaproject:tts:777:5002?a=1")
        self.assertEqual(status, 308)
        self.assertEqual(headers["location"], "/x:selmaproject:tts:777:5002/?a=1")

    def test_env_reaches_container_and_separates_keys(self) -> None:
        srv = self.server(slots=2)
        s1, _, b1 = srv.get("/x:selmaproject:tts:777:5002:GREETING=hello%3Bworld/cgi-bin/env")
        s2, _, b2 = srv.get("/x:selmaproject:tts:777:5002:GREETING=other/cgi-bin/env")
        self.assertEqual((s1, s2), (200, 200))
        self.assertIn(b"GREETING=hello;world", b1)
        self.assertIn(b"GREETING=other", b2)
        self.assertNotEqual(hostname_of(b1), hostname_of(b2))
        snap = srv.snapshot()
        self.assertNotIn("hello", str(snap))
        self.assertNotIn("hello", srv.output())

    def test_disconnect_while_queued(self) -> None:
        srv = self.server("--source", "1", slots=1)
        first = ThreadPoolExecutor(1).submit(srv.get, "/x:dockerspaces-test:web:1:8080/cgi-bin/sleep?3")
        eventually(lambda: in_flight(srv) == 1, 30, "the first request holds the only container")
        sock = socket.create_connection(("127.0.0.1", srv.port))
        sock.sendall(b"GET /x:dockerspaces-test:web:1:8080/ HTTP/1.1\r\nHost: t\r\n\r\n")
        eventually(lambda: queued(srv) >= 1, 10, "the second request queued", interval=0.1)
        sock.close()  # leave the queue
        eventually(lambda: queued(srv) == 0, 10, "the queue empty again", interval=0.1)
        self.assertEqual(first.result(60)[0], 200)
        status, _, _ = srv.get("/x:dockerspaces-test:web:1:8080/")
        self.assertEqual(status, 200)

    def test_container_killed_mid_request(self) -> None:
        srv = self.server(slots=1)
        status, _, body = srv.get("/x:dockerspaces-test:web:1:8080/")
        self.assertEqual(status, 200)
        victim = hostname_of(body)
        pending = ThreadPoolExecutor(1).submit(srv.get, "/x:dockerspaces-test:web:1:8080/cgi-bin/sleep?5")
        eventually(lambda: in_flight(srv) == 1, 30, "the request in flight on the container")
        c = docker_client()
        try:
            (info,) = [
                i
                for i in c.containers(filters={"label": f"dockerspaces.instance={srv.instance}"})
                if i["Id"].startswith(victim)
            ]
            c.kill(info["Id"])
        finally:
            c.close()
        status, _, body = pending.result(60)
        # a bodiless GET that got no byte of an answer is sent again, once, to a new
        # container; a request with a body would have its 502 (its bytes may have
        # reached the app: test_faults covers it)
        self.assertEqual(status, 200, body)
        self.assertNotEqual(hostname_of(body), victim)
        status, _, body = srv.get("/x:dockerspaces-test:web:1:8080/")
        self.assertEqual(status, 200, body)
        self.assertNotEqual(hostname_of(body), victim)


class Shared(JobsTestCase):
    """y: one container serves everyone at once."""

    def test_y_sharing(self) -> None:
        srv = self.server(slots=2)
        start = time.monotonic()
        with ThreadPoolExecutor(5) as pool:
            results = list(
                pool.map(lambda _: srv.get("/y:dockerspaces-test:web:1:8080/cgi-bin/sleep?2"), range(5))
            )
        took = time.monotonic() - start
        self.assertEqual([r[0] for r in results], [200] * 5)
        self.assertEqual(len({hostname_of(r[2]) for r in results}), 1)
        self.assertLess(took, 2 * 5, "y: requests were served one at a time")
        self.assertEqual(len(srv.containers()), 1)


class Workers(JobsTestCase):
    """Worker launches (port 3)."""

    def test_worker_sees_env(self) -> None:
        srv = self.server(slots=3)  # workers may hold all slots but one
        status, _, body = srv.get("/x:dockerspaces-test:worker:1:3:QUEUE_URL=amqp%3A%2F%2Fmq%3A5672;N=1/")
        self.assertEqual((status, body), (200, b""))
        (info,) = srv.containers()
        c = docker_client()
        try:
            logs = c.logs(info["Id"]).decode()
        finally:
            c.close()
        self.assertIn("QUEUE_URL=amqp://mq:5672", logs)
        status, _, _ = srv.get("/x:dockerspaces-test:worker:1:3:QUEUE_URL=amqp%3A%2F%2Fmq%3A5672;N=1/")
        self.assertEqual(status, 200)
        self.assertEqual(len(srv.containers()), 2)


class Adoption(JobsTestCase):
    """--keep-containers leaves containers running; the next start adopts them."""

    def test_restart_adopts(self) -> None:
        first = Server("--keep-containers", slots=2)
        self.addCleanup(first.cleanup)
        first.start()
        status, _, body = first.get("/x:selmaproject:tts:777:5002/")
        self.assertEqual(status, 200)
        host = hostname_of(body)
        self.assertIn(first.stop(), (0, -signal.SIGTERM))  # twistd re-raises the signal
        self.assertEqual(len(first.containers()), 1, "container not kept")
        second = Server("--keep-containers", slots=2, instance=first.instance, start_port=first.start_port)
        self.addCleanup(second.cleanup)
        second.start()
        snap = second.reconciled_snapshot()
        adopted = [s for s in snap["TargetSlots"] if s["Container"]]
        self.assertEqual(len(adopted), 1, snap)
        status, _, body = second.get("/x:selmaproject:tts:777:5002/")
        self.assertEqual(status, 200)
        self.assertEqual(hostname_of(body), host)
        second.stop()
        third = Server(slots=2, instance=first.instance, start_port=first.start_port)
        self.addCleanup(third.cleanup)
        third.start()
        self.assertIn(third.stop(), (0, -signal.SIGTERM))
        self.assertEqual(len(first.containers(all=True)), 0, "containers left after a normal stop")


class HostRefusals(JobsTestCase):
    """host: cannot reach a slot container directly, nor this machine's Docker bridge."""

    def test_slot_container_and_bridge_gateway_refused(self) -> None:
        srv = self.server(slots=1)
        status, _, body = srv.get("/x:dockerspaces-test:web:1:8080/")
        self.assertEqual(status, 200, body)
        (info,) = srv.containers()
        c = docker_client()
        try:
            net = c.inspect_container(info["Id"])["NetworkSettings"]
        finally:
            c.close()
        ip, gateway = net["IPAddress"], net["Gateway"]
        self.assertTrue(ip and gateway, net)
        for target in (f"{ip}:8080", f"{gateway}:{srv.start_port}", f"{gateway}:{srv.port}"):
            status, _, body = srv.get(f"/host:{target}/")
            self.assertEqual(status, 403, (target, body))
        status, _, body = srv.get("/host:" + "a" * 64 + ".example/")
        self.assertEqual(status, 400, body)


def queued(srv: Server) -> int:
    """Requests waiting in the server's queues."""
    return sum(srv.snapshot()["Queues"].values() or [0])


def in_flight(srv: Server) -> int:
    """Requests in flight on the server's containers."""
    return sum(int(s.get("InFlight") or 0) for s in srv.snapshot()["TargetSlots"])
