"""The real Engine driven against a fake docker-py client and an inline thread pool."""

from __future__ import annotations

import base64
import json
import threading
import time
from types import SimpleNamespace
from typing import Any

import attrs
import docker.errors  # type: ignore[import-untyped]
import docker.types  # type: ignore[import-untyped]
import requests.exceptions
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.config import HostConfig
from dockerspaces.engine.auth import RegistryAuth
from dockerspaces.engine.engine import (
    Engine,
    EngineService,
    docker_time,
    event_from_docker,
    pull_error,
)
from dockerspaces.engine.interface import (
    LABEL_DISPLAY,
    LABEL_HOST,
    LABEL_INSTANCE,
    LABEL_KEY,
    LABEL_SLOT,
    LABEL_SPEC,
    ContainerEvent,
    ContainerExited,
    ContainerRemoved,
    EngineError,
    EngineUnreachable,
    ImageNotFound,
    NetworkInfo,
    NotReady,
    OwnedContainer,
    PortAllocated,
    PullProgress,
    RunOptions,
    SlotInfo,
    Unauthorized,
)
from dockerspaces.engine.probe import StatusLineProbe
from dockerspaces.spec import JobSpec, parse_route


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


class PullTests(EngineTestCase):
    """ensure_image: policies, credentials routing, progress, errors in the stream."""

    def sent_auth(self, ref: str) -> dict[str, str] | None:
        for r, headers in self.client.pull_headers:
            if r == ref:
                if "X-Registry-Auth" not in headers:
                    return None
                raw = headers["X-Registry-Auth"]
                raw = raw.decode() if isinstance(raw, bytes) else raw
                return json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        raise AssertionError(f"{ref} was not pulled")

    def test_credentials_only_to_their_registry(self) -> None:
        auth = RegistryAuth.from_options(registry="localhost:5000", user="u", password="pw")
        eng = self.make(pull="always", auth=auth)
        self.successResultOf(eng.ensure_image("localhost:5000/team/app:1"))
        self.successResultOf(eng.ensure_image("selmaproject/tts:777"))
        self.assertEqual(self.sent_auth("localhost:5000/team/app:1")["username"], "u")  # type: ignore[index]
        self.assertEqual(self.sent_auth("localhost:5000/team/app:1")["password"], "pw")  # type: ignore[index]
        self.assertIsNone(self.sent_auth("selmaproject/tts:777"))

    def test_hub_credentials_not_sent_to_private_registry(self) -> None:
        auth = RegistryAuth.from_options(user="hub", password="hubpw")
        eng = self.make(pull="always", auth=auth)
        self.successResultOf(eng.ensure_image("localhost:5000/team/app:1"))
        self.successResultOf(eng.ensure_image("selmaproject/tts:777"))
        self.assertIsNone(self.sent_auth("localhost:5000/team/app:1"))
        self.assertEqual(self.sent_auth("selmaproject/tts:777")["username"], "hub")  # type: ignore[index]

    def test_missing_present_does_not_pull(self) -> None:
        eng = self.make(pull="missing")
        self.client.images.add("selmaproject/tts:777")
        self.successResultOf(eng.ensure_image("selmaproject/tts:777"))
        self.assertEqual(self.client.names(), ["inspect_image"])

    def test_missing_absent_pulls(self) -> None:
        eng = self.make(pull="missing")
        self.successResultOf(eng.ensure_image("selmaproject/tts:777"))
        self.assertEqual(self.client.names(), ["inspect_image", "pull", "inspect_image"])

    def test_always_pulls_even_if_present(self) -> None:
        eng = self.make(pull="always")
        self.client.images.add("selmaproject/tts:777")
        self.successResultOf(eng.ensure_image("selmaproject/tts:777"))
        self.assertIn("pull", self.client.names())

    def test_never_fails_when_absent(self) -> None:
        eng = self.make(pull="never")
        f = self.failureResultOf(eng.ensure_image("selmaproject/tts:777"), ImageNotFound)
        self.assertIn("--pull is never", str(f.value))
        self.assertNotIn("pull", self.client.names())

    def test_bad_policy(self) -> None:
        self.assertRaises(ValueError, Engine, Reactor(), HOST, "i", "sometimes")

    def test_progress_on_the_reactor(self) -> None:
        eng = self.make(pull="always")
        self.client.pull_chunks["a/b:1"] = [
            {"status": "Pulling fs layer", "id": "l1"},
            {"status": "Downloading", "id": "l1", "progressDetail": {"current": 5, "total": 10}},
            {"status": "Pull complete", "id": "l1"},
            {"status": "Status: Downloaded newer image for a/b:1"},
        ]
        self.client.images.add("a/b:1")
        seen: list[PullProgress] = []
        self.successResultOf(eng.ensure_image("a/b:1", seen.append))
        statuses = [p.status for p in seen]
        self.assertEqual(statuses[0], "pulling a/b:1 from docker.io")
        self.assertIn("l1: Pulling fs layer", statuses)
        self.assertIn("l1: Pull complete", statuses)
        self.assertIn("Status: Downloaded newer image for a/b:1", statuses)
        self.assertTrue(all(p.ref == "a/b:1" for p in seen))

    def _pull_fails(self, message: str, auth: RegistryAuth | None = None) -> Failure:
        eng = self.make(pull="always", auth=auth)
        self.client.pull_chunks["localhost:5000/a:1"] = [
            {"status": "Pulling from a"},
            {"errorDetail": {"message": message}, "error": message},
        ]
        return self.failureResultOf(eng.ensure_image("localhost:5000/a:1"))

    def test_unauthorized_in_stream(self) -> None:
        auth = RegistryAuth.from_options(registry="localhost:5000", user="u", password="SECRETPW")
        f = self._pull_fails(
            "Head http://localhost:5000/v2/a/manifests/1: unauthorized: authentication required",
            auth,
        )
        f.trap(Unauthorized)
        self.assertIn("localhost:5000", str(f.value))
        self.assertIn("configured credentials", str(f.value))
        self.assertNotIn("SECRETPW", str(f.value))

    def test_not_found_in_stream(self) -> None:
        f = self._pull_fails("manifest for localhost:5000/a:1 not found: manifest unknown")
        f.trap(ImageNotFound)
        self.assertIn("localhost:5000/a:1", str(f.value))

    def test_other_error_in_stream(self) -> None:
        f = self._pull_fails("write /var/lib/docker/tmp/x: no space left on device")
        f.trap(EngineError)
        self.assertNotIsInstance(f.value, (Unauthorized, ImageNotFound))
        self.assertIn("no space left", str(f.value))

    def test_denied_without_credentials_is_not_found(self) -> None:
        self.assertIsInstance(
            pull_error("a/b:1", "docker.io", "pull access denied for a/b", False), ImageNotFound
        )
        self.assertIsInstance(
            pull_error("a/b:1", "docker.io", "pull access denied for a/b", True), Unauthorized
        )

    def test_port_digits_are_not_a_401(self) -> None:
        """A registry on port 51401 once made a missing tag look like refused credentials."""
        msg = ("manifest for localhost:51401/dstest/tts:nosuchtag not found: "
               "manifest unknown: manifest unknown")
        self.assertIsInstance(pull_error("localhost:51401/dstest/tts:nosuchtag",
                                         "localhost:51401", msg, True), ImageNotFound)
        self.assertIsInstance(pull_error("r:5000/a:1", "r:5000",
                                         "Head https://r:5000/v2/a/manifests/1: 401", True),
                              Unauthorized)

    def test_concurrent_callers_share_one_pull(self) -> None:
        eng = self.make(pull="always")
        started: list[Any] = []
        # Hold the pool: queue the work instead of running it inline.
        self.pool.callInThreadWithCallback = lambda cb, f, *a: started.append((cb, f, a))  # type: ignore[method-assign]
        p1: list[PullProgress] = []
        p2: list[PullProgress] = []
        d1 = eng.ensure_image("a/b:1", p1.append)
        d2 = eng.ensure_image("a/b:1", p2.append)
        self.assertEqual(len(started), 1)
        cb, f, a = started[0]
        cb(True, f(*a))
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertEqual(self.client.names().count("pull"), 1)
        self.assertTrue(p1)
        self.assertEqual([p.status for p in p1], [p.status for p in p2])

    def test_cancelled_waiter_does_not_break_others(self) -> None:
        eng = self.make(pull="always")
        started: list[Any] = []
        self.pool.callInThreadWithCallback = lambda cb, f, *a: started.append((cb, f, a))  # type: ignore[method-assign]
        d1 = eng.ensure_image("a/b:1")
        d2 = eng.ensure_image("a/b:1")
        d1.cancel()
        self.failureResultOf(d1)
        cb, f, a = started[0]
        cb(True, f(*a))
        self.successResultOf(d2)

    def test_engine_down_is_unreachable(self) -> None:
        eng = self.make()

        def broken() -> Any:
            raise requests.exceptions.ConnectionError("connection refused")

        eng._client_factory = broken
        f = self.failureResultOf(eng.ensure_image("a/b:1"), EngineUnreachable)
        self.assertIn("local", str(f.value))


