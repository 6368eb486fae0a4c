"""Broker scale benchmark: 10,000 waiting requests, 1,000 slots, 200 keys (FakeEngine).

Run: ``.venv/bin/python -m bench.broker_scale`` (options: ``--waiters``, ``--slots``,
``--keys``, ``--hosts``, ``--releases``).  Prints events per second (arrivals and
releases, each a broker event that hands a container on) and the memory one waiting
request costs (tracemalloc, broker state plus its Deferred).  Bars: >= 20,000 events/s,
<= 8 KB per waiter; the exit status is 1 when a bar is missed.
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
import tracemalloc

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from dockerspaces.broker.broker import Broker
from dockerspaces.broker.model import BrokerSettings, Lease
from dockerspaces.config import HostConfig
from dockerspaces.engine.fake import FakeEngine
from dockerspaces.spec import JobSpec

EVENTS_BAR = 20_000
BYTES_BAR = 8 * 1024


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--waiters", type=int, default=10_000)
    p.add_argument("--slots", type=int, default=1_000)
    p.add_argument("--keys", type=int, default=200)
    p.add_argument("--hosts", type=int, default=4)
    p.add_argument("--releases", type=int, default=10_000)
    args = p.parse_args(argv)

    def setup() -> tuple[Clock, Broker, list[JobSpec], list[Lease]]:
        """A broker whose slots are all busy with long requests of every key."""
        clock = Clock()
        clock.advance(1_700_000_000)
        per_host = args.slots // args.hosts
        hosts = [
            HostConfig(f"h{i}", "unix:///var/run/docker.sock", 10_000 + i * per_host, per_host)
            for i in range(args.hosts)
        ]
        engines = {h.name: FakeEngine(clock, h) for h in hosts}
        settings = BrokerSettings(
            source=args.waiters + args.slots + 10, queue=args.waiters, queue_timeout=1e9
        )
        broker = Broker(clock, hosts, engines, settings)
        broker.start()
        specs = [JobSpec("x", ("bench", f"svc{i}"), "1", 8000) for i in range(args.keys)]
        held: list[Lease] = []
        # Teach every key that its requests are long (so it scales to its share of slots).
        for s in specs:
            broker.acquire(s).addCallback(held.append)
        clock.advance(100)
        for lease in held:
            lease.release()
        held.clear()
        for s in specs:
            for _ in range(args.slots // args.keys):
                broker.acquire(s).addCallback(held.append)
        return clock, broker, specs, held

    def arrive(broker: Broker, specs: list[JobSpec], held: list[Lease]) -> list[Deferred[None]]:
        out = []
        for i in range(args.waiters):
            d = broker.acquire(specs[i % args.keys])
            out.append(d.addCallback(held.append))
        return out

    # memory: a separate run under tracemalloc (which slows everything down)
    _clock, broker, specs, held = setup()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    waiting = arrive(broker, specs, held)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    grown = sum(st.size_diff for st in after.compare_to(before, "filename"))
    per_waiter = grown / args.waiters
    del waiting, broker, held

    # speed
    _clock, broker, specs, held = setup()
    busy = len(held)
    gc.collect()
    t0 = time.perf_counter()
    arrive(broker, specs, held)
    t_arrive = time.perf_counter() - t0

    n_waiting = broker.waiting()
    rng = random.Random(1)
    t0 = time.perf_counter()
    events_before = broker.events
    for _ in range(args.releases):
        i = rng.randrange(len(held))
        lease = held[i]
        held[i] = held[-1]
        held.pop()
        lease.release()
    t_release = time.perf_counter() - t0
    release_events = broker.events - events_before

    arrive_rate = args.waiters / t_arrive
    release_rate = release_events / t_release
    total_rate = (args.waiters + release_events) / (t_arrive + t_release)
    print(
        f"slots={args.slots} hosts={args.hosts} keys={args.keys} busy={busy} "
        f"waiting={n_waiting} (asked {args.waiters})"
    )
    print(f"arrivals: {args.waiters} in {t_arrive * 1000:.0f} ms = {arrive_rate:,.0f}/s")
    print(
        f"releases (each hands the container to the next waiter): {release_events} in "
        f"{t_release * 1000:.0f} ms = {release_rate:,.0f}/s"
    )
    print(f"events/s overall: {total_rate:,.0f} (bar >= {EVENTS_BAR:,})")
    print(f"memory per waiting request: {per_waiter:,.0f} B (bar <= {BYTES_BAR:,} B)")
    print(f"still waiting after releases: {broker.waiting()}, leases held: {len(held)}")
    ok = min(arrive_rate, release_rate) >= EVENTS_BAR and per_waiter <= BYTES_BAR
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
