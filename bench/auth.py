"""Authenticated warm dispatch: an x: request with a Bearer token vs the same without accounts.

Starts two dockerspaces processes (this checkout, one slot each) on the same busybox
test image (``selmaproject/tts:777``): one ``--auth none``, one ``--auth accounts``
with a user, a group and a token made by ``dockerspaces-admin``. Warms an ``x:``
container in each, then measures in the same run, rounds interleaved (every other
round in reverse order), sequential requests on one keep-alive connection each:

  direct:  client → the none server's container (its published port)
  nginx:   client → nginx (keep-alive proxy) → that same port
  none:    client → dockerspaces --auth none     /x:…/ → broker lease → container
  auth:    client → dockerspaces --auth accounts /x:…/ with ``Authorization: Bearer``

and prints p50 and mean latency per target (median over the rounds) and the median of
the per-round ratios auth/none (bar ≤ 1.05×), plus auth and none against direct and
nginx. With two or more cores the two dockerspaces processes and nginx are pinned to
the last core and this client to the others (``taskset``, as in ``bench/proxy.py``;
``--no-pin`` to turn it off); the containers run where Docker puts them.

    .venv/bin/python -m bench.auth [--n 2000] [--rounds 5] [--no-pin]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import proxy
from bench.dispatch import start_nginx
from tests.integration.images import TTS, ensure_test_images
from tests.integration.procs import REPO, Server

XPATH = "/x:selmaproject:tts:777:5002/index.html"
PATH = "/index.html"


class PinnedServer(Server):
    """A dockerspaces process on the cores of the ``proxy`` role."""

    def argv(self) -> list[str]:
        return proxy._pinned("proxy", super().argv())


def admin(state: str, *args: str, stdin: str | None = None) -> str:
    """``dockerspaces-admin --state STATE --json ARGS``; its output."""
    p = subprocess.run(
        [sys.executable, "-m", "dockerspaces.admin", "--state", state, "--json", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
    )
    if p.returncode != 0:
        sys.exit(f"dockerspaces-admin {' '.join(args)}: {p.stdout}{p.stderr}")
    return p.stdout


def latencies(port: int, path: str, n: int, headers: dict[str, str]) -> list[float]:
    """n sequential GETs on one keep-alive connection; seconds each."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            conn.request("GET", path, headers=headers)
            r = conn.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f":{port}{path}: {r.status}")
            out.append(time.perf_counter() - t)
    finally:
        conn.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="requests per target and round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if not args.no_pin and len(cores) >= 2 and shutil.which("taskset"):
        load = set(cores[:-1])
        proxy.PIN["proxy"], proxy.PIN["load"] = {cores[-1]}, load
        os.sched_setaffinity(0, load)  # this client
    ensure_test_images(TTS)
    tmp = tempfile.mkdtemp(prefix="ds-bench-auth-")
    state = os.path.join(tmp, "state.sqlite")
    admin(state, "user", "add", "bench", "--password-stdin", stdin="bench-password\n")
    admin(state, "group", "add", "bench", "--image", "selmaproject/*", "--route", "x")
    admin(state, "group", "add-member", "bench", "bench")
    token = json.loads(admin(state, "token", "create", "bench", "--scope", "x"))["token"]
    plain = PinnedServer(slots=1)
    authed = PinnedServer("--auth", "accounts", "--state", state, slots=1, probe="/monitor:health")
    nginx, ndir = None, ""
    try:
        plain.start()
        authed.start()
        host = {"Host": "bench"}
        targets: dict[str, tuple[int, str, dict[str, str]]] = {
            "direct": (plain.start_port, PATH, host),
            "nginx": (0, PATH, host),  # port below
            "none": (plain.port, XPATH, host),
            "auth": (authed.port, XPATH, dict(host, Authorization="Bearer " + token)),
        }
        for name in ("none", "auth"):  # start the containers
            port, path, headers = targets[name]
            latencies(port, path, 1, headers)
        nproc, nport, ndir = start_nginx(plain.start_port)
        nginx = nproc
        if proxy.PIN["proxy"]:
            subprocess.run(
                ["taskset", "-a", "-p", "-c", str(cores[-1]), str(nproc.pid)], check=True, capture_output=True
            )
            for child in _children(nproc.pid):
                subprocess.run(
                    ["taskset", "-a", "-p", "-c", str(cores[-1]), str(child)], check=True, capture_output=True
                )
        targets["nginx"] = (nport, PATH, host)
        for port, path, headers in targets.values():
            latencies(port, path, args.warmup, headers)
        runs: dict[str, list[tuple[float, float]]] = {k: [] for k in targets}
        order = list(targets)
        for i in range(args.rounds):
            for name in order if i % 2 == 0 else order[::-1]:
                port, path, headers = targets[name]
                lat = latencies(port, path, args.n, headers)
                runs[name].append((statistics.median(lat) * 1000, statistics.fmean(lat) * 1000))
        pin = (
            f"dockerspaces and nginx pinned to core {cores[-1]}, the client to "
            f"{sorted(proxy.PIN['load'] or ())}"
            if proxy.PIN["proxy"]
            else "no pinning"
        )
        print(
            f"auth bench: {os.cpu_count()} cores ({pin}); {args.n} sequential keep-alive "
            f"requests per target and round, {args.rounds} rounds interleaved"
        )
        print(f"  {'target':8} {'p50 ms':>8} {'mean ms':>8}   rounds (p50 ms)")
        for name, r in runs.items():
            p50 = statistics.median(x[0] for x in r)
            mean = statistics.median(x[1] for x in r)
            print(f"  {name:8} {p50:8.3f} {mean:8.3f}   " + " ".join(f"{x[0]:.3f}" for x in r))

        def ratio(a: str, b: str, i: int) -> float:
            """Median over the rounds of a's latency over b's in the same round."""
            return statistics.median(x[i] / y[i] for x, y in zip(runs[a], runs[b]))

        for a, b in (
            ("auth", "none"),
            ("auth", "direct"),
            ("none", "direct"),
            ("auth", "nginx"),
            ("none", "nginx"),
        ):
            print(f"  {a}/{b}: p50 {ratio(a, b, 0):.3f}x, mean {ratio(a, b, 1):.3f}x")
        ok = ratio("auth", "none", 0) <= 1.05 and ratio("auth", "none", 1) <= 1.05
        print(
            f"bar: [{'ok' if ok else 'MISSED'}] auth/none latency <= 1.05x (p50 and mean, "
            "median per-round ratio)"
        )
        log = authed.output()
        if token in log or token.split("_", 2)[2] in log:
            print("WARNING: the token appears in the server's log")
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait()
            shutil.rmtree(ndir, ignore_errors=True)
        plain.cleanup()
        authed.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (nginx's worker)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


if __name__ == "__main__":
    main()
