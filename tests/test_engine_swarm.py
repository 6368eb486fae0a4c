"""The swarm engine (dockerspaces.engine.swarm): nodes and their labels, the service a
slot's container becomes, readiness from the service's task, stop, adoption, the task
poller's events and ping, against a fake manager (tests/swarm_fake.py), an inline pool
and a memory reactor (tests/test_engine_harness.py)."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.engine.auth import Credentials, RegistryAuth
from dockerspaces.engine.interface import (
    LABEL_DISPLAY,
    LABEL_HOST,
    LABEL_INSTANCE,
    LABEL_KEY,
    LABEL_SLOT,
    LABEL_SPEC,
    ContainerEvent,
    ContainerExited,
    ContainerHandle,
    ContainerRemoved,
    EngineError,
    EngineUnreachable,
    IEngine,
    ImageNotFound,
    NetworkInfo,
    NotReady,
    PortAllocated,
    PullProgress,
    RunOptions,
    SlotInfo,
)
from dockerspaces.engine.swarm import (
    SwarmManager,
    SwarmManagerService,
    SwarmNodeEngine,
    host_for_node,
    label_problems,
    node_from_docker,
    slots_and_gpus,
    task_from_docker,
)
from dockerspaces.spec import JobSpec

from .swarm_fake import NODE_ID, FakeSwarmClient, node_json
from .test_engine_harness import SPEC, WORKER, InlinePool, Reactor, answer

PRIVATE = JobSpec(mode="x", name=("registry.example.com:5000", "team", "app"), tag="2", port=8080)


class NodeTests(SynchronousTestCase):
    """NodeInfo from the node JSON; slots and GPUs from its labels."""

    def test_node_from_docker(self) -> None:
        n = node_from_docker(node_json(labels={"dockerspaces.slots": "4", "zone": "a"}))
        self.assertEqual(
            (n.id, n.hostname, n.address, n.state, n.availability, n.role),
            (NODE_ID, "gpu1", "10.0.0.7", "ready", "active", "worker"),
        )
        self.assertEqual(n.labels, {"dockerspaces.slots": "4", "zone": "a"})
        self.assertTrue(n.ready)

    def test_ready_needs_ready_and_active(self) -> None:
        self.assertFalse(node_from_docker(node_json(availability="drain")).ready)
        self.assertFalse(node_from_docker(node_json(availability="pause")).ready)
        self.assertFalse(node_from_docker(node_json(state="down")).ready)
        self.assertFalse(node_from_docker({"ID": "x"}).ready)  # state unknown

    def test_manager_with_zero_address(self) -> None:
        """A manager that reports Status.Addr 0.0.0.0 is reached at its ManagerStatus
        address."""
        raw = node_json(addr="0.0.0.0", role="manager")
        raw["ManagerStatus"] = {"Leader": True, "Reachability": "reachable", "Addr": "10.0.0.2:2377"}
        self.assertEqual(node_from_docker(raw).address, "10.0.0.2")
        raw["ManagerStatus"]["Addr"] = "[fd00::2]:2377"
        self.assertEqual(node_from_docker(raw).address, "fd00::2")

    def test_slots_and_gpus_from_labels(self) -> None:
        def node(**labels: str) -> Any:
            return node_from_docker(node_json(labels={f"dockerspaces.{k}": v for k, v in labels.items()}))

        self.assertEqual(slots_and_gpus(node(), 2, 0), (2, 0))
        self.assertEqual(slots_and_gpus(node(slots="4", gpus="2"), 2, 0), (4, 2))
        self.assertEqual(slots_and_gpus(node(slots="0"), 2, 0), (0, 0))
        self.assertEqual(slots_and_gpus(node(slots="3"), 2, -1), (3, 3))  # --gpu true: one per slot
        self.assertEqual(slots_and_gpus(node(slots="many", gpus="-1"), 2, 1), (2, 1))
        self.assertEqual(label_problems(node(slots="4")), ())
        problems = label_problems(node(slots="many", gpus="-1"))
        self.assertEqual(len(problems), 2)
        self.assertIn("dockerspaces.slots='many' is not a whole number >= 0; using the default", problems[0])
        self.assertIn("dockerspaces.gpus='-1'", problems[1])

    def test_host_for_node(self) -> None:
        n = node_from_docker(node_json())
        h = host_for_node(n, "tcp://manager:2375", 9100, 3, 1)
        self.assertEqual(
            (h.name, h.address, h.slots, h.gpus, h.start_port), ("swarm-gpu1", "10.0.0.7", 3, 1, 9100)
        )
        self.assertEqual(
            host_for_node(n, "tcp://m:2375", 9100, 1, 0, name="swarm-gpu1-2").name, "swarm-gpu1-2"
        )

    def test_task_from_docker(self) -> None:
        """Exit codes only for a task that had a container; addresses without prefix."""
        t = task_from_docker(
            {
                "ID": "t1",
                "ServiceID": "s1",
                "NodeID": "n1",
                "Version": {"Index": 23},
                "Status": {
                    "Timestamp": "2026-12-04T05:05:57.5Z",
                    "State": "failed",
                    "Err": "task: non-zero exit (3)",
                    "ContainerStatus": {"ContainerID": "c883", "PID": 0, "ExitCode": 3},
                },
                "DesiredState": "shutdown",
                "NetworksAttachments": [{"Addresses": ["10.0.1.3/24"]}],
            }
        )
        self.assertEqual((t.state, t.exit_code, t.version, t.addresses), ("failed", 3, 23, ("10.0.1.3",)))
        self.assertTrue(t.terminal)
        self.assertAlmostEqual(t.timestamp or 0, 1796360757.5)
        rejected = task_from_docker(
            {"Status": {"State": "rejected", "ContainerStatus": {"ContainerID": "", "ExitCode": 0}}}
        )
        self.assertIsNone(rejected.exit_code)


class SwarmTestCase(SynchronousTestCase):
    """A manager and one node engine over a FakeSwarmClient, an InlinePool and a Reactor."""

    def setUp(self) -> None:
        self.client = FakeSwarmClient()
        self.reactor = Reactor()
        self.pool = InlinePool()
        self.manager = SwarmManager(
            self.reactor, "tcp://manager:2375", "inst1", pool=self.pool, client_factory=lambda: self.client
        )
        self.events: list[ContainerEvent] = []
        self.engine = self.node_engine()
        self.as_iengine: IEngine = self.engine  # mypy checks that it is one

    def node_engine(self, auth: RegistryAuth | None = None, stop_grace: float = 10.0) -> SwarmNodeEngine:
        node = node_from_docker(node_json())
        host = host_for_node(node, "tcp://manager:2375", 9100, 2, 1)
        engine = SwarmNodeEngine(self.manager, node, host, stop_grace=stop_grace, auth=auth)
        engine.watch(self.events.append)
        return engine

    def create(
        self, spec: JobSpec = SPEC, slot: SlotInfo | None = None, options: RunOptions | None = None
    ) -> ContainerHandle:
        d = self.engine.create(spec, slot or SlotInfo("swarm-gpu1", 9101), options or RunOptions())
        return self.successResultOf(d)

    def body(self) -> dict[str, Any]:
        """The last POST /services/create body."""
        return self.client.posted[-1][1]


class CreateTests(SwarmTestCase):
    """create(): the service a slot's container becomes."""

    def test_service_for_a_slot(self) -> None:
        opts = RunOptions(env=(("PUBLIC_PATH", "/x/"),), command=("serve", "--port", "5002"))
        h = self.create(options=opts)
        url, body, headers = self.client.posted[-1]
        self.assertEqual(url, "http+docker://localhost/v1.41/services/create")
        self.assertNotIn("X-Registry-Auth", headers)  # nothing known for Docker Hub
        self.assertEqual(headers["Content-Type"], "application/json")
        labels = {
            LABEL_INSTANCE: "inst1",
            LABEL_HOST: "swarm-gpu1",
            LABEL_SLOT: "9101",
            LABEL_KEY: SPEC.key,
            LABEL_DISPLAY: SPEC.display,
            LABEL_SPEC: "x:selmaproject:tts:777:5002",  # no env values
        }
        self.assertEqual(body["Labels"], labels)
        self.assertEqual(body["Mode"], {"replicated": {"Replicas": 1}})
        self.assertEqual(
            body["EndpointSpec"],
            {
                "Ports": [
                    {"PublishedPort": 9101, "TargetPort": 5002, "Protocol": "tcp", "PublishMode": "host"}
                ]
            },
        )
        tt = body["TaskTemplate"]
        self.assertEqual(tt["Placement"], {"Constraints": [f"node.id=={NODE_ID}"]})
        self.assertEqual(tt["RestartPolicy"]["Condition"], "none")
        self.assertNotIn("Resources", tt)
        self.assertNotIn("Networks", tt)
        cs = tt["ContainerSpec"]
        self.assertEqual(cs["Image"], "selmaproject/tts:777")
        self.assertEqual(cs["Env"], ["A=1", "PUBLIC_PATH=/x/"])
        self.assertEqual(cs["Args"], ["serve", "--port", "5002"])  # the CMD; the entrypoint stays
        self.assertIsNone(cs["Command"])  # null: the image's entrypoint
        self.assertEqual(cs["Labels"], labels)
        self.assertEqual(cs["StopGracePeriod"], 10 * 10**9)
        self.assertEqual(h.id, next(iter(self.client.services_by_id)))
        self.assertEqual(
            (h.host, h.slot, h.key, h.spec), ("swarm-gpu1", SlotInfo("swarm-gpu1", 9101), SPEC.key, SPEC)
        )
        self.assertRegex(h.name, r"^ds-inst1-swarm-gpu1-9101-[0-9a-f]{6}$")
        self.assertEqual(body["Name"], h.name)
        self.assertIn(h.id, self.manager.followed)

    def test_run_options(self) -> None:
        opts = RunOptions(
            volumes=("/data:/data:ro", "cache:/cache"),
            mem_limit="2g",
            nano_cpus=1_500_000_000,
            network="dsnet",
        )
        self.create(options=opts)
        tt = self.body()["TaskTemplate"]
        self.assertEqual(tt["Resources"], {"Limits": {"NanoCPUs": 1_500_000_000, "MemoryBytes": 2 * 1024**3}})
        self.assertEqual(tt["Networks"], [{"Target": "dsnet"}])
        mounts = tt["ContainerSpec"]["Mounts"]
        self.assertEqual(
            [(m["Type"], m["Source"], m["Target"], m["ReadOnly"]) for m in mounts],
            [("bind", "/data", "/data", True), ("volume", "cache", "/cache", False)],
        )

    def test_gpu_only_when_the_slot_has_one(self) -> None:
        self.create(slot=SlotInfo("swarm-gpu1", 9100, gpu=0))
        self.assertEqual(
            self.body()["TaskTemplate"]["Resources"],
            {"Reservations": {"GenericResources": [{"DiscreteResourceSpec": {"Kind": "gpu", "Value": 1}}]}},
        )
        self.create(slot=SlotInfo("swarm-gpu1", 9100, gpu=0), options=RunOptions(gpu=False))
        self.assertNotIn("Resources", self.body()["TaskTemplate"])
        self.create(slot=SlotInfo("swarm-gpu1", 9100))
        self.assertNotIn("Resources", self.body()["TaskTemplate"])

    def test_worker_publishes_nothing(self) -> None:
        self.create(spec=WORKER)
        self.assertNotIn("EndpointSpec", self.body())
        self.assertEqual(self.body()["TaskTemplate"]["ContainerSpec"]["Env"], ["JOB=7"])

    def test_registry_credentials_only_for_their_registry(self) -> None:
        auth = RegistryAuth({"registry.example.com:5000": Credentials("bob", "pw")})
        self.engine = self.node_engine(auth=auth)
        self.create(spec=PRIVATE)
        header = self.client.posted[-1][2]["X-Registry-Auth"]
        sent = json.loads(base64.urlsafe_b64decode(header))
        self.assertEqual(
            sent, {"username": "bob", "password": "pw", "serveraddress": "registry.example.com:5000"}
        )
        self.create(spec=SPEC)  # Docker Hub: no credentials known, none sent
        self.assertNotIn("X-Registry-Auth", self.client.posted[-1][2])

    def test_stop_grace_zero(self) -> None:
        self.engine = self.node_engine(stop_grace=0)
        self.create()
        self.assertEqual(self.body()["TaskTemplate"]["ContainerSpec"]["StopGracePeriod"], 0)

    def test_service_names_valid_and_unique(self) -> None:
        node = node_from_docker(node_json(hostname="node.example.com"))
        long_name = "swarm-" + "x" * 80
        host = host_for_node(node, "tcp://m:2375", 9100, 1, 0, name=long_name)
        eng = SwarmNodeEngine(self.manager, node, host)
        a, b = eng.service_name(SlotInfo(long_name, 9100)), eng.service_name(SlotInfo(long_name, 9100))
        self.assertNotEqual(a, b)
        self.assertLessEqual(len(a), 63)
        self.assertRegex(a, r"^ds-inst1-swarm-x+-9100-[0-9a-f]{6}$")
        host2 = host_for_node(node, "tcp://m:2375", 9100, 1, 0)
        name = SwarmNodeEngine(self.manager, node, host2).service_name(SlotInfo("x", 9100))
        self.assertRegex(name, r"^ds-inst1-swarm-node-example-com-9100-[0-9a-f]{6}$")

    def test_name_conflict(self) -> None:
        self.client.create_error = (409, "rpc error: code = AlreadyExists desc = name conflicts")
        f = self.failureResultOf(
            self.engine.create(SPEC, SlotInfo("swarm-gpu1", 9100), RunOptions()), EngineError
        )
        self.assertIn("is already in use on swarm-gpu1", str(f.value))
        self.assertEqual(self.manager.followed, frozenset())

    def test_other_errors(self) -> None:
        self.client.create_error = (400, "invalid mount config")
        f = self.failureResultOf(
            self.engine.create(SPEC, SlotInfo("swarm-gpu1", 9100), RunOptions()), EngineError
        )
        self.assertIn("creating a service for x:selmaproject/tts:777:5002", str(f.value))
        self.assertIn("invalid mount config", str(f.value))
        self.client.create_error = None
        self.client.unreachable = True
        self.failureResultOf(
            self.engine.create(SPEC, SlotInfo("swarm-gpu1", 9100), RunOptions()), EngineUnreachable
        )

    def test_bad_memory_size(self) -> None:
        d = self.engine.create(SPEC, SlotInfo("swarm-gpu1", 9100), RunOptions(mem_limit="lots"))
        self.failureResultOf(d, EngineError)
        self.assertEqual(self.client.posted, [])

    def test_shm_size_ignored_and_logged_once(self) -> None:
        from twisted.logger import capturedLogs

        with capturedLogs() as seen:
            self.create(options=RunOptions(shm_size="1g"))
            self.create(options=RunOptions(shm_size="1g"))
        self.assertNotIn("ShmSize", json.dumps(self.body()))
        warnings = [e for e in seen if "shm_size" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertEqual(warnings[0]["host"], "swarm-gpu1")

    def test_ensure_image_and_start_do_nothing(self) -> None:
        progress: list[PullProgress] = []
        self.successResultOf(self.engine.ensure_image("selmaproject/tts:777", progress.append))
        self.assertEqual(
            progress, [PullProgress("selmaproject/tts:777", "pulled on the node when its task starts")]
        )
        self.successResultOf(self.engine.ensure_image("selmaproject/tts:777"))
        h = self.create()
        calls = len(self.client.calls)
        self.successResultOf(self.engine.start(h))
        self.assertEqual(len(self.client.calls), calls)


class WaitReadyTests(SwarmTestCase):
    """wait_ready(): the service's task, the probe at the node's address, the deadline."""

    def answer(self, data: bytes | None) -> StringTransport:
        host, port, _factory, _timeout, _bind = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("10.0.0.7", 9101))
        return answer(self.reactor, data)

    def test_pending_preparing_running_probed(self) -> None:
        h = self.create()
        d = self.engine.wait_ready(h, 10.0, RunOptions(ready_path="/health"))
        self.assertNoResult(d)
        self.assertEqual(self.client.calls[-1], ("tasks", {"service": [h.id]}))
        self.client.set_task(h.id, "preparing")
        self.reactor.advance(0.25)
        self.assertEqual(self.reactor.tcpClients, [])  # no probe before the task runs
        self.client.set_task(h.id, "running")
        self.reactor.advance(0.25)
        tr = self.answer(b"HTTP/1.1 404 Not Found\r\n\r\n")
        self.assertTrue(tr.value().startswith(b"GET /health HTTP/1.1\r\n"))
        self.successResultOf(d)

    def test_not_ready_until_an_http_answer(self) -> None:
        h = self.create()
        self.client.set_task(h.id, "running")
        d = self.engine.wait_ready(h, 10.0, RunOptions())
        self.answer(None)  # accepted, then closed
        self.assertNoResult(d)
        self.reactor.advance(0.25)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.answer(b"HTTP/1.0 200 OK\r\n\r\n")
        self.successResultOf(d)

    def test_failed_task_with_exit_code_and_log_tail(self) -> None:
        h = self.create()
        self.client.set_task(h.id, "failed", exit_code=3, err="task: non-zero exit (3)")
        self.client.logs[h.id] = [b"starting\n", b"fatal: no model\n"]
        f = self.failureResultOf(self.engine.wait_ready(h, 10.0, RunOptions()), ContainerExited)
        self.assertEqual(f.value.exit_code, 3)
        self.assertEqual(f.value.log_tail, "starting\nfatal: no model")
        self.assertIn("exited with code 3 while starting: task: non-zero exit (3)", str(f.value))
        self.assertIn(
            (
                "service_logs",
                (h.id, {"stdout": True, "stderr": True, "tail": 20, "timestamps": False, "is_tty": False}),
            ),
            self.client.calls,
        )

    def test_missing_image_is_image_not_found(self) -> None:
        h = self.create()
        self.client.set_task(h.id, "rejected", err="No such image: selmaproject/tts:777")
        f = self.failureResultOf(self.engine.wait_ready(h, 10.0, RunOptions()), ImageNotFound)
        self.assertIn("No such image", str(f.value))
        self.assertNotIn("service_logs", self.client.names())  # no container, no log

    def test_port_taken_by_something_else(self) -> None:
        h = self.create()
        self.client.set_task(
            h.id,
            "failed",
            exit_code=128,
            err="starting container failed: ... listen tcp4 0.0.0.0:9101: bind: address already in use",
        )
        f = self.failureResultOf(self.engine.wait_ready(h, 10.0, RunOptions()), PortAllocated)
        self.assertIn("port 9101 on swarm-gpu1", str(f.value))

    def test_removed_from_outside(self) -> None:
        h = self.create()
        d = self.engine.wait_ready(h, 10.0, RunOptions())
        del self.client.services_by_id[h.id]
        self.reactor.advance(0.25)
        f = self.failureResultOf(d, ContainerRemoved)
        self.assertIn("removed from outside", str(f.value))
        h2 = self.create()
        self.client.set_task(h2.id, "shutdown", exit_code=143)
        self.failureResultOf(self.engine.wait_ready(h2, 10.0, RunOptions()), ContainerRemoved)

    def test_deadline_says_the_node_pulls(self) -> None:
        h = self.create()
        self.client.set_task(h.id, "preparing")
        d = self.engine.wait_ready(h, 1.0, RunOptions())
        self.reactor.advance(0.75)
        self.assertNoResult(d)
        self.reactor.advance(0.25)
        f = self.failureResultOf(d, NotReady)
        self.assertIn(
            "not ready on 10.0.0.7:9101 by the deadline: the node is pulling the image", str(f.value)
        )

    def test_deadline_while_pending_gives_the_scheduler_reason(self) -> None:
        h = self.create()
        self.client.set_task(h.id, "pending", err="no suitable node (insufficient resources on 1 node)")
        d = self.engine.wait_ready(h, 0.5, RunOptions())
        self.reactor.pump([0.25, 0.25])
        f = self.failureResultOf(d, NotReady)
        self.assertIn("its task is pending: no suitable node (insufficient resources", str(f.value))

    def test_worker_ready_when_still_running(self) -> None:
        h = self.create(spec=WORKER)
        self.client.set_task(h.id, "running")
        d = self.engine.wait_ready(h, 10.0, RunOptions())
        self.reactor.pump([0.25] * 7)
        self.assertNoResult(d)  # 1.75 s
        self.reactor.advance(0.25)
        self.successResultOf(d)
        self.assertEqual(self.reactor.tcpClients, [])  # a worker is never probed

    def test_worker_that_exits(self) -> None:
        h = self.create(spec=WORKER)
        self.client.set_task(h.id, "running")
        d = self.engine.wait_ready(h, 10.0, RunOptions())
        self.reactor.advance(0.25)
        self.client.set_task(h.id, "complete", exit_code=0)
        self.reactor.advance(0.25)
        f = self.failureResultOf(d, ContainerExited)
        self.assertEqual(f.value.exit_code, 0)


