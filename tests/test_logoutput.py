"""Log lines batched per reactor iteration, in twistd's own format, to twistd's file."""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import threading
from typing import Any

from twisted.internet.testing import MemoryReactorClock
from twisted.logger import (
    Logger,
    LogLevel,
    LogPublisher,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import logfile
from twisted.trial import unittest

from dockerspaces import logs
from dockerspaces.logoutput import (
    FLUSH_LINES,
    LineWriter,
    TextObserver,
    twistd_destination,
)


class Out(io.StringIO):
    """A text file that remembers each ``write`` call."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, s: str) -> int:
        self.writes.append(s)
        return super().write(s)


def running_reactor() -> MemoryReactorClock:
    r = MemoryReactorClock()
    r.running = True
    return r


class LineWriterTests(unittest.TestCase):
    def test_one_write_per_iteration(self) -> None:
        out, reactor = Out(), running_reactor()
        w = LineWriter(out, reactor)
        for i in range(100):
            w.write(f"line {i}\n")
        self.assertEqual(out.writes, [])  # nothing until the iteration ends
        reactor.advance(0)
        self.assertEqual(out.writes, ["".join(f"line {i}\n" for i in range(100))])
        self.assertEqual(reactor.getDelayedCalls(), [])
        w.write("next\n")
        reactor.advance(0)
        self.assertEqual(out.writes[1:], ["next\n"])

    def test_urgent_flushes_pending_first(self) -> None:
        out, reactor = Out(), running_reactor()
        w = LineWriter(out, reactor)
        w.write("a\n")
        w.write("b\n", urgent=True)
        self.assertEqual(out.getvalue(), "a\nb\n")
        self.assertEqual(reactor.getDelayedCalls(), [])  # the pending flush was cancelled

    def test_large_backlog_written_at_once(self) -> None:
        out, reactor = Out(), running_reactor()
        w = LineWriter(out, reactor)
        line = "x" * 100 + "\n"
        for _ in range(FLUSH_LINES):
            w.write(line)
        self.assertEqual(len(out.writes), 1)
        self.assertEqual(out.getvalue(), line * FLUSH_LINES)
        w.write(line)  # the next batch waits for the end of the iteration again
        self.assertEqual(len(out.writes), 1)
        reactor.advance(0)
        self.assertEqual(len(out.writes), 2)

    def test_reactor_not_running_writes_through(self) -> None:
        out, reactor = Out(), running_reactor()
        w = LineWriter(out, reactor)
        w.write("during\n")
        reactor.running = False  # twistd logs "Server Shut Down." after the loop
        w.write("after\n")
        self.assertEqual(out.getvalue(), "during\nafter\n")

    def test_other_thread_writes_through(self) -> None:
        out, reactor = Out(), running_reactor()
        w = LineWriter(out, reactor)
        t = threading.Thread(target=w.write, args=("from a pool thread\n",))
        t.start()
        t.join()
        self.assertEqual(out.getvalue(), "from a pool thread\n")
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_closed_file_does_not_raise(self) -> None:
        out, reactor = Out(), running_reactor()
        w = LineWriter(out, reactor)
        out.close()
        w.write("lost\n", urgent=True)  # no exception into the code that logged
        self.assertTrue(out.closed)


class TextObserverTests(unittest.TestCase):
    def setUp(self) -> None:
        self.out, self.reactor = Out(), running_reactor()
        self.obs = TextObserver(LineWriter(self.out, self.reactor))
        self.events: list[dict[str, Any]] = []
        pub = LogPublisher(self.obs, self.events.append)
        self.log = Logger(namespace="dockerspaces.request", observer=pub)

    def twistd_lines(self) -> str:
        """What twistd's own textFileLogObserver writes for the same events."""
        return "".join(formatEventAsClassicLogText(e, formatTime=formatTime) or "" for e in self.events)

    def test_same_lines_as_twistd(self) -> None:
        logs.log_request(
            kind="host",
            route="h:1",
            method=b"GET",
            uri=b"/host:h:1/a?b=2",
            status=200,
            nbytes=3,
            seconds=0.5,
            logger=self.log,
        )
        self.log.info("plain {what}", what="event")
        self.log.info("with a system", log_system="custom")
        try:
            1 / 0  # noqa: B018 - raised on purpose: a failure to log
        except ZeroDivisionError:
            self.log.failure("it broke")
        logs.log_request(
            kind="x",
            route="r",
            method="GET",
            uri=b"/x:a:1:80/",
            status=502,
            nbytes=0,
            seconds=0.1,
            reason="backend-error",
            logger=self.log,
        )
        self.reactor.advance(0)
        self.assertEqual(self.out.getvalue(), self.twistd_lines())
        text = self.out.getvalue()
        self.assertIn("[dockerspaces.request#info] host h:1 GET /host:h:1/a?b=… -> 200 3B", text)
        self.assertIn("[custom] with a system", text)
        self.assertIn("ZeroDivisionError", text)

    def test_request_log_writes_the_same_lines_directly(self) -> None:
        """RequestLog(text=observer) skips the event, not a character of the line."""
        request: dict[str, Any] = {
            "kind": "x",
            "route": "r",
            "method": b"POST",
            "uri": b"/x:a:1:80/p?secret=1",
            "status": 502,
            "nbytes": 0,
            "seconds": 0.1,
            "queue_wait": 0.25,
            "reason": "backend-error",
        }
        when = 1_700_000_000.5
        logs.RequestLog(logger=self.log)(**request, client=None)
        self.events[-1]["log_time"] = when
        self.reactor.advance(0)
        by_event = self.twistd_lines()
        self.out.truncate(0)
        self.out.seek(0)
        direct = logs.RequestLog(text=self.obs, now=lambda: when)
        direct(**request, client=None)
        self.assertEqual(self.out.getvalue(), "")  # batched until the end of the iteration
        self.reactor.advance(0)
        self.assertEqual(self.out.getvalue(), by_event)
        self.assertIn(
            "x r POST /x:a:1:80/p?secret=… -> 502 0B in 0.100s queued 0.250s (backend-error)", by_event
        )
        self.assertEqual(len(self.events), 1)  # the direct line made no event

    def test_timestamp_follows_the_clock(self) -> None:
        for when in (1_700_000_000.25, 1_700_000_000.75, 1_700_000_001.5, 1_700_003_600.0):
            event = {
                "log_format": "at {when}",
                "when": when,
                "log_time": when,
                "log_level": LogLevel.info,
                "log_namespace": "t",
            }
            self.events.append(event)
            self.obs(event)
        self.reactor.advance(0)
        self.assertEqual(self.out.getvalue(), self.twistd_lines())
        stamps = [line.split(" ")[0] for line in self.out.getvalue().splitlines()]
        self.assertEqual(stamps[0], stamps[1])
        self.assertNotEqual(stamps[1], stamps[2])

    def test_warnings_are_written_at_once(self) -> None:
        self.log.info("first")
        self.assertEqual(self.out.getvalue(), "")
        self.log.emit(LogLevel.warn, "container crash")
        self.assertEqual(len(self.out.writes), 1)
        self.assertIn("first", self.out.getvalue())
        self.assertIn("[dockerspaces.request#warn] container crash", self.out.getvalue())

    def test_empty_event_writes_nothing(self) -> None:
        self.obs({"log_level": LogLevel.info, "log_time": 0.0})
        self.reactor.advance(0)
        self.assertEqual(self.out.getvalue(), "")


class SetupTests(unittest.TestCase):
    def test_text_with_destination_is_ours(self) -> None:
        out, reactor = Out(), running_reactor()
        obs = logs.setup_logging("text", out, reactor)
        self.assertIsInstance(obs, TextObserver)

    def test_json_batched_with_reactor(self) -> None:
        out, reactor = Out(), running_reactor()
        obs = logs.setup_logging("json", out, reactor)
        assert obs is not None
        log = Logger(namespace="t", observer=LogPublisher(obs))
        log.info("one")
        log.info("two")
        self.assertEqual(out.getvalue(), "")
        reactor.advance(0)
        self.assertEqual([json.loads(x)["message"] for x in out.getvalue().splitlines()], ["one", "two"])
        self.assertEqual(len(out.writes), 1)


class DestinationTests(unittest.TestCase):
    """twistd_destination follows twistd's own --logfile/--nodaemon rules."""

    def test_cases(self) -> None:
        self.assertIsNone(twistd_destination(None))
        self.assertIsNone(twistd_destination({"syslog": True, "nodaemon": True}))
        self.assertIsNone(twistd_destination({"logger": "a.b", "nodaemon": True}))
        self.assertIsNone(twistd_destination({"logfile": "-", "nodaemon": False}))
        self.assertIs(twistd_destination({"logfile": "-", "nodaemon": True}), sys.stdout)
        self.assertIs(twistd_destination({"logfile": None, "nodaemon": True}), sys.stdout)

    def test_file_and_sigusr1_rotation(self) -> None:
        previous = signal.getsignal(signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
        self.addCleanup(signal.signal, signal.SIGUSR1, previous)
        path = os.path.abspath(self.mktemp())
        dest = twistd_destination({"logfile": path, "nodaemon": False})
        self.assertIsInstance(dest, logfile.LogFile)
        assert isinstance(dest, logfile.LogFile)
        self.addCleanup(dest.close)
        handler = signal.getsignal(signal.SIGUSR1)
        self.assertTrue(callable(handler))
        dest.write("hello\n")
        dest.flush()
        with open(path) as f:
            self.assertEqual(f.read(), "hello\n")
