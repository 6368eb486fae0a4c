"""Route resources: x:/y:/worker through the broker, host:/shost: straight to the proxy."""

from __future__ import annotations

import fnmatch
from functools import lru_cache
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..broker.quota import Owner
from ..spec import HostTarget, JobSpec, split_uri_cached
from .accesslog import IDENTITY_ATTR, route_info
from .backend import Backend
from .errors import finish_error, status_of, write_error
from .pages import WaitingRoom, wants_html
from .proxy import ExchangeEnd, Proxy
from .routing import Forbidden, HostPolicy
from .site import done_or_gone, on_lost

#: seconds a close-delimited answer's end waits for news of its container's death
#: (Docker's ``die`` event comes ~50 ms after a kill); only such answers pay it
CLOSE_GRACE = 0.25
#: seconds a request with a body that got no answer waits for its container's exit
#: time (the ``die`` event, then one inspect); only such failures pay it
EXIT_GRACE = 1.0


def image_allowed(patterns: tuple[str, ...], spec: JobSpec) -> bool:
    """``--allow-image``: True when no pattern is set or one matches ``name:tag`` / ``name``."""
    if not patterns:
        return True
    return any(fnmatch.fnmatchcase(spec.ref, p) or fnmatch.fnmatchcase(spec.image, p) for p in patterns)


def owner_of(request: Request) -> Owner | None:
    """The broker's :class:`Owner` of a signed-in request (``--auth accounts``): the user
    and their quota; None without accounts."""
    identity = getattr(request, IDENTITY_ATTR, None)
    if identity is None:
        return None
    q = identity.quota
    return Owner(identity.user, containers=q.containers, gpus=q.gpus, queued=q.queued, group=identity.group)


def _on_gone(request: Request, d: Deferred[Any]) -> None:
    """Cancel ``d`` if the client goes away before it fires (leaves the queue)."""

    def gone(_: object) -> None:
        if not d.called:
            d.cancel()

    on_lost(request, gone)


def _fail(request: Request, f: Failure, what: str) -> None:
    if f.check(CancelledError):
        return  # the client left; nothing to answer
    status, retry = status_of(f.value)
    finish_error(request, status, f"{what}: {f.getErrorMessage()}", retry)


