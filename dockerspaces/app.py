"""Wiring: the one place that builds engines, the broker, the proxy and the site."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import IO, Any, cast

from attrs import define, field
from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.resource import Resource

from . import logs
from .accounts.identity import make_portal
from .accounts.service import AccountsService, open_snapshot
from .autoscale.wiring import Autoscaler, build_autoscaler
from .broker.broker import Broker
from .broker.model import BrokerSettings, Clock
from .config import Config, HostConfig
from .engine.auth import RegistryAuth
from .engine.engine import Engine, EngineService
from .engine.interface import IEngine, RunOptions
from .engine.swarm import NodeInfo, SwarmManager, SwarmManagerService, SwarmNodeEngine, host_for_node
from .engine.swarmhosts import SwarmHosts
from .hostguard import HostPolicyService, host_policy, warn_refused_root
from .logoutput import TextObserver
from .metrics import Metrics
from .profiles import Profiles
from .spec import HostTarget, JobSpec, MonitorRoute
from .web.accesslog import Recorder
from .web.apphosts import AppHosts
from .web.auth import AuthGate
from .web.backend import Backend
from .web.dockerapi import DockerApiResource, load_token, peer_headers
from .web.errors import ErrorResource
from .web.health import HealthResource, MetricsResource
from .web.jobs import ForwardResource, HostResource, HostRoute, JobResource
from .web.monitor import MonitorResource
from .web.pages import DashboardResource, ProgressBoard, ProgressResource, WaitingRoom
from .web.proxy import Proxy
from .web.root import Root
from .web.routecookie import RouteCookies
from .web.routing import HostPolicy
from .web.site import ProxySite, make_site

log = Logger()

#: the global reactor: it provides every ``IReactor*`` interface the parts below need
#: (time, TCP, SSL, UNIX, threads, name resolution), and no one type says all that
Reactor = Any
#: the broker's container-event hook (see :func:`container_hook`)
ContainerHook = Callable[..., None]


def run_options_for(config: Config) -> Callable[[JobSpec], RunOptions]:
    """A function mapping a JobSpec to its RunOptions from the first matching profile."""
    return Profiles(config).run_options


_NO_HOST_ROUTE = ErrorResource(404, "host:/shost: routes are turned off here (--no-host-route)")


@define
class Routes:
    """Builds the resource for each route kind (see ``web.root.RouteResources``)."""

    config: Config
    proxy: Proxy
    broker: Broker
    policy: HostPolicy
    reactor: IReactorTime | None = None  # the health page's clock
    engines: dict[str, IEngine] = field(factory=dict)
    waiting: WaitingRoom | None = None
    metrics: Metrics | None = None

    has_slots: bool = True
    docker_api_resource: Resource | None = None
    autoscale: Autoscaler | None = None
    profiles: Profiles | None = None  # prefix = "keep" apps (None: every app strips)
    #: --workers child: the /monitor: routes are the broker process's (forwarded there)
    monitor_at: Backend | None = None
    gather: Callable[[], Deferred[Metrics]] | None = None  # metrics summed over processes

    def snapshot(self) -> dict[str, Any]:
        """The ``/monitor:broker/`` JSON: the broker's, plus ``Apps`` (each app
        container's public place: ``Link``, and ``Host`` with ``--app-domain``) and
        ``Autoscale`` (per entry: desired, actual, queue, last decision and reason) when
        entries are configured."""
        snap = self.broker.snapshot()
        if self.profiles is not None:
            apps = self.profiles.apps
            snap["Apps"] = [
                {"Key": v.display, "Link": apps.link(v.spec), "Host": apps.host_of(v.spec)}
                for v in self.broker.containers()
                if v.spec is not None and not v.spec.worker
            ]
        if self.autoscale is not None:
            snap["Autoscale"] = self.autoscale.service.snapshot()
        return snap

    def job(self, spec: JobSpec, prefix: bytes, path: bytes) -> Resource:
        """x:/y:/worker; ``prefix`` empty: the path is the app's own (an app host)."""
        if not self.has_slots:
            return ErrorResource(503, "this instance has no container slots (--target 0)", 60)
        if prefix and self.profiles is not None and self.profiles.keeps_prefix(spec):
            # the app knows its prefix: it gets the whole path (in the key's one
            # spelling), no X-Forwarded-Prefix, no Location rewriting, no dsroute
            path, prefix = self.profiles.kept_prefix(spec) + path, b""
        return JobResource(
            spec,
            prefix,
            path,
            broker=self.broker,
            proxy=self.proxy,
            allow_image=self.config.allow_image,
            waiting=self.waiting,
            worker_post_only=self.config.worker_post_only,
            cookie_paths=self.profiles is None or self.profiles.cookie_paths(spec),
        )

    def host(self, target: HostTarget, prefix: bytes, path: bytes, cookie: bool) -> Resource:
        """host:/shost:/--root."""
        if prefix and self.config.no_host_route:
            return _NO_HOST_ROUTE
        return HostResource(target, prefix, path, proxy=self.proxy, policy=self.policy, cookie=cookie)

    def host_route(self, target: HostTarget, prefix: bytes) -> Resource:
        """host:/shost: as the URI's own segment: one resource for all its requests."""
        if self.config.no_host_route:
            return _NO_HOST_ROUTE
        return HostRoute(target, prefix, proxy=self.proxy, policy=self.policy)

    def monitor(self, route: MonitorRoute) -> Resource:
        """/monitor:NAME."""
        if self.monitor_at is not None:
            return ForwardResource(self.proxy, self.monitor_at)
        if route.name == "broker":
            return DashboardResource(MonitorResource(self.snapshot))
        if route.name == "progress" and isinstance(
            board := getattr(self.waiting, "board", None), ProgressBoard
        ):
            return ProgressResource(board)
        if route.name == "metrics" and self.metrics is not None:
            return MetricsResource(self.metrics, self.snapshot, gather=self.gather)
        if route.name == "health" and self.reactor is not None:
            return HealthResource(
                self.engines, self.reactor, serving=lambda: not self.broker.snapshot().get("Draining")
            )
        return ErrorResource(404, f"/monitor:{route.name} is not available")

    def docker_api(self, path: bytes) -> Resource:
        """/docker:local (404 unless --docker-api; the gate checks caller and token)."""
        if self.docker_api_resource is None:
            return ErrorResource(404, "/docker:local is disabled (start with --docker-api)")
        return self.docker_api_resource


