"""``--workers``: warm x: dispatch and CPU per request, and the broker's AMP capacity.

Two parts (``--part dispatch``, ``--part amp``, default both):

dispatch
  Two dockerspaces processes of this checkout, one slot each on the busybox test image
  (``selmaproject/tts:777``): ``w1`` (the single process) and ``w2`` (``--workers 2``).
  Each warms its x: container, then ``--rounds`` rounds, the targets interleaved
  (every other round in reverse order), of ``--n`` sequential GETs on one keep-alive
  connection (low load: the x: container is never contended): p50 and p99 per target
  and round, and the CPU-seconds per request of each process tree (the parent and its
  children: ``utime + stime`` of every descendant in ``/proc``, before and after).
  ``direct`` (the container's published port) is measured alongside for scale. Bars,
  on the median of the per-round ratios and in every round: w2/w1 p50 ≤ 1.1×,
  w2/w1 CPU per request ≤ 1.10×.

  Pinned (the default with two or more cores): each dockerspaces process tree on the
  last core (``taskset`` before exec: the twistd parent *and* its children inherit it,
  so ``--workers 2`` gets the same one core the single process gets), this client on
  the others; ``--no-pin``: where the kernel puts them.

amp
  The broker's AMP message capacity, in this process and one reactor: a ``Broker``
  over ``FakeEngine`` (ready at once), its :class:`~dockerspaces.procs.brokerside.Hub`
  and one ``BrokerBox`` per simulated child (wired as ``procs/parent.py`` wires them),
  each talking to a ``ChildBox``/``RemoteBroker`` over its own real UNIX socketpair.
  Every child runs ``--loops`` concurrent loops of acquire → release on a warm
  container (``x``: its own key, so never contended; ``y``: one shared key). Reports
  acquire+release round trips per second and this process's CPU-µs per round trip —
  both ends of every message, so an upper bound of the broker's own share.

    .venv/bin/python -m bench.workers [--part dispatch|amp] [--rounds 5] [--n 2000] [--no-pin]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import proxy
from bench.dispatch import latencies
from tests.integration.images import TTS, ensure_test_images
from tests.integration.procs import Server

XPATH = "/x:selmaproject:tts:777:5002/index.html"
PATH = "/index.html"
TICK = os.sysconf("SC_CLK_TCK")


def tree_pids(root: int) -> list[int]:
    """``root`` and every live descendant (from ``/proc/*/stat``'s parent pids)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(p for p, pp in parents.items() if pp == pid)
    return out


def tree_cpu(root: int) -> float:
    """utime + stime (seconds) of ``root`` and its live descendants."""
    total = 0.0
    for pid in tree_pids(root):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


def uptime() -> str:
    """The load averages now."""
    with open("/proc/loadavg") as f:
        return "load " + " ".join(f.read().split()[:3])


# -- dispatch ------------------------------------------------------------------------


class PinnedServer(Server):
    """A dockerspaces process (and, with ``--workers``, its children) on the proxy cores."""

    def argv(self) -> list[str]:
        return proxy._pinned("proxy", super().argv())


def dispatch(args: argparse.Namespace) -> bool:
    """Part ``dispatch`` (see module); True when every bar holds in every round."""
    ensure_test_images(TTS)
    w1 = PinnedServer(slots=1)
    w2 = PinnedServer("--workers", "2", slots=1)
    try:
        w1.start()
        w2.start()
        assert w1.proc is not None and w2.proc is not None
        for s in (w1, w2):
            latencies(s.port, XPATH, 1)  # start the container
        targets = {
            "direct": (w1.start_port, PATH, 0),
            "w1": (w1.port, XPATH, w1.proc.pid),
            "w2": (w2.port, XPATH, w2.proc.pid),
        }
        print(f"  w2 tree: {len(tree_pids(w2.proc.pid))} processes; {uptime()}")
        for port, path, _ in targets.values():
            latencies(port, path, args.warmup)
        runs: dict[str, list[tuple[float, float, float]]] = {k: [] for k in targets}
        order = list(targets)
        for i in range(args.rounds):
            for name in order if i % 2 == 0 else order[::-1]:
                port, path, pid = targets[name]
                cpu0 = tree_cpu(pid) if pid else 0.0
                lat = latencies(port, path, args.n)
                cpu = (tree_cpu(pid) - cpu0) / args.n if pid else float("nan")
                p99 = statistics.quantiles(lat, n=100)[98]
                runs[name].append((statistics.median(lat) * 1000, p99 * 1000, cpu * 1e6))
            print(f"  round {i + 1} done; {uptime()}")
        print(
            f"\nwarm x: dispatch, {args.n} sequential keep-alive GETs per target and round, "
            f"{args.rounds} rounds interleaved"
        )
        print(f"  {'target':7} {'p50 ms':>8} {'p99 ms':>8} {'CPU µs/req':>11}   rounds p50 / p99 / CPU µs")
        for name, r in runs.items():
            med = [statistics.median(x[i] for x in r) for i in range(3)]
            rounds = "  ".join(f"{x[0]:.3f}/{x[1]:.3f}/{x[2]:.0f}" for x in r)
            print(f"  {name:7} {med[0]:8.3f} {med[1]:8.3f} {med[2]:11.0f}   {rounds}")
        ok = True
        for label, i, bar in (("p50", 0, 1.1), ("p99", 1, None), ("CPU/req", 2, 1.10)):
            per = [a[i] / b[i] for a, b in zip(runs["w2"], runs["w1"])]
            text = f"w2/w1 {label}: median {statistics.median(per):.3f}x, rounds " + " ".join(
                f"{x:.3f}" for x in per
            )
            if bar is None:
                print(f"  {text} (no bar)")
                continue
            every = all(x <= bar for x in per)
            held = statistics.median(per) <= bar
            ok = ok and every
            state = "ok in every round" if every else ("median ok, MISSED in a round" if held else "MISSED")
            print(f"  [{state}] {text} (bar <= {bar}x)")
        return ok
    finally:
        w1.cleanup()
        w2.cleanup()


# -- amp -----------------------------------------------------------------------------


def amp_round(mode: str, children: int, loops: int, seconds: float) -> dict[str, float]:
    """One run of part ``amp`` in ``mode``: both ends in this process, one reactor."""
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory

    from dockerspaces.broker.broker import Broker
    from dockerspaces.broker.model import BrokerSettings
    from dockerspaces.config import HostConfig
    from dockerspaces.engine.fake import FakeEngine
    from dockerspaces.procs.brokerside import Hub
    from dockerspaces.procs.childside import ChildBox, RemoteBroker, RemoteLease
    from dockerspaces.spec import JobSpec
    from dockerspaces.web.pages import ProgressBoard

    r: Any = reactor
    slots = children * loops if mode == "x" else 1
    host = HostConfig("h0", "unix:///var/run/docker.sock", 20_000, slots)
    engines = {host.name: FakeEngine(r, host)}
    broker = Broker(r, [host], engines, BrokerSettings(queue_timeout=1e9))
    hub = Hub(broker, ProgressBoard(r), r, engines=engines)
    broker.state.on_container = lambda *a, **kw: hub.containers_changed()  # as procs/parent.py
    broker.start()
    state = {"measuring": False, "stop": False, "count": 0, "errors": 0}

    class One(Factory):
        def __init__(self, box: Any):
            self.box = box

        def buildProtocol(self, addr: object) -> Any:
            return self.box

    def loop(remote: RemoteBroker, spec: JobSpec) -> None:
        def got(lease: RemoteLease) -> None:
            lease.release()
            if state["measuring"]:
                state["count"] += 1
            if not state["stop"]:
                loop(remote, spec)

        def failed(f: Any) -> None:
            state["errors"] += 1
            print(f.getTraceback(), file=sys.stderr)

        remote.acquire(spec).addCallbacks(got, failed)

    n = 0
    for i in range(children):
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        r.adoptStreamConnection(b.fileno(), socket.AF_UNIX, One(hub.box(i)))
        box = ChildBox()
        r.adoptStreamConnection(a.fileno(), socket.AF_UNIX, One(box))
        a.close()
        b.close()
        remote = RemoteBroker(box)
        for _ in range(loops):
            name = ("bench", f"svc{n}") if mode == "x" else ("bench", "shared")
            n += 1
            r.callLater(0, loop, remote, JobSpec(mode, name, "1", 8000))  # type: ignore[arg-type]
    marks: dict[str, float] = {}

    def start() -> None:
        state["measuring"] = True
        t = os.times()
        marks["cpu0"], marks["t0"] = t.user + t.system, time.monotonic()
        r.callLater(seconds, stop)

    def stop() -> None:
        state["stop"] = True
        t = os.times()
        marks["cpu1"], marks["t1"] = t.user + t.system, time.monotonic()
        marks["count"] = state["count"]
        r.callLater(0.2, r.crash)

    r.callLater(1.0, start)  # warm: every container started
    r.run(installSignalHandlers=False)
    trips = max(marks["count"], 1)
    wall = marks["t1"] - marks["t0"]
    cpu = marks["cpu1"] - marks["cpu0"]
    if state["errors"]:
        print(f"  {state['errors']} acquire(s) failed", file=sys.stderr)
    return {"trips/s": trips / wall, "CPU µs/trip (both ends)": cpu / trips * 1e6, "busy": cpu / wall}


def amp(args: argparse.Namespace) -> None:
    """Part ``amp`` (see module): ``--rounds`` rounds of each mode, interleaved."""
    runs: dict[str, list[dict[str, float]]] = {"x": [], "y": []}
    for i in range(args.rounds):
        for mode in ("x", "y") if i % 2 == 0 else ("y", "x"):
            runs[mode].append(amp_round(mode, args.children, args.loops, args.seconds))
        print(f"  amp round {i + 1} done; {uptime()}")
    print(
        f"\nbroker AMP capacity: {args.children} simulated children x {args.loops} concurrent "
        f"acquire+release loops, {args.seconds}s per round, {args.rounds} rounds"
    )
    keys = list(runs["x"][0])
    print(f"  {'mode':5} " + " ".join(f"{k:>20}" for k in keys) + "   capacity trips/broker-core-s")
    for mode, r in runs.items():
        med = {k: statistics.median(x[k] for x in r) for k in keys}
        cap = statistics.median(1e6 / x["CPU µs/trip (both ends)"] for x in r)
        print(f"  {mode + ':':5} " + " ".join(f"{med[k]:20.2f}" for k in keys) + f"   {cap:10.0f}")
        print("        rounds trips/s: " + " ".join(f"{x['trips/s']:.0f}" for x in r))
        print("        rounds µs/trip: " + " ".join(f"{x['CPU µs/trip (both ends)']:.1f}" for x in r))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="dispatch,amp", help="comma list of dispatch,amp")
    ap.add_argument("--n", type=int, default=2000, help="dispatch: requests per target and round")
    ap.add_argument("--warmup", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--children", type=int, default=2, help="amp: simulated children")
    ap.add_argument("--loops", type=int, default=8, help="amp: concurrent loops per child")
    ap.add_argument("--seconds", type=float, default=5.0, help="amp: seconds measured per round")
    ap.add_argument("--no-pin", action="store_true")
    args = ap.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    if not args.no_pin and len(cores) >= 2 and shutil.which("taskset"):
        load = set(cores[:-1])
        proxy.PIN["proxy"], proxy.PIN["load"] = {cores[-1]}, load
        os.sched_setaffinity(0, load)  # this client
    pin = (
        f"dockerspaces/broker pinned to core {sorted(proxy.PIN['proxy'] or ())}, clients to "
        f"{sorted(proxy.PIN['load'] or ())}"
        if proxy.PIN["proxy"]
        else "no pinning"
    )
    print(f"workers bench: {os.cpu_count()} cores ({pin}); {uptime()}")
    parts = set(args.part.split(","))
    ok = True
    if "dispatch" in parts:
        ok = dispatch(args)
    if "amp" in parts:
        amp(args)
    print(f"end; {uptime()}")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
