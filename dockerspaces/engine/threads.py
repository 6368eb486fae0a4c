"""The engine's threads: a pool whose threads each hold their own docker-py client.

docker-py clients are not thread-safe, and making one blocks (it asks the engine for
its API version), so every pool thread makes its client on first use and keeps it
(thread-local).  :meth:`ClientThreads.run` calls ``func(client, *args)`` in the pool
through Twisted's :func:`~twisted.internet.threads.deferToThreadPool` and translates
what docker-py raised (:func:`~dockerspaces.engine.errors.translate`); a caller that
cancels the Deferred (``ping``'s timeout) simply never sees the late result, as
Twisted suppresses the one result a Deferred without canceller gets after cancelling.

Streams that block a thread (pulls, the event stream) are tracked, so that
:meth:`ClientThreads.shutdown` can close them from the reactor thread before it stops
the pool; it waits at most ``shutdown_timeout`` seconds for calls still in flight (the
pool threads are daemons: a hung engine call cannot keep the process alive).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar, cast

import docker.errors  # type: ignore[import-untyped]
from twisted.internet.defer import Deferred, fail
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from .errors import translate
from .interface import EngineError, EngineUnreachable

T = TypeVar("T")
P = ParamSpec("P")

log = Logger()


class Stream(Protocol):
    """A blocking stream docker-py gives (pull progress, events): closable from
    another thread."""

    def close(self) -> None:
        """Stop the stream (a reader blocked on it gets its end or an error)."""


class EventStream(Stream, Protocol):
    """The decoded ``docker events`` stream."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The events, as they come."""


