"""CPU per proxied request inside the process, without sockets or load generator.

The wrk runs of ``bench/proxy.py`` share two cores between wrk, nginx and the proxy
and swing ±25 % from run to run; this drives the same code with in-memory transports
(``StringTransport``), one request at a time on a keep-alive client connection and a
pooled backend connection, and reports microseconds of CPU per request, best of
``--rounds``. It is the steady number to tune against:

- ``ours``: ``Proxy.forward`` in a plain site (the data path alone);
- ``app``: the whole dockerspaces service tree (``build_service``), its real
  ``/host:127.0.0.1:PORT/`` route: dispatch, host policy, request log line, metrics;
- ``static``: a twisted.web site answering a 19-byte page itself (twisted.web's own
  per-request floor, no proxying).

``--profile app`` prints a cProfile of that target; ``--bytecodes app`` counts the
Python bytecodes executed per request (the same every run, unlike CPU time on a
shared machine) and writes the functions they ran in, most first;
``--instructions app`` counts machine instructions per request with valgrind's
cachegrind (two runs, N and 2N requests, the difference divided by N): C-level work
included, steady to a fraction of a per cent. Bytecodes can mislead (a builtin call
is one bytecode however long it runs); decide between two versions by instructions.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time
from collections.abc import Callable
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogBeginner
from twisted.web.resource import Resource
from twisted.web.server import Site

from dockerspaces.web.backend import Backend, BackendFactory, BackendProtocol
from dockerspaces.web.proxy import Proxy
from dockerspaces.web.site import make_site

CLIENT = IPv4Address("TCP", "127.0.0.1", 40000)
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 29 Nov 2026 17:00:00 GMT\r\n"
    b"Content-Type: application/octet-stream\r\nContent-Length: 19\r\n"
    b"Last-Modified: Sun, 29 Nov 2026 16:00:00 GMT\r\nConnection: keep-alive\r\n"
    b'ETag: "6a2b-13"\r\nAccept-Ranges: bytes\r\n\r\nhello from nginx!!\n'
)
BACKEND_PORT = 18080


class _Endpoint:
    """Connects at once to an in-memory backend connection."""

    def __init__(self, rig: Rig):
        self.rig = rig

    def connect(self, factory: BackendFactory) -> Any:
        p = factory.buildProtocol(None)
        t = StringTransport()
        p.makeConnection(t)
        self.rig.backends.append((p, t))
        return succeed(p)


class Rig:
    """A site with one client connection and an answering in-memory backend."""

    def __init__(self, site: Any, path: bytes, proxy: Proxy | None):
        self.backends: list[tuple[BackendProtocol, StringTransport]] = []
        if proxy is not None:
            proxy._endpoint_factory = lambda backend: _Endpoint(self)  # type: ignore[assignment,return-value]
        self.channel = site.buildProtocol(CLIENT)
        self.ct = StringTransport(peerAddress=CLIENT)
        self.ct.protocol = self.channel  # type: ignore[attr-defined]
        self.channel.makeConnection(self.ct)
        self.request = (
            b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
        )
        self.proxied = proxy is not None

    def one(self) -> None:
        """One request, answered by the backend, the response taken by the client."""
        self.channel.dataReceived(self.request)
        if self.proxied:
            p, t = self.backends[-1]
            t.clear()
            p.dataReceived(RESPONSE)
        out = self.ct.value()
        if not out.endswith(b"hello from nginx!!\n"):
            raise AssertionError(out[-300:])
        self.ct.clear()


def ours(reactor: Any) -> Rig:
    """The bare data path: Proxy.forward in a plain site."""
    proxy = Proxy(reactor, pool_size=64)
    backend = Backend.tcp("127.0.0.1", BACKEND_PORT)

    class Front(Resource):
        isLeaf = True

        def render(self, request: Any) -> Any:
            return proxy.forward(request, backend, request.uri, prefix=b"", host_header=None)

    return Rig(make_site(Front(), reactor, max_body=1 << 30), b"/small", proxy)


def app(reactor: Any) -> Rig:
    """The whole service tree and its host: route (the text log goes to a buffer)."""
    from twisted.application.service import IServiceCollection

    from dockerspaces.app import ProxyService, build_service
    from dockerspaces.options import build_config

    config = build_config(
        {"target": "0", "allow-host": ["127.0.0.1"], "instance": "bench", "port": ["tcp:18090"]}
    )
    top = build_service(config, reactor, io.StringIO())
    # the log observer becomes the only one, as under twistd
    globalLogBeginner.beginLoggingTo(
        [top.observer],
        discardBuffer=True,  # type: ignore[attr-defined]
        redirectStandardIO=False,
    )
    services = list(IServiceCollection(top))
    proxy = next(s.proxy for s in services if isinstance(s, ProxyService))
    site = next(s for s in services if hasattr(s, "factory")).factory
    return Rig(site, f"/host:127.0.0.1:{BACKEND_PORT}/small".encode(), proxy)


def static(reactor: Any) -> Rig:
    """twisted.web answering itself: its per-request floor."""

    class Page(Resource):
        isLeaf = True

        def render(self, request: Any) -> bytes:
            return b"hello from nginx!!\n"

    site = Site(Page(), reactor=reactor)
    site.log = lambda request: None  # type: ignore[method-assign]
    return Rig(site, b"/small", None)


TARGETS: dict[str, Callable[[Any], Rig]] = {"ours": ours, "app": app, "static": static}


def measure(make: Callable[[Any], Rig], n: int, rounds: int) -> float:
    """Best CPU microseconds per request over ``rounds`` rounds of ``n`` requests."""
    reactor = MemoryReactorClock()
    reactor.running = True
    rig = make(reactor)
    for _ in range(200):  # warm caches and the pool
        rig.one()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.process_time()
        for _ in range(n):
            rig.one()
        reactor.advance(0)  # batched log writes
        best = min(best, (time.process_time() - t0) / n * 1e6)
    return best


def bytecodes(make: Callable[[Any], Rig], n: int, top: int = 40) -> None:
    """Print the bytecodes executed per request (after a warm-up), and per function."""
    import collections
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    me = os.path.abspath(__file__).replace(root, "")
    reactor = MemoryReactorClock()
    reactor.running = True
    rig = make(reactor)
    for _ in range(300):
        rig.one()
    counts: collections.Counter[str] = collections.Counter()

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        if event == "call":
            frame.f_trace_opcodes = True
            return tracer
        if event == "opcode":
            co = frame.f_code
            where = co.co_filename.rsplit("site-packages/", 1)[-1].replace(root, "")
            counts[f"{where}:{co.co_firstlineno}({co.co_name})"] += 1
        return tracer

    sys.settrace(tracer)
    try:
        for _ in range(n):
            rig.one()
        reactor.advance(0)
    finally:
        sys.settrace(None)
    driver = sum(v for k, v in counts.items() if k.startswith(me))
    total = sum(counts.values()) - driver
    print(f"{total / n:.0f} bytecodes per request (the driver's own excluded)")
    for name, v in counts.most_common(top):
        if not name.startswith(me):
            print(f"  {v / n:7.1f}  {name}")


def instructions(target: str, n: int) -> None:
    """Print the machine instructions per request of ``target`` (valgrind cachegrind)."""
    import re
    import subprocess
    import sys

    def total(requests: int) -> int:
        out = subprocess.run(
            [
                "valgrind",
                "--tool=cachegrind",
                "--cache-sim=no",
                "--cachegrind-out-file=/dev/null",
                sys.executable,
                "-m",
                "bench.overhead",
                "--run",
                target,
                "-n",
                str(requests),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        m = re.search(r"I\s+refs:\s+([\d,]+)", out)
        if m is None:
            raise RuntimeError(f"no instruction count from valgrind:\n{out[-2000:]}")
        return int(m.group(1).replace(",", ""))

    per = (total(2 * n) - total(n)) / n
    print(f"{target}: {per:,.0f} instructions per request (cachegrind, {n} and {2 * n} requests)")


def run(target: str, n: int) -> None:
    """Warm up, then serve ``n`` requests (what ``--instructions`` runs under valgrind)."""
    reactor = MemoryReactorClock()
    reactor.running = True
    rig = TARGETS[target](reactor)
    for _ in range(300):
        rig.one()
    for _ in range(n):
        rig.one()
    reactor.advance(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=5000, help="requests per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--targets", default="static,ours,app")
    ap.add_argument("--profile", choices=sorted(TARGETS), help="cProfile one target")
    ap.add_argument(
        "--bytecodes", choices=sorted(TARGETS), help="count bytecodes per request of one target, per function"
    )
    ap.add_argument(
        "--instructions",
        choices=sorted(TARGETS),
        help="count machine instructions per request of one target (valgrind)",
    )
    ap.add_argument("--run", choices=sorted(TARGETS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.run:
        run(args.run, args.n)
        return
    if args.instructions:
        instructions(args.instructions, min(args.n, 500))
        return
    if args.bytecodes:
        bytecodes(TARGETS[args.bytecodes], min(args.n, 200))
        return
    if args.profile:
        reactor = MemoryReactorClock()
        reactor.running = True
        rig = TARGETS[args.profile](reactor)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.n):
            rig.one()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(35)
        return
    results = {name: measure(TARGETS[name], args.n, args.rounds) for name in args.targets.split(",")}
    print(f"CPU per request, in-process, best of {args.rounds} x {args.n}")
    for name, us in results.items():
        rel = f"  {us / results['ours']:.2f}x ours" if "ours" in results else ""
        print(f"  {name:8} {us:7.1f} us{rel}")


if __name__ == "__main__":
    main()
