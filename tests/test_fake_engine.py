"""Tests of the in-memory FakeEngine used by broker tests and benchmarks."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.config import HostConfig
from dockerspaces.engine.fake import FakeEngine
from dockerspaces.engine.interface import (
    ContainerEvent,
    ContainerExited,
    EngineUnreachable,
    ImageNotFound,
    NetworkInfo,
    NotReady,
    PortAllocated,
    PullProgress,
    RunOptions,
    SlotInfo,
)
from dockerspaces.spec import JobSpec

SPEC = JobSpec("x", ("img",), "1", 80)
SLOT = SlotInfo("local", 9100, 0)
HOST = HostConfig("local", "unix:///var/run/docker.sock", 9100, 2, gpus=1)


class FakeEngineTests(SynchronousTestCase):
    """The fake's operations, delays and failure injection."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.engine = FakeEngine(self.clock, HOST, pull_delay=3, start_delay=1, ready_delay=2)

    def _started(self) -> str:
        self.clock.advance(0)
        handle = self.successResultOf(self.engine.create(SPEC, SLOT, RunOptions()))
        d = self.engine.start(handle)
        self.clock.advance(1)
        self.successResultOf(d)
        return handle.id

    def test_pull_with_progress_and_delay(self) -> None:
        """A pull takes pull_delay, reports progress, and is not repeated."""
        seen: list[PullProgress] = []
        d = self.engine.ensure_image("img:1", seen.append)
        self.assertNoResult(d)
        self.clock.advance(3)
        self.successResultOf(d)
        self.assertEqual([p.current for p in seen], [0, 100])
        self.successResultOf(self.engine.ensure_image("img:1"))
        self.assertEqual(self.engine.pulls, 1)

    def test_create_start_ready(self) -> None:
        """create, start (after start_delay) and wait_ready (after ready_delay)."""
        cid = self._started()
        self.assertTrue(self.engine.containers[cid].running)
        self.assertEqual(self.engine.starts, 1)
        self.assertEqual(self.engine.containers[cid].gpu, 0)
        d = self.engine.wait_ready(
            self.successResultOf(self.engine.create(SPEC, SlotInfo("local", 9101), RunOptions())),
            self.clock.seconds() + 10,
            RunOptions(),
        )
        self.failureResultOf(d, ContainerExited)  # never started

    def test_ready_deadline(self) -> None:
        """wait_ready fails with NotReady when the deadline comes first."""
        self.clock.advance(0)
        handle = self.successResultOf(self.engine.create(SPEC, SLOT, RunOptions()))
        self.engine.start(handle)
        self.clock.advance(1)
        d = self.engine.wait_ready(handle, self.clock.seconds() + 1, RunOptions())
        self.clock.advance(1)
        self.failureResultOf(d, NotReady)

    def test_crash_emits_die_and_fails_ready(self) -> None:
        """crash() emits a die event and fails a pending wait_ready with the log tail."""
        events: list[ContainerEvent] = []
        self.engine.watch(events.append)
        cid = self._started()
        handle = self.successResultOf(self.engine.create(SPEC, SlotInfo("local", 9101), RunOptions()))
        self.engine.start(handle)
        self.clock.advance(1)
        d = self.engine.wait_ready(handle, self.clock.seconds() + 100, RunOptions())
        self.engine.crash(handle.id, exit_code=1, log_tail="boom")
        err = self.failureResultOf(d, ContainerExited).value
        self.assertEqual(err.log_tail, "boom")
        self.assertEqual(events, [ContainerEvent("die", handle.id, 1)])
        self.assertTrue(self.engine.containers[cid].running)

    def test_port_allocated(self) -> None:
        """A second running container on the same slot port is refused."""
        self._started()
        handle = self.successResultOf(self.engine.create(SPEC, SLOT, RunOptions()))
        d = self.engine.start(handle)
        self.clock.advance(1)
        self.failureResultOf(d, PortAllocated)
        self.assertEqual(len(self.engine.running_on(9100)), 1)

    def test_stop_honours_grace(self) -> None:
        """stop() kills after grace clock seconds, then removes."""
        cid = self._started()
        handle = self.successResultOf(self.engine.create(SPEC, SlotInfo("local", 9101), RunOptions()))
        d = self.engine.stop(self.engine_handle(cid), 5)
        self.clock.advance(4)
        self.assertNoResult(d)
        self.clock.advance(1)
        self.successResultOf(d)
        self.assertNotIn(cid, self.engine.containers)
        self.successResultOf(self.engine.stop(handle, 5))  # not running: at once
        self.assertEqual(self.engine.stops, 2)
        self.successResultOf(self.engine.stop(handle, 0))  # already gone: no-op
        self.assertEqual(self.engine.stops, 2)

    def engine_handle(self, cid: str):
        """An OwnedContainer view of ``cid`` (stop accepts either kind)."""
        return next(o for o in self.successResultOf(self.engine.list_own()) if o.id == cid)

    def test_down(self) -> None:
        """set_down: ping answers False and operations fail with EngineUnreachable."""
        self.engine.set_down(True)
        self.assertFalse(self.successResultOf(self.engine.ping()))
        self.failureResultOf(self.engine.ensure_image("img:1"), EngineUnreachable)
        self.failureResultOf(self.engine.create(SPEC, SLOT, RunOptions()), EngineUnreachable)
        self.failureResultOf(self.engine.list_own(), EngineUnreachable)
        self.engine.set_down(False)
        self.assertTrue(self.successResultOf(self.engine.ping()))

    def test_injected_failures(self) -> None:
        """fail_pull, fail_next_start and fail_next_ready."""
        self.engine.fail_pull("img:1", ImageNotFound("nope"))
        self.failureResultOf(self.engine.ensure_image("img:1"), ImageNotFound)
        self.engine.fail_next_start(PortAllocated("taken"))
        handle = self.successResultOf(self.engine.create(SPEC, SLOT, RunOptions()))
        d = self.engine.start(handle)
        self.clock.advance(1)
        self.failureResultOf(d, PortAllocated)
        d = self.engine.start(handle)
        self.clock.advance(1)
        self.successResultOf(d)
        self.engine.fail_next_ready(ContainerExited("x", 1, "tail"))
        self.failureResultOf(self.engine.wait_ready(handle, 1e9, RunOptions()), ContainerExited)

    def test_list_own_only_ours(self) -> None:
        """list_own returns our instance's containers on this host, running or stopped."""
        ours = self.engine.seed(SPEC, 9100)
        stopped = self.engine.seed(SPEC, 9101, running=False)
        self.engine.seed(SPEC, 9100, instance="other")
        self.engine.seed(SPEC, 9100, host="elsewhere")
        owned = {o.id: o for o in self.successResultOf(self.engine.list_own())}
        self.assertEqual(set(owned), {ours, stopped})
        self.assertEqual(owned[ours].slot_port, 9100)
        self.assertEqual(owned[ours].spec, SPEC)
        self.assertFalse(owned[stopped].running)

    def test_networks(self) -> None:
        """networks: Docker's default bridge unless a test sets ``network_list``;
        EngineUnreachable while down."""
        nets = self.successResultOf(self.engine.networks())
        self.assertIn(NetworkInfo("bridge", "bridge", ("172.17.0.0/16",)), nets)
        self.engine.network_list = [NetworkInfo("slots", "bridge", ("10.77.0.0/24",))]
        self.assertEqual(
            self.successResultOf(self.engine.networks()), [NetworkInfo("slots", "bridge", ("10.77.0.0/24",))]
        )
        self.engine.set_down(True)
        self.failureResultOf(self.engine.networks(), EngineUnreachable)

    def test_endpoint(self) -> None:
        """endpoint_for names the host address and slot port."""
        self.assertEqual(self.engine.endpoint_for(SLOT, SPEC), "tcp:127.0.0.1:9100")

    def test_container_address(self) -> None:
        """container_address answers from ``addresses`` (None when absent); fails while down."""
        self.engine.addresses["c1"] = "172.17.0.5"
        self.assertEqual(self.successResultOf(self.engine.container_address("c1")), "172.17.0.5")
        self.assertIsNone(self.successResultOf(self.engine.container_address("c2")))
        self.engine.set_down(True)
        self.failureResultOf(self.engine.container_address("c1"), EngineUnreachable)
