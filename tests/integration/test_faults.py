"""Fault injection against the real engine (issue 12): nothing lost that was never
forwarded, no cut answer that looks whole, no leak, every crash counted once.

The scenario and its accounting are in :mod:`tests.integration.faults`; this runs it
once (about two minutes) and prints the table."""

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
        report = faults.run(srv, log=lambda line: print(line))
        print("\n" + report.table())
        self.assertGreaterEqual(len(report.kills), 10, "too few kills to mean anything")
        self.assertIsNotNone(report.removed_while_starting,
                             "no container was caught while starting")
        self.assertGreater(report.counts()["ok"], 150)
        self.assertEqual(report.violations(), [])
