"""Warm dispatch: an x: request to a warm container vs host: to the same published port.

Starts dockerspaces (this checkout) with one slot, warms an ``x:`` container of the
busybox test image, then measures in the same run, with wrk at one connection (so the
x: container is never contended) and a small Python client for p50/p99:

  (a) direct:  client → the container's published port
  (b) host:    client → dockerspaces /host:127.0.0.1:PORT/ → container
  (c) x:       client → dockerspaces /x:…/ → broker lease → container
  (d) nginx:   client → nginx (keep-alive proxy) → container

and prints the x:/host: latency ratio (bar ≤ 1.2×; the original added 0–2,000 ms of
polling) plus ratios against direct and nginx.  Needs Docker, wrk and nginx.

    .venv/bin/python -m bench.dispatch [--seconds 5]
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.integration.dockerutil import free_port
from tests.integration.images import TTS, ensure_test_images
from tests.integration.procs import Server

PATH = "/index.html"


def latencies(port: int, path: str, n: int) -> list[float]:
    """n sequential GETs on one keep-alive connection; seconds each."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    for _ in range(n):
        t = time.perf_counter()
        conn.request("GET", path, headers={"Host": "bench"})
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"{path}: {r.status}")
        out.append(time.perf_counter() - t)
    conn.close()
    return out


def wrk(port: int, path: str, seconds: int) -> float:
    """Requests/s from wrk at one connection."""
    res = subprocess.run(
        ["wrk", "-t1", "-c1", f"-d{seconds}s", f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        check=True,
    )
    for line in res.stdout.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(res.stdout)


def start_nginx(backend: int) -> tuple[subprocess.Popen[bytes], int, str]:
    port = free_port()
    d = tempfile.mkdtemp(prefix="ds-bench-nginx-")
    conf = os.path.join(d, "nginx.conf")
    with open(conf, "w") as f:
        f.write(f"""
worker_processes 1; daemon off; pid {d}/nginx.pid; error_log {d}/error.log;
events {{ worker_connections 1024; }}
http {{ access_log off;
  client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};
  uwsgi_temp_path {d}; scgi_temp_path {d};
  upstream b {{ server 127.0.0.1:{backend}; keepalive 16; }}
  server {{ listen 127.0.0.1:{port};
    location / {{ proxy_pass http://b; proxy_http_version 1.1; proxy_set_header Connection ""; }} }} }}
""")
    proc = subprocess.Popen(["nginx", "-c", conf, "-p", d])
    time.sleep(0.5)
    return proc, port, d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    ensure_test_images(TTS)
    srv = Server("--allow-host", "127.0.0.1", slots=1)
    srv.start()
    nginx = None
    try:
        xpath = "/x:selmaproject:tts:777:5002" + PATH
        status, _, _ = srv.get(xpath)
        assert status == 200
        slot = srv.start_port
        hpath = f"/host:127.0.0.1:{slot}" + PATH
        assert srv.get(hpath)[0] == 200
        nginx, nport, _ = start_nginx(slot)
        rows = []
        for name, port, path in [
            ("direct", slot, PATH),
            ("nginx", nport, PATH),
            ("host:", srv.port, hpath),
            ("x:", srv.port, xpath),
        ]:
            lat = latencies(port, path, args.n)
            rps = wrk(port, path, args.seconds)
            p50 = statistics.median(lat) * 1000
            p99 = statistics.quantiles(lat, n=100)[98] * 1000
            rows.append((name, rps, p50, p99))
        print(f"{'path':8} {'req/s (wrk -c1)':>16} {'p50 ms':>8} {'p99 ms':>8}")
        for name, rps, p50, p99 in rows:
            print(f"{name:8} {rps:16.0f} {p50:8.3f} {p99:8.3f}")
        by = {r[0]: r for r in rows}
        print(f"x: / host:  p50 latency ratio {by['x:'][2] / by['host:'][2]:.2f}x (bar <= 1.2x)")
        print(f"x: / direct p50 latency ratio {by['x:'][2] / by['direct'][2]:.2f}x")
        print(f"x: / nginx  p50 latency ratio {by['x:'][2] / by['nginx'][2]:.2f}x")
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait()
        srv.cleanup()


if __name__ == "__main__":
    main()
