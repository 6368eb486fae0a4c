"""Cold start through a swarm service vs a plain engine, same machine, same run.

A single-node swarm is made on this machine's engine for the run (``docker swarm init
--advertise-addr 127.0.0.1``) and left afterwards. Each round starts one container of
``selmaproject/tts:777`` (the busybox test image) by each path, interleaved, and times
``ensure_image + create + start + wait_ready`` until the first HTTP status line:

- plain: :class:`~dockerspaces.engine.engine.Engine` (a container);
- swarm: :class:`~dockerspaces.engine.swarm.SwarmNodeEngine` (a one-replica service
  pinned to the node, its port published in host mode).

For the swarm path the daemon's own timestamps say where the time goes: the service
created → its task created (scheduling), the task created → running (assigning,
preparing and starting the container), running → ready (our HTTP probe). Run::

    PYTHONPATH=. .venv/bin/python -m bench.swarm [--runs N]
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
from dockerspaces.engine.events import docker_time
from dockerspaces.engine.interface import RunOptions, SlotInfo
from dockerspaces.engine.swarm import SwarmManager, SwarmManagerService, SwarmNodeEngine, host_for_node
from dockerspaces.spec import JobSpec
from tests.integration.dockerutil import DOCKER_URL, docker_available, free_port, unique_instance
from tests.integration.images import TTS, TTS_PORT, ensure_test_images

SPEC = JobSpec(mode="x", name=("selmaproject", "tts"), tag="777", port=TTS_PORT)


def _docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=False).stdout.strip()


def phases(client: Any, service_id: str) -> tuple[float, float] | None:
    """(service created → task created, task created → running) from the daemon's own
    timestamps; None when they cannot be read."""
    try:
        svc = client.inspect_service(service_id)
        (t,) = client.tasks(filters={"service": service_id})
    except Exception:  # noqa: BLE001 - a bench: report what can be read
        return None
    created = docker_time(svc.get("CreatedAt", ""))
    task_created = docker_time(t.get("CreatedAt", ""))
    running = docker_time((t.get("Status") or {}).get("Timestamp", ""))
    if None in (created, task_created, running):
        return None
    assert created is not None and task_created is not None and running is not None
    return task_created - created, running - task_created


async def rounds(reactor: Any, runs: int) -> dict[str, Any]:
    """``runs`` cold starts by each path, interleaved."""
    import docker  # type: ignore[import-untyped]

    instance = unique_instance("bench")
    plain_host = HostConfig(name="local", url=DOCKER_URL, start_port=free_port(), slots=1)
    plain = Engine(reactor, plain_host, instance, "missing")
    manager = SwarmManager(reactor, DOCKER_URL, instance)
    services = [EngineService(plain), SwarmManagerService(manager)]
    for s in services:
        s.startService()
    (node,) = await manager.nodes()
    swarm = SwarmNodeEngine(manager, node, host_for_node(node, DOCKER_URL, free_port(), 1, 0), stop_grace=0)
    client = docker.APIClient(base_url=DOCKER_URL)
    out: dict[str, Any] = {"plain": [], "swarm": [], "phases": []}
    try:
        await plain.ping()
        await manager.ping()
        for _ in range(runs + 1):  # the first of each is a warm-up
            for name, engine in (("plain", plain), ("swarm", swarm)):
                slot = SlotInfo(engine.name, free_port())
                t0 = time.perf_counter()
                await engine.ensure_image(SPEC.ref)
                h = await engine.create(SPEC, slot, RunOptions())
                await engine.start(h)
                await engine.wait_ready(h, reactor.seconds() + 60, RunOptions())
                took = time.perf_counter() - t0
                if name == "swarm":
                    p = phases(client, h.id)
                    ready = took - sum(p) if p else None
                    out["phases"].append((*p, ready) if p else None)
                out[name].append(took)
                await engine.stop(h, 0)
        out["plain"], out["swarm"], out["phases"] = out["plain"][1:], out["swarm"][1:], out["phases"][1:]
    finally:
        client.close()
        for s in reversed(services):
            await s.stopService()
    return out


def main(argv: list[str]) -> None:
    """Make the swarm, run, leave the swarm, print medians and the ratio."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args(argv)
    reason = docker_available()
    if reason:
        sys.exit(f"skipped: {reason}")
    ensure_test_images(TTS)
    made = _docker("info", "--format", "{{.Swarm.LocalNodeState}}") != "active"
    if made:
        _docker("swarm", "init", "--advertise-addr", "127.0.0.1")
    result: dict[str, Any] = {}

    async def run(reactor: Any) -> None:
        result.update(await rounds(reactor, args.runs))

    try:
        task.react(lambda r: defer.ensureDeferred(run(r)), [])
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    finally:
        if made:
            _docker("swarm", "leave", "--force")
            _docker("network", "rm", "docker_gwbridge")
    plain, swarm = result["plain"], result["swarm"]
    mp, ms = statistics.median(plain), statistics.median(swarm)
    print(f"cold start of {TTS}, {args.runs} runs each, interleaved (medians)")
    print(
        f"  plain engine (a container):  {mp * 1000:6.0f} ms  [{', '.join(f'{t * 1000:.0f}' for t in plain)}]"
    )
    print(
        f"  swarm (a one-replica service): {ms * 1000:6.0f} ms  [{', '.join(f'{t * 1000:.0f}' for t in swarm)}]"
    )
    print(f"  ratio swarm/plain: {ms / mp:.2f}x")
    known = [p for p in result["phases"] if p is not None]
    if known:
        sched, start, ready = (statistics.median(x) for x in zip(*known, strict=True))
        print(
            f"  swarm, where the time goes (medians): service → task created {sched * 1000:.0f} ms, "
            f"task created → running {start * 1000:.0f} ms, running → answers (probe, rest) {ready * 1000:.0f} ms"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
