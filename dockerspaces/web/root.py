"""The root resource: dispatch on the raw first path segment, fallbacks, CORS.

``Root.getChildWithDefault`` ignores Twisted's (percent-decoded) ``postpath`` and
parses ``request.uri`` itself, so the job grammar sees the raw segment.
"""

from __future__ import annotations

from typing import Protocol

from twisted.web.resource import Resource
from twisted.web.server import Request

from ..config import Config
from ..spec import (
    DockerApiRoute,
    HostTarget,
    JobSpec,
    MonitorRoute,
    Route,
    SpecError,
    parse_route,
    split_uri,
)
from . import routing
from .accesslog import Recorder
from .errors import ErrorResource, RedirectResource


class RouteResources(Protocol):
    """What the root hands each kind of route to (built in :mod:`dockerspaces.app`)."""

    def job(self, spec: JobSpec, prefix: bytes, path: bytes) -> Resource:
        """Resource for an x:/y:/worker request."""

    def host(self, target: HostTarget, prefix: bytes, path: bytes, cookie: bool) -> Resource:
        """Resource for a host:/shost:/--root request."""

    def monitor(self, route: MonitorRoute) -> Resource:
        """Resource for /monitor:NAME/."""

    def docker_api(self, path: bytes) -> Resource:
        """Resource for /docker:local/…"""


class Root(Resource):
    """Dispatches every request by its raw first path segment."""

    def __init__(self, config: Config, routes: RouteResources, recorder: Recorder | None = None):
        super().__init__()
        self.config = config
        self.routes = routes
        self.recorder = recorder

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

    def _resolve(self, request: Request) -> Resource:
        raw = split_uri(request.uri)
        try:
            route = parse_route(raw.segment)
        except SpecError as e:
            return ErrorResource(400, f"bad route {raw.segment[:200]!r}: {e}")
        if route is None:
            return self._fallback(request, raw.rest, raw.query)
        prefix = b"/" + raw.segment.encode("latin-1")
        if (isinstance(route, (JobSpec, HostTarget)) and not raw.has_slash
                and request.method in (b"GET", b"HEAD")):
            location = prefix + b"/" + (b"?" + raw.query if raw.query else b"")
            return RedirectResource(location, 308)
        return self._for_route(request, route, prefix, raw.forward_path, cookie=True)

    def _begin(self, request: Request, kind: str, route: str) -> None:
        if self.recorder is not None:
            self.recorder.begin(request, kind, route)

    def _for_route(self, request: Request, route: Route, prefix: bytes, path: bytes,
                   cookie: bool) -> Resource:
        if isinstance(route, JobSpec):
            self._begin(request, route.kind, route.display)
        elif isinstance(route, HostTarget):
            self._begin(request, "shost" if route.tls else "host", route.host_header)
        elif isinstance(route, MonitorRoute):
            self._begin(request, "monitor", route.name)
        else:
            self._begin(request, "docker", "local")
        if isinstance(route, JobSpec):
            return self.routes.job(route, prefix, path)
        if isinstance(route, HostTarget):
            return self.routes.host(route, prefix, path, cookie)
        if isinstance(route, MonitorRoute):
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
        if segment is None:
            segment = routing.route_from_cookie(request)
        if segment is not None:
            try:
                route = parse_route(segment)
            except SpecError:
                route = None
            if isinstance(route, (JobSpec, HostTarget)):
                prefix = b"/" + segment.encode("latin-1")
                return self._for_route(request, route, prefix, full, cookie=False)
        if self.config.root is not None:
            self._begin(request, "root", self.config.root.host_header)
            return self.routes.host(self.config.root, b"", full, False)
        return ErrorResource(
            404,
            "no route: the path must start with /x:…, /y:…, /host:…, /shost:…, "
            "/monitor:broker or /docker:local",
        )


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
