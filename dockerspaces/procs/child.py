"""A ``--workers`` child: the whole HTTP side on sockets the parent bound.

Run as ``python -m dockerspaces.procs.child`` by :class:`~.pool.WorkerPool`, with its
:class:`~.pool.ChildPlan` pickled on stdin, its AMP socket on fd 3 and the listening
sockets after it. It parses, routes, serves waiting pages, proxies and tunnels;
leases, progress and the ``/monitor:`` routes come from the broker's process. On
SIGTERM it stops accepting, lets its requests finish (at most
:data:`DRAIN_TIMEOUT` s) and exits; when the broker's process goes, it exits too.
SIGINT (a terminal's Ctrl-C reaching the whole process group) is the parent's to act on.
"""

from __future__ import annotations

import os
import pickle
import signal
import socket
import sys
from typing import IO, Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort
from twisted.logger import Logger, globalLogBeginner
from twisted.protocols.tls import TLSMemoryBIOFactory

from .. import logs
from ..accounts.service import AccountsService, open_snapshot
from ..broker.broker import Broker
from ..hostguard import HostPolicyService, host_policy
from ..metrics import Metrics
from ..profiles import Profiles
from ..spec import JobSpec, SpecError, parse_route
from ..twistedseam import tls_context_of
from ..web.apphosts import AppHosts
from ..web.backend import Backend
from ..web.pages import WaitingRoom
from ..web.routecookie import RouteCookies
from .childside import ChildBox, RemoteBoard, RemoteBroker, RemoteNetworks
from .pool import AMP_FD, ChildPlan, OneProtocol

log = Logger()

#: seconds a stopping child waits for its requests to end
DRAIN_TIMEOUT = 30.0


class AdoptedPort(Service):
    """A listening socket the parent bound, served by ``factory`` while running."""

    def __init__(self, reactor: Any, desc: str, fd: int, family: int, factory: Any):
        self.reactor, self.desc, self.fd, self.family, self.factory = reactor, desc, fd, family, factory
        self.port: IListeningPort | None = None

    def startService(self) -> None:
        """Adopt the socket (the reactor keeps a copy; ours is closed)."""
        super().startService()
        factory: Any = self.factory
        if self.desc.partition(":")[0].lower() == "ssl":
            ctx = tls_context_of(serverFromString(self.reactor, self.desc))
            factory = TLSMemoryBIOFactory(ctx, False, factory)
        self.port = self.reactor.adoptStreamPort(self.fd, self.family, factory)
        os.close(self.fd)

    def stopService(self) -> Deferred[None] | None:
        """Stop accepting (the parent's copy stays open for the other children)."""
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        if self.family == socket.AF_UNIX:
            # not stopListening: it would unlink the path, which the parent and the
            # other children still serve (the parent removes it last)
            port.stopReading()  # type: ignore[attr-defined]
            port.socket.close()  # type: ignore[attr-defined]
            return None
        return port.stopListening()  # type: ignore[return-value]


class Drain(Service):
    """At stop: wait until this child holds no lease and waits for none."""

    def __init__(self, broker: RemoteBroker, reactor: Any, timeout: float = DRAIN_TIMEOUT):
        self.broker, self.reactor, self.timeout = broker, reactor, timeout

    def stopService(self) -> Deferred[None]:
        """Fires once idle, or after ``timeout`` seconds."""
        super().stopService()
        self.broker.give_back_idle()
        done: Deferred[None] = Deferred()
        timer = self.reactor.callLater(self.timeout, lambda: None if done.called else done.callback(None))

        def idle(_: object) -> None:
            if timer.active():
                timer.cancel()
            if not done.called:
                done.callback(None)

        self.broker.when_idle().addCallback(idle)
        return done


def _spec(segment: str) -> JobSpec | None:
    try:
        route = parse_route(segment)
    except SpecError:
        return None
    return route if isinstance(route, JobSpec) else None


def build_child(
    plan: ChildPlan, reactor: Any, out: IO[str], amp_fd: int | None = AMP_FD
) -> tuple[logs.ObservedMultiService, ChildBox]:
    """The child's services (see module) and its AMP box (connected on ``amp_fd``;
    None: the caller connects it)."""
    from ..app import Core, build_web

    config = plan.config
    observer = logs.setup_logging(config.log_format, out, reactor)
    top = logs.ObservedMultiService(observer)
    metrics = Metrics()
    box = ChildBox(metrics)
    broker = RemoteBroker(box, reactor)
    box.on_containers = broker.containers_changed
    accounts = None
    if config.auth == "accounts":
        accounts = AccountsService(config.state, reactor, open_snapshot(config.state))
        accounts.setServiceParent(top)
    apps = AppHosts(config.app_domain, config.public_url, noted=box.note)
    apps.known = lambda: [v.spec for v in broker.containers() if v.spec is not None]
    cookies = RouteCookies(key=plan.cookie_key, noted=box.note)

    def learn_app(label: str, segment: str) -> None:
        spec = _spec(segment)
        if spec is not None:
            apps.learn(label, spec)

    box.learners = {"route": lambda ref, seg: cookies.learn(ref.encode("ascii"), seg), "app": learn_app}
    policy = host_policy(config, config.hosts() if not config.swarm else [], reactor)
    remote = {name: RemoteNetworks(box, name) for name in plan.engines}
    HostPolicyService(policy, remote, reactor).setServiceParent(top)  # type: ignore[arg-type]
    core = Core(
        observer,
        cast(Broker, broker),
        metrics,
        accounts,
        apps,
        Profiles(config, apps),
        policy,
        {},
        None,
        plan.has_slots,
    )
    site = build_web(
        config,
        reactor,
        top,
        core,
        broker=broker,
        waiting=WaitingRoom(RemoteBoard(box), reactor),
        monitor=Backend.unix(plan.monitor),
        route_cookies=cookies,
        ask=box.lookup,
    )
    gate = site.resource.gate  # type: ignore[attr-defined]
    if gate is not None:
        gate.shared = box
        box.learners["forget"] = lambda key, _: gate.forget(key.encode("latin-1"), tell=False)
    Drain(broker, reactor).setServiceParent(top)
    for desc, fd, family in plan.ports:
        AdoptedPort(reactor, desc, fd, family, site).setServiceParent(top)
    if amp_fd is not None:
        reactor.adoptStreamConnection(amp_fd, socket.AF_UNIX, OneProtocol(box))
        os.close(amp_fd)
    return top, box


def main() -> None:
    """Read the plan, build, run until SIGTERM or until the broker's process goes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    plan: ChildPlan = pickle.loads(sys.stdin.buffer.read())  # noqa: S301 - see the import
    from twisted.internet import reactor

    r: Any = reactor
    top, box = build_child(plan, r, sys.stdout)
    if top.observer is not None:
        globalLogBeginner.beginLoggingTo([top.observer], redirectStandardIO=False)

    stopping: list[bool] = []
    r.addSystemEventTrigger("before", "shutdown", lambda: stopping.append(True))

    def lost() -> None:
        if not stopping:
            log.warn("child {i}: the broker's process is gone; stopping", i=plan.index)  # noqa: G010
            r.stop()

    box.on_lost = lost

    def stop_once(signum: int, frame: object) -> None:
        # the parent's SIGTERM; a repeated one (a whole process group signalled as
        # well) must not stop a reactor that is stopping already
        r.callFromThread(lambda: None if stopping else r.stop())

    signal.signal(signal.SIGTERM, stop_once)
    r.callWhenRunning(top.startService)
    r.addSystemEventTrigger("before", "shutdown", top.stopService)
    r.run(installSignalHandlers=False)


if __name__ == "__main__":
    main()
