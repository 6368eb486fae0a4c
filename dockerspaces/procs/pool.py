"""The parent's side of ``--workers N``: it binds every listening endpoint, starts N
children that adopt those sockets, and keeps N running.

The parent listens with the endpoint the ``--port`` description names and never
accepts (the port stops reading at once); each child gets the sockets' file
descriptors, a UNIX socket pair to the broker (AMP, :mod:`.brokerside`) and its
:class:`ChildPlan` (pickled, on its stdin). A child writes its log lines itself to
this process's log stream when that is a plain stream (stdout, a journal); with a
file twistd rotates they come back on a pipe and this process writes them as they are.
A child that exits while running is replaced (at once when it lived a while, else
after a growing delay); the listening sockets stay open meanwhile, so connections
wait in their backlog.
Stopping sends every child SIGTERM (each stops accepting and drains its requests)
and waits for them to exit before the broker drains.
"""

from __future__ import annotations

import os
import pickle
import socket
import sys
from collections.abc import Callable
from typing import Any

from attrs import field, frozen
from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred, DeferredList, gatherResults, maybeDeferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import Factory, ProcessProtocol, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..config import Config
from .brokerside import Hub

log = Logger()

#: a child's fd for its AMP socket; its listening sockets follow
AMP_FD = 3
#: seconds a stopping child may take before it is killed
STOP_GRACE = 60.0
#: a child that lived less than this is restarted after a growing delay
SHORT_LIFE = 10.0
MAX_DELAY = 30.0


@frozen
class ChildPlan:
    """What a child needs to know, handed over on its stdin."""

    config: Config
    index: int
    #: (description, the child's fd, address family) per listening endpoint
    ports: tuple[tuple[str, int, int], ...]
    monitor: str  # the UNIX socket of the broker process's monitor routes
    cookie_key: bytes = field(repr=False)
    engines: tuple[str, ...]  # engine names, for the host: policy's networks
    has_slots: bool


def family_of(port: IListeningPort) -> int:
    """The address family of a listening port."""
    host = port.getHost()
    if isinstance(host, IPv6Address):
        return socket.AF_INET6
    if isinstance(host, IPv4Address):
        return socket.AF_INET
    if isinstance(host, UNIXAddress):
        return socket.AF_UNIX
    raise ValueError(f"cannot share a listening port on {host!r}")


class _Refuse(Factory):
    """The parent never accepts (its ports stop reading); just in case, it closes."""

    def buildProtocol(self, addr: Any) -> Protocol | None:
        """No protocol: the connection is closed."""
        return None


class OneProtocol(Factory):
    """Builds one given protocol (the adopted end of a socket pair)."""

    def __init__(self, protocol: Protocol):
        self.proto = protocol

    def buildProtocol(self, addr: Any) -> Protocol:
        """The protocol."""
        return self.proto


class ChildProcess(ProcessProtocol):
    """One child: its log lines to ``relay``; its end to the pool."""

    def __init__(self, pool: WorkerPool, index: int, started: float):
        self.pool, self.index, self.started = pool, index, started
        self._buf = b""
        self.ended: Deferred[None] = Deferred()
        self.pid: int | None = None

    def connectionMade(self) -> None:
        """Started: remember the pid."""
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def childDataReceived(self, childFD: int, data: bytes) -> None:
        """Its stdout: the whole log lines in ``data``, relayed in one piece."""
        buf = self._buf + data
        end = buf.rfind(b"\n")
        if end < 0:
            self._buf = buf
            return
        self._buf = buf[end + 1 :]
        self.pool.relay(buf[:end].decode("utf-8", "replace"))

    def processEnded(self, reason: Failure) -> None:
        """Exited: the pool decides what next."""
        if self._buf:
            self.pool.relay(self._buf.decode("utf-8", "replace"))
            self._buf = b""
        self.pool.ended(self, reason)
        self.ended.callback(None)