def container_hook(metrics: Metrics, accounts: AccountsService | None = None) -> ContainerHook:
    """The broker's container-event hook: one log line and the metrics per event, and
    with accounts the usage rows (``owner``: the user it was started for)."""

    def hook(
        event: str,
        display: str,
        host: str,
        slot: int,
        *,
        container: str | None = None,
        seconds: float | None = None,
        detail: str | None = None,
        owner: str | None = None,
        gpus: int = 0,
    ) -> None:
        logs.log_container(event, display, host, slot, container=container, seconds=seconds, detail=detail)
        metrics.container_event(event, host, seconds=seconds)
        if accounts is not None:
            accounts.container_event(event, container, display, owner, gpus)

    return hook


class ProxyService(Service):
    """Closes the proxy's idle backend connections at shutdown."""

    def __init__(self, proxy: Proxy):
        self.proxy = proxy

    def stopService(self) -> Deferred[None]:
        """Close pooled connections."""
        super().stopService()
        return self.proxy.close_idle()


class BrokerService(Service):
    """Starts the broker after the engines, drains it at shutdown."""

    def __init__(self, broker: Broker, keep: bool, clock: Clock):
        self.broker, self.keep, self.clock = broker, keep, clock
        self._started: Deferred[None] | None = None

    def startService(self) -> None:
        """Adopt containers, start watching engines."""
        super().startService()
        self._started = self.broker.start()

    def stopService(self) -> Deferred[None]:
        """Stop admitting, drain in-flight work, stop containers unless --keep-containers.

        Waits (up to 10 s) for adoption to finish first, so containers found at
        start-up are stopped too when the process is told to stop right away.
        """
        super().stopService()
        started = self._started if self._started is not None else succeed(None)
        waited: Deferred[None] = Deferred()
        started.addBoth(lambda _: None if waited.called else waited.callback(None))
        timer = self.clock.callLater(10, lambda: None if waited.called else waited.callback(None))
        waited.addCallback(lambda _: timer.cancel() if timer.active() else None)
        waited.addCallback(lambda _: self.broker.shutdown(keep_containers=self.keep))
        return waited


def exposed_ports(ports: tuple[str, ...]) -> list[str]:
    """The listening endpoints reachable beyond loopback (a TCP/TLS port without an
    ``interface=`` on a loopback address; UNIX sockets are local)."""
    out = []
    for desc in ports:
        kind, _, rest = desc.partition(":")
        if kind.lower() not in ("tcp", "tcp6", "ssl", "tls"):
            continue
        m = re.search(r"(?:^|:)interface=((?:\\:|[^:])*)", rest)
        interface = m.group(1).replace("\\:", ":").strip("[]") if m else ""
        try:
            local = bool(interface) and ipaddress.ip_address(interface).is_loopback
        except ValueError:
            local = interface == "localhost"
        if not local:
            out.append(desc)
    return out


