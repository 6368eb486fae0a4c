"""Log events: the text and JSON lines after a known sequence; nothing secret in them."""

from __future__ import annotations

import io
import json
from typing import Any

from twisted.application.service import Application, IService
from twisted.logger import ILogObserver, Logger, LogPublisher, formatEvent
from twisted.trial import unittest

from dockerspaces import logs
from dockerspaces.spec import parse_route

SECRET = "s3cr3t-value"
SEGMENT = f"x:selmaproject:tts:777:5002:TOKEN={SECRET};MODE=fast"


class Captured:
    """A Logger whose events land in a list (and optionally a JSON observer)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.publisher = LogPublisher(self.events.append)
        self.log = Logger(namespace="dockerspaces.request", observer=self.publisher)

    def sequence(self) -> None:
        spec = parse_route(SEGMENT)
        logs.log_request(
            kind="x",
            route=spec.display,
            method=b"POST",  # type: ignore[union-attr]
            uri=f"/{SEGMENT}/api/tts?text=hello&key={SECRET}".encode(),
            status=200,
            nbytes=1234,
            seconds=1.25,
            queue_wait=0.5,
            client="10.0.0.9",
            logger=self.log,
        )
        logs.log_container(
            "pull-start",
            spec.display,
            "local",
            9100,  # type: ignore[union-attr]
            logger=self.log,
        )
        logs.log_container(
            "ready",
            spec.display,
            "local",
            9100,  # type: ignore[union-attr]
            container="3f2a9c0d1e2f3a4b5c6d",
            seconds=2.5,
            logger=self.log,
        )
        logs.log_container(
            "crash",
            spec.display,
            "gpu1",
            9101,  # type: ignore[union-attr]
            detail="exit code 3",
            logger=self.log,
        )
        logs.log_request(
            kind="host",
            route="example.org:80",
            method="GET",
            uri=b"/host:example.org/",
            status=502,
            nbytes=0,
            seconds=0.004,
            reason="backend-error",
            logger=self.log,
        )


class TextTests(unittest.TestCase):
    def test_lines(self) -> None:
        c = Captured()
        c.sequence()
        lines = [formatEvent(e) for e in c.events]
        spec = parse_route(SEGMENT)
        display = spec.display  # type: ignore[union-attr]
        redacted = "/" + display.replace(" ", ":")
        self.assertEqual(
            lines,
            [
                f"x {display} POST {redacted}/api/tts?text=…&key=… -> 200 1234B in 1.250s queued 0.500s",
                f"container pull-start {display} on local:9100",
                f"container ready {display} on local:9100 [3f2a9c0d1e2f] after 2.500s",
                f"container crash {display} on gpu1:9101: exit code 3",
                "host example.org:80 GET /host:example.org/ -> 502 0B in 0.004s (backend-error)",
            ],
        )
        self.assertEqual([e["log_level"].name for e in c.events], ["info", "info", "info", "warn", "info"])

    def test_no_secret_anywhere(self) -> None:
        c = Captured()
        c.sequence()
        for e in c.events:
            self.assertNotIn(SECRET, formatEvent(e))
            self.assertNotIn(SECRET, repr(e))

    def test_request_event_is_what_logger_info_builds(self) -> None:
        """log_request hands its observer the very event ``Logger.info`` would."""
        c = Captured()
        logs.log_request(
            kind="host",
            route="h:1",
            method=b"GET",
            uri=b"/host:h:1/a?b=c",
            status=200,
            nbytes=3,
            seconds=0.5,
            client="10.0.0.1",
            logger=c.log,
        )
        (ours,) = c.events
        ref: list[dict[str, Any]] = []
        Logger(namespace="dockerspaces.request", observer=ref.append).info(
            "{ds_text}", **{k: v for k, v in ours.items() if k.startswith("ds_")}
        )
        (theirs,) = ref
        self.assertEqual(set(ours), set(theirs))
        for k in ours:
            if k not in ("log_time", "log_logger"):
                self.assertEqual(ours[k], theirs[k], k)
        self.assertIs(ours["log_logger"], c.log)
        self.assertLess(abs(ours["log_time"] - theirs["log_time"]), 5)
        self.assertEqual(formatEvent(ours), "host h:1 GET /host:h:1/a?b=… -> 200 3B in 0.500s")

    def test_safe_path(self) -> None:
        self.assertEqual(logs.safe_path(b"/y:a:1:80/p?x=1&flag&y="), "/y:a:1:80/p?x=…&flag&y=…")
        self.assertEqual(logs.safe_path(b"/host:h/a/b"), "/host:h/a/b")


class JsonTests(unittest.TestCase):
    def test_json_lines(self) -> None:
        out = io.StringIO()
        observer = logs.setup_logging("json", out)
        self.assertIsNotNone(observer)
        c = Captured()
        c.publisher.addObserver(observer)  # type: ignore[arg-type]
        c.sequence()
        lines = out.getvalue().splitlines()
        self.assertEqual(len(lines), 5)
        recs = [json.loads(line) for line in lines]
        self.assertNotIn(SECRET, out.getvalue())
        first = recs[0]
        self.assertEqual(first["event"], "request")
        self.assertEqual(first["kind"], "x")
        self.assertEqual(first["status"], 200)
        self.assertEqual(first["bytes"], 1234)
        self.assertEqual(first["seconds"], 1.25)
        self.assertEqual(first["queue_wait"], 0.5)
        self.assertEqual(first["method"], "POST")
        self.assertEqual(first["client"], "10.0.0.9")
        self.assertTrue(first["route"].startswith("x:selmaproject/tts:777:5002 env[MODE,TOKEN]#"))
        self.assertTrue(first["time"].endswith("Z"))
        self.assertEqual(first["message"], formatEvent(c.events[0]))
        self.assertEqual([r["event"] for r in recs[1:4]], ["pull-start", "ready", "crash"])
        self.assertEqual(recs[2]["container"], "3f2a9c0d1e2f")
        self.assertEqual(recs[2]["slot"], 9100)
        self.assertEqual(recs[3]["level"], "warn")
        self.assertEqual(recs[3]["detail"], "exit code 3")
        self.assertNotIn("queue_wait", recs[4])  # None fields are left out
        self.assertEqual(recs[4]["reason"], "backend-error")

    def test_foreign_events_and_failures(self) -> None:
        out = io.StringIO()
        obs = logs.json_observer(out)
        log = Logger(namespace="twisted.other", observer=LogPublisher(obs))
        log.info("hello {who}", who="world")
        try:
            raise ZeroDivisionError("division by zero")
        except ZeroDivisionError:
            log.failure("oops")
        recs = [json.loads(x) for x in out.getvalue().splitlines()]
        self.assertEqual(recs[0]["message"], "hello world")
        self.assertEqual(recs[0]["namespace"], "twisted.other")
        self.assertEqual(recs[1]["level"], "critical")
        self.assertIn("ZeroDivisionError", recs[1]["message"])

    def test_text_means_twistd_observer(self) -> None:
        self.assertIsNone(logs.setup_logging("text"))
        self.assertRaises(ValueError, logs.setup_logging, "xml")


class ApplicationTests(unittest.TestCase):
    def test_observer_becomes_application_component(self) -> None:
        """twistd asks the Application for an ILogObserver before using --logfile."""
        app = Application("t")
        obs = logs.json_observer(io.StringIO())
        top = logs.ObservedMultiService(obs)
        top.setServiceParent(app)
        self.assertIs(app.getComponent(ILogObserver), obs)
        self.assertIn(top, list(IService(app)))  # type: ignore[call-overload]

    def test_text_sets_nothing(self) -> None:
        app = Application("t")
        logs.ObservedMultiService(None).setServiceParent(app)
        self.assertIsNone(app.getComponent(ILogObserver, None))


class UserTests(unittest.TestCase):
    def test_request_line_names_the_user(self) -> None:
        text = logs.request_text("x", "k", "GET", "/x:a/", 200, 2, 0.1, None, None, "alice")
        self.assertTrue(text.endswith(" user=alice"))
        self.assertNotIn("user=", logs.request_text("x", "k", "GET", "/", 200, 2, 0.1, None, None))
