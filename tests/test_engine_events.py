"""Container events (dockerspaces.engine.events): mapping, filters, the event thread's
reconnects, the exit time of a local engine's containers."""

from __future__ import annotations

import threading
from typing import Any

import requests.exceptions

from dockerspaces.config import HostConfig
from dockerspaces.engine.engine import Engine
from dockerspaces.engine.events import docker_time, event_from_docker
from dockerspaces.engine.interface import ContainerEvent

from .test_engine_harness import HOST, EngineTestCase, FakeStream


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
        self.assertEqual(event_from_docker({"status": "oom", "id": "x"}), ContainerEvent("oom", "x", None))
        self.assertIsNone(event_from_docker({"Type": "container", "Action": "start", "id": "x"}))
        self.assertIsNone(event_from_docker({"Type": "network", "Action": "destroy", "id": "x"}))

    def test_watch_loop_reconnects_with_since(self) -> None:
        eng = self.make()
        ev1 = {
            "Action": "die",
            "Actor": {"ID": "a", "Attributes": {"exitCode": "1"}},
            "timeNano": 1_500_000_000_000_000_123,
        }
        ev2 = {"Action": "destroy", "Actor": {"ID": "a"}, "timeNano": 1_500_000_001_000_000_000}

        class Stopper(FakeStream):
            def __iter__(inner) -> Any:
                eng._threads.stopping.set()
                return iter([])

        self.client.event_streams = [
            FakeStream([ev1, requests.exceptions.ConnectionError("engine went away")]),
            requests.exceptions.ConnectionError("still down"),
            FakeStream([ev1, ev2]),  # ev1 replayed by since=; must not be delivered twice
            Stopper([]),
        ]
        got: list[ContainerEvent] = []
        eng._events.callbacks.append(got.append)
        t = threading.Thread(target=eng._events.loop, kwargs={"backoff_start": 0.001})
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
        die = {"Action": "die", "Actor": {"ID": "a", "Attributes": {"exitCode": "137"}}, "timeNano": 7}
        for host, expected in [(HOST, 1796287362.5), (remote, None)]:
            eng = self.make(host=host)
            self.client.states["a"] = [{"Status": "exited", "FinishedAt": "2026-12-03T08:42:42.500000000Z"}]

            class Stopper(FakeStream):
                def __iter__(inner, eng: Engine = eng) -> Any:
                    eng._threads.stopping.set()
                    return iter([])

            self.client.event_streams = [FakeStream([die]), Stopper([])]
            got: list[ContainerEvent] = []
            eng._events.callbacks.append(got.append)
            t = threading.Thread(target=eng._events.loop, kwargs={"backoff_start": 0.001})
            t.start()
            t.join(5)
            die_event = ContainerEvent("die", "a", 137)
            self.assertEqual(
                got,
                [die_event]
                if expected is None
                else [die_event, ContainerEvent("exited", "a", 137, expected)],
            )

    def test_docker_time(self) -> None:
        self.assertEqual(docker_time("2026-12-03T08:42:42.123456Z"), 1796287362.123456)
        self.assertEqual(docker_time("2026-12-03T09:42:42+01:00"), 1796287362.0)
        for nothing in ("", "0001-01-01T00:00:00Z", "yesterday"):
            self.assertIsNone(docker_time(nothing))
