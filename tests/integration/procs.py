"""Run dockerspaces as a real process for integration tests.

:class:`Server` starts ``twistd -n dockerspaces …`` (or ``docker-spaces``) from this
checkout on a free loopback port with a unique ``--instance`` (so cleanup touches only
its own containers), waits until ``/monitor:broker/`` answers (``probe=`` names another
path, e.g. ``/monitor:health``, which stays open under ``--auth accounts``;
``probe_headers=`` adds credentials), and offers small blocking HTTP helpers.  Tests
using it are blocking on purpose: the server is another process.  ``workers=N`` (N > 1)
starts it with ``--workers N``: the broker in that process, the HTTP side in N children
(:meth:`Server.child_pids` lists them).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
from typing import Any

from .dockerutil import (
    docker_client,
    free_port,
    free_ports,
    remove_instance_containers,
    unique_instance,
)
from .wait import eventually

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


class Server:
    """One dockerspaces process (``twistd -n dockerspaces`` by default)."""

    def __init__(
        self,
        *args: str,
        slots: int = 2,
        instance: str | None = None,
        port: int | None = None,
        command: str = "twistd",
        start_port: int | None = None,
        extra_env: dict[str, str] | None = None,
        probe: str = "/monitor:broker/",
        probe_headers: dict[str, str] | None = None,
        workers: int = 1,
    ):
        self.port = port or free_port()
        self.instance = instance or unique_instance("srv")
        self.slots = slots
        if start_port is None:
            start_port = free_ports(max(slots, 1))[0] if slots <= 1 else _free_range(slots)
        self.start_port = start_port
        self.args = list(args)
        self.command = command
        self.env = dict(os.environ, PYTHONPATH=REPO, **(extra_env or {}))
        self.probe, self.probe_headers = probe, probe_headers
        self.workers = workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = os.path.join(REPO, "_trial_temp", f"server-{self.instance}.log")

    def argv(self) -> list[str]:
        """The command line (twistd plugin form)."""
        base = [os.path.join(BIN, "twistd"), "-n", "--pidfile=", "--logfile=-", "dockerspaces"]
        own = ["--port", f"tcp:{self.port}:interface=127.0.0.1", "--instance", self.instance]
        if not any(a == "--cluster" for a in self.args):
            own += ["--target", str(self.slots), "--start-port", str(self.start_port)]
        if self.workers != 1:
            own += ["--workers", str(self.workers)]
        return base + own + self.args

    def start(self, timeout: float = 30.0) -> Server:
        """Start and wait until the probe path (/monitor:broker/) answers 200."""
        os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.proc = subprocess.Popen(
            self.argv(), cwd=REPO, env=self.env, stdout=self._log, stderr=subprocess.STDOUT
        )
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"dockerspaces exited {proc.returncode}:\n{self.output()[-4000:]}")
            try:
                status, _, _ = self.request("GET", self.probe, headers=self.probe_headers, timeout=2)
            except OSError:
                return False
            return status == 200

        try:
            eventually(answers, timeout, "dockerspaces answering", interval=0.1)
        except AssertionError as e:
            if "not within" not in str(e):
                raise
            raise AssertionError("dockerspaces did not answer:\n" + self.output()[-4000:]) from None
        return self

    def output(self) -> str:
        """Everything the process logged so far."""
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        """Signal the process and wait for it; returns its exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def cleanup(self) -> None:
        """Stop (if running) and remove every container of this instance."""
        self.stop()
        remove_instance_containers(self.instance)

    def child_pids(self) -> list[int]:
        """The process ids of this process's children (with ``--workers N``: the N HTTP
        processes; a child being replaced may be missing for a moment), from /proc."""
        if self.proc is None:
            return []
        return children_of(self.proc.pid)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 120.0,
    ) -> tuple[int, dict[str, str], bytes]:
        """One HTTP request on a new connection: (status, headers, body)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, data
        finally:
            conn.close()

    def get(self, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        """GET path."""
        return self.request("GET", path, **kw)

    def snapshot(self) -> dict[str, Any]:
        """The /monitor:broker/ JSON."""
        status, _, body = self.get("/monitor:broker/", timeout=10)
        assert status == 200, body
        return json.loads(body)  # type: ignore[no-any-return]

    def reconciled_snapshot(self, timeout: float = 30.0) -> dict[str, Any]:
        """The /monitor:broker/ JSON once every host is up: the broker has listed and
        adopted (or removed) its labelled containers, which it does after the port
        opens."""

        def all_up() -> dict[str, Any] | None:
            snap = self.snapshot()
            return snap if all(h["Up"] for h in snap["Hosts"]) else None

        try:
            return eventually(all_up, timeout, "every host up", interval=0.1)
        except AssertionError:
            return self.snapshot()  # the caller's assertions say what is missing

    def containers(self, all: bool = False) -> list[dict[str, Any]]:
        """This instance's containers as docker sees them."""
        c = docker_client()
        try:
            return c.containers(all=all, filters={"label": f"dockerspaces.instance={self.instance}"})  # type: ignore[no-any-return]
        finally:
            c.close()


def children_of(pid: int) -> list[int]:
    """The live (not zombie) processes whose parent is ``pid``, sorted, read off
    ``/proc/<pid>/stat``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # gone meanwhile
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        fields = stat[stat.rindex(b")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != b"Z":
            out.append(int(entry))
    return sorted(out)


def _free_range(n: int) -> int:
    """A start port with n consecutive free ports after it."""
    import socket

    for _ in range(50):
        start = free_port()
        if start + n >= 65000:
            continue
        ok = True
        for p in range(start, start + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return start
    raise RuntimeError("no free port range")
