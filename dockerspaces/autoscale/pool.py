"""The workers of an entry: :class:`WorkerPool` (what the service needs) and
:class:`BrokerWorkers`, which provides it over the broker (:class:`WorkerControl`)
and the engines (each worker's address, for matching it to a queue consumer).

Launches go through the broker like any worker launch (slots, GPUs, eviction,
``--release``); a stop is SIGTERM, then SIGKILL after the ``--stop`` grace.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, cast

from attrs import define, field
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..engine.interface import ContainerHandle, IEngine
from ..spec import JobSpec
from .config import Entry
from .policy import WorkerContainer

__all__ = ["BrokerWorkers", "WorkerContainer", "WorkerControl", "WorkerPool", "WorkerView"]

log = Logger()


class WorkerView(Protocol):
    """A running worker as the broker shows it."""

    @property
    def id(self) -> str:
        """The container id."""

    @property
    def since(self) -> float:
        """When it was created (clock seconds)."""

    @property
    def host(self) -> str:
        """The engine's (host's) name."""


class WorkerControl(Protocol):
    """What the broker provides for launching, listing and stopping workers."""

    def launch_worker(self, spec: JobSpec) -> Deferred[ContainerHandle]:
        """Start one more worker of a port-3 spec; fires once it has started."""

    def worker_views(self, spec: JobSpec) -> Sequence[WorkerView]:
        """The running (started, not stopping) workers of ``spec``'s key (a ``list``;
        typed ``Sequence`` so that a list of the broker's own view class fits)."""

    def stop_worker(self, container_id: str) -> Deferred[None]:
        """SIGTERM, SIGKILL after the ``--stop`` grace; fires once it is gone."""


class WorkerPool(Protocol):
    """The service's view of an entry's workers."""

    def workers(self, entry: Entry) -> Deferred[list[WorkerContainer]]:
        """The entry's running workers with their addresses."""

    def launch(self, entry: Entry) -> Deferred[object]:
        """Start one more worker of the entry."""

    def stop(self, entry: Entry, container_id: str) -> Deferred[None]:
        """Stop one worker gracefully (SIGTERM and the grace)."""


@define
class BrokerWorkers:
    """:class:`WorkerPool` over the broker; a worker's address is asked of its engine
    once (``container_address``) and kept while the worker runs; an address that
    could not be read is None (such a worker is never chosen for stopping)."""

    control: WorkerControl
    engines: Mapping[str, IEngine]
    _addresses: dict[str, str] = field(factory=dict, alias="addresses")

    def workers(self, entry: Entry) -> Deferred[list[WorkerContainer]]:
        """The entry's workers (oldest first), addresses included."""
        views = list(self.control.worker_views(entry.spec))
        alive = {v.id for v in views}
        for cid in list(self._addresses):
            if cid not in alive:
                del self._addresses[cid]
        return gatherResults([self._address(v) for v in views]).addCallback(
            lambda addresses: [
                WorkerContainer(v.id, a, v.since) for v, a in zip(views, addresses, strict=True)
            ]
        )

    def _address(self, view: WorkerView) -> Deferred[str | None]:
        known: str | None = self._addresses.get(view.id)
        engine = self.engines.get(view.host)
        if known is not None or engine is None:
            return succeed(known)

        def got(address: str | None) -> str | None:
            if address is not None:
                self._addresses[view.id] = address
            return address

        def failed(f: Failure) -> None:
            log.info(
                "autoscale: cannot read the address of worker {id} on {host}: {e}",
                id=view.id[:12],
                host=view.host,
                e=f.getErrorMessage(),
            )

        return engine.container_address(view.id).addCallbacks(got, failed)

    def launch(self, entry: Entry) -> Deferred[object]:
        """``launch_worker(entry.spec)``."""
        try:
            d = cast("Deferred[object]", self.control.launch_worker(entry.spec))
        except Exception as e:  # noqa: BLE001 - a refusal raised instead of returned
            return fail(e)
        return d

    def stop(self, entry: Entry, container_id: str) -> Deferred[None]:
        """``stop_worker(container_id)``; the address is forgotten."""
        self._addresses.pop(container_id, None)
        try:
            return self.control.stop_worker(container_id)
        except Exception as e:  # noqa: BLE001 - e.g. ValueError: not a running worker
            return fail(e)
