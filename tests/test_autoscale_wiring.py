"""The autoscaler in the service tree: ``[[autoscale]]`` in ``--config`` builds it under
the top service, ``/monitor:broker/`` and ``/monitor:metrics`` show its entries, and a
bad entry is a usage error at start."""

from __future__ import annotations

import io
import json
import os
import tempfile

from twisted.application.service import IServiceCollection
from twisted.internet.testing import MemoryReactorClock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from dockerspaces.app import build_service
from dockerspaces.autoscale.wiring import Autoscaler
from dockerspaces.metrics import Metrics
from dockerspaces.options import build_config
from dockerspaces.spec import MonitorRoute
from dockerspaces.tap import Options

ENTRY = """
[[autoscale]]
name = "consumers"
image = "dockerspaces-test/consumer"
tag = "1"
amqp = "amqp://rabbit.example:5672/"
credentials = "rabbit.cred"
vhost = "/"
queue = "work"
max = 3
"""


def write_config(text: str) -> str:
    """A config file (and its credentials file) in a fresh temp dir."""
    d = tempfile.mkdtemp(prefix="ds-autoscale-")
    with open(os.path.join(d, "rabbit.cred"), "w") as f:
        f.write("worker:s3cret\n")
    path = os.path.join(d, "dockerspaces.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


class WiringTests(SynchronousTestCase):
    def build(self, text: str) -> list[object]:
        path = write_config(text)
        config = build_config({"config": path, "instance": "t", "port": ["tcp:0"], "target": "1"})
        top = build_service(config, MemoryReactorClock(), io.StringIO())
        return list(IServiceCollection(top))

    def test_entries_build_an_autoscaler_under_the_top_service(self) -> None:
        """With [[autoscale]] entries the service tree holds the autoscaler (its service
        and config watcher); without them there is none."""
        found = [s for s in self.build(ENTRY) if isinstance(s, Autoscaler)]
        self.assertEqual(len(found), 1)
        self.assertEqual(list(found[0].service.snapshot()), ["consumers"])
        self.assertEqual([s for s in self.build("") if isinstance(s, Autoscaler)], [])

    def test_monitor_and_metrics_show_the_entries(self) -> None:
        """/monitor:broker/ carries Autoscale per entry, /monitor:metrics its gauges;
        the credentials never appear in either."""
        services = self.build(ENTRY)
        site = next(s for s in services if hasattr(s, "factory")).factory  # type: ignore[attr-defined]
        routes = site.resource.routes
        snap = routes.snapshot()
        self.assertIn("consumers", snap["Autoscale"])
        self.assertIn("Desired", snap["Autoscale"]["consumers"])
        req = DummyRequest([b""])
        req.requestHeaders.setRawHeaders(b"accept", [b"application/json"])
        body = routes.monitor(MonitorRoute("broker")).render(req)
        text = body if isinstance(body, bytes) else b"".join(req.written)
        self.assertIn("consumers", json.loads(text)["Autoscale"])
        self.assertNotIn(b"s3cret", text)

    def test_metrics_gauges_per_entry(self) -> None:
        """Desired/actual workers and the queue's counts become gauges per entry."""
        snap = {
            "Autoscale": {
                "consumers": {
                    "Desired": 3,
                    "Actual": 2,
                    "Ready": 40,
                    "Unacked": 2,
                    "Errors": 4,
                    "Unreachable": 3,
                    "Reason": "x",
                }
            }
        }
        text = Metrics().render(snap).decode()
        self.assertIn('dockerspaces_autoscale_desired_workers{entry="consumers"} 3', text)
        self.assertIn('dockerspaces_autoscale_workers{entry="consumers"} 2', text)
        self.assertIn('dockerspaces_autoscale_queue_ready{entry="consumers"} 40', text)
        self.assertIn('dockerspaces_autoscale_queue_unacked{entry="consumers"} 2', text)
        self.assertIn('dockerspaces_autoscale_unreachable_reads{entry="consumers"} 3', text)
        self.assertIn('dockerspaces_autoscale_errors{entry="consumers"} 4', text)
        self.assertNotIn("dockerspaces_autoscale_", Metrics().render({}).decode())

    def test_a_bad_entry_is_a_usage_error(self) -> None:
        """twistd dockerspaces --config with a bad [[autoscale]] entry stops with a usage
        error naming the entry and the key."""
        path = write_config(ENTRY.replace("max = 3", "max = 0"))
        with self.assertRaises(usage.UsageError) as cm:
            Options().parseOptions(["--config", path])
        self.assertIn("consumers", str(cm.exception))
        self.assertIn("max", str(cm.exception))

    def test_autoscale_must_be_tables(self) -> None:
        """autoscale = "x" is refused by the option reader."""
        path = write_config('autoscale = "x"\n')
        with self.assertRaises(usage.UsageError) as cm:
            Options().parseOptions(["--config", path])
        self.assertIn("[[autoscale]]", str(cm.exception))