class JobResource(Resource):
    """An x:/y: request: acquire a lease from the broker, forward, release at the end."""

    isLeaf = True

    def __init__(
        self,
        spec: JobSpec,
        prefix: bytes,
        path: bytes,
        *,
        broker: Any,
        proxy: Proxy,
        allow_image: tuple[str, ...],
        waiting: WaitingRoom | None = None,
        worker_post_only: bool = False,
        cookie_paths: bool = True,
    ):
        super().__init__()
        self.cookie_paths = cookie_paths  # Set-Cookie paths under the prefix (Proxy.forward)
        self.worker_post_only = worker_post_only
        self.waiting = waiting  # a pages.WaitingRoom: browsers get the waiting page
        self.spec, self.prefix, self.path = spec, prefix, path
        self.broker, self.proxy, self.allow_image = broker, proxy, allow_image

    def render(self, request: Request) -> Any:
        """Start the acquire; the answer comes later."""
        if not image_allowed(self.allow_image, self.spec):
            return write_error(request, 403, f"image {self.spec.ref} is not allowed here (--allow-image)")
        if self.spec.worker:
            if self.worker_post_only and request.method != b"POST":
                request.setHeader(b"allow", b"POST")
                return write_error(
                    request,
                    405,
                    f"{self.spec.display}: worker launches take POST only here (--worker-post-only)",
                )
            return self._launch(request)
        if self.waiting is not None and wants_html(request):
            owner = owner_of(request)
            if owner is None:
                d = self.waiting.acquire(
                    request, self.spec.display, lambda cb: self.broker.acquire(self.spec, progress=cb)
                )
            else:
                d = self.waiting.acquire(
                    request,
                    self.spec.display,
                    lambda cb: self.broker.acquire(self.spec, progress=cb, owner=owner),
                )
            _on_gone(request, d)
            d.addCallbacks(
                lambda lease: None if lease is None else self._forward(request, lease),
                lambda f: _fail(request, f, self.spec.display),
            )
            return NOT_DONE_YET
        owner = owner_of(request)
        d = self.broker.acquire(self.spec) if owner is None else self.broker.acquire(self.spec, owner=owner)
        _on_gone(request, d)
        d.addCallbacks(
            lambda lease: self._forward(request, lease), lambda f: _fail(request, f, self.spec.display)
        )
        return NOT_DONE_YET

    def _forward(self, request: Request, lease: Any, attempt: int = 0) -> None:
        if done_or_gone(request):
            lease.release()
            return
        info = route_info(request)
        if info is not None and attempt == 0:
            info.queue_wait = lease.queued_for

        def ended(end: ExchangeEnd) -> None:
            if end.reason == "unforwarded":
                # the request never left (the container's port refused it): the
                # container is failed and the request goes back to the head of its
                # key's queue, within its deadline
                self._retry(request, lease, attempt + 1)
                return
            if end.reason == "unanswered":
                # a bodiless GET/HEAD got no answer: sent again, once; the container
                # is failed only if it is known dead (Docker's die event comes later)
                lease.confirm(CLOSE_GRACE).addCallback(
                    lambda alive: self._retry(request, lease, attempt + 1, failed=not alive)
                )
                return
            # A response cut short is not enough to fail the container: one bad request
            # must not cost a shared y: container; a container that really died is
            # reported by the engine's events.
            lease.release()

        self.proxy.forward(
            request,
            Backend(lease.endpoint),
            self.path,
            prefix=self.prefix,
            host_header=None,
            on_end=ended,
            set_route_cookie=self.prefix[1:].decode("latin-1"),
            # a bodiless GET/HEAD the backend closed without answering is sent again,
            # elsewhere, once
            retry_unforwarded=2 if attempt == 0 else 1,
            # a close-delimited answer is complete only if its container did not die
            # (a killed container's connection ends with a clean FIN too)
            confirm_close=lambda: lease.confirm(CLOSE_GRACE),
            # a request with a body that nothing answered may go elsewhere as well
            # if its container had exited before it was sent
            died_before=lambda when: lease.died_before(when, EXIT_GRACE),
            cookie_paths=self.cookie_paths,
        )

    def _retry(self, request: Request, lease: Any, attempt: int, failed: bool = True) -> None:
        """Hand the request to another container (the broker's ``Lease.retry``)."""
        if done_or_gone(request):
            if failed:
                lease.failed()
            else:
                lease.release()
            return
        d = lease.retry(failed)
        _on_gone(request, d)
        d.addCallbacks(
            lambda new: self._forward(request, new, attempt), lambda f: _fail(request, f, self.spec.display)
        )

    def _launch(self, request: Request) -> Any:
        owner = owner_of(request)
        d = (
            self.broker.launch_worker(self.spec)
            if owner is None
            else self.broker.launch_worker(self.spec, owner=owner)
        )
        _on_gone(request, d)

        def started(_: object) -> None:
            if done_or_gone(request):
                return
            request.setResponseCode(200)
            request.setHeader(b"content-length", b"0")
            request.finish()

        d.addCallbacks(started, lambda f: _fail(request, f, self.spec.display))
        return NOT_DONE_YET


@lru_cache(maxsize=1024)
def _host_plan(target: HostTarget, ip: str) -> tuple[Backend, bytes]:
    """The backend and ``Host`` header for ``target`` at the checked address ``ip``
    (pure; cached so a busy route does not rebuild them, IDNA included, per request)."""
    if target.tls:
        backend = Backend.tls(target.host, target.port, address=ip)
    else:
        backend = Backend.tcp(ip, target.port)
    return backend, target.host_header.encode("idna")


