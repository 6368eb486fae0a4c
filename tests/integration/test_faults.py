"""Fault injection against the real engine (issue 12): nothing lost that was never
forwarded, no cut answer that looks whole, no leak, every crash counted once.

The scenario, its accounting (each request's id in its path, the containers' own httpd
logs as the proof that it was forwarded, the in-flight count at each kill as a
cross-check) and the bars are in :mod:`tests.integration.faults`; this runs it once
(about two minutes) and prints the table (``bench/faults.py`` prints the same by hand).

dockerspaces runs as its own ``twistd -n dockerspaces`` process (:class:`.procs.Server`,
``PYTHONPATH`` = the checkout holding this file), not in-process: the kills, the log
followers and the 20 blocking clients then never share a reactor with the code under
test, and the same file copied into a worktree of an older commit measures that
commit (RELIABILITY.md's "before")."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from . import faults
from .dockerutil import docker_available
from .images import SLOWHTTP, TTS, WEB, ensure_test_images
from .procs import Server


class FaultInjection(TestCase):
    """300 requests, 3 images, 2 slots, 20 clients, kills every ~3 s, hang-ups, one
    removal while starting."""

    skip = docker_available()
    timeout = 400

    def test_nothing_lost_nothing_cut_looks_whole(self) -> None:
        ensure_test_images(TTS, WEB, SLOWHTTP)
        srv = Server("--queue-timeout", "240", "--start-timeout", "60", slots=2)
        self.addCleanup(srv.cleanup)
        srv.start()
        report = faults.run(srv, log=print)
        print("\n" + report.table())
        self.assertGreaterEqual(len(report.kills), 10, "too few kills to mean anything")
        self.assertIsNotNone(report.removed_while_starting, "no container was caught while starting")
        self.assertGreater(report.counts()["ok"], 150)
        self.assertEqual(report.violations(), [])