class StopTests(SwarmTestCase):
    """stop(): remove the service, wait until its task's container is gone."""

    def test_removes_and_waits_for_the_task(self) -> None:
        h = self.create()
        self.client.set_task(h.id, "running")
        self.client.removal_polls = 2
        d = self.engine.stop(h, 0)
        self.assertNoResult(d)
        self.assertNotIn(h.id, self.manager.followed)
        self.assertIn(("remove_service", h.id), self.client.calls)
        self.assertEqual(
            self.client.calls[-1],
            ("tasks", {"label": ["dockerspaces.instance=inst1", "dockerspaces.host=swarm-gpu1"]}),
        )
        self.reactor.advance(0.25)
        self.assertNoResult(d)
        self.reactor.advance(0.25)
        self.successResultOf(d)
        self.assertEqual(self.client.names().count("tasks"), 3)

    def test_stopped_task_no_longer_holds_the_port(self) -> None:
        """A removed service's task already shut down does not make stop wait."""
        h = self.create()
        self.client.set_task(h.id, "shutdown", exit_code=0)
        self.client.removal_polls = 5
        self.successResultOf(self.engine.stop(h, 0))

    def test_already_gone(self) -> None:
        h = self.create()
        self.successResultOf(self.engine.stop(h, 0))
        self.successResultOf(self.engine.stop(h, 0))
        self.assertEqual(self.client.names().count("remove_service"), 2)

    def test_bounded_by_grace_plus_margin(self) -> None:
        h = self.create()
        self.client.set_task(h.id, "running")
        self.client.removal_polls = 10**6
        d = self.engine.stop(h, 5)  # stop_grace 10 s is longer: 25 s in all
        self.reactor.pump([0.25] * 99)
        self.assertNoResult(d)
        self.reactor.advance(0.25)
        f = self.failureResultOf(d, EngineError)
        self.assertIn("still runs 25s after the service was removed", str(f.value))

    def test_unreachable(self) -> None:
        h = self.create()
        self.client.unreachable = True
        self.failureResultOf(self.engine.stop(h, 0), EngineUnreachable)


