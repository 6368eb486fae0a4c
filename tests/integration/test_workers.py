"""``--workers 2`` as a real process: the broker in the main process, the HTTP side in
two children that share the listening socket (issue 18).

- x: exclusivity across children: 30 concurrent requests over 2 slots, and the backend
  itself (:data:`~.images.BUSY`'s ``/cgi-bin/busy``) says whether it was serving
  another request at the same time;
- ``kill -9`` of a child under load: only requests that child had accepted may fail,
  the port never refuses, a new child replaces it, the leases come back;
- SIGTERM drains a slow request, then the process exits and removes its containers;
- ``/monitor:metrics`` counts the requests of both children.

Which child took a connection is read off ``/proc`` (the children's sockets against
``/proc/net/tcp``), so a test can show that both children served.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.trial.unittest import TestCase

from .dockerutil import docker_available
from .images import WEB, ensure_busy_image, ensure_test_images
from .procs import Server
from .wait import eventually

BUSY_KEY = "/x:dockerspaces-test:busy:1:8080"
WEB_KEY = "/x:dockerspaces-test:web:1:8080"


def connections_by_pid(pids: list[int], port: int) -> dict[int, int]:
    """How many established TCP connections on local ``port`` each process holds."""
    inodes = set()
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == "01":  # ESTABLISHED
                inodes.add(f"socket:[{cols[9]}]")
    out = {}
    for pid in pids:
        n = 0
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            fds = []  # gone
        for fd in fds:
            try:
                n += os.readlink(f"/proc/{pid}/fd/{fd}") in inodes
            except OSError:
                continue
        out[pid] = n
    return out


class ConnectionWatch:
    """Samples, in a thread, which of ``pids`` hold client connections on ``port``:
    ``most[pid]`` is the most seen at once."""

    def __init__(self, pids: list[int], port: int):
        self.pids, self.port = pids, port
        self.most = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for pid, n in connections_by_pid(self.pids, self.port).items():
                self.most[pid] = max(self.most[pid], n)

    def __enter__(self) -> ConnectionWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def quiet(snap: dict[str, Any]) -> bool:
    """No lease held and nobody waiting in a ``/monitor:broker/`` snapshot."""
    return (
        all(s["InFlight"] == 0 and s["State"] != "Run" for s in snap["TargetSlots"])
        and all(s["State"] == "Free" for s in snap["SourceSlots"])
        and not snap["Queues"]
    )


class WorkersTestCase(TestCase):
    """A ``--workers 2`` server per test (started by :meth:`server`)."""

    skip = docker_available()
    timeout = 120

    def server(self, *args: str, slots: int = 2) -> Server:
        srv = Server(*args, slots=slots, workers=2)
        self.addCleanup(srv.cleanup)
        srv.start()
        eventually(lambda: len(srv.child_pids()) == 2, 10, "two children")
        return srv


class Exclusivity(WorkersTestCase):
    """x: is exclusive across children: a container never serves two requests at once."""

    def setUp(self) -> None:
        ensure_busy_image()

    def test_30_concurrent_over_2_slots(self) -> None:
        srv = self.server(slots=2)
        children = srv.child_pids()

        def one(i: int) -> tuple[int, bytes]:
            # arrivals 20 ms apart (not all in one accept burst), so both children take some
            time.sleep(i * 0.02)
            status, _, body = srv.get(BUSY_KEY + "/cgi-bin/busy?0.3", timeout=90)
            return status, body

        with ConnectionWatch(children, srv.port) as watch, ThreadPoolExecutor(30) as pool:
            answers = list(pool.map(one, range(30)))
        self.assertEqual([s for s, _ in answers], [200] * 30, answers)
        verdicts = [body.split(b"\n")[0] for _, body in answers]
        self.assertEqual(verdicts, [b"alone"] * 30, answers)
        hosts = {body.split(b"\n")[1] for _, body in answers}
        self.assertLessEqual(len(hosts), 2, hosts)  # two slots, so at most two containers
        # both children took requests: the exclusivity held across processes
        self.assertTrue(all(watch.most[p] > 0 for p in children), watch.most)
        eventually(lambda: quiet(srv.snapshot()), 10, "no lease held")


class Outcome:
    """One request of the load: when it started, and its status or error."""

    def __init__(self, started: float, status: int | None, error: str | None):
        self.started, self.status, self.error = started, status, error

    def __repr__(self) -> str:
        return f"<{self.started:.3f} {self.status or self.error}>"


class Load:
    """``threads`` threads sending ``path`` one request after another until stopped;
    plus one thread that only connects (a refused connection is counted)."""

    def __init__(self, srv: Server, path: str, threads: int):
        self.srv, self.path = srv, path
        self.outcomes: list[Outcome] = []
        self.connects = 0
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True) for _ in range(threads)]
        self._threads.append(threading.Thread(target=self._connect, daemon=True))

    def _send(self) -> None:
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                status, _, _ = self.srv.get(self.path, timeout=30)
                self.outcomes.append(Outcome(t, status, None))
            except (OSError, http.client.HTTPException) as e:
                self.outcomes.append(Outcome(t, None, f"{e.__class__.__name__}: {e}"))
                if isinstance(e, ConnectionRefusedError):
                    self.refused.append(str(e))

    def _connect(self) -> None:
        while not self._stop.wait(0.005):
            try:
                socket.create_connection(("127.0.0.1", self.srv.port), timeout=5).close()
                self.connects += 1
            except OSError as e:
                self.refused.append(f"{e.__class__.__name__}: {e}")

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(40)

    def served_since(self, when: float) -> int:
        """Requests started after ``when`` and answered 200."""
        return sum(1 for o in self.outcomes if o.started > when and o.status == 200)


class KillAChild(WorkersTestCase):
    """``kill -9`` of one child under load."""

    def setUp(self) -> None:
        ensure_test_images(WEB)

    def test_kill_9_during_load(self) -> None:
        srv = self.server(slots=2)
        path = WEB_KEY + "/cgi-bin/sleep?0.2"
        self.assertEqual(srv.get(path)[0], 200)  # a warm container first
        before = srv.child_pids()
        victim = before[0]
        with Load(srv, path, threads=10) as load:
            eventually(lambda: load.served_since(0) >= 10, 20, "load running")
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            # the load goes on until a replacement runs and has been busy a while
            eventually(
                lambda: len([p for p in srv.child_pids() if p not in before]) == 1,
                20,
                "a replacement child",
            )
            replaced = time.monotonic()
            eventually(lambda: load.served_since(replaced) >= 20, 30, "served after the replacement")
        out = srv.output()
        failed = [o for o in load.outcomes if o.status != 200]
        # only the requests the dead child had accepted may fail, and only by the
        # connection closing: none started after the kill, none answered with an error
        self.assertEqual([o for o in failed if o.status is not None], [], out[-3000:])
        self.assertEqual([o for o in failed if o.started > killed + 0.1], [], out[-3000:])
        self.assertLessEqual(len(failed), 10, failed)
        self.assertEqual(load.refused, [])
        self.assertGreater(load.connects, 50)
        self.assertGreater(load.served_since(killed), 20)
        after = srv.child_pids()
        self.assertEqual(len(after), 2, after)
        self.assertNotIn(victim, after)
        self.assertIn("exited (signal 9)", out)
        # the dead child's leases came back: nothing held, nobody waiting
        eventually(lambda: quiet(srv.snapshot()), 10, "every lease back")
        with ThreadPoolExecutor(10) as pool:
            statuses = list(pool.map(lambda _: srv.get(path)[0], range(10)))
        self.assertEqual(statuses, [200] * 10)
        print(
            f"\n{len(load.outcomes)} requests, {len(failed)} lost with the killed child, "
            f"{load.connects} bare connects, none refused"
        )


class Drain(WorkersTestCase):
    """SIGTERM while a slow request is in flight on a child."""

    def setUp(self) -> None:
        ensure_test_images(WEB)

    def test_sigterm_finishes_the_request_then_exits(self) -> None:
        srv = self.server(slots=1)
        got: list[tuple[int, bytes]] = []

        def slow() -> None:
            status, _, body = srv.get(WEB_KEY + "/cgi-bin/sleep?3", timeout=60)
            got.append((status, body))

        t = threading.Thread(target=slow, daemon=True)
        t.start()
        eventually(
            lambda: any(s["InFlight"] == 1 for s in srv.snapshot()["TargetSlots"]),
            30,
            "the request in flight",
        )
        self.assertEqual(len(srv.containers()), 1)
        signalled = time.monotonic()
        code = srv.stop(signal.SIGTERM)
        t.join(10)
        out = srv.output()
        self.assertEqual(len(got), 1, out[-3000:])
        self.assertEqual(got[0][0], 200, got)
        self.assertIn(b"slept 3", got[0][1])
        self.assertIn(code, (0, -signal.SIGTERM), out[-3000:])  # twistd re-raises the signal
        self.assertLess(time.monotonic() - signalled, 30)
        self.assertEqual(srv.containers(all=True), [], "containers left after SIGTERM")
        self.assertIn("Server Shut Down", out)


class Metrics(WorkersTestCase):
    """/monitor:metrics adds up both children's counts."""

    def setUp(self) -> None:
        ensure_test_images(WEB)

    def test_counts_both_children(self) -> None:
        srv = self.server(slots=2)
        children = srv.child_pids()
        n = 24

        def get(i: int) -> int:
            time.sleep(min(i, 12) * 0.02)  # the first arrivals spread, so both children take some
            return srv.get(WEB_KEY + "/cgi-bin/sleep?0.3")[0]

        with ConnectionWatch(children, srv.port) as watch, ThreadPoolExecutor(12) as pool:
            statuses = list(pool.map(get, range(n)))
        self.assertEqual(statuses, [200] * n)
        self.assertTrue(all(watch.most[p] > 0 for p in children), watch.most)
        status, _, text = srv.get("/monitor:metrics")
        self.assertEqual(status, 200)
        from prometheus_client.parser import text_string_to_metric_families

        x200 = [
            s.value
            for fam in text_string_to_metric_families(text.decode())
            for s in fam.samples
            if s.name == "dockerspaces_requests_total" and s.labels == {"kind": "x", "status": "200"}
        ]
        self.assertEqual(x200, [float(n)], text.decode()[:2000])