class WorkerPool(Service):
    """Binds the ports, runs ``count`` children (see module)."""

    def __init__(
        self,
        config: Config,
        reactor: Any,
        hub: Hub,
        count: int,
        *,
        monitor: str,
        cookie_key: bytes,
        engines: tuple[str, ...],
        has_slots: bool,
        relay: Callable[[str], None],
        log_fd: int | None = None,
        argv: list[str] | None = None,
    ):
        self.config, self.reactor, self.hub, self.count = config, reactor, hub, count
        self.monitor, self.cookie_key, self.engines, self.has_slots = monitor, cookie_key, engines, has_slots
        self.relay = relay
        #: children write their log lines to this fd themselves (None: on a pipe to
        #: ``relay``, this process writing them)
        self.log_fd = log_fd
        self.argv = argv or [sys.executable, "-m", "dockerspaces.procs.child"]
        self.ports: list[tuple[str, IListeningPort]] = []
        self.children: dict[int, ChildProcess] = {}
        self.delays: dict[int, float] = {}
        self.restarts = 0
        self.stopping = False
        self._timers: dict[int, Any] = {}

    # -- start -----------------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Bind every port before twistd sheds privileges (``--uid``), as
        ``strports.service`` does."""
        super().privilegedStartService()
        self.bind()

    def startService(self) -> None:
        """Start the children (the ports bound first, if not yet)."""
        super().startService()
        if not self.ports:
            self.bind()
        for i in range(self.count):
            self.spawn(i)
        # stopping from the moment the reactor is told to (before this service's turn)
        self.reactor.addSystemEventTrigger("before", "shutdown", self._shutting_down)

    def bind(self) -> None:
        """Listen on every ``--port`` without accepting: the children will."""
        for desc in self.config.ports:
            d = serverFromString(self.reactor, desc).listen(_Refuse())
            got: list[IListeningPort | Failure] = []
            d.addBoth(got.append)  # tcp, ssl and unix endpoints listen at once
            if not got:
                raise RuntimeError(f"--port {desc}: did not listen at once")
            p = got[0]
            if isinstance(p, Failure):
                p.raiseException()
                raise AssertionError("unreachable")
            p.stopReading()  # type: ignore[attr-defined]
            self.ports.append((desc, p))

    def _shutting_down(self) -> None:
        self.stopping = True

    def spawn(self, index: int) -> None:
        """Start child ``index``."""
        self._timers.pop(index, None)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds: dict[int, Any] = {
            0: "w",
            1: "r" if self.log_fd is None else self.log_fd,
            2: 2,
            AMP_FD: theirs.fileno(),
        }
        ports = []
        for n, (desc, p) in enumerate(self.ports):
            fd = AMP_FD + 1 + n
            fds[fd] = p.fileno()  # type: ignore[attr-defined]
            ports.append((desc, fd, family_of(p)))
        plan = ChildPlan(
            self.config, index, tuple(ports), self.monitor, self.cookie_key, self.engines, self.has_slots
        )
        proc = ChildProcess(self, index, self.reactor.seconds())
        try:
            transport = self.reactor.spawnProcess(
                proc, self.argv[0], self.argv, env=dict(os.environ), childFDs=fds
            )
            self.reactor.adoptStreamConnection(
                mine.fileno(), socket.AF_UNIX, OneProtocol(self.hub.box(index))
            )
        finally:
            mine.close()
            theirs.close()
        transport.writeToChild(0, pickle.dumps(plan))
        transport.closeChildFD(0)
        self.children[index] = proc
        log.info("child {i}: started (pid {pid})", i=index, pid=proc.pid)

    def ended(self, proc: ChildProcess, reason: Failure) -> None:
        """A child exited: replaced unless stopping."""
        if self.children.get(proc.index) is proc:
            del self.children[proc.index]
        code = getattr(reason.value, "exitCode", None)
        signal = getattr(reason.value, "signal", None)
        how = f"signal {signal}" if signal else f"status {code}"
        if self.stopping:
            log.info("child {i}: stopped ({how})", i=proc.index, how=how)
            return
        lived = self.reactor.seconds() - proc.started
        last = self.delays.get(proc.index, 0.0)
        delay = 0.0 if lived >= SHORT_LIFE else min(MAX_DELAY, max(1.0, 2 * last))
        if code == 0 and not signal:
            # a clean exit is a child told to stop: when its SIGTERM came with ours
            # (a whole process group signalled), this process stops within the second
            delay = max(delay, 1.0)
        self.delays[proc.index] = delay
        self.restarts += 1
        log.warn(  # noqa: G010 - twisted.logger
            "child {i}: exited ({how}) after {s:.1f} s; a new one starts in {d:.0f} s",
            i=proc.index,
            how=how,
            s=lived,
            d=delay,
        )
        self._timers[proc.index] = self.reactor.callLater(delay, self._respawn, proc.index)

    def _respawn(self, index: int) -> None:
        if not self.stopping and self.running:
            self.spawn(index)

    @property
    def pids(self) -> list[int]:
        """The running children's process ids."""
        return [p.pid for p in self.children.values() if p.pid is not None]

    # -- stop ------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        """SIGTERM every child, wait for them (killed after :data:`STOP_GRACE`), then
        close the listening sockets."""
        super().stopService()
        self.stopping = True
        for t in self._timers.values():
            if t.active():
                t.cancel()
        self._timers.clear()
        waits = []
        for proc in list(self.children.values()):
            waits.append(proc.ended)
            _signal(proc, "TERM")
        killer = self.reactor.callLater(STOP_GRACE, self._kill_all)

        def close(_: object) -> Deferred[Any]:
            if killer.active():
                killer.cancel()
            closing = [maybeDeferred(p.stopListening) for _, p in self.ports]
            self.ports = []
            return gatherResults(closing)

        return DeferredList(waits).addCallback(close).addCallback(lambda _: None)

    def _kill_all(self) -> None:
        for proc in list(self.children.values()):
            log.warn("child {i}: did not stop in time; killed", i=proc.index)  # noqa: G010 - twisted.logger
            _signal(proc, "KILL")


def _signal(proc: ChildProcess, name: str) -> None:
    try:
        proc.transport.signalProcess(name)  # type: ignore[union-attr]
    except Exception:  # noqa: BLE001 - ProcessExitedAlready and the like: it is gone
        log.debug("child {i}: no signal (already gone)", i=proc.index)
