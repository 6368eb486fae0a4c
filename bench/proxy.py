"""Proxy benchmark: our streaming proxy against nginx, configurable-http-proxy and stock Twisted.

In one run, against the same backends on loopback:

  (a) direct   wrk → nginx (static files: a 19-byte page, a 1 MiB file)
  (b) nginx    wrk → nginx keep-alive reverse proxy → (a)
  (c) chp      wrk → configurable-http-proxy → (a)
  (d) twisted  wrk → twisted.web.proxy.ReverseProxyResource → (a)
  (e) ours     wrk → dockerspaces Proxy.forward in a plain Site → (a)
  (f) app      wrk → the whole dockerspaces process, /host:127.0.0.1:PORT/ route → (a)
               (dispatch, host policy, one request log line and metrics per request)
  (g) app-w2   (f) with ``--workers 2``: the broker process and two HTTP children
  (h) app-auto (f) with ``--workers auto`` (one child per core)

plus WebSocket echo round trips (a small Python client, N sequential round trips) direct
to a ``websockets`` echo server and through (b), (c) and (e) (stock Twisted cannot).
Prints req/s, p50/p99 and the ratio of (e) to each, and for the 1 MiB test the
CPU-seconds per GiB moved of each proxy, the backend and wrk. Bars (same run): small
page ≥ chp and ≥ 1.7× stock Twisted; 1 MiB ≥ nginx.

Steadier ratios on a small shared machine: the small-page test runs ``--rounds`` times
with the targets interleaved (every other round in reverse order), and the bars use the
median of the per-round ratios;
with two or more cores the proxy under test is pinned to the last core and wrk, the
backends and the echo server to the others (``--no-pin`` to turn it off), so every
proxy gets the same one core and the load generator does not take turns with it.
A ``--workers`` app is pinned as a whole: ``taskset`` before exec, so the broker process
and every child it spawns share the one core the single process gets (pinned, the
comparison is of cost on equal CPU; unpinned, of what the extra processes buy).

For the app targets the small-page test also reports the CPU-seconds per request of the
whole process tree (parent and children, ``/proc`` before and after each wrk run) and
the ratios app-w2/chp, app-w2/app, app-w2/nginx (and the same for app-auto) per round.
``--chp2`` runs a second configurable-http-proxy (another version) as target ``chp2``.

Needs wrk, nginx (``apt-get install -y wrk nginx``) and ``npm i -g configurable-http-proxy``.
The backends and proxies are started here with their own temp configs (no system service).

    .venv/bin/python -m bench.proxy [--seconds 5] [--rounds 5] [--connections 50] [--ws-trips 2000]
    .venv/bin/python -m bench.proxy --profile   # also cProfile ours under the small-page load
    .venv/bin/python -m bench.proxy --tests big --targets nginx,ours --repeat 5
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


NGINX_BACKEND = """
worker_processes 1;
daemon off;
pid {tmp}/backend.pid;
error_log {tmp}/backend-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    sendfile on;
    server {{
        listen 127.0.0.1:{port};
        root {tmp}/www;
        default_type text/plain;
    }}
}}
"""

NGINX_PROXY = """
worker_processes 1;
daemon off;
pid {tmp}/proxy.pid;
error_log {tmp}/proxy-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    upstream backend {{ server 127.0.0.1:{backend}; keepalive 64; }}
    upstream wsbackend {{ server 127.0.0.1:{ws}; keepalive 8; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering on;
        }}
        location /ws {{
            proxy_pass http://wsbackend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
        }}
    }}
}}
"""

WS_ECHO = """
import asyncio, sys
from websockets.asyncio.server import serve
async def echo(ws):
    async for m in ws:
        await ws.send(m)
async def main():
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), compression=None):
        await asyncio.Future()
asyncio.run(main())
"""

STOCK_TWISTED = """
import sys
from twisted.internet import reactor
from twisted.web.proxy import ReverseProxyResource
from twisted.web.server import Site
site = Site(ReverseProxyResource("127.0.0.1", int(sys.argv[2]), b""))
site.noisy = False
site.log = lambda request: None
reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1", backlog=1024)
reactor.run()
"""

OURS = """
import sys
from twisted.internet import reactor
from twisted.web.resource import Resource
from dockerspaces.web.backend import Backend
from dockerspaces.web.proxy import Proxy
from dockerspaces.web.site import make_site