class ListOwnTests(SwarmTestCase):
    """list_own(): this instance's services on this node, read back from their labels."""

    def labels(self, host: str = "swarm-gpu1", instance: str = "inst1", slot: str = "9101") -> dict[str, str]:
        return {
            LABEL_INSTANCE: instance,
            LABEL_HOST: host,
            LABEL_SLOT: slot,
            LABEL_KEY: SPEC.key,
            LABEL_DISPLAY: SPEC.display,
            LABEL_SPEC: "x:selmaproject:tts:777:5002",
        }

    def test_adoption(self) -> None:
        running = self.client.add_service("ds-inst1-swarm-gpu1-9101-abcdef", self.labels())
        ended = self.client.add_service("ds-inst1-swarm-gpu1-9100-012345", self.labels(slot="9100"), "failed")
        self.client.add_service("other-host", self.labels(host="swarm-gpu2"))
        self.client.add_service("other-instance", self.labels(instance="inst2"))
        owned = self.successResultOf(self.engine.list_own())
        self.assertEqual([o.id for o in owned], [running, ended])
        first = owned[0]
        self.assertEqual(
            (first.name, first.running, first.slot_port), ("ds-inst1-swarm-gpu1-9101-abcdef", True, 9101)
        )
        self.assertEqual(first.spec, JobSpec("x", ("selmaproject", "tts"), "777", 5002))
        self.assertEqual(first.labels, self.labels())
        self.assertFalse(owned[1].running)
        self.assertEqual(self.manager.followed, frozenset({running}))  # only running ones are watched
        self.assertIn(
            ("services", {"label": ["dockerspaces.instance=inst1", "dockerspaces.host=swarm-gpu1"]}),
            self.client.calls,
        )

    def test_the_filter_is_not_trusted_alone(self) -> None:
        self.client.add_service("x", self.labels(host="swarm-gpu2"))
        self.client.services = lambda filters=None: list(self.client.services_by_id.values())  # type: ignore[method-assign]
        self.assertEqual(self.successResultOf(self.engine.list_own()), [])

    def test_unparsable_spec_label(self) -> None:
        labels = dict(self.labels(), **{LABEL_SPEC: "nonsense", LABEL_SLOT: "x"})
        self.client.add_service("x", labels)
        (owned,) = self.successResultOf(self.engine.list_own())
        self.assertIsNone(owned.spec)
        self.assertIsNone(owned.slot_port)


