"""The engine's pool (dockerspaces.engine.threads): calls in the pool with a client per
thread, translated errors, cancellation, a bounded shutdown."""

from __future__ import annotations

import threading
import time
from typing import Any

import requests.exceptions
from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.engine.interface import EngineError, EngineUnreachable
from dockerspaces.engine.threads import ClientThreads

from .test_engine_harness import EngineTestCase, FakeClient, FakeStream, InlinePool, Reactor


def wait_called(d: Any, seconds: float = 5) -> None:
    """Wait (really) until ``d`` fired from another thread."""
    end = time.monotonic() + seconds
    while not d.called and time.monotonic() < end:
        time.sleep(0.01)


class RunTests(EngineTestCase):
    """Engine calls through the pool."""

    def test_engine_down_is_unreachable(self) -> None:
        eng = self.make()

        def broken() -> Any:
            raise requests.exceptions.ConnectionError("connection refused")

        eng._threads.client_factory = broken
        f = self.failureResultOf(eng.ensure_image("a/b:1"), EngineUnreachable)
        self.assertIn("local", str(f.value))


class ClientThreadsTests(SynchronousTestCase):
    """ClientThreads over an inline or a held pool."""

    def make(self, pool: Any = None, shutdown_timeout: float = 10.0) -> ClientThreads:
        self.made: list[FakeClient] = []
        self.reactor = Reactor()

        def factory() -> FakeClient:
            self.made.append(FakeClient())
            return self.made[-1]

        return ClientThreads(
            self.reactor, "local", "unix:///s", pool or InlinePool(), factory, shutdown_timeout
        )

    def test_one_client_per_thread_dropped_when_unreachable(self) -> None:
        threads = self.make()
        seen: list[Any] = []
        self.assertEqual(self.successResultOf(threads.run(lambda c, x: seen.append(c) or x, 7)), 7)
        self.successResultOf(threads.run(seen.append))
        self.assertIs(seen[0], seen[1])

        def down(client: Any) -> None:
            raise requests.exceptions.ConnectionError("refused")

        self.failureResultOf(threads.run(down), EngineUnreachable)
        self.assertTrue(seen[0].closed)
        self.successResultOf(threads.run(seen.append))
        self.assertIsNot(seen[2], seen[0])
        self.assertEqual(len(self.made), 2)

    def test_other_errors_unchanged(self) -> None:
        threads = self.make()

        def bug(client: Any) -> None:
            raise ValueError("bug")

        self.failureResultOf(threads.run(bug), ValueError)
        self.assertFalse(self.made[0].closed)

    def test_cancelled_call_ignores_its_late_result(self) -> None:
        held: list[Any] = []
        pool = InlinePool()
        pool.callInThreadWithCallback = lambda cb, f, *a: held.append((cb, f, a))  # type: ignore[method-assign]
        threads = self.make(pool)
        d = threads.run(lambda c: 1)
        d.cancel()
        cb, f, a = held[0]
        cb(True, f(*a))  # no AlreadyCalledError
        self.failureResultOf(d, CancelledError)

    def test_shutdown_closes_streams_and_refuses_calls(self) -> None:
        pool = InlinePool()
        threads = self.make(pool)
        self.successResultOf(threads.run(lambda c: None))
        stream = FakeStream([])
        key = threads.track(stream, self.made[0])
        other = FakeStream([])
        threads.untrack(threads.track(other, self.made[0]))
        d = threads.shutdown()
        wait_called(d)
        self.assertIsNone(self.successResultOf(d))
        self.assertTrue(stream.closed)
        self.assertFalse(other.closed)
        self.assertTrue(pool.stopped)
        self.assertTrue(self.made[0].closed)
        threads.untrack(key)
        f = self.failureResultOf(threads.run(lambda c: None), EngineError)
        self.assertIn("shut down", str(f.value))

    def test_shutdown_does_not_wait_past_its_timeout(self) -> None:
        release = threading.Event()
        pool = InlinePool()
        pool.stop = lambda: release.wait(5)  # type: ignore[assignment,method-assign]
        threads = self.make(pool, shutdown_timeout=3)
        d = threads.shutdown()
        self.assertNoResult(d)
        self.reactor.advance(3)
        self.assertIsNone(self.successResultOf(d))
        release.set()  # the late callback of the stop thread is swallowed
