"""Cold start: Engine (ensure_image + create + start + wait_ready) vs. docker by hand.

For a small local image (``selmaproject/tts:777`` from tests/integration/images.py),
each run starts a fresh container on a free port and measures until the first HTTP
status line.  "By hand" is ``docker run -d -p 127.0.0.1:PORT:5002`` (the CLI) followed
by polling the port for a status line every 10 ms.  Prints both medians and the ratio
(the bar is <= 1.2x).  Run::

    PYTHONPATH=. .venv/bin/python bench/coldstart.py [--runs N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from typing import Any

from twisted.internet import defer, task

from dockerspaces.config import HostConfig
from dockerspaces.engine.engine import Engine, EngineService
from dockerspaces.engine.interface import RunOptions, SlotInfo
from dockerspaces.spec import JobSpec
from tests.integration.dockerutil import (
    DOCKER_URL,
    TEST_LABEL,
    docker_available,
    free_port,
    remove_instance_containers,
    remove_test_containers,
    unique_instance,
    wait_http_status,
)
from tests.integration.images import TTS, TTS_PORT, ensure_test_images

SPEC = JobSpec(mode="x", name=("selmaproject", "tts"), tag="777", port=TTS_PORT)


def by_hand() -> float:
    """``docker run -d -p`` then poll the port; seconds until a status line."""
    port = free_port()
    t0 = time.perf_counter()
    subprocess.run(
        ["docker", "run", "-d", "--label", f"{TEST_LABEL}=1", "-p", f"127.0.0.1:{port}:{TTS_PORT}", TTS],
        check=True,
        capture_output=True,
    )
    wait_http_status("127.0.0.1", port, timeout=30)
    took = time.perf_counter() - t0
    remove_test_containers()
    return took


async def with_engine(reactor: Any, runs: int) -> list[float]:
    """The Engine's path, ``runs`` times, one long-lived Engine (as the broker has)."""
    instance = unique_instance("bench")
    host = HostConfig(name="local", url=DOCKER_URL, start_port=free_port(), slots=1)
    engine = Engine(reactor, host, instance, "missing")
    svc = EngineService(engine)
    svc.startService()
    times = []
    try:
        await engine.ping()  # warm the thread's client, as a running broker would have
        for _ in range(runs):
            slot = SlotInfo("local", free_port())
            t0 = time.perf_counter()
            await engine.ensure_image(SPEC.ref)
            h = await engine.create(SPEC, slot, RunOptions())
            await engine.start(h)
            await engine.wait_ready(h, reactor.seconds() + 30, RunOptions())
            times.append(time.perf_counter() - t0)
            await engine.stop(h, 0)
    finally:
        await svc.stopService()
        remove_instance_containers(instance)
    return times


def main(argv: list[str]) -> None:
    """Run the benchmark and print the medians and their ratio."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args(argv)
    reason = docker_available()
    if reason:
        sys.exit(f"skipped: {reason}")
    ensure_test_images(TTS)
    by_hand()  # warm-up
    hand = [by_hand() for _ in range(args.runs)]

    async def engine_runs(reactor: Any) -> None:
        eng = await with_engine(reactor, args.runs)
        mh, me = statistics.median(hand), statistics.median(eng)
        print(f"runs: {args.runs} each, image {TTS}")
        print(
            f"by hand (docker run -d -p + poll): median {mh * 1000:.0f} ms  "
            f"[{', '.join(f'{t * 1000:.0f}' for t in hand)}]"
        )
        print(
            f"Engine (ensure+create+start+ready): median {me * 1000:.0f} ms  "
            f"[{', '.join(f'{t * 1000:.0f}' for t in eng)}]"
        )
        print(f"ratio Engine/by hand: {me / mh:.2f}x (bar <= 1.20x)")

    task.react(lambda r: defer.ensureDeferred(engine_runs(r)))


if __name__ == "__main__":
    main(sys.argv[1:])