class CreateTests(EngineTestCase):
    """create(): labels, names, env, ports, GPUs, run options."""

    def test_labels_env_ports(self) -> None:
        eng = self.make()
        slot = SlotInfo("local", 9101)
        h = self.successResultOf(eng.create(SPEC, slot, RunOptions()))
        kw = self.client.created[h.id]
        self.assertEqual(
            kw["labels"],
            {
                LABEL_INSTANCE: "inst1",
                LABEL_HOST: "local",
                LABEL_SLOT: "9101",
                LABEL_KEY: SPEC.key,
                LABEL_DISPLAY: SPEC.display,
                # no env values in labels: they are secrets (docker ps shows labels)
                LABEL_SPEC: "x:selmaproject:tts:777:5002",
            },
        )
        self.assertEqual(parse_route(kw["labels"][LABEL_SPEC]), attrs.evolve(SPEC, env=()))
        self.assertEqual(kw["environment"], ["A=1"])
        self.assertEqual(kw["image"], "selmaproject/tts:777")
        self.assertEqual(kw["ports"], [5002])
        hc = kw["host_config"]
        self.assertEqual(hc["PortBindings"], {"5002/tcp": [{"HostIp": "127.0.0.1", "HostPort": "9101"}]})
        self.assertNotIn("DeviceRequests", hc)
        self.assertNotIn("RestartPolicy", hc)
        self.assertTrue(h.name.startswith("ds-inst1-local-9101-"), h.name)
        self.assertEqual((h.host, h.slot, h.key, h.spec), ("local", slot, SPEC.key, SPEC))

    def test_names_are_unique_and_valid(self) -> None:
        host = HostConfig(name="10.0.0.5:2375#2", url="tcp://10.0.0.5:2375", start_port=1, slots=1)
        eng = self.make(host=host)
        a = eng.container_name(SlotInfo("x", 9100))
        b = eng.container_name(SlotInfo("x", 9100))
        self.assertNotEqual(a, b)
        self.assertRegex(a, r"^ds-inst1-10\.0\.0\.5_2375_2-9100-[0-9a-f]{6}$")

    def test_gpu_device_request(self) -> None:
        eng = self.make()
        h = self.successResultOf(eng.create(SPEC, SlotInfo("local", 9100, gpu=1), RunOptions()))
        reqs = self.client.created[h.id]["host_config"]["DeviceRequests"]
        self.assertEqual(
            reqs,
            [{"Driver": "nvidia", "Count": 0, "DeviceIDs": ["1"], "Capabilities": [["gpu"]], "Options": {}}],
        )

    def test_gpu_off_by_profile(self) -> None:
        eng = self.make()
        h = self.successResultOf(
            eng.create(SPEC, SlotInfo("local", 9100, gpu=0), RunOptions(gpu=False))
        )
        self.assertNotIn("DeviceRequests", self.client.created[h.id]["host_config"])

    def test_worker_publishes_nothing(self) -> None:
        eng = self.make()
        h = self.successResultOf(eng.create(WORKER, SlotInfo("local", 9100), RunOptions()))
        kw = self.client.created[h.id]
        self.assertIsNone(kw["ports"])
        self.assertNotIn("PortBindings", kw["host_config"])
        self.assertEqual(kw["environment"], ["JOB=7"])

    def test_run_options(self) -> None:
        eng = self.make()
        opts = RunOptions(
            volumes=("/data:/data:ro",), shm_size="1g", mem_limit="2g", nano_cpus=1_500_000_000,
            network="dsnet",
        )
        h = self.successResultOf(eng.create(SPEC, SlotInfo("local", 9100), opts))
        hc = self.client.created[h.id]["host_config"]
        self.assertEqual(hc["Binds"], ["/data:/data:ro"])
        self.assertEqual(hc["ShmSize"], 1024**3)
        self.assertEqual(hc["Memory"], 2 * 1024**3)
        self.assertEqual(hc["NanoCpus"], 1_500_000_000)
        self.assertEqual(hc["NetworkMode"], "dsnet")

    def test_publish_ip(self) -> None:
        host = HostConfig(name="r", url="tcp://10.1.1.1:2375", start_port=9100, slots=1, publish_ip="0.0.0.0")
        eng = self.make(host=host)
        h = self.successResultOf(eng.create(SPEC, SlotInfo("r", 9100), RunOptions()))
        self.assertEqual(
            self.client.created[h.id]["host_config"]["PortBindings"]["5002/tcp"][0]["HostIp"], "0.0.0.0"
        )

    def test_port_allocated(self) -> None:
        eng = self.make()
        h = self.successResultOf(eng.create(SPEC, SlotInfo("local", 9100), RunOptions()))
        self.client.start_error = api_error(
            500,
            "driver failed programming external connectivity on endpoint x: "
            "Bind for 127.0.0.1:9100 failed: port is already allocated",
        )
        f = self.failureResultOf(eng.start(h), PortAllocated)
        self.assertIn("9100", str(f.value))
        self.assertIn(("remove", (h.id, True, True)), self.client.calls)


