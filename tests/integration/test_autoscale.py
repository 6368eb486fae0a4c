"""The autoscaler against a real RabbitMQ and real worker containers (issue 16).

300 messages are published to a queue nobody consumes; dockerspaces, with one
``[[autoscale]]`` entry (``max = 3``, from 0 workers), starts consumer containers
(:data:`~tests.integration.rabbit.CONSUMER`: prefetch 1, a record per message on
``work.done`` before its ack), the backlog drains, and after the cooldown the workers
are stopped -- idle ones only, with SIGTERM and the ``--stop`` grace -- down to 0.
Every message must be recorded exactly once and never redelivered (a worker stopped
while holding one would have it redelivered).  The worker count is sampled from
docker (this instance's running consumer containers) and from the entry in
``/monitor:broker/``'s ``Autoscale``.  The second test does the same while x: requests
compete for the slots.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable
from typing import Any

from twisted.python import log
from twisted.trial.unittest import TestCase

from .dockerutil import docker_available
from .images import TTS, TTS_PORT, ensure_test_images
from .procs import Server
from .rabbit import (
    CONSUMER,
    ensure_consumer_image,
    rabbit_account,
    require_rabbit,
    skip_reason,
    write_autoscale_config,
)
from .wait import eventually

MESSAGES = 300
QUEUE = "work"
ENTRY = "consumers"
MAX = 3
#: the entry's cooldown and stabilization (s): short, so that the test sees the way
#: back to 0, and long against the 1 s interval
COOLDOWN, STABILIZATION = 10, 5
SNAPSHOT_KEYS = {"Desired", "Actual", "Ready", "Unacked", "Consumers", "LastDecision", "Reason"}


def compress(values: list[Any]) -> list[tuple[Any, int]]:
    """Runs of equal values as (value, how many times in a row)."""
    runs: list[tuple[Any, int]] = []
    for v in values:
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return runs


class Sampler:
    """Samples, in a thread, the number of running consumer containers of one
    dockerspaces instance and its autoscale entry's view, while a test runs."""

    def __init__(self, server: Server, every: float = 0.25):
        self.server = server
        self.every = every
        self.counts: list[int] = []
        self.views: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def workers(self) -> int:
        """This instance's running consumer containers, as docker lists them."""
        image = CONSUMER.partition(":")[0]
        return sum(1 for c in self.server.containers() if c["Image"].startswith(image))

    def view(self) -> dict[str, Any]:
        """The entry in ``/monitor:broker/``'s ``Autoscale``."""
        return self.server.snapshot()["Autoscale"][ENTRY]  # type: ignore[no-any-return]

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.counts.append(self.workers())
                self.views.append(self.view())
            except Exception as e:  # noqa: BLE001 - a missed sample; the next one counts
                self.errors.append(repr(e))
            self._stop.wait(self.every)  # the sampling pace, not synchronisation

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