class PollerTests(SwarmTestCase):
    """The manager's task poller: die and exited once per service that ended."""

    def start(self) -> None:
        self.manager.start_pool()
        self.addCleanup(self.manager._loop.stop)

    def test_no_calls_while_nothing_is_followed(self) -> None:
        self.start()
        self.reactor.pump([1.0] * 3)
        self.assertEqual(self.client.calls, [])

    def test_die_and_exited_once(self) -> None:
        h = self.create()
        self.client.set_task(h.id, "running")
        self.start()
        self.reactor.advance(1.0)
        self.assertEqual(self.events, [])
        self.assertEqual(
            self.client.calls[-2:],
            [
                ("services", {"label": ["dockerspaces.instance=inst1"]}),
                ("tasks", {"label": ["dockerspaces.instance=inst1"]}),
            ],
        )
        self.client.set_task(
            h.id, "failed", exit_code=137, err="task: non-zero exit (137)", timestamp="2026-12-04T05:06:00.5Z"
        )
        self.reactor.advance(1.0)
        self.assertEqual(
            self.events,
            [ContainerEvent("die", h.id, 137), ContainerEvent("exited", h.id, 137, 1796360760.5)],
        )
        calls = len(self.client.calls)
        self.reactor.pump([1.0] * 3)
        self.assertEqual(len(self.events), 2)
        self.assertEqual(len(self.client.calls), calls)  # nothing left to follow

    def test_one_listing_for_every_node(self) -> None:
        """Services of two nodes: one services() and one tasks() call per poll, each
        end reported to its own node's engine."""
        other_node = node_json(node_id="n2", hostname="gpu2", addr="10.0.0.8")
        self.client.node_list.append(other_node)
        node2 = node_from_docker(other_node)
        engine2 = SwarmNodeEngine(self.manager, node2, host_for_node(node2, "tcp://m:2375", 9100, 1, 0))
        events2: list[ContainerEvent] = []
        engine2.watch(events2.append)
        h1 = self.create()
        h2 = self.successResultOf(engine2.create(SPEC, SlotInfo("swarm-gpu2", 9100), RunOptions()))
        self.assertEqual(self.client.task_of(h2.id)["NodeID"], "n2")
        self.client.set_task(h1.id, "complete", exit_code=0)
        self.client.set_task(h2.id, "failed", exit_code=1)
        before = len(self.client.calls)
        self.successResultOf(self.manager.poll())
        self.assertEqual(self.client.names()[before:], ["services", "tasks"])
        self.assertEqual([e.kind for e in self.events], ["die", "exited"])
        self.assertEqual(self.events[0], ContainerEvent("die", h1.id, 0))
        self.assertEqual(
            [(e.kind, e.container_id, e.exit_code) for e in events2],
            [("die", h2.id, 1), ("exited", h2.id, 1)],
        )

    def test_service_removed_from_outside(self) -> None:
        h = self.create()
        del self.client.services_by_id[h.id]
        self.successResultOf(self.manager.poll())
        self.assertEqual(self.events, [ContainerEvent("die", h.id), ContainerEvent("destroy", h.id)])

    def test_nothing_after_stop(self) -> None:
        h = self.create()
        self.client.set_task(h.id, "running")
        self.client.removal_polls = 1
        d = self.engine.stop(h, 0)
        self.successResultOf(self.manager.poll())
        self.reactor.advance(0.25)
        self.successResultOf(d)
        self.successResultOf(self.manager.poll())
        self.assertEqual(self.events, [])

    def test_without_exit_times(self) -> None:
        self.manager.exit_times = False
        h = self.create()
        self.client.set_task(h.id, "failed", exit_code=2)
        self.successResultOf(self.manager.poll())
        self.assertEqual(self.events, [ContainerEvent("die", h.id, 2)])

    def test_a_failed_poll_keeps_the_loop(self) -> None:
        h = self.create()
        self.start()
        self.client.unreachable = True
        self.reactor.advance(1.0)
        self.assertTrue(self.manager._loop.running)
        self.client.unreachable = False
        self.client.set_task(h.id, "failed", exit_code=1)
        self.reactor.advance(1.0)
        self.assertEqual(self.events[0], ContainerEvent("die", h.id, 1))

    def test_forget_node(self) -> None:
        h = self.create()
        self.client.set_task(h.id, "failed", exit_code=1)
        self.manager.forget_node(NODE_ID)
        self.successResultOf(self.manager.poll())
        self.assertEqual(self.events, [])


