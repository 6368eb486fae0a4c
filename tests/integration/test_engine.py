"""The real Engine against the real Docker engine on this machine (unix socket)."""

from __future__ import annotations

import socket
import time
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from dockerspaces.config import HostConfig
from dockerspaces.engine.engine import Engine, EngineService
from dockerspaces.engine.interface import (
    LABEL_HOST,
    LABEL_INSTANCE,
    LABEL_KEY,
    LABEL_SPEC,
    ContainerEvent,
    ContainerExited,
    ContainerHandle,
    ImageNotFound,
    NotReady,
    PortAllocated,
    RunOptions,
    SlotInfo,
)
from dockerspaces.spec import JobSpec, parse_route

from .dockerutil import (
    DOCKER_URL,
    TEST_LABEL,
    docker_available,
    docker_client,
    free_ports,
    http_get,
    remove_instance_containers,
    unique_instance,
)
from .images import ensure_test_images

reactor: Any = _reactor


def job(segment: str) -> JobSpec:
    """Parse a route segment that must be a job."""
    spec = parse_route(segment)
    assert isinstance(spec, JobSpec)
    return spec


class EngineIntegrationBase(TestCase):
    """An Engine for a fresh instance name, its service started; cleanup in tearDown."""

    skip = docker_available()
    timeout = 60
    slots = 3

    def setUp(self) -> None:
        ensure_test_images()
        self.instance = unique_instance("eng")
        self.ports = free_ports(self.slots)
        self.host = HostConfig(name="local", url=DOCKER_URL, start_port=self.ports[0], slots=self.slots)
        self.engine = self.make_engine()
        self.addCleanup(remove_instance_containers, self.instance)

    def make_engine(self, **kw: Any) -> Engine:
        engine = Engine(reactor, self.host, self.instance, "missing", **kw)
        svc = EngineService(engine)
        svc.startService()
        self.addCleanup(svc.stopService)
        return engine

    def slot(self, i: int = 0, gpu: int | None = None) -> SlotInfo:
        return SlotInfo("local", self.ports[i], gpu)

    async def launch(self, spec: JobSpec, i: int = 0, deadline: float = 10.0) -> ContainerHandle:
        await self.engine.ensure_image(spec.ref)
        h = await self.engine.create(spec, self.slot(i), RunOptions())
        await self.engine.start(h)
        await self.engine.wait_ready(h, reactor.seconds() + deadline, RunOptions())
        return h

    def inspect(self, cid: str) -> dict[str, Any]:
        c = docker_client()
        try:
            return c.inspect_container(cid)  # type: ignore[no-any-return]
        finally:
            c.close()


class LifecycleTests(EngineIntegrationBase):
    """create -> start -> ready -> page -> stop, and the ways that goes wrong."""

    def test_page_env_and_stop(self) -> Deferred[None]:
        async def go() -> None:
            spec = job("x:selmaproject:tts:777:5002:GREETING=hello%20world;B=2")
            h = await self.launch(spec)
            status, body = await deferToThread(http_get, "127.0.0.1", self.ports[0], "/")
            self.assertEqual(status, 200)
            self.assertIn(b"GREETING=hello world", body)
            self.assertIn(f"hostname={h.id[:12]}".encode(), body)
            info = self.inspect(h.id)
            self.assertEqual(info["Config"]["Labels"][LABEL_INSTANCE], self.instance)
            self.assertEqual(info["HostConfig"]["RestartPolicy"]["Name"], "")
            await self.engine.stop(h, 0)
            self.assertEqual(await self.engine.list_own(), [])
            await self.engine.stop(h, 0)  # idempotent

        return ensureDeferred(go())

    def test_delayed_listen_is_not_ready_early(self) -> Deferred[None]:
        async def go() -> None:
            spec = job("x:dockerspaces-test:web:1:8080:DELAY=1.5")
            t0 = time.monotonic()
            await self.launch(spec)
            self.assertGreaterEqual(time.monotonic() - t0, 1.4)

        return ensureDeferred(go())

    def test_healthcheck_must_be_healthy(self) -> Deferred[None]:
        async def go() -> None:
            spec = job("x:dockerspaces-test:health:1:8080:HEALTH_DELAY=1")
            t0 = time.monotonic()
            h = await self.launch(spec)
            self.assertGreaterEqual(time.monotonic() - t0, 0.9)
            self.assertEqual(self.inspect(h.id)["State"]["Health"]["Status"], "healthy")

        return ensureDeferred(go())

    def test_exit_at_once(self) -> Deferred[None]:
        async def go() -> None:
            spec = job("x:dockerspaces-test:exit:1:8080")
            t0 = time.monotonic()
            with self.assertRaises(ContainerExited) as cm:
                await self.launch(spec, deadline=20)
            self.assertLess(time.monotonic() - t0, 5)
            self.assertEqual(cm.exception.exit_code, 3)
            self.assertIn("exit-image: starting", cm.exception.log_tail)
            self.assertIn("fatal error, exiting with 3", cm.exception.log_tail)

        return ensureDeferred(go())

    def test_never_listens(self) -> Deferred[None]:
        async def go() -> None:
            spec = job("x:dockerspaces-test:deaf:1:8080")
            t0 = time.monotonic()
            with self.assertRaises(NotReady) as cm:
                await self.launch(spec, deadline=1.5)
            took = time.monotonic() - t0
            self.assertGreaterEqual(took, 1.4)
            self.assertLess(took, 4)
            self.assertIn(str(self.ports[0]), str(cm.exception))
            # docker-proxy accepted the connection and closed it: that is not ready.
            self.assertIn("accepted then closed", str(cm.exception))

        return ensureDeferred(go())

    def test_worker_ready_after_two_seconds(self) -> Deferred[None]:
        async def go() -> None:
            spec = job("x:dockerspaces-test:worker:1:3:JOB=9")
            t0 = time.monotonic()
            h = await self.launch(spec)
            self.assertGreaterEqual(time.monotonic() - t0, 1.9)
            info = self.inspect(h.id)
            self.assertEqual(info["HostConfig"]["PortBindings"] or {}, {})
            self.assertIn("JOB=9", info["Config"]["Env"])

        return ensureDeferred(go())

    def test_port_allocated(self) -> Deferred[None]:
        async def go() -> None:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.ports[1]))
            s.listen(1)
            self.addCleanup(s.close)
            spec = job("x:selmaproject:tts:777:5002")
            await self.engine.ensure_image(spec.ref)
            h = await self.engine.create(spec, self.slot(1), RunOptions())
            with self.assertRaises(PortAllocated):
                await self.engine.start(h)
            self.assertEqual(await self.engine.list_own(), [])  # removed again

        return ensureDeferred(go())

    def test_pull_never_missing_image(self) -> Deferred[None]:
        async def go() -> None:
            engine = self.make_engine()
            engine.pull_policy = "never"
            with self.assertRaises(ImageNotFound):
                await engine.ensure_image("dockerspaces-test/nonexistent:1")

        return ensureDeferred(go())

    def test_gpu_device_request_on_created_container(self) -> Deferred[None]:
        async def go() -> None:
            spec = job("x:selmaproject:tts:777:5002")
            h = await self.engine.create(spec, self.slot(2, gpu=1), RunOptions())
            reqs = self.inspect(h.id)["HostConfig"]["DeviceRequests"]
            self.assertEqual(len(reqs), 1)
            self.assertEqual(reqs[0]["Driver"], "nvidia")
            self.assertEqual(reqs[0]["DeviceIDs"], ["1"])
            self.assertEqual(reqs[0]["Capabilities"], [["gpu"]])
            await self.engine.stop(h, 0)

        return ensureDeferred(go())


