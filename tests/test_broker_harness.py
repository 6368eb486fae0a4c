"""Shared set-up for the broker tests (no tests here): a Clock, FakeEngines and a Broker."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from dockerspaces.broker.broker import Broker
from dockerspaces.broker.model import BrokerSettings, Lease
from dockerspaces.config import HostConfig
from dockerspaces.engine.fake import FakeEngine
from dockerspaces.spec import JobSpec, parse_route


def spec(segment: str) -> JobSpec:
    """Parse a job route segment (``x:img:tag:port``) into a JobSpec."""
    route = parse_route(segment)
    assert isinstance(route, JobSpec), segment
    return route


class Harness:
    """A broker over ``hosts`` fake engines with ``slots`` slots each (``gpus`` GPUs
    per host, or ``host_gpus[i]`` on host i)."""

    def __init__(
        self,
        slots: int = 2,
        hosts: int = 1,
        gpus: int = 0,
        pull_delay: float = 0,
        start_delay: float = 0,
        ready_delay: float = 0,
        create_delay: float = 0,
        start: bool = True,
        run_options: Any = None,
        host_gpus: tuple[int, ...] | None = None,
        **settings: Any,
    ):
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.hosts = [
            HostConfig(
                f"h{i}",
                "unix:///var/run/docker.sock",
                9100 + 100 * i,
                slots,
                gpus if host_gpus is None else host_gpus[i],
            )
            for i in range(hosts)
        ]
        self.engines = {
            h.name: FakeEngine(
                self.clock,
                h,
                pull_delay=pull_delay,
                start_delay=start_delay,
                ready_delay=ready_delay,
                create_delay=create_delay,
            )
            for h in self.hosts
        }
        self.settings = BrokerSettings(**settings)
        self.container_events: list[tuple[Any, ...]] = []
        extra = {} if run_options is None else {"run_options": run_options}
        self.broker = Broker(
            self.clock,
            self.hosts,
            self.engines,
            self.settings,
            **extra,
            on_container=lambda *a, **kw: self.container_events.append(
                (a[0], a[1], a[3], kw.get("seconds"), kw.get("detail"), kw.get("owner"), kw.get("gpus"))
            ),
        )
        if start:
            started = self.broker.start()
            assert started.called

    @property
    def engine(self) -> FakeEngine:
        """The first host's engine."""
        return self.engines["h0"]

    def starts(self) -> int:
        """Containers started on all engines."""
        return sum(e.starts for e in self.engines.values())

    def running(self) -> int:
        """Running containers on all engines."""
        return sum(1 for e in self.engines.values() for c in e.containers.values() if c.running)

    def acquire(self, segment: str, **kw: Any) -> Deferred[Lease]:
        """``broker.acquire`` of a spec given as a route segment."""
        return self.broker.acquire(spec(segment), **kw)