class ReadyTests(EngineTestCase):
    """wait_ready(): status line, health, exit with log tail, workers, deadline."""

    def started(self, spec: JobSpec = SPEC, states: list[dict[str, Any]] | None = None) -> Any:
        eng = self.make()
        h = self.successResultOf(eng.create(spec, SlotInfo("local", 9100), RunOptions()))
        self.client.states[h.id] = states or [{"Status": "running"}]
        self.successResultOf(eng.start(h))
        return h

    def answer(self, data: bytes | None) -> StringTransport:
        """Complete the newest probe connection: ``data`` then (None: only) close."""
        host, port, factory, _timeout, _bind = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 9100))
        proto = factory.buildProtocol(None)
        tr = StringTransport()
        proto.makeConnection(tr)
        if data:
            proto.dataReceived(data)
        proto.connectionLost(Failure(ConnectionError("closed")))
        return tr

    def test_ready_on_status_line(self) -> None:
        h = self.started()
        d = self.engine.wait_ready(h, 10.0, RunOptions(ready_path="/health"))
        self.assertNoResult(d)
        tr = self.answer(b"HTTP/1.1 404 Not Found\r\n\r\n")
        self.assertTrue(tr.value().startswith(b"GET /health HTTP/1.0\r\n"))
        self.successResultOf(d)

    def test_accepted_then_eof_is_not_ready(self) -> None:
        h = self.started()
        d = self.engine.wait_ready(h, 10.0, RunOptions())
        self.answer(None)  # docker-proxy: accept, then close
        self.assertNoResult(d)
        self.reactor.advance(0.05)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.answer(b"HTTP/1.0 200 OK\r\n")
        self.successResultOf(d)

    def test_health_must_be_healthy(self) -> None:
        h = self.started(
            states=[
                {"Status": "running", "Health": {"Status": "starting"}},
                {"Status": "running", "Health": {"Status": "healthy"}},
            ]
        )
        d = self.engine.wait_ready(h, 10.0, RunOptions())
        self.answer(b"HTTP/1.1 200 OK\r\n")
        self.assertNoResult(d)
        self.reactor.advance(0.05)
        self.answer(b"HTTP/1.1 200 OK\r\n")
        self.successResultOf(d)

    def test_exit_fails_at_once_with_log_tail(self) -> None:
        h = self.started(states=[{"Status": "exited", "ExitCode": 3}])
        self.client.logs_text = b"starting\nfatal: no model\n"
        f = self.failureResultOf(self.engine.wait_ready(h, 10.0, RunOptions()), ContainerExited)
        self.assertEqual(f.value.exit_code, 3)
        self.assertEqual(f.value.log_tail, "starting\nfatal: no model")
        self.assertIn("exited with code 3", str(f.value))
        self.assertIn(("logs", {"stdout": True, "stderr": True, "tail": 20, "timestamps": False}), self.client.calls)

    def test_exit_while_waiting(self) -> None:
        h = self.started(states=[{"Status": "running"}, {"Status": "exited", "ExitCode": 1, "OOMKilled": True}])
        d = self.engine.wait_ready(h, 10.0, RunOptions())
        self.answer(None)
        self.reactor.advance(0.05)
        f = self.failureResultOf(d, ContainerExited)
        self.assertIn("out of memory", str(f.value))

    def test_gone_container(self) -> None:
        """Removed from outside (docker rm -f) while starting: ContainerRemoved, which
        the broker may retry, not the image's own exit."""
        h = self.started()
        del self.client.states[h.id]
        f = self.failureResultOf(self.engine.wait_ready(h, 10.0, RunOptions()),
                                 ContainerRemoved)
        self.assertIn("removed from outside", str(f.value))

    def test_killed_from_outside(self) -> None:
        """Exit 137 without the OOM flag (docker kill) is a removal from outside too."""
        h = self.started(states=[{"Status": "exited", "ExitCode": 137}])
        self.failureResultOf(self.engine.wait_ready(h, 10.0, RunOptions()), ContainerRemoved)

    def test_oom_kill_is_the_images_exit(self) -> None:
        h = self.started(states=[{"Status": "exited", "ExitCode": 137, "OOMKilled": True}])
        f = self.failureResultOf(self.engine.wait_ready(h, 10.0, RunOptions()), ContainerExited)
        self.assertNotIsInstance(f.value, ContainerRemoved)

    def test_not_ready_by_deadline(self) -> None:
        h = self.started()
        d = self.engine.wait_ready(h, 1.0, RunOptions())
        answered = 0
        for _ in range(100):
            if d.called:
                break
            if len(self.reactor.tcpClients) > answered:
                answered += 1
                self.answer(None)
            self.reactor.advance(0.05)
        self.assertGreater(answered, 3)
        f = self.failureResultOf(d, NotReady)
        self.assertIn("accepted then closed", str(f.value))
        self.assertLessEqual(self.reactor.seconds(), 1.2)

    def test_probe_that_never_connects_times_out(self) -> None:
        h = self.started()
        d = self.engine.wait_ready(h, 0.5, RunOptions())
        self.reactor.advance(0.6)
        f = self.failureResultOf(d, NotReady)
        self.assertIn("within", str(f.value))

    def test_worker_ready_when_running_after_settle(self) -> None:
        h = self.started(spec=WORKER)
        d = self.engine.wait_ready(h, 10.0, RunOptions())
        self.assertNoResult(d)
        self.reactor.advance(1.0)
        self.assertNoResult(d)
        self.reactor.pump([0.5] * 4)
        self.successResultOf(d)
        self.assertEqual(self.reactor.tcpClients, [])  # workers are never probed

    def test_worker_exit_during_settle(self) -> None:
        h = self.started(spec=WORKER, states=[{"Status": "running"}, {"Status": "exited", "ExitCode": 2}])
        d = self.engine.wait_ready(h, 10.0, RunOptions())
        self.reactor.advance(0.05)
        f = self.failureResultOf(d, ContainerExited)
        self.assertEqual(f.value.exit_code, 2)