class StopTests(EngineIntegrationBase):
    """SIGTERM honoured; SIGKILL after the grace time."""

    def test_sigterm_honoured(self) -> Deferred[None]:
        async def go() -> None:
            h = await self.launch(job("x:dockerspaces-test:worker:1:3"))
            t0 = time.monotonic()
            await self.engine.stop(h, 5)
            self.assertLess(time.monotonic() - t0, 2.5)
            self.assertEqual(await self.engine.list_own(), [])

        return ensureDeferred(go())

    def test_sigkill_after_grace(self) -> Deferred[None]:
        async def go() -> None:
            h = await self.launch(job("x:dockerspaces-test:worker:1:3:IGNORE_TERM=1"))
            t0 = time.monotonic()
            await self.engine.stop(h, 1)
            took = time.monotonic() - t0
            self.assertGreaterEqual(took, 0.9)
            self.assertLess(took, 4)
            self.assertEqual(await self.engine.list_own(), [])

        return ensureDeferred(go())


class WatchAndAdoptTests(EngineIntegrationBase):
    """Events from outside, and finding our containers after a restart."""

    def test_watch_reports_kill_from_outside(self) -> Deferred[None]:
        async def go() -> None:
            events: list[ContainerEvent] = []
            self.engine.watch(events.append)
            spec = job("x:dockerspaces-test:worker:1:3")
            h = await self.engine.create(spec, self.slot(0), RunOptions())
            await self.engine.start(h)
            await deferLater(reactor, 0.3)
            c = docker_client()
            try:
                c.kill(h.id)
            finally:
                c.close()
            for _ in range(100):
                if any(e.kind == "die" and e.container_id == h.id for e in events):
                    break
                await deferLater(reactor, 0.05)
            die = [e for e in events if e.kind == "die" and e.container_id == h.id]
            self.assertEqual(len(die), 1)
            self.assertEqual(die[0].exit_code, 137)

        return ensureDeferred(go())

    def test_list_own_after_restart_ignores_others(self) -> Deferred[None]:
        async def go() -> None:
            spec = job("x:selmaproject:tts:777:5002:A=1")
            h = await self.launch(spec)
            # Someone else's container: same host name, another instance.
            other = unique_instance("other")
            self.addCleanup(remove_instance_containers, other)
            c = docker_client()
            try:
                c.create_container(
                    "dockerspaces-test/worker:1",
                    labels={LABEL_INSTANCE: other, LABEL_HOST: "local", TEST_LABEL: "1"},
                )
            finally:
                c.close()
            fresh = self.make_engine()
            own = await fresh.list_own()
            self.assertEqual([o.id for o in own], [h.id])
            # the spec label holds no env values; key and display labels name the key
            self.assertEqual(own[0].spec, JobSpec(spec.mode, spec.name, spec.tag, spec.port))
            self.assertEqual(own[0].labels[LABEL_KEY], spec.key)
            self.assertNotIn("=", own[0].labels[LABEL_SPEC])
            self.assertEqual(own[0].slot_port, self.ports[0])
            self.assertTrue(own[0].running)
            await fresh.stop(own[0], 0)
            self.assertEqual(await fresh.list_own(), [])

        return ensureDeferred(go())