def warn_if_exposed(ports: tuple[str, ...]) -> None:
    """``--auth none`` on a port others can reach: say so once at start."""
    exposed = exposed_ports(ports)
    if exposed:
        log.warn(  # noqa: G010 - twisted.logger
            "--auth none: anyone who reaches {ports} may start any allowed image and read "
            "the monitor; use --auth accounts (README: Accounts) or listen on loopback only",
            ports=", ".join(_redact_port(p) for p in exposed),
        )


def _redact_port(desc: str) -> str:
    """An endpoint description without its key/certificate paths (log lines)."""
    return ":".join(p for p in desc.split(":") if "=" not in p or p.startswith("interface="))


def user_containers(
    broker: Broker, user: str, apps: AppHosts | None = None
) -> list[tuple[str, str, str | None]]:
    """A signed-in user's applications for the home page: (displayed key, state, link)
    of the containers the user holds or that were started for them (warm ones too);
    the link is :meth:`AppHosts.link` (a route prefix only for keys without env
    values: they stay out of pages)."""
    apps = apps if apps is not None else AppHosts()
    return [
        (v.display, v.state, apps.link(v.spec))
        for v in broker.containers()
        if v.spec is not None and (user in v.users or v.owner == user)
    ]


def build_engines(config: Config, reactor: Reactor) -> tuple[list[HostConfig], dict[str, Engine]]:
    """One Engine per configured host."""
    auth = RegistryAuth.from_config(config)
    hosts = config.hosts()
    token = load_token(config)  # one token cluster-wide: sent to peers' /docker:local
    engines = {
        h.name: Engine(
            reactor,
            h,
            instance=config.instance_name(),
            pull=config.pull,
            auth=auth,
            extra_headers=peer_headers(h, token),
        )
        for h in hosts
    }
    return hosts, engines


def build_swarm(config: Config, reactor: Reactor, broker: Broker) -> tuple[SwarmManager, SwarmHosts]:
    """``--swarm``: the manager's connection and the service keeping the broker's hosts
    equal to the swarm's ready nodes (each a :class:`SwarmNodeEngine`)."""
    url = config.swarm
    if url is None:  # pragma: no cover - only called with --swarm
        raise ValueError("build_swarm needs --swarm")
    manager = SwarmManager(reactor, url, config.instance_name(), extra_headers=None)
    auth = RegistryAuth.from_config(config)
    nodes: dict[str, str] = {}  # host name -> node id

    def make_host(node: NodeInfo, slots: int, gpus: int, name: str) -> tuple[HostConfig, IEngine]:
        host = host_for_node(node, url, config.start_port, slots, gpus, name=name)
        nodes[name] = node.id
        return host, SwarmNodeEngine(manager, node, host, stop_grace=config.stop, auth=auth)

    hosts = SwarmHosts(
        manager,
        broker,
        reactor,
        make_host,
        default_slots=config.target,
        default_gpus=config.gpu,
        forget=lambda name: manager.forget_node(nodes.pop(name, "")),
    )
    return manager, hosts


@define
class Core:
    """The broker's side, built once per instance (the single process, or the broker's
    process with ``--workers``)."""

    observer: Any
    broker: Broker
    metrics: Metrics
    accounts: AccountsService | None
    apps: AppHosts
    profiles: Profiles
    policy: HostPolicy
    watched: dict[str, IEngine]  # engines the health page pings (and host: avoids)
    autoscale: Autoscaler | None
    has_slots: bool


def build_core(config: Config, reactor: Reactor, top: MultiService, observer: Any) -> Core:
    """Engines, accounts, the broker, the swarm, the host: policy and the autoscaler,
    as services of ``top`` (in their start order)."""
    hosts, engines = build_engines(config, reactor) if not config.swarm else ([], {})
    engine_services = MultiService()
    engine_services.setServiceParent(top)
    for e in engines.values():
        EngineService(e).setServiceParent(engine_services)
    settings = BrokerSettings.from_config(config)
    metrics = Metrics()
    accounts = None
    if config.auth == "accounts":
        accounts = AccountsService(config.state, reactor, open_snapshot(config.state))
        accounts.setServiceParent(top)
    apps = AppHosts(config.app_domain, config.public_url)
    profiles = Profiles(config, apps)
    broker = Broker(
        reactor,
        [h for h in hosts if h.slots > 0],
        engines,
        settings,
        profiles.run_options,
        on_container=container_hook(metrics, accounts),
    )
    BrokerService(broker, config.keep_containers, reactor).setServiceParent(top)
    # engines the health page pings and whose networks host: may not reach
    watched: dict[str, IEngine] = dict(engines)
    if config.swarm:
        manager, swarm_hosts = build_swarm(config, reactor, broker)
        SwarmManagerService(manager).setServiceParent(engine_services)
        swarm_hosts.setServiceParent(top)  # after the broker: it adds the nodes' hosts
        watched["swarm-manager"] = cast(IEngine, manager)  # ping() and networks() only
    apps.known = lambda: [v.spec for v in broker.containers() if v.spec is not None]
    policy = host_policy(config, hosts, reactor)
    HostPolicyService(policy, watched, reactor).setServiceParent(top)
    if config.root is not None:
        warn_refused_root(policy, config.root)
    autoscale = build_autoscaler(config.config, broker, engines, reactor) if config.config else None
    if autoscale is not None:
        autoscale.setServiceParent(top)
    return Core(
        observer,
        broker,
        metrics,
        accounts,
        apps,
        profiles,
        policy,
        watched,
        autoscale,
        has_slots=bool(config.swarm) or any(h.slots > 0 for h in hosts),
    )