class ProbeProtocolTests(SynchronousTestCase):
    """The status-line probe protocol over a StringTransport."""

    def connect(self) -> tuple[StatusLineProbe, StringTransport]:
        p = StatusLineProbe("127.0.0.1:9100", "/ready?x=1")
        tr = StringTransport()
        p.makeConnection(tr)
        return p, tr

    def test_request(self) -> None:
        _, tr = self.connect()
        self.assertEqual(
            tr.value(),
            b"GET /ready?x=1 HTTP/1.0\r\nHost: 127.0.0.1:9100\r\n"
            b"User-Agent: dockerspaces-probe\r\nConnection: close\r\n\r\n",
        )

    def test_any_status_code_is_ready(self) -> None:
        for line in (b"HTTP/1.1 200 OK\r\n", b"HTTP/1.0 503 Busy\r\n", b"HTTP/1.1 404\r\n"):
            p, tr = self.connect()
            p.dataReceived(line)
            r = self.successResultOf(p.result)
            self.assertTrue(r.ready, line)
            self.assertTrue(tr.disconnecting)

    def test_split_status_line(self) -> None:
        p, _ = self.connect()
        p.dataReceived(b"HTTP/1.")
        self.assertNoResult(p.result)
        p.dataReceived(b"1 500 Internal\r\nX: y\r\n")
        self.assertTrue(self.successResultOf(p.result).ready)

    def test_eof_is_not_ready(self) -> None:
        p, _ = self.connect()
        p.connectionLost(Failure(ConnectionError()))
        r = self.successResultOf(p.result)
        self.assertFalse(r.ready)
        self.assertIn("accepted then closed", r.reason)

    def test_partial_then_eof(self) -> None:
        p, _ = self.connect()
        p.dataReceived(b"HTTP/1.1 2")
        p.connectionLost(Failure(ConnectionError()))
        self.assertFalse(self.successResultOf(p.result).ready)

    def test_not_http(self) -> None:
        p, _ = self.connect()
        p.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n")
        r = self.successResultOf(p.result)
        self.assertFalse(r.ready)
        self.assertIn("not HTTP", r.reason)


