"""In-process metrics and their Prometheus text exposition (``/monitor:metrics``).

A tiny registry (:class:`Counter`, :class:`Gauge`, :class:`Histogram` with fixed
buckets, each with label names) and :class:`Metrics`, the one object the web and
broker layers report to:

- ``request_started(kind)`` / ``request_done(kind, status, seconds, queue_wait)`` --
  requests by route kind and status, in flight, request and queue-wait durations;
- ``container_event(event, host, seconds=...)`` -- container starts, evictions,
  crashes; ``pull-end``/``ready`` with ``seconds`` feed the pull and start-to-ready
  histograms;
- ``render(snapshot)`` -- the Prometheus text, with gauges computed from the broker's
  ``/monitor:broker/`` snapshot at scrape time (waiting per key, slots by host and
  state, sources in use).

Labels never carry env values: keys are shown as ``JobSpec.display``.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterable
from functools import lru_cache
from itertools import accumulate
from typing import Any, Protocol

from attrs import define, field

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: request/queue durations: 5 ms .. 30 min
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0)
#: pulls and cold starts: 100 ms .. 1 h
START_BUCKETS = (0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 3600.0)

Labels = tuple[str, ...]
#: the broker's ``/monitor:broker/`` document: JSON, its values of any shape
SnapshotJSON = dict[str, Any]


class Exposed(Protocol):
    """A metric: its lines of the text exposition."""

    def lines(self) -> Iterable[str]:
        """``# HELP``, ``# TYPE`` and one line per sample."""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Labels, values: Labels, extra: tuple[tuple[str, str], ...] = ()) -> str:
    pairs = list(zip(names, values, strict=False)) + list(extra)
    if not pairs:
        return ""
    return "{" + ",".join(f'{n}="{_escape(v)}"' for n, v in pairs) + "}"


def _num(v: float) -> str:
    if v == math.inf:
        return "+Inf"
    if v == -math.inf:
        return "-Inf"
    if isinstance(v, int) or float(v).is_integer():
        return str(int(v))
    return repr(float(v))


@lru_cache(maxsize=1024)
def _status_labels(kind: str, status: int) -> Labels:
    return (kind, str(status))


