"""The autoscaler in the service tree: the ``[[autoscale]]`` entries of ``--config``,
the queue reader (treq with a persistent pool and a timeout), the broker's workers,
and the watcher that applies a changed file without a restart."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from treq.client import HTTPClient
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.web.client import Agent, HTTPConnectionPool

from ..engine.interface import IEngine
from .config import load_entries
from .pool import BrokerWorkers, WorkerControl
from .rabbit import QueueReading, QueueRef, read_queue
from .service import AutoscaleService
from .watch import ConfigWatcher, sighup_installer

#: seconds a management API reading may take before it counts as unreachable
READ_TIMEOUT = 10.0


class Autoscaler(MultiService):
    """The autoscale service and its config watcher; :attr:`service` for snapshots."""

    def __init__(self, service: AutoscaleService, watcher: ConfigWatcher):
        super().__init__()
        self.service = service
        self.watcher = watcher
        service.setServiceParent(self)
        watcher.setServiceParent(self)


def build_autoscaler(
    config_path: str, broker: WorkerControl, engines: Mapping[str, IEngine], reactor: Any
) -> Autoscaler | None:
    """The autoscaler for the ``[[autoscale]]`` entries of ``config_path``; None when the
    file has none (entries added later are picked up only after a restart).
    ``reactor``: the global reactor (time, TCP, threads)."""
    entries = load_entries(config_path)
    if not entries:
        return None
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = 2
    client = HTTPClient(Agent(reactor, pool=pool))

    def reader(ref: QueueRef) -> Deferred[QueueReading]:
        return read_queue(client, ref, reactor, READ_TIMEOUT)

    service = AutoscaleService(entries, BrokerWorkers(broker, engines), reader, reactor)
    watcher = ConfigWatcher(
        config_path, entries, service.reconfigure, reactor, install_sighup=sighup_installer(reactor)
    )
    return Autoscaler(service, watcher)
