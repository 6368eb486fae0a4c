"""The installed entry points as real processes: ``twistd -n dockerspaces``, ``docker-spaces``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from typing import Any

from twisted.trial.unittest import TestCase

from .dockerutil import (
    docker_available,
    free_port,
    remove_instance_containers,
    unique_instance,
)
from .procs import BIN, REPO
from .wait import eventually


def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def get(url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None) -> Any:
    """GET url, retrying while the server comes up; returns (status, headers, body)."""

    def answer() -> Any:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.headers, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.headers, e.read()
        except OSError:
            if proc is not None and proc.poll() is not None:
                out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                raise AssertionError(f"process exited {proc.returncode}:\n{out[-3000:]}") from None
            return None  # not listening yet

    return eventually(answer, timeout, f"an answer from {url}", interval=0.2)


def stop(proc: subprocess.Popen[bytes]) -> str:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.stdout.read().decode(errors="replace") if proc.stdout else ""


class EntryPoints(TestCase):
    """Both commands start the same service and serve /monitor:broker/."""

    skip = docker_available()
    timeout = 120

    def test_twistd_plugin(self) -> None:
        port = free_port()
        inst = unique_instance("plugin")
        self.addCleanup(remove_instance_containers, inst)
        proc = spawn(
            [
                os.path.join(BIN, "twistd"),
                "-n",
                "--pidfile=",
                "dockerspaces",
                "--port",
                f"tcp:{port}:interface=127.0.0.1",
                "--target",
                "3",
                "--start-port",
                str(free_port()),
                "--instance",
                inst,
            ]
        )
        try:
            status, _headers, body = get(f"http://127.0.0.1:{port}/monitor:broker/", proc=proc)
            self.assertEqual(status, 200)
            snap = json.loads(body)
            self.assertEqual(len(snap["TargetSlots"]), 3)
            self.assertEqual({s["State"] for s in snap["TargetSlots"]}, {"Free"})
            self.assertEqual(len(snap["SourceSlots"]), 15)
            status, _, body = get(f"http://127.0.0.1:{port}/x:A:1:80/")
            self.assertEqual(status, 400)
            self.assertIn(b"lower-case", body)
        finally:
            out = stop(proc)
        # twistd exits by re-raising the SIGTERM it shut down for
        self.assertIn(proc.returncode, (0, -signal.SIGTERM), out[-3000:])
        self.assertIn("Server Shut Down", out)

    def test_docker_spaces_seed_command(self) -> None:
        port = free_port()
        slot = free_port()
        inst = unique_instance("compat")
        self.addCleanup(remove_instance_containers, inst)
        proc = spawn(
            [
                os.path.join(BIN, "docker-spaces"),
                "-p",
                str(port),
                "-source",
                "10",
                "-cluster",
                f"{slot}:5:unix:///var/run/docker.sock",
                "--instance",
                inst,
            ]
        )
        try:
            status, _, body = get(f"http://127.0.0.1:{port}/monitor:broker/", proc=proc)
            self.assertEqual(status, 200)
            snap = json.loads(body)
            self.assertEqual(len(snap["SourceSlots"]), 10)
            self.assertEqual([s["Port"] for s in snap["TargetSlots"]], list(range(slot, slot + 5)))
        finally:
            out = stop(proc)
        self.assertFalse(os.path.exists(os.path.join(REPO, "twistd.pid")), "wrote a pid file")
        # logs went to stdout (foreground, --logfile=-)
        self.assertIn(f"starting on {port}", out)

    def test_bad_option_is_a_usage_error(self) -> None:
        proc = subprocess.run(
            [os.path.join(BIN, "twistd"), "-n", "dockerspaces", "--target", "-2"],
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=REPO),
            capture_output=True,
            timeout=60,
            check=False,
        )
        self.assertNotEqual(proc.returncode, 0)
        err = (proc.stdout + proc.stderr).decode()
        self.assertIn("--target", err)
        self.assertNotIn("Traceback", err)
        proc = subprocess.run(
            [os.path.join(BIN, "docker-spaces"), "-frob"],
            cwd=REPO,
            capture_output=True,
            timeout=60,
            check=False,
        )
        self.assertEqual(proc.returncode, 2)
        self.assertIn(b"-frob", proc.stderr)


class LogFile(TestCase):
    """``twistd --logfile``: request lines in twistd's format, SIGUSR1 rotates, the
    shutdown lines are there too (no Docker needed: ``--target 0``)."""

    timeout = 60

    def test_request_lines_in_the_logfile(self) -> None:
        port = free_port()
        path = os.path.abspath(self.mktemp())
        proc = spawn(
            [
                os.path.join(BIN, "twistd"),
                "-n",
                "--pidfile=",
                "--logfile",
                path,
                "dockerspaces",
                "--port",
                f"tcp:{port}:interface=127.0.0.1",
                "--target",
                "0",
                "--instance",
                unique_instance("logfile"),
            ]
        )
        try:
            status, _, _ = get(f"http://127.0.0.1:{port}/monitor:broker/?token=abc", proc=proc)
            self.assertEqual(status, 200)

            def request_line() -> str:
                with open(path) as f:
                    return next((x for x in f if "dockerspaces.request#info" in x), "")

            line = eventually(request_line, 10, "a request line in the log file")
            # 2026-11-29T17:50:20+0000 [dockerspaces.request#info] monitor broker GET …
            self.assertRegex(
                line,
                r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4} "
                r"\[dockerspaces\.request#info\] monitor broker GET "
                r"/monitor:broker/\?token=… -> 200 ",
            )
            proc.send_signal(signal.SIGUSR1)
            eventually(lambda: os.path.exists(path + ".1"), 10, "SIGUSR1 rotating the log")
            get(f"http://127.0.0.1:{port}/monitor:broker/", proc=proc)
        finally:
            out = stop(proc)
        self.assertEqual(out, "")  # nothing on stdout: it all went to the file
        with open(path) as f:
            after = f.read()
        self.assertIn("monitor broker GET /monitor:broker/ -> 200", after)
        self.assertIn("Server Shut Down.", after)


class Packaging(TestCase):
    """``pip install .`` ships the plugin file without making ``twisted`` a package of ours."""

    timeout = 300

    def test_wheel_ships_the_plugin(self) -> None:
        import zipfile

        out = self.mktemp()
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, REPO],
            capture_output=True,
            timeout=240,
            check=False,
        )
        self.assertEqual(proc.returncode, 0, proc.stderr.decode()[-2000:])
        (wheel,) = [f for f in os.listdir(out) if f.endswith(".whl")]
        names = zipfile.ZipFile(os.path.join(out, wheel)).namelist()
        self.assertIn("twisted/plugins/dockerspaces_plugin.py", names)
        self.assertNotIn("twisted/__init__.py", names)
        self.assertNotIn("twisted/plugins/__init__.py", names)
        self.assertIn("dockerspaces/web/static/waiting.html", names)
        self.assertIn("dockerspaces/tap.py", names)
        entry = [n for n in names if n.endswith("entry_points.txt")]
        self.assertEqual(len(entry), 1)
