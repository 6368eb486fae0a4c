"""The metrics and health resources (dockerspaces/web/health.py; clock-driven)."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial import unittest
from twisted.web.test.requesthelper import DummyRequest

from dockerspaces.metrics import Metrics
from dockerspaces.web.health import HealthResource, MetricsResource


def request(uri: bytes) -> DummyRequest:
    r = DummyRequest([b""])
    r.uri, r.method = uri, b"GET"
    return r


class MetricsTests(unittest.TestCase):
    def test_metrics_resource(self) -> None:
        m = Metrics()
        m.request_done("x", 200, 0.1)
        res = MetricsResource(m, lambda: {"Queues": {"k": 2}, "TargetSlots": [], "SourceSlots": []})
        req = request(b"/monitor:metrics")
        body = res.render(req).decode()
        self.assertIn('dockerspaces_requests_total{kind="x",status="200"} 1', body)
        self.assertIn('dockerspaces_waiting{key="k"} 2', body)
        self.assertTrue(req.responseHeaders.getRawHeaders(b"content-type")[0].startswith(b"text/plain"))


class Engine:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def ping(self) -> Deferred[bool]:
        if isinstance(self.answer, Exception):
            return fail(self.answer)
        if self.answer is None:
            return Deferred()  # never answers
        return succeed(self.answer)


class HealthTests(unittest.TestCase):
    def health(self, engines: dict[str, Engine], serving: bool = True) -> tuple[int, dict[str, Any]]:
        clock = task.Clock()
        res = HealthResource(engines, clock, serving=lambda: serving, timeout=5)
        req = request(b"/monitor:health")
        res.render(req)
        clock.advance(5)
        self.assertTrue(req.finished)
        return req.responseCode or 200, json.loads(b"".join(req.written))

    def test_one_engine_up_is_enough(self) -> None:
        code, body = self.health({"local": Engine(True), "gpu1": Engine(RuntimeError("refused"))})
        self.assertEqual(code, 200)
        self.assertEqual(body["engines"]["local"], "up")
        self.assertTrue(body["engines"]["gpu1"].startswith("down"))

    def test_all_down_or_silent(self) -> None:
        code, body = self.health({"a": Engine(False), "b": Engine(None)})
        self.assertEqual(code, 503)
        self.assertEqual(body["status"], "unavailable")
        self.assertTrue(body["engines"]["b"].startswith("down"))

    def test_not_serving(self) -> None:
        code, body = self.health({"local": Engine(True)}, serving=False)
        self.assertEqual((code, body["serving"]), (503, False))

    def test_no_engines(self) -> None:
        self.assertEqual(self.health({})[0], 503)
