"""Readiness: poll a started container until it answers, exits or runs out of time.

The rules (SPEC "Readiness"): a container removed or killed from outside while
starting is :class:`~dockerspaces.engine.interface.ContainerRemoved`; one that exits
on its own is :class:`~dockerspaces.engine.interface.ContainerExited` at once, with
the tail of its log; a service is ready when its published port gives an HTTP answer
(:mod:`dockerspaces.engine.probe`) and its health check, if any, says healthy; a
worker (no port) when it still runs ``worker_settle`` seconds after its start;
otherwise :class:`~dockerspaces.engine.interface.NotReady` at the deadline, saying
why in plain words.  Polls start at 50 ms and slow down to 0.5 s.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import docker.errors  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater

from .errors import is_not_found
from .interface import ContainerExited, ContainerHandle, ContainerRemoved, NotReady, RunOptions
from .probe import ProbeResult
from .threads import ClientThreads, DockerClient

LOG_TAIL_LINES = 20
FIRST_POLL = 0.05  # seconds; each next poll waits 1.5 times longer, up to LAST_POLL
LAST_POLL = 0.5

#: ``probe(address, port, path, timeout)``: one readiness probe
Probe = Callable[[str, int, str, float], "Deferred[ProbeResult]"]


class State:
    """A container's state as read by inspect (``info`` None: it is gone)."""

    def __init__(self, info: dict[str, Any] | None) -> None:
        self.gone = info is None
        state = (info or {}).get("State") or {}
        self.status: str = state.get("Status", "gone" if info is None else "unknown")
        self.exit_code: int | None = state.get("ExitCode")
        self.oom: bool = bool(state.get("OOMKilled"))
        health = state.get("Health")
        self.health: str | None = health.get("Status") if isinstance(health, dict) else None
        self.error: str = state.get("Error") or ""


def inspect_sync(client: DockerClient, cid: str) -> State:
    """The container's :class:`State` (blocking; a missing container is gone)."""
    try:
        return State(client.inspect_container(cid))
    except docker.errors.APIError as e:
        if is_not_found(e):
            return State(None)
        raise


def log_tail_sync(client: DockerClient, cid: str) -> str:
    """The last :data:`LOG_TAIL_LINES` lines of the container's output (blocking;
    empty when the engine cannot give them)."""
    try:
        raw = client.logs(cid, stdout=True, stderr=True, tail=LOG_TAIL_LINES, timestamps=False)
    except docker.errors.APIError:
        return ""
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    return str(raw).rstrip()


async def wait_ready(
    threads: ClientThreads,
    clock: IReactorTime,
    probe: Probe,
    handle: ContainerHandle,
    deadline: float,
    options: RunOptions,
    *,
    address: str,
    started: float,
    probe_timeout: float,
    worker_settle: float,
) -> None:
    """Poll ``handle`` until ready by the rules of the module docstring; ``address``
    is where its slot's port is published, ``started`` when it was started."""
    spec = handle.spec
    delay = FIRST_POLL
    why = "no answer yet"
    while True:
        st = await threads.run(inspect_sync, handle.id)
        if st.gone or st.status == "removing":
            raise ContainerRemoved(
                f"container {handle.name} ({spec.display}) was removed from outside while starting"
            )
        if st.status in ("exited", "dead") and st.exit_code == 137 and not st.oom:
            raise ContainerRemoved(
                f"container {handle.name} ({spec.display}) was killed (exit 137) from outside while starting"
            )
        if st.status in ("exited", "dead"):
            tail = await threads.run(log_tail_sync, handle.id)
            oom = " (out of memory)" if st.oom else ""
            raise ContainerExited(
                f"container {handle.name} ({spec.display}) exited with code "
                f"{st.exit_code}{oom} while starting",
                exit_code=st.exit_code,
                log_tail=tail,
            )
        now = clock.seconds()
        if spec.worker:
            if st.status == "running" and now >= started + worker_settle:
                return
            why = f"worker is {st.status}, not yet {worker_settle:g}s old"
        elif st.status == "running":
            budget = max(0.05, min(probe_timeout, deadline - now))
            res = await probe(address, handle.slot.port, options.ready_path, budget)
            if res.ready:
                if st.health in (None, "healthy"):
                    return
                why = f"HTTP answers ({res.status_line}) but health is {st.health}"
            else:
                why = res.reason
        else:
            why = f"container is {st.status}"
        now = clock.seconds()
        if now >= deadline:
            raise NotReady(
                f"container {handle.name} ({spec.display}) not ready on "
                f"{address}:{handle.slot.port} by the deadline: {why}"
            )
        wait = min(delay, deadline - now)
        if spec.worker:
            wait = min(wait, max(0.0, started + worker_settle - now)) or 0.01
        await deferLater(clock, wait)
        delay = min(delay * 1.5, LAST_POLL)
