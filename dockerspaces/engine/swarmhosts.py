"""A Docker Swarm's nodes as the broker's hosts, kept current while running (``--swarm``).

:class:`SwarmHosts` reads the manager's node list every ``interval`` seconds: every
ready, active node is a host (its slots and GPUs from the node labels
``dockerspaces.slots`` / ``dockerspaces.gpus``, else ``--target`` / ``--gpu``; its
slot ports from ``--start-port``); a node that joins is added, one whose slot label
changed is resized, one that drains, goes down or leaves is removed -- all through the
broker (:meth:`~dockerspaces.broker.broker.Broker.add_host`, ``resize_host``,
``remove_host``), so its rules do not change. A manager that does not answer changes
nothing (a warning each time; the hosts keep what they had).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import HostConfig
from .interface import IEngine
from .swarm import NodeInfo, slots_and_gpus

log = Logger()

_NOT_NAME = re.compile(r"[^a-zA-Z0-9_.-]+")


class NodeSource(Protocol):
    """The manager's node list."""

    def nodes(self) -> Deferred[list[NodeInfo]]:
        """Every node the manager knows."""


class HostTable(Protocol):
    """The broker's hosts (:class:`~dockerspaces.broker.broker.Broker`)."""

    def add_host(self, config: HostConfig, engine: IEngine) -> Deferred[None]:
        """A host joins."""

    def resize_host(self, name: str, slots: int) -> None:
        """A host's slot count changes."""

    def remove_host(self, name: str, reason: str) -> None:
        """A host leaves."""

    def host_slots(self) -> dict[str, int]:
        """The hosts in use and their slots."""


#: makes a node's host: (node, slots, gpus, host name) -> (its HostConfig, its engine)
HostMaker = Callable[[NodeInfo, int, int, str], tuple[HostConfig, IEngine]]


class SwarmHosts(Service):
    """Keeps the broker's hosts equal to the swarm's ready nodes (see module)."""

    def __init__(
        self,
        nodes: NodeSource,
        broker: HostTable,
        clock: IReactorTime,
        make_host: HostMaker,
        *,
        default_slots: int,
        default_gpus: int,
        interval: float = 5.0,
        forget: Callable[[str], None] | None = None,
    ):
        self.forget = forget or (lambda name: None)  # a removed host's engine is done
        self.source, self.broker, self.clock = nodes, broker, clock
        self.make_host = make_host
        self.default_slots, self.default_gpus = default_slots, default_gpus
        self.interval = interval
        self.names: dict[str, str] = {}  # node id -> host name (stable while running)
        self.reading: Deferred[None] | None = None
        self._loop: LoopingCall | None = None
        self.errors = 0  # readings that failed, in a row

    def startService(self) -> None:
        """Read the nodes now, then every ``interval`` seconds."""
        super().startService()
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:  # type: ignore[override]
        """Stop reading."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def refresh(self) -> Deferred[None] | None:
        """One reading of the nodes, applied to the broker (skipped while one is under
        way); fires once applied."""
        if self.reading is not None:
            return None
        d: Deferred[None] = self.source.nodes().addCallbacks(self.apply, self._failed)
        self.reading = d

        def done(_: object) -> None:
            self.reading = None

        return d.addBoth(done)

    def _failed(self, f: Failure) -> None:
        self.errors += 1
        log.warn(  # noqa: G010 - twisted.logger
            "swarm: the manager's node list could not be read ({err}); hosts unchanged",
            err=f.getErrorMessage(),
        )

    def host_name(self, node: NodeInfo) -> str:
        """The host name of ``node``: its hostname, made unique with its id's start."""
        name = self.names.get(node.id)
        if name is None:
            base = _NOT_NAME.sub("_", node.hostname or node.id[:12]) or node.id[:12]
            taken = set(self.names.values())
            name = base if base not in taken else f"{base}-{node.id[:6]}"
            self.names[node.id] = name
        return name

    def apply(self, nodes: list[NodeInfo]) -> None:
        """Make the broker's hosts those of the ready, active ``nodes``."""
        self.errors = 0
        have = self.broker.host_slots()
        wanted: dict[str, NodeInfo] = {}
        why: dict[str, str] = {}
        for node in nodes:
            name = self.host_name(node)
            if not node.ready:
                why[name] = f"node {node.hostname} is {node.state}/{node.availability}"
                continue
            wanted[name] = node
            slots, gpus = slots_and_gpus(node, self.default_slots, self.default_gpus)
            if name not in have:
                config, engine = self.make_host(node, slots, gpus, name)
                log.info(
                    "swarm: node {node} ({addr}) joins with {slots} slots",
                    node=node.hostname,
                    addr=node.address,
                    slots=slots,
                )
                self.broker.add_host(config, engine)
            elif have[name] != slots:
                log.info("swarm: node {node} now has {slots} slots", node=node.hostname, slots=slots)
                self.broker.resize_host(name, slots)
        ours = set(self.names.values())
        for name in have:
            if name not in wanted and name in ours:
                self.broker.remove_host(name, why.get(name, "node left the swarm"))
                self.forget(name)
