"""BrokerWorkers (dockerspaces.autoscale.pool) over a fake WorkerControl and FakeEngines."""

from __future__ import annotations

from attrs import frozen
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.autoscale.config import Entry
from dockerspaces.autoscale.policy import WorkerContainer
from dockerspaces.autoscale.pool import BrokerWorkers
from dockerspaces.config import HostConfig
from dockerspaces.engine.fake import FakeEngine
from dockerspaces.engine.interface import ContainerHandle, IEngine, SlotInfo
from dockerspaces.spec import JobSpec

ENTRY = Entry(
    name="jobs",
    image="team/worker",
    tag="1",
    env=(),
    management="http://r:15672",
    amqp="amqp://r/",
    vhost="/",
    queue="jobs",
    user="u",
    password="secret",
    max=3,
)


@frozen
class View:
    id: str
    since: float
    host: str


class FakeControl:
    """Records launches and stops; lists ``views``."""

    def __init__(self) -> None:
        self.views: list[View] = []
        self.launched: list[JobSpec] = []
        self.stopped: list[str] = []
        self.refuse: Exception | None = None

    def launch_worker(self, spec: JobSpec) -> Deferred[ContainerHandle]:
        self.launched.append(spec)
        if self.refuse is not None:
            raise self.refuse
        return succeed(ContainerHandle("c9", "ds-c9", "a", SlotInfo("a", 9100), spec.key, spec))

    def worker_views(self, spec: JobSpec) -> list[View]:
        assert spec == ENTRY.spec
        return list(self.views)

    def stop_worker(self, container_id: str) -> Deferred[None]:
        self.stopped.append(container_id)
        if container_id == "bad":
            raise ValueError("bad is not a running worker (starting)")
        return succeed(None)


class BrokerWorkersTests(SynchronousTestCase):
    def setUp(self) -> None:
        clock = Clock()
        self.a = FakeEngine(clock, HostConfig("a", "unix:///a.sock", 9100, 2))
        self.b = FakeEngine(clock, HostConfig("b", "unix:///b.sock", 9100, 2))
        self.control = FakeControl()
        engines: dict[str, IEngine] = {"a": self.a, "b": self.b}
        self.pool = BrokerWorkers(self.control, engines)

    def test_workers_with_addresses(self) -> None:
        """Each worker's address from its own engine; unknown host or failure: None;
        a known address is not asked again while the worker runs."""
        self.control.views = [
            View("c1", 1.0, "a"),
            View("c2", 2.0, "b"),
            View("c3", 3.0, "gone-host"),
            View("c4", 4.0, "a"),
        ]
        self.a.addresses["c1"] = "172.17.0.2"
        self.b.addresses["c2"] = "172.18.0.2"
        got = self.successResultOf(self.pool.workers(ENTRY))
        self.assertEqual(
            got,
            [
                WorkerContainer("c1", "172.17.0.2", 1.0),
                WorkerContainer("c2", "172.18.0.2", 2.0),
                WorkerContainer("c3", None, 3.0),
                WorkerContainer("c4", None, 4.0),
            ],
        )
        self.a.addresses["c1"] = "changed"
        self.a.addresses["c4"] = "172.17.0.4"
        got = self.successResultOf(self.pool.workers(ENTRY))
        self.assertEqual([w.address for w in got], ["172.17.0.2", "172.18.0.2", None, "172.17.0.4"])
        self.control.views = [View("c2", 2.0, "b")]  # c1 gone: forgotten
        self.successResultOf(self.pool.workers(ENTRY))
        self.a.set_down(True)
        self.control.views = [View("c1", 1.0, "a")]
        got = self.successResultOf(self.pool.workers(ENTRY))
        self.assertEqual(got, [WorkerContainer("c1", None, 1.0)])

    def test_launch_and_stop(self) -> None:
        """launch: the entry's worker spec; a refusal raised becomes a failure; stop:
        stop_worker, errors as failures."""
        self.successResultOf(self.pool.launch(ENTRY))
        self.assertEqual(self.control.launched, [ENTRY.spec])
        self.control.refuse = RuntimeError("no slot")
        self.failureResultOf(self.pool.launch(ENTRY), RuntimeError)
        self.successResultOf(self.pool.stop(ENTRY, "c1"))
        self.failureResultOf(self.pool.stop(ENTRY, "bad"), ValueError)
        self.assertEqual(self.control.stopped, ["c1", "bad"])

    def test_failed_launch_deferred(self) -> None:
        self.control.launch_worker = lambda spec: fail(RuntimeError("503"))  # type: ignore[method-assign]
        self.failureResultOf(self.pool.launch(ENTRY), RuntimeError)