class StopTests(EngineTestCase):
    """stop(): kill or stop with grace, then remove; idempotent."""

    def handle(self) -> Any:
        eng = self.make()
        return self.successResultOf(eng.create(SPEC, SlotInfo("local", 9100), RunOptions()))

    def test_grace_zero_kills(self) -> None:
        h = self.handle()
        self.successResultOf(self.engine.stop(h, 0))
        self.assertEqual(self.client.calls[-2:], [("kill", h.id), ("remove", (h.id, True, True))])

    def test_grace_rounds_up(self) -> None:
        h = self.handle()
        self.successResultOf(self.engine.stop(h, 2.5))
        self.assertEqual(self.client.calls[-2:], [("stop", (h.id, 3)), ("remove", (h.id, True, True))])

    def test_already_gone(self) -> None:
        h = self.handle()
        self.client.stop_error = api_error(404, "No such container")
        self.successResultOf(self.engine.stop(h, 0))
        self.assertNotIn("remove", self.client.names())

    def test_not_running_still_removed(self) -> None:
        h = self.handle()
        self.client.stop_error = api_error(409, f"Container {h.id} is not running")
        self.successResultOf(self.engine.stop(h, 0))
        self.assertEqual(self.client.calls[-1], ("remove", (h.id, True, True)))

    def test_removal_in_progress(self) -> None:
        h = self.handle()
        self.client.remove_error = api_error(409, "removal of container is already in progress")
        self.successResultOf(self.engine.stop(h, 0))

    def test_owned_container(self) -> None:
        self.make()
        oc = OwnedContainer(id="abc", name="ds-x", running=True, slot_port=9100)
        self.successResultOf(self.engine.stop(oc, 1))
        self.assertEqual(self.client.calls[-2:], [("stop", ("abc", 1)), ("remove", ("abc", True, True))])

    def test_other_errors_surface(self) -> None:
        h = self.handle()
        self.client.stop_error = api_error(500, "cannot kill: permission denied")
        f = self.failureResultOf(self.engine.stop(h, 0), EngineError)
        self.assertIn("permission denied", str(f.value))


