"""The Engine facade (create, start, stop, ping, networks, the service) against a fake
docker-py client and an inline thread pool (tests/test_engine_harness.py); each room of
the engine has its own test module (test_engine_pull, _readiness, _probe, _events,
_adopt, _errors, _threads)."""

from __future__ import annotations

import time
from typing import Any

import attrs
import requests.exceptions

from dockerspaces.config import HostConfig
from dockerspaces.engine.engine import EngineService
from dockerspaces.engine.interface import (
    LABEL_DISPLAY,
    LABEL_HOST,
    LABEL_INSTANCE,
    LABEL_KEY,
    LABEL_SLOT,
    LABEL_SPEC,
    EngineError,
    EngineUnreachable,
    NetworkInfo,
    OwnedContainer,
    PortAllocated,
    RunOptions,
    SlotInfo,
)
from dockerspaces.spec import parse_route

from .test_engine_harness import (
    SPEC,
    WORKER,
    EngineTestCase,
    FakeStream,
    api_error,
)


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
        h = self.successResultOf(eng.create(SPEC, SlotInfo("local", 9100, gpu=0), RunOptions(gpu=False)))
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
            volumes=("/data:/data:ro",),
            shm_size="1g",
            mem_limit="2g",
            nano_cpus=1_500_000_000,
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
            {
                "Name": "bridge",
                "Driver": "bridge",
                "IPAM": {"Config": [{"Subnet": "172.17.0.0/16", "Gateway": "172.17.0.1"}]},
            },
            {
                "Name": "lan",
                "Driver": "macvlan",
                "IPAM": {
                    "Config": [
                        {"Subnet": "192.168.1.0/24", "IPRange": "192.168.1.192/27"},
                        {"Subnet": "fd00:1::/64"},
                    ]
                },
            },
            {"Name": "host", "Driver": "host", "IPAM": {"Driver": "default", "Config": []}},
            {"Name": "none", "Driver": "null", "IPAM": {"Config": None}},
        ]
        got = self.successResultOf(eng.networks())
        self.assertEqual(
            got,
            [
                NetworkInfo("bridge", "bridge", ("172.17.0.0/16",)),
                NetworkInfo("lan", "macvlan", ("192.168.1.0/24", "fd00:1::/64"), ("192.168.1.192/27",)),
                NetworkInfo("host", "host"),
                NetworkInfo("none", "null"),
            ],
        )
        self.assertEqual(self.client.calls[-1], ("networks", None))
        self.client.networks = lambda: (_ for _ in ()).throw(  # type: ignore[method-assign]
            requests.exceptions.ConnectionError("refused")
        )
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
        eng._threads.track(stream, self.client)
        d = svc.stopService()
        end = time.monotonic() + 5
        while not d.called and time.monotonic() < end:
            time.sleep(0.01)
        self.successResultOf(d)
        self.assertTrue(stream.closed)
        self.assertTrue(self.pool.stopped)
        self.failureResultOf(eng.list_own(), EngineError)


class ReexportTests(EngineTestCase):
    """The names engine.py had before its rooms moved out are still importable there."""

    def test_old_names(self) -> None:
        from dockerspaces.engine import engine, errors, events, pull, threads

        self.assertIs(engine.pull_error, errors.pull_error)
        self.assertIs(engine.translate, errors.translate)
        self.assertIs(engine.event_from_docker, events.event_from_docker)
        self.assertIs(engine.docker_time, events.docker_time)
        self.assertIs(engine.DaemonThreadPool, threads.DaemonThreadPool)
        self.assertEqual(engine.PULL_POLICIES, pull.PULL_POLICIES)
        for name in engine.__all__:
            self.assertTrue(hasattr(engine, name), name)

    def test_pull_policy_settable(self) -> None:
        eng = self.make(pull="missing")
        eng.pull_policy = "never"
        self.assertEqual(eng.pull_policy, "never")
        self.assertRaises(ValueError, setattr, eng, "pull_policy", "sometimes")


class ContainerAddressTests(EngineTestCase):
    """container_address(): the IP on the container's first network."""

    def test_first_network_legacy_and_gone(self) -> None:
        """The first network with an address wins; the legacy top-level IPAddress when
        there are no networks; None for a container without one or gone; an engine
        that does not answer fails as unreachable."""
        eng = self.make()
        answers: dict[str, Any] = {
            "c1": {
                "NetworkSettings": {
                    "IPAddress": "",
                    "Networks": {
                        "none-yet": {"IPAddress": ""},
                        "bridge": {"IPAddress": "172.17.0.5"},
                        "lan": {"IPAddress": "10.0.0.9"},
                    },
                }
            },
            "c2": {"NetworkSettings": {"IPAddress": "172.17.0.7", "Networks": None}},
            "c3": {
                "NetworkSettings": {"Networks": {"v6": {"IPAddress": "", "GlobalIPv6Address": "fd00::5"}}}
            },
            "c4": {"NetworkSettings": {"Networks": {"host": {"IPAddress": ""}}}},
        }

        def inspect(cid: str) -> dict[str, Any]:
            self.client.calls.append(("inspect", cid))
            if cid not in answers:
                raise api_error(404, f"No such container: {cid}")
            return dict(answers[cid], Id=cid)

        self.client.inspect_container = inspect  # type: ignore[method-assign]
        self.assertEqual(self.successResultOf(eng.container_address("c1")), "172.17.0.5")
        self.assertEqual(self.successResultOf(eng.container_address("c2")), "172.17.0.7")
        self.assertEqual(self.successResultOf(eng.container_address("c3")), "fd00::5")
        self.assertIsNone(self.successResultOf(eng.container_address("c4")))
        self.assertIsNone(self.successResultOf(eng.container_address("gone")))
        self.assertEqual(self.client.calls[-1], ("inspect", "gone"))

        def refused(cid: str) -> dict[str, Any]:
            raise requests.exceptions.ConnectionError("refused")

        self.client.inspect_container = refused  # type: ignore[method-assign]
        self.failureResultOf(eng.container_address("c1"), EngineUnreachable)