class PingTests(SwarmTestCase):
    """ping(): the manager answers and the node is still ready and active."""

    def test_ready_node(self) -> None:
        self.assertTrue(self.successResultOf(self.engine.ping()))
        self.assertEqual(self.client.calls[-1], ("inspect_node", NODE_ID))

    def test_drained_down_or_gone(self) -> None:
        self.client.node_list[0] = node_json(availability="drain")
        self.assertFalse(self.successResultOf(self.engine.ping()))
        self.client.node_list[0] = node_json(state="down")
        self.assertFalse(self.successResultOf(self.engine.ping()))
        self.client.node_list = []
        self.assertFalse(self.successResultOf(self.engine.ping()))

    def test_manager_unreachable(self) -> None:
        self.client.unreachable = True
        self.assertFalse(self.successResultOf(self.engine.ping()))
        self.assertFalse(self.successResultOf(self.manager.ping()))
        self.client.unreachable = False
        self.assertTrue(self.successResultOf(self.manager.ping()))


class MiscTests(SwarmTestCase):
    """nodes, networks, endpoints, addresses, the service."""

    def test_nodes(self) -> None:
        self.client.node_list.append(node_json(node_id="n2", hostname="gpu2", availability="drain"))
        nodes = self.successResultOf(self.manager.nodes())
        self.assertEqual([(n.hostname, n.ready) for n in nodes], [("gpu1", True), ("gpu2", False)])

    def test_networks_are_the_managers(self) -> None:
        self.client.network_list = [
            {"Name": "ingress", "Driver": "overlay", "IPAM": {"Config": [{"Subnet": "10.0.0.0/24"}]}}
        ]
        self.assertEqual(
            self.successResultOf(self.engine.networks()),
            [NetworkInfo("ingress", "overlay", ("10.0.0.0/24",))],
        )

    def test_endpoint_for(self) -> None:
        self.assertEqual(self.engine.endpoint_for(SlotInfo("swarm-gpu1", 9105), SPEC), "tcp:10.0.0.7:9105")
        node = node_from_docker(node_json(addr="fd00::7"))
        eng6 = SwarmNodeEngine(self.manager, node, host_for_node(node, "tcp://m:2375", 9100, 1, 0))
        self.assertEqual(eng6.endpoint_for(SlotInfo("x", 9100), SPEC), "tcp:[fd00::7]:9100")

    def test_container_address(self) -> None:
        h = self.create()
        self.assertIsNone(self.successResultOf(self.engine.container_address(h.id)))  # default bridge only
        self.client.set_task(h.id, "running", addresses=["10.0.1.3/24"])
        self.assertEqual(self.successResultOf(self.engine.container_address(h.id)), "10.0.1.3")
        self.assertIsNone(self.successResultOf(self.engine.container_address("gone")))

    def test_service_starts_and_stops_pool_and_poller(self) -> None:
        svc = SwarmManagerService(self.manager)
        svc.startService()
        self.assertTrue(self.pool.started)
        self.assertTrue(self.manager._loop.running)
        d = svc.stopService()
        end = time.monotonic() + 5
        while not d.called and time.monotonic() < end:
            time.sleep(0.01)
        self.successResultOf(d)
        self.assertTrue(self.pool.stopped)
        self.assertFalse(self.manager._loop.running)
        self.failureResultOf(self.manager.nodes(), EngineError)
