"""Metrics: counters/gauges/histograms after a known sequence, read back through
prometheus_client's own text parser (a test-only dependency)."""

from __future__ import annotations

from typing import Any

from twisted.trial import unittest

from dockerspaces.metrics import DURATION_BUCKETS, Metrics

try:
    from prometheus_client.parser import text_string_to_metric_families
except ImportError:  # pragma: no cover
    text_string_to_metric_families = None


SNAPSHOT: dict[str, Any] = {
    "SourceSlots": [{"State": "Run"}, {"State": "Run"}, {"State": "Free"}],
    "TargetSlots": [
        {"State": "Run", "Host": "local", "Port": 9100, "InFlight": 1},
        {"State": "Starting", "Host": "local", "Port": 9101, "InFlight": 0},
        {"State": "Free", "Host": "gpu1:2375", "Port": 9100, "InFlight": None},
    ],
    "Queues": {"x:a/b:1:80 env[]#abcdef": 4, 'x:c/d:2:80 env[A]#"q\\': 1},
}


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    out = {}
    for fam in text_string_to_metric_families(text.decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


class MetricsTests(unittest.TestCase):
    if text_string_to_metric_families is None:
        skip = "prometheus-client (test-only: pip install prometheus-client) is not installed"

    def sequence(self) -> Metrics:
        m = Metrics()
        for _ in range(3):
            m.request_started("x")
        m.request_done("x", 200, 0.3, queue_wait=0.02)
        m.request_done("x", 200, 4.0, queue_wait=3.5)
        m.request_started("host")
        m.request_done("host", 502, 0.01)
        m.container_event("pull-start", "local")
        m.container_event("pull-end", "local", seconds=12.0)
        m.container_event("start", "local")
        m.container_event("ready", "local", seconds=1.5)
        m.container_event("start", "local")
        m.container_event("evict", "local")
        m.container_event("crash", "gpu1:2375")
        return m

    def test_requests_and_in_flight(self) -> None:
        s = samples(self.sequence().render(SNAPSHOT))
        self.assertEqual(s[("dockerspaces_requests_total", (("kind", "x"), ("status", "200")))], 2)
        self.assertEqual(s[("dockerspaces_requests_total", (("kind", "host"), ("status", "502")))], 1)
        self.assertEqual(s[("dockerspaces_requests_in_flight", (("kind", "x"),))], 1)
        self.assertEqual(s[("dockerspaces_requests_in_flight", (("kind", "host"),))], 0)

    def test_histograms(self) -> None:
        s = samples(self.sequence().render(SNAPSHOT))
        kx = (("kind", "x"),)
        self.assertEqual(s[("dockerspaces_request_duration_seconds_count", kx)], 2)
        self.assertAlmostEqual(s[("dockerspaces_request_duration_seconds_sum", kx)], 4.3)

        # cumulative buckets: 0.3 is <= 0.5, 4.0 is not <= 2.5 but <= 5.0
        def le(b):
            return (("kind", "x"), ("le", b))

        self.assertEqual(s[("dockerspaces_request_duration_seconds_bucket", le("0.25"))], 0)
        self.assertEqual(s[("dockerspaces_request_duration_seconds_bucket", le("0.5"))], 1)
        self.assertEqual(s[("dockerspaces_request_duration_seconds_bucket", le("2.5"))], 1)
        self.assertEqual(s[("dockerspaces_request_duration_seconds_bucket", le("5.0"))], 2)
        self.assertEqual(s[("dockerspaces_request_duration_seconds_bucket", le("+Inf"))], 2)
        self.assertEqual(s[("dockerspaces_queue_wait_seconds_count", kx)], 2)
        self.assertAlmostEqual(s[("dockerspaces_queue_wait_seconds_sum", kx)], 3.52)
        # host: requests have no queue wait
        self.assertNotIn(("dockerspaces_queue_wait_seconds_count", (("kind", "host"),)), s)
        self.assertEqual(s[("dockerspaces_pull_duration_seconds_count", (("host", "local"),))], 1)
        self.assertEqual(s[("dockerspaces_pull_duration_seconds_sum", (("host", "local"),))], 12.0)
        self.assertEqual(s[("dockerspaces_start_to_ready_seconds_sum", (("host", "local"),))], 1.5)

    def test_container_counters(self) -> None:
        s = samples(self.sequence().render(SNAPSHOT))
        self.assertEqual(s[("dockerspaces_container_starts_total", (("host", "local"),))], 2)
        self.assertEqual(s[("dockerspaces_evictions_total", (("host", "local"),))], 1)
        self.assertEqual(s[("dockerspaces_container_crashes_total", (("host", "gpu1:2375"),))], 1)
        self.assertNotIn(("dockerspaces_container_crashes_total", (("host", "local"),)), s)
        self.assertEqual(
            s[("dockerspaces_container_events_total", (("event", "pull-start"), ("host", "local")))], 1
        )

    def test_snapshot_gauges(self) -> None:
        s = samples(self.sequence().render(SNAPSHOT))
        self.assertEqual(s[("dockerspaces_waiting", (("key", "x:a/b:1:80 env[]#abcdef"),))], 4)
        # label values with quotes and backslashes are escaped and survive the round trip
        self.assertEqual(s[("dockerspaces_waiting", (("key", 'x:c/d:2:80 env[A]#"q\\'),))], 1)
        self.assertEqual(s[("dockerspaces_slots", (("host", "local"), ("state", "Run")))], 1)
        self.assertEqual(s[("dockerspaces_slots", (("host", "local"), ("state", "Starting")))], 1)
        self.assertEqual(s[("dockerspaces_slots", (("host", "gpu1:2375"), ("state", "Free")))], 1)
        self.assertEqual(s[("dockerspaces_sources", (("state", "Run"),))], 2)
        self.assertEqual(s[("dockerspaces_slot_in_flight", (("host", "local"), ("port", "9100")))], 1)

    def test_no_snapshot(self) -> None:
        """Without a broker snapshot the gauges are declared but empty; it still parses."""
        s = samples(Metrics().render(None))
        self.assertFalse([k for k in s if k[0].startswith("dockerspaces_slots")])
        self.assertFalse([k for k in s if k[0].startswith("dockerspaces_requests_total")])

    def test_every_bucket_is_listed(self) -> None:
        m = Metrics()
        m.request_done("y", 200, 100.0)
        s = samples(m.render())
        les = sorted(
            float(dict(k[1])["le"]) for k in s if k[0] == "dockerspaces_request_duration_seconds_bucket"
        )
        self.assertEqual(les, sorted(DURATION_BUCKETS) + [float("inf")])

    def test_counter_cannot_go_down(self) -> None:
        self.assertRaises(ValueError, Metrics().starts.inc, "local", amount=-1)


class HistogramBuckets(unittest.TestCase):
    """Buckets are cumulative ``le`` counts, whatever way they are kept inside."""

    def test_cumulative_le_counts(self) -> None:
        from dockerspaces.metrics import Histogram

        bounds = (0.005, 0.01, 0.1, 1.0)
        values = [0.0, 0.005, 0.0051, 0.01, 0.05, 0.1, 0.5, 1.0, 1.5, 1e9, -1.0, float("nan")]
        h = Histogram("h", "help", bounds)
        for v in values:
            h.observe(value=v)
        lines = [x for x in h.lines() if x.startswith("h_bucket")]
        got = [int(x.rsplit(" ", 1)[1]) for x in lines]
        want = [sum(1 for v in values if v <= b) for b in bounds] + [len(values)]
        self.assertEqual(got, want)
        self.assertEqual(h.count(), len(values))


class GroupTests(unittest.TestCase):
    """--auth accounts: requests counted by the user's group, never by user."""

    def test_group_requests(self) -> None:
        m = Metrics()
        m.group_request("ml", "x", 200)
        m.group_request("ml", "x", 200)
        m.group_request(None, "y", 429)
        s = samples(m.render(SNAPSHOT))
        key = ("dockerspaces_group_requests_total", (("group", "ml"), ("kind", "x"), ("status", "200")))
        self.assertEqual(s[key], 2)
        self.assertEqual(
            s[("dockerspaces_group_requests_total", (("group", "-"), ("kind", "y"), ("status", "429")))], 1
        )
        self.assertNotIn(b'user="', m.render(SNAPSHOT))
