"""Images: the pull policy, one shared pull per ref, progress on the reactor thread.

:meth:`Pulls.ensure_image` makes an image present per the policy (``always``,
``missing``, ``never``); concurrent callers for one ref share a single pull, each with
its own progress listener and its own cancellable Deferred.  The pull runs in the
engine's pool (:class:`~dockerspaces.engine.threads.ClientThreads`) with the
credentials of the ref's own registry only
(:class:`~dockerspaces.engine.auth.RegistryAuth`); its streamed progress is
throttled to one report per 0.1 s (layer status changes always pass) and delivered on
the reactor thread; errors in the stream are classified by
:func:`~dockerspaces.engine.errors.pull_error`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import docker.auth  # type: ignore[import-untyped]
import docker.errors  # type: ignore[import-untyped]
from docker.types.daemon import CancellableStream  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .auth import RegistryAuth, registry_of, split_ref
from .dockerseam import json_stream, post_streaming
from .errors import explanation, is_not_found, pull_error
from .interface import EngineError, ImageNotFound, PullProgress
from .threads import ClientThreads, DockerClient

log = Logger()

PULL_POLICIES = ("always", "missing", "never")
PROGRESS_INTERVAL = 0.1  # seconds between two throttled progress reports


class _Pull:
    """One pull in flight for a ref, shared by every caller of ensure_image."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.listeners: list[Callable[[PullProgress], None]] = []
        self.waiters: list[Deferred[None]] = []
        self.last_emit = 0.0


class Pulls:
    """The pulls of one engine (see the module docstring); ``reactor`` provides
    ``IReactorFromThreads``."""

    def __init__(self, reactor: Any, threads: ClientThreads, policy: str, auth: RegistryAuth) -> None:
        if policy not in PULL_POLICIES:
            raise ValueError(f"pull policy {policy!r}: use one of {', '.join(PULL_POLICIES)}")
        self.policy = policy
        self._reactor = reactor
        self._threads = threads
        self._auth = auth
        self._pulls: dict[str, _Pull] = {}

    def ensure_image(
        self, ref: str, on_progress: Callable[[PullProgress], None] | None = None
    ) -> Deferred[None]:
        """Make ``ref`` present per the pull policy; concurrent calls share one pull."""
        pull = self._pulls.get(ref)
        fresh = pull is None
        if pull is None:
            pull = _Pull(ref)
            self._pulls[ref] = pull
        if on_progress is not None:
            pull.listeners.append(on_progress)
        p = pull

        def cancel(w: Deferred[None]) -> None:
            if w in p.waiters:
                p.waiters.remove(w)

        waiter: Deferred[None] = Deferred(canceller=cancel)
        pull.waiters.append(waiter)
        if fresh:
            work = self._threads.run(self._ensure_image_sync, ref, pull)
            work.addBoth(self._pull_done, pull)
        return waiter

    def _pull_done(self, result: Any, pull: _Pull) -> None:
        if self._pulls.get(pull.ref) is pull:
            del self._pulls[pull.ref]
        waiters, pull.waiters = pull.waiters, []
        for w in waiters:
            if w.called:
                continue
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(None)
        if isinstance(result, Failure) and not waiters:
            log.info("pull of {ref} failed (nobody waiting): {e}", ref=pull.ref, e=result.value)

    def _deliver(self, pull: _Pull, progress: PullProgress) -> None:
        for cb in list(pull.listeners):
            try:
                cb(progress)
            except Exception:  # noqa: BLE001 - a listener must not break the pull
                log.failure("pull progress listener failed")

    def _progress(self, pull: _Pull, progress: PullProgress, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - pull.last_emit < PROGRESS_INTERVAL:
            return
        pull.last_emit = now
        self._reactor.callFromThread(self._deliver, pull, progress)

    def _ensure_image_sync(self, client: DockerClient, ref: str, pull: _Pull) -> None:
        if self.policy != "always":
            try:
                client.inspect_image(ref)
                return
            except docker.errors.APIError as e:
                if not is_not_found(e):
                    raise
            if self.policy == "never":
                raise ImageNotFound(
                    f"image {ref} is not present on engine {self._threads.name} and --pull is never"
                )
        self._pull_sync(client, ref, pull)

    def _pull_sync(self, client: DockerClient, ref: str, pull: _Pull) -> None:
        repo, tag = split_ref(ref)
        registry = registry_of(ref)
        auth_config = self._auth.for_ref(ref)
        headers = {"X-Registry-Auth": docker.auth.encode_header(auth_config)} if auth_config else {}
        self._progress(pull, PullProgress(ref, f"pulling {ref} from {registry}"), force=True)
        try:
            response = post_streaming(
                client, "/images/create", params={"fromImage": repo, "tag": tag}, headers=headers
            )
        except docker.errors.APIError as e:
            raise pull_error(ref, registry, explanation(e), auth_config is not None) from None
        stream = CancellableStream(json_stream(client, response), response)
        key = self._threads.track(stream, client)
        stopping = self._threads.stopping
        try:
            for chunk in stream:
                if stopping.is_set():
                    break
                if not isinstance(chunk, dict):
                    continue
                if "error" in chunk or "errorDetail" in chunk:
                    detail = chunk.get("errorDetail") or {}
                    msg = detail.get("message") or chunk.get("error") or "unknown error"
                    raise pull_error(ref, registry, str(msg), auth_config is not None)
                status = str(chunk.get("status", ""))
                layer = chunk.get("id")
                detail = chunk.get("progressDetail") or {}
                progress = PullProgress(
                    ref,
                    f"{layer}: {status}" if layer else status,
                    detail.get("current"),
                    detail.get("total"),
                )
                self._progress(pull, progress, force=status not in ("Downloading", "Extracting"))
        finally:
            self._threads.untrack(key)
            try:
                stream.close()
            except Exception:  # noqa: BLE001, S110 - ssh streams cannot be closed
                pass
        if stopping.is_set():
            raise EngineError(f"pull of {ref} interrupted: engine {self._threads.name} is shutting down")
        try:
            client.inspect_image(ref)
        except docker.errors.APIError as e:
            if is_not_found(e):
                raise EngineError(f"pull of {ref} ended but the image is not there") from None
            raise