def build_web(
    config: Config,
    reactor: Reactor,
    top: MultiService,
    core: Core,
    *,
    broker: Any = None,
    waiting: WaitingRoom | None = None,
    monitor: Backend | None = None,
    gather: Callable[[], Deferred[Metrics]] | None = None,
    route_cookies: RouteCookies | None = None,
    internal: bool = False,
    ask: Callable[[str, str], Deferred[str | None]] | None = None,
) -> ProxySite:
    """The HTTP side: proxy, routes, the root and the site (a ``ProxyService`` in
    ``top``). ``broker``: what requests acquire from (default the core's; a
    ``--workers`` child's ``RemoteBroker``); ``monitor``: where the ``/monitor:``
    routes are served (a child forwards them to the broker's process); ``internal``:
    the broker process's monitor site for its children, which sign in, log and count
    the requests themselves (none of that here)."""
    broker = broker if broker is not None else core.broker
    apps = core.apps
    proxy = Proxy(reactor, cors=config.cors, route_cookies=route_cookies)
    ProxyService(proxy).setServiceParent(top)
    routes = Routes(
        config,
        proxy,
        broker,
        core.policy,
        reactor=reactor,
        engines=core.watched,
        waiting=waiting if waiting is not None else WaitingRoom(ProgressBoard(reactor), reactor),
        metrics=core.metrics,
        has_slots=core.has_slots,
        docker_api_resource=(DockerApiResource.from_config(config, proxy) if config.docker_api else None),
        autoscale=core.autoscale,
        profiles=core.profiles,
        monitor_at=monitor,
        gather=gather,
    )
    # request lines straight into our own text log when it is the log (logs.RequestLog)
    observer = core.observer
    request_log = logs.RequestLog(observer if isinstance(observer, TextObserver) else None)
    recorder = None if internal else Recorder(reactor, core.metrics, request_log)
    auth = None
    if core.accounts is not None and not internal:
        auth = AuthGate(
            core.accounts,
            make_portal(core.accounts),
            reactor,
            session_lifetime=config.session_lifetime,
            containers=lambda user: user_containers(broker, user, apps),
            public_url=config.public_url,
            app_origin=apps.origin_of,
            app_domain=config.app_domain,
        )
    root = Root(config, routes, recorder, route_cookies=proxy.route_cookies, gate=auth, apps=apps)
    root.ask = ask  # a --workers child: facts another child noted, asked when missed
    return make_site(
        root,
        reactor,
        max_body=config.max_body,
        on_request_logged=None if recorder is None else recorder.done,
        on_request_lost=None if recorder is None else recorder.lost,
        on_refused=None if recorder is None else recorder.refused,
    )


#: builds the HTTP side in other processes (``procs.parent.build_parent``)
SplitBuilder = Callable[[Config, Reactor, MultiService, Core], object]


def build_service(
    config: Config, reactor: Reactor, log_out: IO[str] | None = None, *, split: SplitBuilder | None = None
) -> MultiService:
    """The whole service tree for ``config``; ``log_out`` is where log lines go (see
    :func:`dockerspaces.logs.setup_logging`; None: twistd's own text observer).
    ``split`` builds the children's side for ``--workers N`` > 1 (required then)."""
    observer = logs.setup_logging(config.log_format, log_out, reactor)
    top = logs.ObservedMultiService(observer)
    core = build_core(config, reactor, top, observer)
    if config.auth != "accounts":
        warn_if_exposed(config.ports)
    if config.worker_count > 1:
        if split is None:
            raise ValueError("--workers > 1 needs the process split (dockerspaces.procs.parent.build_parent)")
        split(config, reactor, top, core)
        return top
    site = build_web(config, reactor, top, core)
    for desc in config.ports:
        strports.service(desc, site).setServiceParent(top)
    return top
