"""Shared set-up for the engine tests (no tests here): a fake docker-py client, an
inline thread pool, a memory reactor whose callFromThread runs at once, and an
:class:`EngineTestCase` building an :class:`Engine` over them.  A probe is answered
over the memory reactor with :meth:`EngineTestCase.answer`."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import docker.errors  # type: ignore[import-untyped]
import docker.types  # type: ignore[import-untyped]
import requests.exceptions
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.config import HostConfig
from dockerspaces.engine.auth import RegistryAuth
from dockerspaces.engine.engine import Engine
from dockerspaces.spec import JobSpec


class Reactor(MemoryReactorClock):
    """A memory reactor whose callFromThread runs the call at once."""

    def callFromThread(self, f: Any, *args: Any, **kw: Any) -> None:  # type: ignore[override]
        f(*args, **kw)


class InlinePool:
    """A thread pool stand-in that runs every call inline."""

    def __init__(self) -> None:
        self.started = self.stopped = False

    def callInThreadWithCallback(self, onResult: Any, func: Any, *args: Any) -> None:
        try:
            result = func(*args)
        except BaseException:  # noqa: BLE001 - reported like a real pool does
            onResult(False, Failure())
            return
        onResult(True, result)

    def start(self) -> None:
        self.started = True

    def stop(self) -> None:
        self.stopped = True


def api_error(status: int, explanation: str) -> docker.errors.APIError:
    """The ``APIError`` (``NotFound`` for 404) docker-py raises for ``status``."""
    resp = SimpleNamespace(status_code=status, url="http://docker/x", reason="R")
    cls = docker.errors.NotFound if status == 404 else docker.errors.APIError
    return cls(explanation, response=resp, explanation=explanation)


class FakeResponse:
    """What ``_post(stream=True)`` returns: the decoded chunks to stream."""

    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self.chunks = chunks
        self.raw = SimpleNamespace(closed=True)


class FakeStream:
    """An events stream with close()."""

    def __init__(self, items: list[Any]) -> None:
        self.items = list(items)
        self.closed = False

    def __iter__(self) -> Any:
        for item in self.items:
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.closed = True


class FakeClient:
    """The docker-py APIClient methods the engine uses, recording calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.images: set[str] = set()
        self.pull_chunks: dict[str, list[dict[str, Any]]] = {}
        self.pull_headers: list[tuple[str, dict[str, str]]] = []
        self.created: dict[str, dict[str, Any]] = {}
        self.states: dict[str, list[dict[str, Any]]] = {}
        self.logs_text = b""
        self.start_error: Exception | None = None
        self.stop_error: Exception | None = None
        self.remove_error: Exception | None = None
        self.listing: list[dict[str, Any]] = []
        self.network_listing: list[dict[str, Any]] = []
        self.event_streams: list[Any] = []
        self.ping_ok = True
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def ping(self) -> bool:
        if not self.ping_ok:
            raise requests.exceptions.ConnectionError("refused")
        return True

    # images
    def inspect_image(self, ref: str) -> dict[str, Any]:
        self.calls.append(("inspect_image", ref))
        if ref not in self.images:
            raise api_error(404, f"No such image: {ref}")
        return {"Id": "sha256:" + ref}

    def _url(self, path: str) -> str:
        return "http+docker://localhost/v1.41" + path

    def _post(self, url: str, params: dict[str, str], headers: dict[str, str], **kw: Any) -> Any:
        ref = f"{params['fromImage']}:{params['tag']}"
        self.calls.append(("pull", ref))
        self.pull_headers.append((ref, dict(headers)))
        chunks = self.pull_chunks.get(ref)
        if chunks is None:
            chunks = [{"status": "Pulling from x", "id": params["tag"]}, {"status": "Done"}]
            self.images.add(ref)
        return FakeResponse(chunks)

    def _raise_for_status(self, response: Any) -> None:
        pass

    def _stream_helper(self, response: FakeResponse, decode: bool = False) -> Any:
        assert decode
        yield from response.chunks

    # containers
    def create_host_config(self, **kw: Any) -> Any:
        return docker.types.HostConfig(version="1.41", **kw)

    def create_container(self, **kw: Any) -> dict[str, str]:
        cid = f"c{len(self.created) + 1:063d}"
        self.created[cid] = kw
        self.calls.append(("create", cid))
        return {"Id": cid}

    def start(self, cid: str) -> None:
        self.calls.append(("start", cid))
        if self.start_error:
            raise self.start_error

    def inspect_container(self, cid: str) -> dict[str, Any]:
        self.calls.append(("inspect", cid))
        seq = self.states.get(cid)
        if seq is None:
            raise api_error(404, f"No such container: {cid}")
        state = seq.pop(0) if len(seq) > 1 else seq[0]
        return {"Id": cid, "State": state}

    def logs(self, cid: str, **kw: Any) -> bytes:
        self.calls.append(("logs", kw))
        return self.logs_text

    def kill(self, cid: str) -> None:
        self.calls.append(("kill", cid))
        if self.stop_error:
            raise self.stop_error

    def stop(self, cid: str, timeout: int) -> None:
        self.calls.append(("stop", (cid, timeout)))
        if self.stop_error:
            raise self.stop_error

    def remove_container(self, cid: str, force: bool = False, v: bool = False) -> None:
        self.calls.append(("remove", (cid, force, v)))
        if self.remove_error:
            raise self.remove_error

    def containers(self, all: bool, filters: dict[str, Any]) -> list[dict[str, Any]]:
        self.calls.append(("containers", (all, filters)))
        return self.listing

    def events(self, **kw: Any) -> Any:
        self.calls.append(("events", kw))
        if not self.event_streams:
            return FakeStream([])
        nxt = self.event_streams.pop(0)
        if isinstance(nxt, BaseException):
            raise nxt
        return nxt

    def networks(self) -> list[dict[str, Any]]:
        self.calls.append(("networks", None))
        return self.network_listing

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


HOST = HostConfig(name="local", url="unix:///var/run/docker.sock", start_port=9100, slots=2)
SPEC = JobSpec(mode="x", name=("selmaproject", "tts"), tag="777", port=5002, env=(("A", "1"),))
WORKER = JobSpec(mode="x", name=("team", "worker"), tag="1", port=3, env=(("JOB", "7"),))


class EngineTestCase(SynchronousTestCase):
    """Builds an Engine over a FakeClient, an InlinePool and a Reactor."""

    def make(
        self, pull: str = "missing", auth: RegistryAuth | None = None, host: HostConfig = HOST
    ) -> Engine:
        """A fresh engine (``self.engine``) over ``self.client``, ``self.pool``,
        ``self.reactor``."""
        self.client = FakeClient()
        self.reactor = Reactor()
        self.pool = InlinePool()
        self.engine = Engine(
            self.reactor,
            host,
            "inst1",
            pull,
            auth,
            pool=self.pool,
            client_factory=lambda: self.client,
        )
        return self.engine


def answer(reactor: MemoryReactorClock, data: bytes | None, close: bool = True) -> StringTransport:
    """Complete the newest connection the reactor was asked for (a probe's): ``data``
    (None: nothing), then close it unless ``close`` is false; its transport."""
    _host, _port, factory, _timeout, _bind = reactor.tcpClients[-1]
    proto = factory.buildProtocol(None)
    tr = StringTransport()
    proto.makeConnection(tr)
    if data:
        proto.dataReceived(data)
    if close:
        proto.connectionLost(Failure(ConnectionError("closed")))
    return tr