class ListOwnTests(EngineTestCase):
    """list_own(): label filters, and never someone else's container."""

    def entry(self, cid: str, instance: str, host: str, spec: str = SPEC.segment(), state: str = "running") -> dict[str, Any]:
        return {
            "Id": cid,
            "Names": [f"/ds-{cid}"],
            "State": state,
            "Labels": {
                LABEL_INSTANCE: instance,
                LABEL_HOST: host,
                LABEL_SLOT: "9101",
                LABEL_SPEC: spec,
            },
        }

    def test_filters_and_mapping(self) -> None:
        eng = self.make()
        self.client.listing = [
            self.entry("a1", "inst1", "local"),
            self.entry("b2", "inst1", "local", spec="garbage::", state="exited"),
            self.entry("c3", "other", "local"),
            self.entry("d4", "inst1", "remote"),
        ]
        got = self.successResultOf(eng.list_own())
        self.assertEqual(
            self.client.calls[-1],
            ("containers", (True, {"label": ["dockerspaces.instance=inst1", "dockerspaces.host=local"]})),
        )
        self.assertEqual([c.id for c in got], ["a1", "b2"])
        self.assertEqual(got[0].spec, SPEC)
        self.assertEqual((got[0].name, got[0].running, got[0].slot_port), ("ds-a1", True, 9101))
        self.assertIsNone(got[1].spec)
        self.assertFalse(got[1].running)


