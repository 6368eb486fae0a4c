"""Time to drain a backlog: the autoscaler (from 0 workers) against a fixed pool of
``max`` workers started by hand, same run, rounds alternating which goes first.

``python -m bench.autoscale [--rounds 3] [--messages 300] [--work 0.3] [--max 3]``
(needs Docker and RabbitMQ with its management plugin, as the integration tests do;
builds the consumer image the same way, ``tests/integration/rabbit.py``).

Each round publishes ``--messages`` messages and times from the first publish to the
last message's record (the consumer writes one per message to ``QUEUE.done`` before
acking it); publishing (~1 s through the management API) is in both times:

- ``fixed``: ``max`` consumer containers started with ``docker run`` on their own
  queue, subscribed before the publish -- the best a hand-sized pool does, paid for by
  running while there is nothing to do;
- ``autoscale``: dockerspaces with one ``[[autoscale]]`` entry (``max`` workers,
  ``interval`` 1 s, ``--target max + 1`` slots), starting from 0 workers: its time
  includes seeing the backlog (RabbitMQ's queue statistics lag by their collection
  interval, 5 s by default), starting the containers and their connecting.

Why ``--work 0.3`` (seconds per message): the autoscaler pays a fixed start of a few
seconds per burst (statistics interval, poll interval, container start), whatever the
backlog. With 0.1 s messages, 300 x 0.1 s / 3 workers is a 10 s drain, and the ratio
would mostly measure RabbitMQ's statistics interval; 0.3 s gives a 30 s drain, where
the start-up is a fraction, as with real queue work (inference, transcoding), which
takes seconds per message. ``--work 0.1`` shows the short-burst case.

Redeliveries are counted from the records (a record flagged ``redelivered`` or an id
recorded twice; bar: 0); the bar for the time: autoscale / fixed <= 1.3x (the median
of the rounds' ratios).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from typing import Any

from tests.integration.procs import Server
from tests.integration.rabbit import (
    CONSUMER,
    Account,
    ensure_consumer_image,
    rabbit_account,
    require_rabbit,
    write_autoscale_config,
)
from tests.integration.wait import eventually

QUEUE = "work"  # the autoscaled entry's queue
FIXED = "fixed"  # the hand-started pool's own queue: the autoscaler does not see it
ENTRY = "bench"
BENCH_LABEL = "dockerspaces.bench=autoscale"


def wait_records(acct: Account, queue: str, n: int, timeout: float) -> list[dict[str, Any]]:
    """Collect ``n`` records from ``queue.done``."""
    records: list[dict[str, Any]] = []

    def done() -> bool:
        records.extend(acct.take(queue + ".done"))
        return len(records) >= n

    eventually(done, timeout, f"{n} records on {queue}.done", interval=0.1)
    return records


def redeliveries(records: list[dict[str, Any]]) -> int:
    """Records flagged redelivered plus ids recorded more than once."""
    ids = [r["id"] for r in records]
    return (len(ids) - len(set(ids))) + sum(1 for r in records if r["redelivered"])


def _logs(container: str) -> str:
    p = subprocess.run(["docker", "logs", container], check=False, capture_output=True, text=True)
    return p.stdout


def fixed_round(acct: Account, n: int, workers: int, work: float) -> tuple[float, int]:
    """Drain ``n`` messages with ``workers`` consumers started by hand, subscribed
    before the publish; (seconds, redeliveries)."""
    ids: list[str] = []
    try:
        for _ in range(workers):
            out = subprocess.run(
                [
                    "docker",
                    "run",
                    "-d",
                    "--label",
                    BENCH_LABEL,
                    "-e",
                    f"AMQP_URL={acct.worker_url}",
                    "-e",
                    f"AMQP_QUEUE={FIXED}",
                    "-e",
                    f"WORK_SECONDS={work}",
                    CONSUMER,
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            ids.append(out.stdout.strip())
        eventually(
            lambda: all("consuming" in _logs(c) for c in ids), 60, "the fixed pool subscribed", interval=0.2
        )
        t0 = time.monotonic()
        acct.publish(FIXED, [f"f{i:04d}" for i in range(n)])
        records = wait_records(acct, FIXED, n, 900)
        return time.monotonic() - t0, redeliveries(records)
    finally:
        if ids:
            subprocess.run(["docker", "stop", "-t", "10", *ids], check=False, capture_output=True)
            subprocess.run(["docker", "rm", "-f", *ids], check=False, capture_output=True)


class WorkerWatch:
    """When the autoscaled workers first appear and how many run at most."""

    def __init__(self, server: Server):
        self.server = server
        self.first: float | None = None
        self.most = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def count(self) -> int:
        """The instance's running consumer containers."""
        image = CONSUMER.partition(":")[0]
        return sum(1 for c in self.server.containers() if c["Image"].startswith(image))

    def _run(self) -> None:
        while not self._stop.is_set():
            n = self.count()
            if n and self.first is None:
                self.first = time.monotonic()
            self.most = max(self.most, n)
            self._stop.wait(0.2)  # sampling pace

    def start(self) -> None:
        """Start sampling."""
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()
        self._thread.join(10)