@define
class Counter:
    """A monotonically increasing count per label set."""

    name: str
    help: str
    labelnames: Labels = ()
    values: dict[Labels, float] = field(factory=dict)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0) to the series ``labels``."""
        if amount < 0:
            raise ValueError("a counter only goes up")
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        """The current value of one series (0 if never touched)."""
        return self.values.get(labels, 0.0)

    def lines(self) -> Iterable[str]:
        """Exposition lines."""
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for labels, v in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.labelnames, labels)} {_num(v)}"


@define
class Gauge:
    """A value that goes up and down per label set."""

    name: str
    help: str
    labelnames: Labels = ()
    values: dict[Labels, float] = field(factory=dict)

    def set(self, *labels: str, value: float) -> None:
        """Set the series ``labels`` to ``value``."""
        self.values[labels] = value

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        """Add ``amount`` (may be negative) to the series."""
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def get(self, *labels: str) -> float:
        """The current value of one series (0 if never set)."""
        return self.values.get(labels, 0.0)

    def lines(self) -> Iterable[str]:
        """Exposition lines."""
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} gauge"
        for labels, v in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.labelnames, labels)} {_num(v)}"


@define
class _HistSeries:
    counts: list[int]  # per bucket (not cumulative); the last one is +Inf
    total: float = 0.0
    count: int = 0


@define
class Histogram:
    """Observations counted into fixed cumulative buckets, per label set."""

    name: str
    help: str
    buckets: tuple[float, ...]
    labelnames: Labels = ()
    series: dict[Labels, _HistSeries] = field(factory=dict)

    def observe(self, *labels: str, value: float) -> None:
        """Record one observation (into its own bucket; exposition sums them up)."""
        s = self.series.get(labels)
        if s is None:
            s = self.series[labels] = _HistSeries([0] * (len(self.buckets) + 1))
        if not math.isnan(value):  # NaN is below no bound: only in +Inf (count), as before
            s.counts[bisect_left(self.buckets, value)] += 1
        s.total += value
        s.count += 1

    def count(self, *labels: str) -> int:
        """Number of observations of one series."""
        s = self.series.get(labels)
        return s.count if s else 0

    def lines(self) -> Iterable[str]:
        """Exposition lines (``_bucket`` with ``le``, ``_sum``, ``_count``)."""
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for labels, s in sorted(self.series.items()):
            for bound, c in zip(self.buckets, accumulate(s.counts), strict=False):
                le = (("le", repr(float(bound))),)
                yield f"{self.name}_bucket{_labels(self.labelnames, labels, le)} {c}"
            inf = (("le", "+Inf"),)
            yield f"{self.name}_bucket{_labels(self.labelnames, labels, inf)} {s.count}"
            yield f"{self.name}_sum{_labels(self.labelnames, labels)} {_num(s.total)}"
            yield f"{self.name}_count{_labels(self.labelnames, labels)} {s.count}"


class Metrics:
    """Every metric of dockerspaces; the web and broker layers report to it."""

    def __init__(self) -> None:
        p = "dockerspaces_"
        self.requests = Counter(
            p + "requests_total", "Requests answered, by route kind and status.", ("kind", "status")
        )
        self.in_flight = Gauge(
            p + "requests_in_flight", "Requests being served or waiting, by route kind.", ("kind",)
        )
        self.request_seconds = Histogram(
            p + "request_duration_seconds",
            "Whole request time (arrival to last byte), by route kind.",
            DURATION_BUCKETS,
            ("kind",),
        )
        self.queue_seconds = Histogram(
            p + "queue_wait_seconds",
            "Time from arrival until a container was assigned, by route kind.",
            DURATION_BUCKETS,
            ("kind",),
        )
        self.pull_seconds = Histogram(
            p + "pull_duration_seconds", "Image pull time, by host.", START_BUCKETS, ("host",)
        )
        self.ready_seconds = Histogram(
            p + "start_to_ready_seconds", "Container start until ready, by host.", START_BUCKETS, ("host",)
        )
        self.starts = Counter(p + "container_starts_total", "Containers started, by host.", ("host",))
        self.evictions = Counter(
            p + "evictions_total", "Idle containers stopped to make room, by host.", ("host",)
        )
        self.crashes = Counter(
            p + "container_crashes_total",
            "Containers that exited or failed unexpectedly, by host.",
            ("host",),
        )
        self.events = Counter(
            p + "container_events_total", "Container events, by event and host.", ("event", "host")
        )
        self.group_requests = Counter(
            p + "group_requests_total",
            "Requests of signed-in users (--auth accounts), by the "
            "user's group (never by user), route kind and status.",
            ("group", "kind", "status"),
        )

    # --- what the layers call -------------------------------------------------------

    # These two run for every request: the series dictionaries are updated directly
    # (same result as ``inc``/``observe``, without their calls on the hot path).

    def request_started(self, kind: str) -> None:
        """A request of route ``kind`` arrived (pair with :meth:`request_done`)."""
        values = self.in_flight.values
        key = (kind,)
        values[key] = values.get(key, 0.0) + 1

    def request_done(self, kind: str, status: int, seconds: float, queue_wait: float | None = None) -> None:
        """A request of route ``kind`` ended with ``status`` after ``seconds``; ``queue_wait``
        is its wait for a container (x:/y:/worker only)."""
        key = (kind,)
        flying = self.in_flight.values
        n = flying.get(key, 0.0)
        if n > 0:
            flying[key] = n - 1
        counts = self.requests.values
        labels = _status_labels(kind, status)
        counts[labels] = counts.get(labels, 0.0) + 1
        self.request_seconds.observe(kind, value=max(0.0, seconds))
        if queue_wait is not None:
            self.queue_seconds.observe(kind, value=max(0.0, queue_wait))

    def group_request(self, group: str | None, kind: str, status: int) -> None:
        """A signed-in user's request ended (``group``: the first of the user's groups)."""
        self.group_requests.inc(group or "-", kind, str(status))

    def container_event(self, event: str, host: str = "local", seconds: float | None = None) -> None:
        """A container event (names as :data:`dockerspaces.logs.CONTAINER_EVENTS`).

        ``start`` counts a start, ``evict`` an eviction, ``crash`` a crash;
        ``pull-end``/``ready`` with ``seconds`` feed the pull / start-to-ready histograms.
        """
        self.events.inc(event, host)
        if event == "start":
            self.starts.inc(host)
        elif event == "evict":
            self.evictions.inc(host)
        elif event == "crash":
            self.crashes.inc(host)
        elif event == "pull-end" and seconds is not None:
            self.pull_seconds.observe(host, value=seconds)
        elif event == "ready" and seconds is not None:
            self.ready_seconds.observe(host, value=seconds)

    # --- several processes (--workers) --------------------------------------------------

    def _all(self) -> list[Counter | Gauge | Histogram]:
        return [
            self.requests,
            self.in_flight,
            self.request_seconds,
            self.queue_seconds,
            self.pull_seconds,
            self.ready_seconds,
            self.starts,
            self.evictions,
            self.crashes,
            self.events,
            self.group_requests,
        ]

    def export(self) -> dict[str, list[list[Any]]]:
        """Every series as JSON-able lists (a child's metrics sent to the broker's
        process, :meth:`add`)."""
        out: dict[str, list[list[Any]]] = {}
        for m in self._all():
            if isinstance(m, Histogram):
                out[m.name] = [[list(k), s.counts, s.total, s.count] for k, s in m.series.items()]
            else:
                out[m.name] = [[list(k), v] for k, v in m.values.items()]
        return out

    def add(self, exported: dict[str, list[list[Any]]]) -> None:
        """Add another process's :meth:`export` into these (counters, gauges and
        histogram buckets sum)."""
        for m in self._all():
            for row in exported.get(m.name, ()):
                labels = tuple(str(x) for x in row[0])
                if isinstance(m, Histogram):
                    s = m.series.get(labels)
                    if s is None:
                        s = m.series[labels] = _HistSeries([0] * (len(m.buckets) + 1))
                    if len(row[1]) == len(s.counts):
                        s.counts = [a + int(b) for a, b in zip(s.counts, row[1], strict=True)]
                    s.total += float(row[2])
                    s.count += int(row[3])
                else:
                    m.values[labels] = m.values.get(labels, 0.0) + float(row[1])

    def merged(self, others: Iterable[dict[str, list[list[Any]]]]) -> Metrics:
        """A new Metrics: these plus every one of ``others`` (exports)."""
        out = Metrics()
        out.add(self.export())
        for o in others:
            out.add(o)
        return out

    # --- exposition -------------------------------------------------------------------

    def snapshot_gauges(self, snapshot: SnapshotJSON | None) -> list[Gauge]:
        """Gauges computed from a ``/monitor:broker/`` snapshot: waiting per key, slots by
        host and state, sources by state."""
        p = "dockerspaces_"
        waiting = Gauge(p + "waiting", "Requests waiting for a container, by key.", ("key",))
        slots = Gauge(p + "slots", "Target slots, by host and state.", ("host", "state"))
        sources = Gauge(p + "sources", "Admission places (--source), by state.", ("state",))
        containers = Gauge(
            p + "slot_in_flight", "Requests in flight through each slot's container.", ("host", "port")
        )
        if snapshot:
            for key, n in (snapshot.get("Queues") or {}).items():
                waiting.set(str(key), value=float(n))
            for s in snapshot.get("TargetSlots") or []:
                host, state = str(s.get("Host", "local")), str(s.get("State", "Free"))
                slots.inc(host, state)
                if s.get("InFlight") is not None and s.get("Port") is not None:
                    containers.set(host, str(s["Port"]), value=float(s["InFlight"]))
            for s in snapshot.get("SourceSlots") or []:
                sources.inc(str(s.get("State", "Free")))
        return [waiting, slots, sources, containers, *self.autoscale_gauges(snapshot)]

    @staticmethod
    def autoscale_gauges(snapshot: SnapshotJSON | None) -> list[Gauge]:
        """Per ``[[autoscale]]`` entry (the snapshot's ``Autoscale``): desired and actual
        workers, the queue's ready and unacknowledged messages, failed queue reads."""
        p = "dockerspaces_autoscale_"
        names = {
            "Desired": ("desired_workers", "Workers the autoscaler wants, by entry."),
            "Actual": ("workers", "Workers running or launching, by entry."),
            "Ready": ("queue_ready", "Ready messages in the entry's queue."),
            "Unacked": ("queue_unacked", "Unacknowledged messages in the entry's queue."),
            "Errors": ("errors", "Errors of the entry's loop (readings, launches, stops)."),
            "Unreachable": ("unreachable_reads", "Queue readings RabbitMQ did not answer."),
        }
        gauges = {k: Gauge(p + n, h, ("entry",)) for k, (n, h) in names.items()}
        entries = (snapshot or {}).get("Autoscale") or {}
        for entry, view in entries.items():
            for k, g in gauges.items():
                v = view.get(k)
                if isinstance(v, (int, float)):
                    g.set(str(entry), value=float(v))
        return list(gauges.values()) if entries else []

    def render(self, snapshot: SnapshotJSON | None = None) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of every metric."""
        metrics: list[Exposed] = [*self._all(), *self.snapshot_gauges(snapshot)]
        out: list[str] = []
        for m in metrics:
            out.extend(m.lines())
        return ("\n".join(out) + "\n").encode("utf-8")