class HostRoute(Resource):
    """One ``host:``/``shost:`` target under one prefix: checks the target (an IP literal
    at once, with a cached verdict; a name by resolving it) and forwards. The root keeps
    one per route segment for all its requests, each forwarding the rest of its own URI;
    :class:`HostResource` serves one request with a given path (``--root``, fallbacks)."""

    isLeaf = True

    def __init__(
        self, target: HostTarget, prefix: bytes, *, proxy: Proxy, policy: HostPolicy, cookie: bool = True
    ):
        super().__init__()
        self.target, self.prefix, self.proxy, self.policy = target, prefix, proxy, policy
        self.cookie = prefix[1:].decode("latin-1") if cookie and prefix else None
        # the backend and Host for an allowed IP literal: its verdict depends on the
        # policy alone, so it is checked once per route -- and again when the policy
        # changes (HostPolicy.generation: the engines' networks are re-read)
        self._literal: tuple[Backend, bytes] | None = None
        self._generation = policy.generation

    def render(self, request: Request) -> Any:
        """Forward the request URI less the route segment."""
        return self.serve(request, split_uri_cached(request.uri)[1])

    def serve(self, request: Request, path: bytes) -> Any:
        """Check the host (resolving a name first), then forward ``path``."""
        plan = self._literal
        if plan is not None and self._generation != self.policy.generation:
            plan = self._literal = None
            self._generation = self.policy.generation
        if plan is None:
            t = self.target
            try:
                # an IP literal is checked at once: no Deferred, no notifyFinish
                ip = self.policy.check_literal(t.host, t.port)
            except Forbidden as e:
                finish_error(request, 403, str(e))
                return NOT_DONE_YET
            if ip is None:
                d = self.policy.check(t.host, t.port)
                _on_gone(request, d)
                d.addCallbacks(lambda ip: self._go(request, path, ip), lambda f: self._denied(request, f))
                return NOT_DONE_YET
            plan = self._literal = _host_plan(t, ip)
        self._forward(request, path, plan)
        return NOT_DONE_YET

    def _go(self, request: Request, path: bytes, ip: str) -> None:
        """A name resolved and allowed: forward, unless the request is over by now."""
        if done_or_gone(request):
            return
        self._forward(request, path, _host_plan(self.target, ip))

    def _forward(self, request: Request, path: bytes, plan: tuple[Backend, bytes]) -> None:
        backend, host_header = plan
        self.proxy.forward(
            request,
            backend,
            path,
            prefix=self.prefix,
            host_header=host_header,
            set_route_cookie=self.cookie,
            external=True,
        )

    def _denied(self, request: Request, f: Failure) -> None:
        if f.check(Forbidden):
            finish_error(request, 403, f.getErrorMessage())
        elif f.check(CancelledError):
            return
        else:
            finish_error(request, 502, f"cannot reach {self.target.host}: {f.getErrorMessage()}")


class HostResource(Resource):
    """A host:/shost:/--root request with its path: a :class:`HostRoute` serving it."""

    isLeaf = True

    def __init__(
        self,
        target: HostTarget,
        prefix: bytes,
        path: bytes,
        *,
        proxy: Proxy,
        policy: HostPolicy,
        cookie: bool,
    ):
        super().__init__()
        self.route = HostRoute(target, prefix, proxy=proxy, policy=policy, cookie=cookie)
        self.path = path

    def render(self, request: Request) -> Any:
        """Check the host (resolving a name first), then forward."""
        return self.route.serve(request, self.path)


class ForwardResource(Resource):
    """Every request as it came (whole URI, no prefix) to one backend: a ``--workers``
    child's ``/monitor:`` routes, served by the broker's process."""

    isLeaf = True

    def __init__(self, proxy: Proxy, backend: Backend):
        super().__init__()
        self.proxy, self.backend = proxy, backend

    def render(self, request: Request) -> Any:
        """Forward."""
        return self.proxy.forward(
            request, self.backend, request.uri, prefix=b"", host_header=None, cors=False
        )