def autoscale_round(acct: Account, server: Server, n: int) -> tuple[float, int, float, int]:
    """Drain ``n`` messages through the autoscaler from 0 workers; (seconds,
    redeliveries, seconds to the first worker container, most workers at once)."""
    watch = WorkerWatch(server)

    def idle() -> bool:
        view = server.snapshot()["Autoscale"][ENTRY]
        return watch.count() == 0 and view["Actual"] in (0, None) and not view["Desired"]

    eventually(idle, 180, "the autoscaled workers back to 0", interval=0.5)
    watch.start()
    try:
        t0 = time.monotonic()
        acct.publish(QUEUE, [f"a{i:04d}" for i in range(n)])
        records = wait_records(acct, QUEUE, n, 900)
        took = time.monotonic() - t0
    finally:
        watch.stop()
    first = (watch.first - t0) if watch.first is not None else float("nan")
    return took, redeliveries(records), first, watch.most


def main() -> None:
    """Run the rounds; print each, the medians and the bars."""
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--messages", type=int, default=300)
    ap.add_argument("--work", type=float, default=0.3, help="seconds per message (see the docstring)")
    ap.add_argument("--max", type=int, default=3, help="workers, both ways")
    args = ap.parse_args()
    require_rabbit()
    ensure_consumer_image()
    acct = rabbit_account("bench")
    directory = tempfile.mkdtemp(prefix="ds-bench-autoscale-")
    server: Server | None = None
    try:
        acct.declare(QUEUE, QUEUE + ".done", FIXED, FIXED + ".done")
        config = write_autoscale_config(
            acct, directory, QUEUE, name=ENTRY, max_workers=args.max, work_seconds=args.work
        )
        server = Server("--config", config, "--stop", "10", slots=args.max + 1).start()
        auto: list[float] = []
        fixed: list[float] = []
        ratios: list[float] = []
        redelivered = 0
        print(
            f"{args.messages} messages, {args.work} s each, {args.max} workers; "
            f"ideal drain {args.messages * args.work / args.max:.1f} s",
            flush=True,
        )
        for r in range(args.rounds):
            if r % 2 == 0:
                ta, ra, first, most = autoscale_round(acct, server, args.messages)
                tf, rf = fixed_round(acct, args.messages, args.max, args.work)
            else:
                tf, rf = fixed_round(acct, args.messages, args.max, args.work)
                ta, ra, first, most = autoscale_round(acct, server, args.messages)
            auto.append(ta)
            fixed.append(tf)
            ratios.append(ta / tf)
            redelivered += ra + rf
            print(
                f"round {r + 1}: autoscale {ta:.1f} s (first worker after {first:.1f} s, "
                f"at most {most}), fixed {tf:.1f} s, ratio {ta / tf:.2f}x, "
                f"redeliveries {ra} autoscale / {rf} fixed",
                flush=True,
            )
        ratio = statistics.median(ratios)
        print(f"median: autoscale {statistics.median(auto):.1f} s, fixed {statistics.median(fixed):.1f} s")
        print(
            f"autoscale / fixed (median of the rounds' ratios): {ratio:.2f}x "
            f"(bar <= 1.3x) {'PASS' if ratio <= 1.3 else 'MISS'}"
        )
        print(f"redeliveries, all rounds: {redelivered} (bar 0) {'PASS' if redelivered == 0 else 'MISS'}")
    finally:
        if server is not None:
            server.cleanup()
        acct.cleanup()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