class DockerClient(Protocol):
    """The docker-py ``APIClient`` methods the engine calls (docker-py has no types;
    the tests' fake client has the same methods)."""

    def close(self) -> None:
        """Close the client's connections."""

    def ping(self) -> bool:
        """Whether the engine answers ``/_ping``."""

    def inspect_image(self, image: str) -> dict[str, Any]:
        """``image``'s description (``APIError`` 404 when absent)."""

    def inspect_container(self, container: str) -> dict[str, Any]:
        """``container``'s description, ``State`` included."""

    def create_host_config(self, **kwargs: Any) -> dict[str, Any]:
        """A ``HostConfig`` for :meth:`create_container`."""

    def create_container(self, **kwargs: Any) -> dict[str, Any]:
        """Create a container; ``{"Id": ...}``."""

    def start(self, container: str) -> None:
        """Start a created container."""

    def logs(self, container: str, **kwargs: Any) -> bytes | str:
        """The container's output."""

    def kill(self, container: str) -> None:
        """SIGKILL the container."""

    def stop(self, container: str, timeout: int) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""

    def remove_container(self, container: str, force: bool = False, v: bool = False) -> None:
        """Remove the container (``force``: even running; ``v``: its volumes)."""

    def containers(self, all: bool = False, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The containers matching ``filters`` (``all``: stopped ones too)."""

    def events(self, **kwargs: Any) -> EventStream:
        """The engine's event stream."""

    def networks(self) -> list[dict[str, Any]]:
        """Every network of the engine."""


class IPool(Protocol):
    """The part of :class:`ThreadPool` the engine uses."""

    def callInThreadWithCallback(
        self, onResult: Callable[[bool, Any], object], func: Callable[..., Any], *args: Any
    ) -> None:
        """Run ``func(*args)`` in a thread and report ``(ok, result)`` to ``onResult``."""

    def start(self) -> None:
        """Start the threads."""

    def stop(self) -> None:
        """Stop the threads (waits for running calls)."""


class DaemonThreadPool(ThreadPool):
    """A :class:`ThreadPool` whose threads do not keep the process alive."""

    @staticmethod
    def threadFactory(*args: Any, **kwargs: Any) -> threading.Thread:  # type: ignore[override]
        """Make a daemon thread."""
        return threading.Thread(*args, daemon=True, **kwargs)


def close_stream(stream: Stream, client: DockerClient) -> None:
    """Interrupt a blocking stream from another thread (ssh: close the client)."""
    try:
        stream.close()
        return
    except docker.errors.DockerException:
        pass  # paramiko channels cannot be cancelled; close the connection instead
    except Exception as e:  # noqa: BLE001 - best effort at shutdown
        log.debug("closing a stream failed: {e!r}", e=e)
    try:
        client.close()
    except Exception as e:  # noqa: BLE001 - best effort at shutdown
        log.debug("closing a client failed: {e!r}", e=e)


class ClientThreads:
    """One engine's pool, its per-thread clients and its open streams.

    ``reactor`` provides ``IReactorFromThreads`` and ``IReactorTime``; ``name`` and
    ``url`` name the engine in translated errors.
    """

    def __init__(
        self,
        reactor: Any,
        name: str,
        url: str,
        pool: IPool,
        client_factory: Callable[[], DockerClient],
        shutdown_timeout: float = 10.0,
    ) -> None:
        self.name = name
        self.url = url
        self.pool = pool
        self.client_factory = client_factory
        self.shutdown_timeout = shutdown_timeout
        self.stopping = threading.Event()
        self._reactor = reactor
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[DockerClient] = []
        self._streams: dict[int, tuple[Stream, DockerClient]] = {}

    def client(self) -> DockerClient:
        """This thread's client (made on first use: blocks)."""
        client: DockerClient | None = getattr(self._local, "client", None)
        if client is None:
            client = self.client_factory()
            with self._lock:
                self._clients.append(client)
            self._local.client = client
        return client

    def drop_client(self) -> None:
        """Close this thread's client (the engine went away: the next call makes a new one)."""
        client = getattr(self._local, "client", None)
        self._local.client = None
        if client is not None:
            with self._lock:
                if client in self._clients:
                    self._clients.remove(client)
            try:
                client.close()
            except Exception:  # noqa: BLE001, S110 - it is being thrown away anyway
                pass

    def track(self, stream: Stream, client: DockerClient) -> int:
        """Remember an open ``stream`` (and its client) for :meth:`shutdown`; its key."""
        with self._lock:
            key = id(stream)
            self._streams[key] = (stream, client)
        return key

    def untrack(self, key: int) -> None:
        """Forget a stream that ended."""
        with self._lock:
            self._streams.pop(key, None)

    def run(
        self, func: Callable[Concatenate[DockerClient, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        """Run ``func(client, *args)`` in the pool; fire on the reactor thread with its
        result or its translated error; EngineError at once after :meth:`shutdown`."""
        if self.stopping.is_set():
            return fail(EngineError(f"engine {self.name} is shut down"))

        def work() -> T:
            try:
                return func(self.client(), *args, **kwargs)
            except BaseException as e:
                new = translate(e, self.name, self.url)
                if isinstance(new, EngineUnreachable):
                    self.drop_client()
                if new is e:
                    raise
                raise new from e

        # deferToThreadPool only calls callInThreadWithCallback: any IPool does
        return deferToThreadPool(self._reactor, cast(ThreadPool, self.pool), work)

    def start(self) -> None:
        """Start the pool."""
        self.pool.start()

    def shutdown(self) -> Deferred[None]:
        """Close open streams, stop the pool (bounded by ``shutdown_timeout``), close
        the clients; fires on the reactor thread."""
        self.stopping.set()
        with self._lock:
            streams = list(self._streams.values())
        for stream, client in streams:
            close_stream(stream, client)
        d: Deferred[None] = Deferred()

        def stop_pool() -> None:
            try:
                self.pool.stop()
            finally:
                with self._lock:
                    clients, self._clients = self._clients, []
                for c in clients:
                    try:
                        c.close()
                    except Exception:  # noqa: BLE001, S110 - shutting down
                        pass
                self._reactor.callFromThread(d.callback, None)

        # past the timeout d fires with None; the stop thread's late callback is
        # swallowed (a cancelled Deferred without canceller ignores one result)
        d.addTimeout(self.shutdown_timeout, self._reactor, onTimeoutCancel=lambda _r, _t: None)
        t = threading.Thread(target=stop_pool, name=f"engine-{self.name}-stop", daemon=True)
        t.start()
        return d