class TlsAndUnixListeners(WorkersTestCase):
    """The children adopt an ``ssl:`` and a ``unix:`` listener too; a stopping child
    leaves the UNIX socket's path to the parent, which removes it last."""

    def setUp(self) -> None:
        ensure_test_images(WEB)

    def test_tls_and_unix(self) -> None:
        import shutil
        import ssl
        import tempfile

        from .dockerutil import free_port
        from .test_proxy import make_certs

        tmp = tempfile.mkdtemp(prefix="ds-workers-tls-")
        self.addCleanup(shutil.rmtree, tmp, True)
        certs = make_certs(tmp)
        tls_port = free_port()
        path = os.path.join(tmp, "ds.sock")
        srv = self.server(
            "--port",
            f"ssl:{tls_port}:privateKey={certs['key']}:certKey={certs['cert']}:interface=127.0.0.1",
            "--port",
            f"unix:{path}",
            slots=1,
        )
        ctx = ssl.create_default_context(cafile=certs["ca"])
        ctx.check_hostname = False
        for _ in range(4):  # new connections: either child may take them
            conn = http.client.HTTPSConnection("127.0.0.1", tls_port, context=ctx, timeout=30)
            conn.request("GET", WEB_KEY + "/index.html")
            r = conn.getresponse()
            self.assertEqual(r.status, 200)
            r.read()
            conn.close()
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(30)
            s.connect(path)
            s.sendall(b"GET /monitor:health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            s.close()
            self.assertTrue(data.startswith(b"HTTP/1.1 200 "), data[:200])
        code = srv.stop()
        self.assertIn(code, (0, -signal.SIGTERM))
        self.assertFalse(os.path.exists(path))
        self.assertNotIn("Traceback", srv.output())