port, backend_port, ws_port = (int(a) for a in sys.argv[1:4])
backend = Backend.tcp("127.0.0.1", backend_port)
ws = Backend.tcp("127.0.0.1", ws_port)
proxy = Proxy(reactor, pool_size=64)

class Front(Resource):
    # every request to the backend (the lead will swap this for the real host: route)
    isLeaf = True
    def render(self, request):
        target = ws if request.uri.startswith(b"/ws") else backend
        return proxy.forward(request, target, request.uri, prefix=b"", host_header=None)

reactor.listenTCP(port, make_site(Front(), reactor, max_body=1 << 30),
                  interface="127.0.0.1", backlog=1024)
if len(sys.argv) > 4:
    import cProfile, pstats
    prof = cProfile.Profile()
    def dump():
        prof.disable()
        with open(sys.argv[4], "w") as out:
            pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(30)
    reactor.addSystemEventTrigger("before", "shutdown", dump)
    prof.enable()
reactor.run()
"""


#: with --pin: the proxy under test gets the last core to itself; wrk, the backends and
#: everything else share the others (set before exec: every thread inherits it)
PIN: dict[str, set[int] | None] = {"proxy": None, "load": None}


def _pinned(role: str, args: list[str]) -> list[str]:
    """``args`` run under ``taskset`` on the cores of ``role`` (as is without --pin)."""
    cores = PIN[role]
    if cores is None:
        return args
    return ["taskset", "-c", ",".join(map(str, sorted(cores))), *args]


class Procs:
    """Started processes, stopped in reverse order."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: list[str], role: str = "load", **kw: object) -> subprocess.Popen[bytes]:
        """Start ``args``; ``role`` ``proxy`` or ``load`` picks its cores under --pin."""
        p = subprocess.Popen(
            _pinned(role, args),
            stdout=subprocess.DEVNULL,  # type: ignore[call-overload]
            stderr=subprocess.DEVNULL,
            **kw,
        )
        self.procs.append(p)
        return p

    def stop(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and all its live descendants (an nginx master and its
    worker; a ``--workers`` app's broker process and its children)."""
    stats: dict[int, list[str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stats[int(entry)] = f.read().rpartition(")")[2].split()
        except OSError:
            continue
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        fields = stats.get(p)
        if fields is not None:
            total += (int(fields[11]) + int(fields[12])) / TICK
        todo.extend(q for q, f in stats.items() if int(f[1]) == p)
    return total


def loadavg() -> str:
    """The load averages now (``uptime``'s three numbers)."""
    with open("/proc/loadavg") as f:
        return "load " + " ".join(f.read().split()[:3])


def wrk_cpu(
    port: int, path: str, seconds: int, conns: int, watch: dict[str, int], mib: float
) -> tuple[tuple[float, float, float], dict[str, float]]:
    """wrk as :func:`wrk`, plus CPU-seconds per MiB moved of each watched process and wrk."""
    before = {k: cpu_seconds(p) for k, p in watch.items()}
    ru0 = os.times()
    res = wrk(port, path, seconds, conns)
    ru1 = os.times()
    moved = max(res[0] * seconds * mib, 1e-9)
    out = {k: (cpu_seconds(p) - before[k]) / moved for k, p in watch.items()}
    out["wrk"] = (ru1.children_user + ru1.children_system - ru0.children_user - ru0.children_system) / moved
    return res, out


def wrk(port: int, path: str, seconds: int, conns: int) -> tuple[float, float, float]:
    """(req/s, p50 ms, p99 ms) from wrk with one thread."""
    res = subprocess.run(
        _pinned(
            "load",
            ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}{path}"],
        ),
        capture_output=True,
        text=True,
        check=True,
    )
    rps = p50 = p99 = float("nan")
    for line in res.stdout.splitlines():
        bits = line.split()
        if line.startswith("Requests/sec:"):
            rps = float(bits[1])
        elif bits[:1] == ["50%"]:
            p50 = to_ms(bits[1])
        elif bits[:1] == ["99%"]:
            p99 = to_ms(bits[1])
        elif "Non-2xx" in line or "Socket errors" in line:
            print(f"    wrk :{port}{path}: {line.strip()}")
    return rps, p50, p99


def to_ms(text: str) -> float:
    for unit, f in (("us", 0.001), ("ms", 1.0), ("s", 1000.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * f
    return float(text)


def ws_trips(port: int, n: int, prefix: str = "") -> tuple[float, float, float]:
    """(round trips/s, p50 ms, p99 ms) of n sequential 64-byte echo round trips."""
    from websockets.sync.client import connect

    msg = "m" * 64
    lat = []
    with connect(f"ws://127.0.0.1:{port}{prefix}/ws", compression=None) as ws:
        for _ in range(50):
            ws.send(msg)
            ws.recv()
        t0 = time.perf_counter()
        for _ in range(n):
            t = time.perf_counter()
            ws.send(msg)
            ws.recv()
            lat.append(time.perf_counter() - t)
        total = time.perf_counter() - t0
    lat.sort()
    return n / total, statistics.median(lat) * 1000, lat[int(len(lat) * 0.99)] * 1000


def table(title: str, rows: dict[str, tuple[float, float, float]], unit: str = "req/s") -> None:
    print(f"\n{title}")
    print(f"  {'target':10} {unit:>10} {'p50 ms':>9} {'p99 ms':>9}   ours/target")
    ours = rows.get("ours", (float("nan"),))[0]
    for name, (rps, p50, p99) in rows.items():
        ratio = "" if name == "ours" or "ours" not in rows else f"{ours / rps:6.2f}x"
        print(f"  {name:10} {rps:10.0f} {p50:9.2f} {p99:9.2f}   {ratio}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=50)
    ap.add_argument("--big-connections", type=int, default=10)
    ap.add_argument("--ws-trips", type=int, default=2000)
    ap.add_argument("--profile", action="store_true", help="cProfile ours (small page)")
    ap.add_argument("--tests", default="small,big,ws", help="comma list of small,big,ws")
    ap.add_argument(
        "--targets",
        default="direct,nginx,chp,chp2,twisted,ours,app,app-w2,app-auto",
        help="comma list of direct,nginx,chp,chp2,twisted,ours,app,app-w2,app-auto",
    )
    ap.add_argument(
        "--repeat", type=int, default=1, help="run the 1 MiB test this many times, targets interleaved"
    )
    ap.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="run the small-page test this many times, targets interleaved; "
        "medians of req/s and of the per-round ratios are reported",
    )
    ap.add_argument("--chp", help="the configurable-http-proxy to run (default: the one on PATH)")
    ap.add_argument("--chp2", help="a second configurable-http-proxy (another version), target chp2")
    ap.add_argument(
        "--no-pin", action="store_true", help="do not give the proxy under test a core of its own"
    )
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if not args.no_pin and len(cores) >= 2 and shutil.which("taskset"):
        PIN["proxy"], PIN["load"] = {cores[-1]}, set(cores[:-1])
    for tool in ("wrk", "nginx"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            sys.exit(f"{tool} not found: apt-get install -y wrk nginx")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    chp = args.chp or shutil.which("configurable-http-proxy")
    chps = {"chp": chp, "chp2": args.chp2}
    for label, path in chps.items():
        if path:
            version = subprocess.run(
                [path, "--version"], capture_output=True, text=True, check=False
            ).stdout.strip()
            print(f"{label}: configurable-http-proxy {version or '?'} ({path})")
    tests = set(args.tests.split(","))
    wanted = set(args.targets.split(","))

    tmp = tempfile.mkdtemp(prefix="dsbench-")
    os.chmod(tmp, 0o755)  # nginx workers run as an unprivileged user
    os.makedirs(f"{tmp}/www")
    with open(f"{tmp}/www/small", "wb") as out:
        out.write(b"hello from nginx!!\n")  # 19 bytes
    with open(f"{tmp}/www/big", "wb") as out:
        out.write(os.urandom(1 << 20))

    apps = {"app": "1", "app-w2": "2", "app-auto": "auto"}  # target -> --workers
    ports = {
        k: free_port()
        for k in ("backend", "ws", "nginx", "chp", "chp_api", "chp2", "chp2_api", "twisted", "ours", *apps)
    }
    # (f) app: the whole dockerspaces process, its real host: route (routing, request
    # log line, metrics) -- what a deployment runs; "ours" is the bare Proxy.forward.
    prefixes = {a: f"/host:127.0.0.1:{ports['backend']}" for a in apps}
    ws_prefixes = {a: f"/host:127.0.0.1:{ports['ws']}" for a in apps}
    procs = Procs()
    pids: dict[str, int] = {}
    env = dict(os.environ, PYTHONPATH=ROOT)
    try:
        for name, conf in (("backend", NGINX_BACKEND), ("nginx", NGINX_PROXY)):
            path = f"{tmp}/{name}.conf"
            with open(path, "w") as f:
                f.write(conf.format(tmp=tmp, port=ports[name], backend=ports["backend"], ws=ports["ws"]))
            pids[name] = procs.start(
                [nginx, "-c", path, "-p", tmp, "-e", f"{tmp}/{name}-start.log"],
                role="load" if name == "backend" else "proxy",
            ).pid
        procs.start([PY, "-c", WS_ECHO, str(ports["ws"])], env=env)
        pids["twisted"] = procs.start(
            [PY, "-c", STOCK_TWISTED, str(ports["twisted"]), str(ports["backend"])],
            env=env,
            role="proxy",
        ).pid
        prof_out = f"{tmp}/ours.prof.txt"
        ours_args = [PY, "-c", OURS, str(ports["ours"]), str(ports["backend"]), str(ports["ws"])]
        if args.profile:
            ours_args.append(prof_out)
        ours = procs.start(ours_args, env=env, role="proxy")
        pids["ours"] = ours.pid
        targets = {"direct": ports["backend"], "nginx": ports["nginx"]}
        for label, path in chps.items():
            if not path or label not in wanted:
                continue
            pids[label] = procs.start(
                [
                    path,
                    "--ip",
                    "127.0.0.1",
                    "--port",
                    str(ports[label]),
                    "--api-ip",
                    "127.0.0.1",
                    "--api-port",
                    str(ports[f"{label}_api"]),
                    "--default-target",
                    f"http://127.0.0.1:{ports['backend']}",
                    "--log-level",
                    "error",
                ],
                env=dict(env, CONFIGPROXY_AUTH_TOKEN="bench"),
                role="proxy",
            ).pid
            targets[label] = ports[label]
        if not chp:
            print("configurable-http-proxy not found (npm i -g configurable-http-proxy): skipped")
        targets["twisted"] = ports["twisted"]
        targets["ours"] = ports["ours"]
        for app, workers in apps.items():
            if app not in wanted and app != "app":
                continue
            # the twistd parent runs under taskset: with --workers its children inherit
            # the same cores (the whole process group pinned where the single process is)
            pids[app] = procs.start(
                [
                    os.path.join(os.path.dirname(PY), "twistd"),
                    "-n",
                    "--pidfile=",
                    "--logfile",
                    f"{tmp}/{app}.log",
                    "dockerspaces",
                    "--port",
                    f"tcp:{ports[app]}:interface=127.0.0.1",
                    "--target",
                    "0",
                    "--allow-host",
                    "127.0.0.1",
                    "--instance",
                    f"bench-proxy-{app}",
                    "--workers",
                    workers,
                ],
                env=env,
                role="proxy",
            ).pid
            targets[app] = ports[app]
        for p in (*targets.values(), ports["ws"]):
            wait_port(p)
        for label in chps:
            if label not in targets:
                continue
            import urllib.request

            req = urllib.request.Request(
                f"http://127.0.0.1:{ports[f'{label}_api']}/api/routes/ws",
                data=f'{{"target": "http://127.0.0.1:{ports["ws"]}"}}'.encode(),
                headers={"Authorization": "token bench"},
                method="POST",
            )
            urllib.request.urlopen(req, timeout=5).read()

        pin = (
            f"proxies pinned to core {sorted(PIN['proxy'])}, wrk and backends to {sorted(PIN['load'] or ())}"
            if PIN["proxy"]
            else "no pinning"
        )
        print(f"proxy bench: {os.cpu_count()} cores ({pin}), wrk -t1, {args.seconds}s per run; {loadavg()}")
        targets = {k: v for k, v in targets.items() if k in wanted}
        small: dict[str, tuple[float, float, float]] = {}
        small_runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in targets}
        #: CPU-seconds per request of each app's whole process tree, per round
        small_cpu: dict[str, list[float]] = {k: [] for k in targets if k in apps}
        big: dict[str, tuple[float, float, float]] = {}
        big_cpu: dict[str, dict[str, float]] = {}
        for name, port in targets.items():
            wrk(port, prefixes.get(name, "") + "/small", 1, args.connections)  # warm up
        for i in range(args.rounds if "small" in tests else 0):
            # every other round in reverse order: no target always runs first or last
            order = list(targets.items())
            for name, port in order if i % 2 == 0 else order[::-1]:
                cpu0 = cpu_seconds(pids[name]) if name in small_cpu else 0.0
                res = wrk(port, prefixes.get(name, "") + "/small", args.seconds, args.connections)
                small_runs[name].append(res)
                if name in small_cpu:
                    small_cpu[name].append((cpu_seconds(pids[name]) - cpu0) / (res[0] * args.seconds))
            print(f"  small round {i + 1} done; {loadavg()}")
        for name, runs in small_runs.items():
            if runs:
                small[name] = tuple(statistics.median(r[i] for r in runs) for i in range(3))  # type: ignore[assignment]
                if len(runs) > 1:
                    print(f"  small {name:8} runs: " + " ".join(f"{r[0]:.0f}" for r in runs))

        def ratio(a: str, b: str) -> float:
            """Median over the rounds of a's req/s over b's in the same round."""
            return statistics.median(x[0] / y[0] for x, y in zip(small_runs[a], small_runs[b]))

        def per_round(a: str, b: str) -> list[float]:
            """a's req/s over b's, round by round."""
            return [x[0] / y[0] for x, y in zip(small_runs[a], small_runs[b])]

        if small_cpu.get("app"):
            print("\n  small page, CPU-µs per request of the app's whole process tree, per round:")
            for name, cpus in small_cpu.items():
                rps = [1 / c for c in cpus]  # requests per CPU-second of the tree
                print(
                    f"  {name:8} "
                    + " ".join(f"{c * 1e6:6.0f}" for c in cpus)
                    + f"   median {statistics.median(cpus) * 1e6:.0f} µs"
                    + f" = {statistics.median(rps):.0f} req per CPU-second"
                )
        multi = [a for a in apps if a != "app" and small_runs.get(a)]
        if multi and small_runs.get("app"):
            print("\n  small page, per-round ratios (median last):")
            for a in multi:
                for b in ("chp", "chp2", "app", "nginx"):
                    if small_runs.get(b):
                        per = per_round(a, b)
                        print(
                            f"  {a + '/' + b:16} "
                            + " ".join(f"{x:5.2f}" for x in per)
                            + f"   median {statistics.median(per):.2f}x"
                        )
                if small_cpu.get(a):
                    per = [x / y for x, y in zip(small_cpu[a], small_cpu["app"])]
                    print(
                        f"  {a + ' CPU/req /app':16} "
                        + " ".join(f"{x:5.2f}" for x in per)
                        + f"   median {statistics.median(per):.2f}x"
                    )

        big_runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in targets}
        for _ in range(args.repeat if "big" in tests else 0):
            for name, port in targets.items():
                watch = {"backend": pids["backend"]}
                if name in pids:
                    watch[name] = pids[name]
                res, cpu = wrk_cpu(
                    port, prefixes.get(name, "") + "/big", args.seconds, args.big_connections, watch, 1.0
                )
                big_runs[name].append(res)
                for k, v in cpu.items():
                    big_cpu.setdefault(name, {}).setdefault(k, 0.0)
                    big_cpu[name][k] += v / args.repeat
        for name, runs in big_runs.items():
            if runs:
                big[name] = tuple(statistics.median(r[i] for r in runs) for i in range(3))  # type: ignore[assignment]
                if len(runs) > 1:
                    print(f"  1 MiB {name:8} runs: " + " ".join(f"{r[0]:.0f}" for r in runs))
        ws: dict[str, tuple[float, float, float]] = {}
        ws_targets: dict[str, int] = {"direct": ports["ws"], "nginx": ports["nginx"]}
        if chp:
            ws_targets["chp"] = ports["chp"]
        ws_targets["ours"] = ports["ours"]
        ws_targets["app"] = ports["app"]
        for a in apps:
            if a != "app" and a in targets:
                ws_targets[a] = ports[a]
        for name, port in ws_targets.items():
            if "ws" in tests and name in wanted:
                ws[name] = ws_trips(port, args.ws_trips, ws_prefixes.get(name, ""))

        if small:
            table(f"19-byte page, {args.connections} connections (median of {args.rounds} rounds)", small)
        if big:
            table(f"1 MiB file, {args.big_connections} connections (median of {args.repeat})", big)
            print("\n  CPU-seconds per GiB moved (the proxy itself, the backend nginx, wrk)")
            for name, cpu in big_cpu.items():
                print("  " + f"{name:10} " + "  ".join(f"{k}={v * 1024:6.2f}" for k, v in cpu.items()))
        if ws:
            table(f"WebSocket echo, {args.ws_trips} sequential round trips", ws, "trips/s")
        check: list[tuple[str, Callable[[], bool]]] = []
        if "chp" in small and "ours" in small:
            check.append(
                (
                    f"small page: ours >= chp ({ratio('ours', 'chp'):.2f}x)",
                    lambda: ratio("ours", "chp") >= 1.0,
                )
            )
        if "twisted" in small and "ours" in small:
            check.append(
                (
                    f"small page: ours >= 1.7x stock twisted ({ratio('ours', 'twisted'):.2f}x)",
                    lambda: ratio("ours", "twisted") >= 1.7,
                )
            )
        if "nginx" in big and "ours" in big:
            check.append(
                (
                    f"1 MiB: ours >= nginx ({big['ours'][0] / big['nginx'][0]:.2f}x)",
                    lambda: big["ours"][0] >= big["nginx"][0],
                )
            )
        if "chp" in small and "app" in small:
            check.append(
                (
                    f"small page: app (host: route) >= chp ({ratio('app', 'chp'):.2f}x)",
                    lambda: ratio("app", "chp") >= 1.0,
                )
            )
        if "twisted" in small and "app" in small:
            label = f"small page: app (host: route) >= 1.7x stock twisted ({ratio('app', 'twisted'):.2f}x)"
            check.append((label, lambda: ratio("app", "twisted") >= 1.7))
        if "nginx" in big and "app" in big:
            check.append(
                (
                    f"1 MiB: app (host: route) >= nginx ({big['app'][0] / big['nginx'][0]:.2f}x)",
                    lambda: big["app"][0] >= big["nginx"][0],
                )
            )
        for a in multi:
            for b in ("chp", "chp2"):
                if small_runs.get(b):
                    per = per_round(a, b)
                    every = all(x >= 1.2 for x in per)
                    check.append(
                        (
                            f"small page: {a} >= 1.2x {b} (median {ratio(a, b):.2f}x, "
                            f"{'every round' if every else 'NOT every round'}: "
                            + " ".join(f"{x:.2f}" for x in per)
                            + ")",
                            functools.partial(bool, every and ratio(a, b) >= 1.2),
                        )
                    )
            if small_cpu.get(a) and small_cpu.get("app"):
                per = [x / y for x, y in zip(small_cpu[a], small_cpu["app"])]
                every = all(x <= 1.10 for x in per)
                med = statistics.median(per)
                check.append(
                    (
                        f"small page: {a} CPU-s/request <= 1.10x app's (median {med:.2f}x, "
                        f"{'every round' if every else 'NOT every round'})",
                        functools.partial(bool, every and med <= 1.10),
                    )
                )
        print("\nbars:")
        for text, ok in check:
            print(f"  [{'ok' if ok() else 'MISSED'}] {text}")
        if args.profile:
            ours.terminate()
            ours.wait(10)
            print(f"\nprofile of ours (tottime), {prof_out}:")
            with open(prof_out) as f:
                print(textwrap.indent(f.read()[:6000], "  "))
    finally:
        procs.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