class EventTests(EngineTestCase):
    """watch(): event mapping, filters, reconnect after an outage."""

    def test_event_mapping(self) -> None:
        raw = {
            "Type": "container",
            "Action": "die",
            "Actor": {"ID": "abc", "Attributes": {"exitCode": "137"}},
            "timeNano": 5,
        }
        self.assertEqual(event_from_docker(raw), ContainerEvent("die", "abc", 137))
        self.assertEqual(
            event_from_docker({"status": "oom", "id": "x"}), ContainerEvent("oom", "x", None)
        )
        self.assertIsNone(event_from_docker({"Type": "container", "Action": "start", "id": "x"}))
        self.assertIsNone(event_from_docker({"Type": "network", "Action": "destroy", "id": "x"}))

    def test_watch_loop_reconnects_with_since(self) -> None:
        eng = self.make()
        ev1 = {"Action": "die", "Actor": {"ID": "a", "Attributes": {"exitCode": "1"}}, "timeNano": 1_500_000_000_000_000_123}
        ev2 = {"Action": "destroy", "Actor": {"ID": "a"}, "timeNano": 1_500_000_001_000_000_000}

        class Stopper(FakeStream):
            def __iter__(inner) -> Any:
                eng._stopping.set()
                return iter([])

        self.client.event_streams = [
            FakeStream([ev1, requests.exceptions.ConnectionError("engine went away")]),
            requests.exceptions.ConnectionError("still down"),
            FakeStream([ev1, ev2]),  # ev1 replayed by since=; must not be delivered twice
            Stopper([]),
        ]
        got: list[ContainerEvent] = []
        eng._callbacks.append(got.append)
        t = threading.Thread(target=eng._watch_loop, kwargs={"backoff_start": 0.001})
        t.start()
        t.join(5)
        self.assertFalse(t.is_alive())
        self.assertEqual(got, [ContainerEvent("die", "a", 1), ContainerEvent("destroy", "a", None)])
        event_calls = [kw for name, kw in self.client.calls if name == "events"]
        self.assertEqual(event_calls[0]["filters"], eng.event_filters())
        self.assertNotIn("since", event_calls[0])
        self.assertEqual(event_calls[1]["since"], "1500000000.000000123")
        self.assertEqual(
            eng.event_filters()["label"], ["dockerspaces.instance=inst1", "dockerspaces.host=local"]
        )


    def test_die_carries_the_exit_time_on_a_local_engine(self) -> None:
        """A local engine's ``die`` event is followed by ``exited`` with the container's
        ``State.FinishedAt`` (the proxy compares it with its own clock); a remote
        engine's is not."""
        remote = HostConfig("far", "tcp://10.0.0.9:2375", 9100, 2)
        die = {"Action": "die", "Actor": {"ID": "a", "Attributes": {"exitCode": "137"}},
               "timeNano": 7}
        for host, expected in [(HOST, 1796287362.5), (remote, None)]:
            eng = self.make(host=host)
            self.client.states["a"] = [{"Status": "exited",
                                        "FinishedAt": "2026-12-03T08:42:42.500000000Z"}]

            class Stopper(FakeStream):
                def __iter__(inner, eng: Engine = eng) -> Any:
                    eng._stopping.set()
                    return iter([])

            self.client.event_streams = [FakeStream([die]), Stopper([])]
            got: list[ContainerEvent] = []
            eng._callbacks.append(got.append)
            t = threading.Thread(target=eng._watch_loop, kwargs={"backoff_start": 0.001})
            t.start()
            t.join(5)
            die_event = ContainerEvent("die", "a", 137)
            self.assertEqual(got, [die_event] if expected is None else
                             [die_event, ContainerEvent("exited", "a", 137, expected)])

    def test_docker_time(self) -> None:
        self.assertEqual(docker_time("2026-12-03T08:42:42.123456Z"), 1796287362.123456)
        self.assertEqual(docker_time("2026-12-03T09:42:42+01:00"), 1796287362.0)
        for nothing in ("", "0001-01-01T00:00:00Z", "yesterday"):
            self.assertIsNone(docker_time(nothing))


