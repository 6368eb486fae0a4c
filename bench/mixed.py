"""Mixed end-to-end load with real containers: requests/s, p99 wait, every request accounted for.

Starts dockerspaces (this checkout) with ``--target 3`` and sends N requests from C
client threads, mixing three x: images (so eviction happens), one y: image, and a few
worker-free cheap CGI calls. It prints requests/s, client latency p50/p99, the server's
queue-wait p50/p99 (from its per-request log lines), container starts and evictions
(from /monitor:metrics), and the status counts — which must add up to N.

    .venv/bin/python -m bench.mixed [--requests 400] [--clients 24]
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.integration.images import SLOWHTTP, TTS, WEB, ensure_test_images
from tests.integration.procs import Server

ROUTES = [
    ("/x:selmaproject:tts:777:5002/cgi-bin/sleep?0.05", 4),
    ("/x:dockerspaces-test:web:1:8080/cgi-bin/sleep?0.05", 3),
    ("/x:dockerspaces-test:slowhttp:1:8080/cgi-bin/sleep?0.2", 1),
    ("/y:dockerspaces-test:web:1:8080/index.html", 2),
]


def pct(values: list[float], p: int) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100)[p - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--clients", type=int, default=24)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    ensure_test_images(TTS, WEB, SLOWHTTP)
    rnd = random.Random(args.seed)
    paths = [p for p, w in ROUTES for _ in range(w)]
    plan = [rnd.choice(paths) for _ in range(args.requests)]
    srv = Server("--queue-timeout", "120", slots=3)
    srv.start()
    try:

        def one(path: str) -> tuple[int, float]:
            t = time.perf_counter()
            try:
                status, _, _ = srv.get(path, timeout=180)
            except OSError:
                status = -1
            return status, time.perf_counter() - t

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = list(pool.map(one, plan))
        took = time.perf_counter() - t0
        statuses = Counter(s for s, _ in results)
        lat = [d for _, d in results]
        _, _, metrics = srv.get("/monitor:metrics")
        text = metrics.decode()

        def total(name: str) -> float:
            return sum(
                float(m.group(1))
                for m in re.finditer(rf"^\w*{name}(?:{{[^}}]*}})? (\S+)$", text, re.MULTILINE)
            )

        waits = [float(m.group(1)) for m in re.finditer(r"queued (\d+\.\d+)s", srv.output())]
        print(f"requests {args.requests} from {args.clients} clients, 3 slots, 4 keys: {took:.1f} s")
        print(f"throughput        {args.requests / took:8.1f} req/s")
        print(f"client latency    p50 {pct(lat, 50) * 1000:8.1f} ms   p99 {pct(lat, 99) * 1000:8.1f} ms")
        print(
            f"queue wait        p50 {pct(waits, 50) * 1000:8.1f} ms   p99 {pct(waits, 99) * 1000:8.1f} ms"
            f"   ({len(waits)} logged)"
        )
        print(
            f"container starts  {total('container_starts_total'):.0f}   evictions "
            f"{total('evictions_total'):.0f}"
        )
        print(
            f"statuses          {dict(sorted(statuses.items()))}  (sum {sum(statuses.values())},"
            f" {'all accounted for' if sum(statuses.values()) == args.requests else 'MISSING'})"
        )
    finally:
        srv.cleanup()


if __name__ == "__main__":
    main()
