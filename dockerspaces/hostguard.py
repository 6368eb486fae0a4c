"""The ``host:`` policy as built and kept current by the service: what it refuses
comes from this machine (:mod:`dockerspaces.netlocal`), the configured engines and
peers, and -- asked at start and every minute -- every engine's own network list."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorPluggableNameResolver, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from .config import Config, HostConfig
from .engine.interface import IEngine, NetworkInfo
from .netlocal import (
    docker_networks,
    engine_targets,
    interface_addresses,
    listening_ports,
    local_addresses,
)
from .spec import HostTarget
from .web.routing import Forbidden, HostPolicy, IPNetwork, parse_ip, resolver_from


def own_ports(config: Config) -> set[int]:
    """TCP ports this instance listens on (``host:`` may never reach them)."""
    return listening_ports(config.ports)


log = Logger()


class IResolvingReactor(IReactorPluggableNameResolver, IReactorTime):
    """What :func:`host_policy` uses of the reactor: its name resolver, and its clock
    for the lookups' timeout."""


def engine_hosts(config: Config, hosts: list[HostConfig]) -> frozenset[str]:
    """Names and addresses of every engine and peer (``--docker``, ``--cluster``): a
    ``host:`` target there is refused on every port, as a Docker API (or a peer's
    ``/docker:local``, or a slot port) there is root on that host or bypasses the
    broker. Names are looked up here, blocking: call at start-up only."""
    out: set[str] = set()
    for name, _ in engine_targets(hosts, None if config.cluster else config.docker):
        out.add(name)
        if parse_ip(name) is None:
            try:
                for info in socket.getaddrinfo(name, None):
                    out.add(str(info[4][0]).split("%")[0])
            except (OSError, UnicodeError):
                pass
    return frozenset(out)


def host_policy(config: Config, hosts: list[HostConfig], reactor: IResolvingReactor) -> HostPolicy:
    """The ``host:`` policy: every address of this machine, Docker's networks (the
    local bridges; the engines' own lists are added by :class:`HostPolicyService`),
    every engine and peer refused unless ``--allow-host``; own ports always
    (blocking lookups: start-up only)."""
    return HostPolicy(
        allow=config.allow_host,
        own_ports=own_ports(config),
        resolve=resolver_from(reactor.nameResolver, reactor),
        local=local_addresses(),
        blocked=docker_networks(),
        engines=engine_hosts(config, hosts),
    )


#: drivers whose networks share the LAN: only their IP ranges hold containers alone
_LAN_DRIVERS = ("macvlan", "ipvlan")


def container_ranges(networks: Iterable[NetworkInfo]) -> frozenset[IPNetwork]:
    """Where an engine's containers have addresses of their own: every subnet of a
    container network (bridge, overlay, …), and of a network on the LAN (macvlan,
    ipvlan) its IP ranges when it has them (else its subnets)."""
    out: set[IPNetwork] = set()
    for n in networks:
        texts = n.ip_ranges if n.driver in _LAN_DRIVERS and n.ip_ranges else n.subnets
        for text in texts:
            try:
                out.add(ipaddress.ip_network(text, strict=False))
            except ValueError:
                continue
    return frozenset(out)


class HostPolicyService(Service):
    """Keeps the ``host:`` policy current while running: asks every engine for its
    networks (``container_ranges``) and re-reads this machine's addresses at start
    and every ``interval`` seconds, so that a network or an interface created later
    is refused too. An engine that does not answer keeps what it said last."""

    def __init__(
        self,
        policy: HostPolicy,
        engines: Mapping[str, IEngine],
        clock: IReactorTime,
        interval: float = 60.0,
        read_local: Callable[[], Iterable[str]] = interface_addresses,
    ):
        self.policy, self.engines, self.clock = policy, engines, clock
        self.interval = interval
        self.read_local = read_local
        self._asking: set[str] = set()
        self._failing: set[str] = set()
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        """Ask at once, then every ``interval`` seconds."""
        super().startService()
        self._loop = LoopingCall(self.refresh)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=True).addErrback(
            lambda f: log.failure("host: policy refresh stopped", f)
        )

    def stopService(self) -> None:
        """Stop asking."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()

    def refresh(self) -> None:
        """One round: this machine's addresses now, and each engine's networks (an
        engine still answering the previous round is not asked again)."""
        try:
            now = set(self.read_local())
        except OSError as e:
            log.warn(  # noqa: G010 - twisted.logger
                "host: policy: cannot read this machine's addresses: {e}", e=e
            )
        else:
            if self.policy.update("local", local=now - self.policy.local):
                log.info(
                    "host: policy: this machine's addresses are now {a}",
                    a=", ".join(sorted(self.policy.local_now)),
                )
        for name, engine in self.engines.items():
            if name in self._asking or not hasattr(engine, "networks"):
                continue
            self._asking.add(name)
            d = engine.networks().addCallbacks(
                self._got, self._failed, callbackArgs=(name,), errbackArgs=(name,)
            )
            d.addBoth(self._answered, name)

    def _answered(self, _: object, name: str) -> None:
        self._asking.discard(name)

    def _got(self, networks: list[NetworkInfo], name: str) -> None:
        self._failing.discard(name)
        ranges = container_ranges(networks)
        if self.policy.update(f"engine:{name}", networks=ranges):
            log.info(
                "host: policy: no host: target in the Docker networks of engine {name}: {nets}",
                name=name,
                nets=", ".join(sorted(str(n) for n in ranges)) or "none",
            )

    def _failed(self, f: Failure, name: str) -> None:
        if name not in self._failing:  # once per outage
            self._failing.add(name)
            log.warn(  # noqa: G010 - twisted.logger
                "host: policy: cannot list the networks of engine {name} (kept what it said before): {e}",
                name=name,
                e=f.getErrorMessage(),
            )


def warn_refused_root(policy: HostPolicy, root: HostTarget) -> Deferred[None]:
    """Log a warning when ``--root`` is a target the policy refuses (every unmatched
    request would get a 403): name it in ``--allow-host``."""

    def refused(f: Failure) -> None:
        if f.check(Forbidden):
            log.warn(  # noqa: G010 - twisted.logger
                "--root {root} is refused by the host: policy ({why}): unmatched "
                "requests get 403 until --allow-host names it",
                root=root.host_header,
                why=f.getErrorMessage(),
            )

    return policy.check(root.host, root.port).addCallbacks(lambda _: None, refused)