class MiscTests(EngineTestCase):
    """ping, endpoint_for, the service."""

    def test_ping(self) -> None:
        eng = self.make()
        self.assertTrue(self.successResultOf(eng.ping()))
        self.client.ping_ok = False
        self.assertFalse(self.successResultOf(eng.ping()))

    def test_networks_ipam_ranges(self) -> None:
        """networks(): every network's IPAM subnets and IP ranges (none for host/none);
        an engine that does not answer fails as unreachable."""
        eng = self.make()
        self.client.network_listing = [
            {"Name": "bridge", "Driver": "bridge",
             "IPAM": {"Config": [{"Subnet": "172.17.0.0/16", "Gateway": "172.17.0.1"}]}},
            {"Name": "lan", "Driver": "macvlan",
             "IPAM": {"Config": [{"Subnet": "192.168.1.0/24", "IPRange": "192.168.1.192/27"},
                                 {"Subnet": "fd00:1::/64"}]}},
            {"Name": "host", "Driver": "host", "IPAM": {"Driver": "default", "Config": []}},
            {"Name": "none", "Driver": "null", "IPAM": {"Config": None}},
        ]
        got = self.successResultOf(eng.networks())
        self.assertEqual(got, [
            NetworkInfo("bridge", "bridge", ("172.17.0.0/16",)),
            NetworkInfo("lan", "macvlan", ("192.168.1.0/24", "fd00:1::/64"), ("192.168.1.192/27",)),
            NetworkInfo("host", "host"),
            NetworkInfo("none", "null"),
        ])
        self.assertEqual(self.client.calls[-1], ("networks", None))
        self.client.networks = lambda: (_ for _ in ()).throw(  # type: ignore[method-assign]
            requests.exceptions.ConnectionError("refused"))
        self.failureResultOf(eng.networks(), EngineUnreachable)

    def test_endpoint_for(self) -> None:
        eng = self.make()
        self.assertEqual(eng.endpoint_for(SlotInfo("local", 9105), SPEC), "tcp:127.0.0.1:9105")
        v6 = HostConfig(name="v6", url="unix:///s", start_port=9100, slots=1, publish_ip="::1")
        eng6 = self.make(host=v6)
        self.assertEqual(eng6.endpoint_for(SlotInfo("v6", 9100), SPEC), "tcp:[::1]:9100")

    def test_service_stops_pool_and_closes_streams(self) -> None:
        eng = self.make()
        svc = EngineService(eng)
        svc.startService()
        self.assertTrue(self.pool.started)
        stream = FakeStream([])
        eng._track(stream, self.client)
        d = svc.stopService()
        end = time.monotonic() + 5
        while not d.called and time.monotonic() < end:
            time.sleep(0.01)
        self.successResultOf(d)
        self.assertTrue(stream.closed)
        self.assertTrue(self.pool.stopped)
        self.failureResultOf(eng.list_own(), EngineError)