class AutoscaleTests(TestCase):
    """RabbitMQ queue-depth autoscaling end to end."""

    skip = docker_available() or skip_reason()
    timeout = 420

    def setUp(self) -> None:
        require_rabbit()
        ensure_consumer_image()
        self.acct = rabbit_account("as")
        self.addCleanup(self.acct.cleanup)
        self.acct.declare(QUEUE, QUEUE + ".done")
        self.dir = tempfile.mkdtemp(prefix="ds-autoscale-")

    def server(self, *args: str, slots: int) -> Server:
        """dockerspaces with the entry; ``--stop 5``: a worker gets 5 s to finish its
        message after SIGTERM (it needs 0.05 s)."""
        config = write_autoscale_config(
            self.acct,
            self.dir,
            QUEUE,
            name=ENTRY,
            max_workers=MAX,
            work_seconds=0.05,
            cooldown=COOLDOWN,
            stabilization=STABILIZATION,
        )
        s = Server("--config", config, "--stop", "5", *args, slots=slots)
        self.addCleanup(s.cleanup)
        return s.start()

    def drain(
        self,
        server: Server,
        while_draining: Callable[[], None] | None = None,
    ) -> tuple[list[dict[str, Any]], Sampler]:
        """Publish the messages, collect a record of each, then wait for the workers to
        be back to 0; the records and the samples."""
        ids = [f"m{i:04d}" for i in range(MESSAGES)]
        records: list[dict[str, Any]] = []

        def all_recorded() -> bool:
            records.extend(self.acct.take(QUEUE + ".done"))
            return len(records) >= MESSAGES

        with Sampler(server) as sampler:
            self.assertEqual(sampler.workers(), 0, "no worker before the backlog")
            self.acct.publish(QUEUE, ids)
            if while_draining is not None:
                while_draining()
            eventually(all_recorded, 180, f"{MESSAGES} messages recorded", interval=0.25)

            def back_to_zero() -> dict[str, Any] | None:
                view = sampler.view()
                if sampler.workers() == 0 and view["Actual"] == 0 and view["Desired"] == 0:
                    return view
                return None

            final = eventually(back_to_zero, 120, "workers back to 0 after the cooldown", interval=0.5)
        records.extend(self.acct.take(QUEUE + ".done"))  # a late duplicate would be here
        log.msg(
            f"autoscale test: running workers sampled {compress(sampler.counts)}; "
            f"decisions {compress([v['LastDecision'] for v in sampler.views])}; final {final}"
        )
        self.assertTrue(set(final) >= SNAPSHOT_KEYS, final)
        self.assertTrue(final["Reason"], final)
        return records, sampler

    def assert_exactly_once(self, records: list[dict[str, Any]]) -> None:
        """Each message recorded once, none redelivered, the queue empty."""
        ids = [r["id"] for r in records]
        self.assertEqual(sorted(set(ids)), [f"m{i:04d}" for i in range(MESSAGES)], "none lost")
        self.assertEqual(len(ids), MESSAGES, "none handled twice")
        self.assertEqual([r for r in records if r["redelivered"]], [], "none redelivered")
        eventually(
            lambda: self.acct.counts(QUEUE) == (0, 0, 0),
            30,
            "the queue empty, without consumers (the stats lag a few seconds)",
            interval=0.5,
        )

    def assert_worker_counts(self, sampler: Sampler, at_least: int) -> None:
        """The workers grew to ``at_least`` (and at most max) and went back to 0."""
        seen = sampler.counts
        actual = [v["Actual"] for v in sampler.views if v["Actual"] is not None]
        self.assertTrue(seen and actual, sampler.errors[-5:])
        self.assertGreaterEqual(max(seen), at_least, f"running workers sampled: {seen}")
        self.assertLessEqual(max(seen), MAX, f"running workers sampled: {seen}")
        self.assertLessEqual(max(actual), MAX, f"Actual sampled: {actual}")
        self.assertLessEqual(max(v["Desired"] or 0 for v in sampler.views), MAX)
        self.assertEqual(seen[-1], 0)

    def test_scales_up_drains_and_back_to_zero(self) -> None:
        """From 0 workers to more than one (at most max, 4 slots), every message once,
        back to 0; the credentials appear in no log line."""
        server = self.server(slots=4)
        records, sampler = self.drain(server)
        self.assert_exactly_once(records)
        self.assert_worker_counts(sampler, at_least=2)
        self.assertGreater(len({r["worker"] for r in records}), 1, "more than one worker worked")
        self.assertNotIn(self.acct.password, server.output())

    def test_with_x_traffic_competing_for_slots(self) -> None:
        """Two clients keep x: requests going on the same 3 slots while the backlog
        drains: every message once, every x: request answered, workers back to 0."""
        ensure_test_images(TTS)
        server = self.server(slots=3)
        url = f"/x:selmaproject:tts:777:{TTS_PORT}/cgi-bin/sleep?0.3"
        stop = threading.Event()
        answers: list[int] = []
        clients: list[threading.Thread] = []

        def client() -> None:
            while not stop.is_set():
                try:
                    answers.append(server.get(url, timeout=300)[0])
                except OSError:
                    answers.append(0)

        def start_clients() -> None:
            clients.extend(threading.Thread(target=client, daemon=True) for _ in range(2))
            for t in clients:
                t.start()
            eventually(lambda: len(answers) >= 2, 120, "x: requests answered while draining", interval=0.2)

        try:
            records, sampler = self.drain(server, while_draining=start_clients)
        finally:
            stop.set()
            for t in clients:
                t.join(300)
        self.assert_exactly_once(records)
        self.assert_worker_counts(sampler, at_least=1)
        self.assertEqual(set(answers), {200}, f"x: answers: {answers}")
