"""The root resource: dispatch on the raw first path segment, fallbacks, CORS.

``Root.getChildWithDefault`` ignores Twisted's (percent-decoded) ``postpath`` and
parses ``request.uri`` itself, so the job grammar sees the raw segment.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..config import Config
from ..spec import (
    DockerApiRoute,
    HostTarget,
    JobSpec,
    MonitorRoute,
    Route,
    SpecError,
    parse_route,
    split_uri_cached,
)
from . import routing
from .accesslog import APP_HOST_ATTR, Recorder
from .apphosts import AppHosts
from .errors import ErrorResource, MethodNotAllowed, RedirectResource
from .pages import wants_html
from .routecookie import RouteCookies
from .site import done_or_gone

if TYPE_CHECKING:
    from .auth import AuthGate


class RouteResources(Protocol):
    """What the root hands each kind of route to (built in :mod:`dockerspaces.app`)."""

    def job(self, spec: JobSpec, prefix: bytes, path: bytes) -> Resource:
        """Resource for an x:/y:/worker request."""

    def host(self, target: HostTarget, prefix: bytes, path: bytes, cookie: bool) -> Resource:
        """Resource for a host:/shost:/--root request."""

    def host_route(self, target: HostTarget, prefix: bytes) -> Resource:
        """The resource shared by every request to one host:/shost: segment (it
        forwards the rest of each request's URI)."""

    def monitor(self, route: MonitorRoute) -> Resource:
        """Resource for /monitor:NAME/."""

    def docker_api(self, path: bytes) -> Resource:
        """Resource for /docker:local/…"""


#: parsed first segments kept by the root (a page's requests repeat the same few)
PLAN_CACHE = 1024


class _Plan:
    """A route segment parsed once: what to dispatch, and how to log it."""

    __slots__ = ("display", "job", "kind", "leaf", "prefix", "redirect", "route")

    def __init__(self, route: Route, prefix: bytes):
        self.route = route
        self.prefix = prefix
        self.leaf: Resource | None = None  # a host: route's shared resource
        self.job = route if isinstance(route, JobSpec) else None
        # x:/y:/host:/shost: without a slash after the segment get a 308 to add it
        self.redirect = isinstance(route, (JobSpec, HostTarget))
        if isinstance(route, JobSpec):
            self.kind, self.display = route.kind, route.display
        elif isinstance(route, HostTarget):
            self.kind, self.display = ("shost" if route.tls else "host"), route.host_header
        elif isinstance(route, MonitorRoute):
            self.kind, self.display = "monitor", route.name
        else:
            self.kind, self.display = "docker", "local"


_MONITOR_METHODS = MethodNotAllowed(b"GET, HEAD")


class Root(Resource):
    """Dispatches every request by its raw first path segment."""

    def __init__(
        self,
        config: Config,
        routes: RouteResources,
        recorder: Recorder | None = None,
        route_cookies: RouteCookies | None = None,
        gate: AuthGate | None = None,
        apps: AppHosts | None = None,
    ):
        super().__init__()
        # --app-domain: requests for LABEL.DOMAIN go to that key, browsers opening an
        # app on the main host are sent there; every x:/y: request tells it how
        # clients reach us (the public URL its containers are told)
        self.apps = apps
        self.app_hosts = apps if apps is not None and apps.domain is not None else None
        self.gate = gate  # --auth accounts: every routed request is checked by it
        self.route_cookies = route_cookies  # the proxy's: dsroute references it handed out
        self.config = config
        self.routes = routes
        self.recorder = recorder
        self._plans: dict[str, _Plan] = {}
        #: --workers child: asks the broker's process for a fact this process missed
        #: (``"app"`` label, ``"route"`` reference → segment), once per request
        self.ask: Callable[[str, str], Deferred[str | None]] | None = None

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:  # type: ignore[override]
        """Pick the resource for this request from its raw URI (``path`` is ignored)."""
        child = self._resolve(request)
        if self.config.cors and not isinstance(child, _NoCors):
            if routing.is_preflight(request):
                return _Preflight()
            routing.cors_headers(request)
        return child

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        """Never reached in practice (``getChildWithDefault`` always answers)."""
        return self.getChildWithDefault(b"", request).render(request)

    def _plan(self, segment: str) -> _Plan | None:
        """The cached plan for a route segment; None when it names no route; raises
        :class:`SpecError` for a malformed one."""
        plan = self._plans.get(segment)
        if plan is None:
            route = parse_route(segment)
            if route is None:
                return None
            plan = _Plan(route, b"/" + segment.encode("latin-1"))
            if len(self._plans) >= PLAN_CACHE:
                self._plans.clear()
            self._plans[segment] = plan
        return plan

    def _resolve(self, request: Request) -> Resource:
        hosts = self.app_hosts
        if hosts is not None:
            label = hosts.label_of(request.requestHeaders.getRawHeaders(b"host", [None])[0])
            if label is not None:
                return self._app_host(request, hosts, label)
        raw, forward_path = split_uri_cached(request.uri)
        if self.gate is not None and raw.segment.startswith("auth:"):
            self._begin(request, "auth", raw.segment[5:])
            return self.gate.page(request, raw.segment[5:])
        try:
            plan = self._plan(raw.segment)
        except SpecError as e:
            # logged without env values: the segment up to its first '=' (as redact_path)
            seg = raw.segment
            self._begin(request, "bad", seg.split("=", 1)[0][:60] + ("=…" if "=" in seg else ""))
            return ErrorResource(400, f"bad route {raw.segment[:200]!r}: {e}")
        if plan is None:
            return self._fallback(request, raw.rest, raw.query)
        if plan.job is not None and self.apps is not None:
            sent = self._to_app_host(request, plan, plan.job, self.apps, forward_path)
            if sent is not None:
                return sent
        if plan.redirect and not raw.rest and request.method in (b"GET", b"HEAD"):
            self._begin(request, plan.kind, plan.display)
            location = plan.prefix + b"/" + (b"?" + raw.query if raw.query else b"")
            return RedirectResource(location, 308)
        return self._dispatch(request, plan, forward_path, cookie=True)

    def _to_app_host(
        self, request: Request, plan: _Plan, spec: JobSpec, apps: AppHosts, path: bytes
    ) -> Resource | None:
        """An x:/y: request on the main host: a browser's is sent to the app's own host
        (``--app-domain``; path and query kept, API clients are served where they are);
        every other one notes how it reached us (the public URL of the key)."""
        if (
            self.app_hosts is not None
            and not spec.worker
            and request.method in (b"GET", b"HEAD")
            and wants_html(request)
        ):
            location = apps.redirect_to(request, spec, path)
            if location is not None:
                self._begin(request, plan.kind, plan.display)
                return RedirectResource(location, 307)
        apps.note(request, spec)
        return None

    def _begin(self, request: Request, kind: str, display: str) -> None:
        """Log and count this request when it ends (the recorder's route info)."""
        if self.recorder is not None:
            self.recorder.begin(request, kind, display)

    def _app_host(self, request: Request, apps: AppHosts, label: str) -> Resource:
        """A request for ``LABEL.DOMAIN``: that key's app with the path untouched (no
        prefix, no route cookie); ``/monitor:progress/`` is the waiting page's, and with
        accounts ``/auth:ticket`` signs the browser in there."""
        raw, _ = split_uri_cached(request.uri)
        gate = self.gate
        if gate is not None:
            setattr(request, APP_HOST_ATTR, label)  # a browser signs in on the main host
            if raw.segment.startswith("auth:"):
                self._begin(request, "auth", raw.segment[5:])
                return gate.app_page(request, label, raw.segment[5:])
        if raw.segment == "monitor:progress":
            plan = self._plan(raw.segment)
            if plan is not None:
                return self._dispatch(request, plan, b"", cookie=False)
        spec = apps.lookup(label)
        if spec is None and self._may_ask(request):
            return self._ask_first(request, "app", label)
        if spec is None:
            self._begin(request, "none", label[:63])
            return ErrorResource(
                404,
                f"no app is known at {label}.{apps.domain}: open the app from its /x:… or "
                "/y:… address on the main host first",
            )
        plan = self._plan(spec.segment())
        if plan is None:  # pragma: no cover - a spec's own segment parses back to it
            raise AssertionError(spec.segment())
        apps.note(request, spec)
        path = b"/" + raw.segment.encode("latin-1") + raw.rest
        if raw.query:
            path += b"?" + raw.query
        return self._dispatch(request, plan, path, cookie=False, prefix=b"")

    def _may_ask(self, request: Request) -> bool:
        return self.ask is not None and not getattr(request, _ASKED_ATTR, False)

    def _ask_first(self, request: Request, table: str, key: str) -> Resource:
        """A fact another process noted and this one missed: asked, learnt, and the
        request routed again (answered as before when nobody knows it)."""
        ask = self.ask
        if ask is None:  # pragma: no cover - only called when set
            raise AssertionError("no ask")
        setattr(request, _ASKED_ATTR, True)
        apps, cookies = self.apps, self.route_cookies

        def learn(value: str | None) -> None:
            if value is None:
                return
            if table == "app" and apps is not None:
                try:
                    route = parse_route(value)
                except SpecError:
                    return
                if isinstance(route, JobSpec):
                    apps.learn(key, route)
            elif table == "route" and cookies is not None:
                cookies.learn(key.encode("latin-1"), value)

        return _AfterAsk(self, ask(table, key).addCallback(learn))

    def _dispatch(
        self, request: Request, plan: _Plan, path: bytes, cookie: bool, prefix: bytes | None = None
    ) -> Resource:
        if self.recorder is not None:  # (not _begin: one call fewer on every request)
            self.recorder.begin(request, plan.kind, plan.display)
        gate = self.gate
        if gate is not None:
            route = plan.route
            kind = plan.kind
            if isinstance(route, MonitorRoute):
                kind = {"health": "monitor-public", "progress": "signed-in"}.get(route.name, "monitor")
            return gate.guard(
                request,
                kind,
                route if isinstance(route, JobSpec) else None,
                lambda: self._route(request, plan, path, cookie, prefix),
            )
        return self._route(request, plan, path, cookie, prefix)

    def _route(
        self, request: Request, plan: _Plan, path: bytes, cookie: bool, prefix: bytes | None = None
    ) -> Resource:
        route = plan.route
        if isinstance(route, HostTarget):
            if cookie:  # the segment is the URI's own: one resource for all its requests
                leaf = plan.leaf
                if leaf is None:
                    leaf = plan.leaf = self.routes.host_route(route, plan.prefix)
                return leaf
            return self.routes.host(route, plan.prefix, path, cookie)
        if isinstance(route, JobSpec):
            return self.routes.job(route, plan.prefix if prefix is None else prefix, path)
        if isinstance(route, MonitorRoute):
            if request.method not in (b"GET", b"HEAD"):
                return _MONITOR_METHODS
            return self.routes.monitor(route)
        if isinstance(route, DockerApiRoute):
            return _NoCors(self.routes.docker_api(path))
        raise AssertionError(route)  # pragma: no cover

    def _fallback(self, request: Request, rest: bytes, query: bytes) -> Resource:
        """Route a path without a known prefix: Referer, then dsroute cookie, then --root."""
        full = request.uri.split(b"?", 1)[0] or b"/"
        if query:
            full += b"?" + query
        headers = request.requestHeaders
        referer = headers.getRawHeaders(b"referer", [None])[0]
        host = headers.getRawHeaders(b"host", [None])[0]
        segment = routing.route_from_referer(referer, host)
        if segment is None and self.gate is not None and full == b"/":
            # --auth accounts: "/" is the signed-in user's page (a link from inside an
            # app, with its Referer, still goes to the app)
            self._begin(request, "home", "/")
            return self.gate.home(request)
        if segment is None and self.route_cookies is not None:
            segment = self.route_cookies.from_request(request)
            if segment is None and self._may_ask(request):
                ref = self.route_cookies.value_of(request)
                if ref is not None and 0 < len(ref) <= 64:
                    return self._ask_first(request, "route", ref.strip(b'"').decode("latin-1"))
        if segment is not None:
            try:
                plan = self._plan(segment)
            except SpecError:
                plan = None
            if plan is not None and isinstance(plan.route, (JobSpec, HostTarget)):
                return self._dispatch(request, plan, full, cookie=False)
        if self.config.root is not None:
            self._begin(request, "root", self.config.root.host_header)
            root = self.config.root
            if self.gate is not None:
                return self.gate.guard(
                    request, "root", None, lambda: self.routes.host(root, b"", full, False)
                )
            return self.routes.host(root, b"", full, False)
        self._begin(request, "none", "-")
        return ErrorResource(
            404,
            "no route: the path must start with /x:…, /y:…, /host:…, /shost:…, "
            "/monitor:broker or /docker:local",
        )


#: a request whose missed fact was asked of the broker's process already
_ASKED_ATTR = "_dockerspaces_asked"


class _AfterAsk(Resource):
    """Routes its request once ``asked`` fired (see :meth:`Root._ask_first`)."""

    isLeaf = True

    def __init__(self, root: Root, asked: Deferred[None]):
        super().__init__()
        self.root, self.asked = root, asked

    def render(self, request: Request) -> object:
        """Wait for the answer, then route and render as usual."""

        def route(_: object) -> None:
            if done_or_gone(request):
                return
            body = self.root.getChildWithDefault(b"", request).render(request)
            if isinstance(body, bytes):
                request.write(body)
                request.finish()

        self.asked.addBoth(route)
        return NOT_DONE_YET


class _Preflight(Resource):
    """Answers a CORS preflight (``--cors``)."""

    isLeaf = True

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        """The preflight answer."""
        return routing.preflight(request)


class _NoCors(Resource):
    """Marks a resource that must not get CORS headers (``/docker:local``)."""

    isLeaf = True

    def __init__(self, inner: Resource):
        super().__init__()
        self.inner = inner

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        """Delegate to the wrapped resource."""
        return self.inner.render(request)  # type: ignore[no-any-return]
