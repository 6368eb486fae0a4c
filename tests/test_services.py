"""StopInOrder: children stop one after another, last added first."""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.services import StopInOrder


class Child(Service):
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name, self.log, self.fail = name, log, fail
        self.d: Deferred[None] | None = None

    def stopService(self) -> Any:
        super().stopService()
        self.log.append(f"stop {self.name}")
        if self.fail:
            raise RuntimeError(f"{self.name} broke")
        self.d = Deferred()
        return self.d


class StopInOrderTests(SynchronousTestCase):
    def test_each_waits_for_the_one_before(self) -> None:
        log: list[str] = []
        top = StopInOrder()
        engines, broker = Child("engines", log), Child("broker", log)
        engines.setServiceParent(top)
        broker.setServiceParent(top)
        top.startService()
        done = top.stopService()
        self.assertEqual(log, ["stop broker"])  # the engines wait for the broker
        assert broker.d is not None
        broker.d.callback(None)
        self.assertEqual(log, ["stop broker", "stop engines"])
        self.assertNoResult(done)
        assert engines.d is not None
        engines.d.callback(None)
        self.assertIsNone(self.successResultOf(done))

    def test_a_failing_stop_does_not_stop_the_rest(self) -> None:
        log: list[str] = []
        top = StopInOrder()
        last = Child("last", log)
        last.setServiceParent(top)
        Child("broken", log, fail=True).setServiceParent(top)
        top.startService()
        done = top.stopService()
        assert last.d is not None
        last.d.callback(None)
        self.assertEqual(log, ["stop broken", "stop last"])
        self.assertIsNone(self.successResultOf(done))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
