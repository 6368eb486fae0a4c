"""wait_ready (dockerspaces.engine.readiness): status line, health, exit with log
tail, workers, deadline; the probe is answered over the memory reactor."""

from __future__ import annotations

from typing import Any

from twisted.internet.testing import StringTransport

from dockerspaces.engine.interface import (
    ContainerExited,
    ContainerRemoved,
    NotReady,
    RunOptions,
    SlotInfo,
)
from dockerspaces.spec import JobSpec

from .test_engine_harness import SPEC, WORKER, EngineTestCase, answer


class ReadyTests(EngineTestCase):
    """wait_ready(): status line, health, exit with log tail, workers, deadline."""

    def started(self, spec: JobSpec = SPEC, states: list[dict[str, Any]] | None = None) -> Any:
        eng = self.make()
        h = self.successResultOf(eng.create(spec, SlotInfo("local", 9100), RunOptions()))
        self.client.states[h.id] = states or [{"Status": "running"}]
        self.successResultOf(eng.start(h))
        return h

    def answer(self, data: bytes | None) -> StringTransport:
        """Complete the newest probe connection: ``data`` then (None: only) close."""
        host, port, _factory, _timeout, _bind = self.reactor.tcpClients[-1]
        self.assertEqual((host, port), ("127.0.0.1", 9100))
        return answer(self.reactor, data)

    def test_ready_on_status_line(self) -> None:
        h = self.started()
        d = self.engine.wait_ready(h, 10.0, RunOptions(ready_path="/health"))
        self.assertNoResult(d)
        tr = self.answer(b"HTTP/1.1 404 Not Found\r\n\r\n")
        self.assertTrue(tr.value().startswith(b"GET /health HTTP/1.1\r\n"))
        self.successResultOf(d)

    def test_accepted_then_eof_is_not_ready(self) -> None:
        h = self.started()
        d = self.engine.wait_ready(h, 10.0, RunOptions())
        self.answer(None)  # docker-proxy: accept, then close
        self.assertNoResult(d)
        self.reactor.advance(0.05)
        self.assertEqual(len(self.reactor.tcpClients), 2)
        self.answer(b"HTTP/1.0 200 OK\r\n\r\n")
        self.successResultOf(d)

    def test_health_must_be_healthy(self) -> None:
        h = self.started(
            states=[
                {"Status": "running", "Health": {"Status": "starting"}},
                {"Status": "running", "Health": {"Status": "healthy"}},
            ]
        )
        d = self.engine.wait_ready(h, 10.0, RunOptions())
        self.answer(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertNoResult(d)
        self.reactor.advance(0.05)
        self.answer(b"HTTP/1.1 200 OK\r\n\r\n")
        self.successResultOf(d)

    def test_exit_fails_at_once_with_log_tail(self) -> None:
        h = self.started(states=[{"Status": "exited", "ExitCode": 3}])
        self.client.logs_text = b"starting\nfatal: no model\n"
        f = self.failureResultOf(self.engine.wait_ready(h, 10.0, RunOptions()), ContainerExited)
        self.assertEqual(f.value.exit_code, 3)
        self.assertEqual(f.value.log_tail, "starting\nfatal: no model")
        self.assertIn("exited with code 3", str(f.value))
        self.assertIn(
            ("logs", {"stdout": True, "stderr": True, "tail": 20, "timestamps": False}), self.client.calls
        )

    def test_exit_while_waiting(self) -> None:
        h = self.started(
            states=[{"Status": "running"}, {"Status": "exited", "ExitCode": 1, "OOMKilled": True}]
        )
        d = self.engine.wait_ready(h, 10.0, RunOptions())
        self.answer(None)
        self.reactor.advance(0.05)
        f = self.failureResultOf(d, ContainerExited)
        self.assertIn("out of memory", str(f.value))

    def test_gone_container(self) -> None:
        """Removed from outside (docker rm -f) while starting: ContainerRemoved, which
        the broker may retry, not the image's own exit."""
        h = self.started()
        del self.client.states[h.id]
        f = self.failureResultOf(self.engine.wait_ready(h, 10.0, RunOptions()), ContainerRemoved)
        self.assertIn("removed from outside", str(f.value))

    def test_killed_from_outside(self) -> None:
        """Exit 137 without the OOM flag (docker kill) is a removal from outside too."""
        h = self.started(states=[{"Status": "exited", "ExitCode": 137}])
        self.failureResultOf(self.engine.wait_ready(h, 10.0, RunOptions()), ContainerRemoved)

    def test_oom_kill_is_the_images_exit(self) -> None:
        h = self.started(states=[{"Status": "exited", "ExitCode": 137, "OOMKilled": True}])
        f = self.failureResultOf(self.engine.wait_ready(h, 10.0, RunOptions()), ContainerExited)
        self.assertNotIsInstance(f.value, ContainerRemoved)

    def test_not_ready_by_deadline(self) -> None:
        h = self.started()
        d = self.engine.wait_ready(h, 1.0, RunOptions())
        answered = 0
        for _ in range(100):
            if d.called:
                break
            if len(self.reactor.tcpClients) > answered:
                answered += 1
                self.answer(None)
            self.reactor.advance(0.05)
        self.assertGreater(answered, 3)
        f = self.failureResultOf(d, NotReady)
        self.assertIn("accepted then closed", str(f.value))
        self.assertLessEqual(self.reactor.seconds(), 1.2)

    def test_probe_that_never_connects_times_out(self) -> None:
        h = self.started()
        d = self.engine.wait_ready(h, 0.5, RunOptions())
        self.reactor.advance(0.6)
        f = self.failureResultOf(d, NotReady)
        self.assertIn("within", str(f.value))

    def test_worker_ready_when_running_after_settle(self) -> None:
        h = self.started(spec=WORKER)
        d = self.engine.wait_ready(h, 10.0, RunOptions())
        self.assertNoResult(d)
        self.reactor.advance(1.0)
        self.assertNoResult(d)
        self.reactor.pump([0.5] * 4)
        self.successResultOf(d)
        self.assertEqual(self.reactor.tcpClients, [])  # workers are never probed

    def test_worker_exit_during_settle(self) -> None:
        h = self.started(spec=WORKER, states=[{"Status": "running"}, {"Status": "exited", "ExitCode": 2}])
        d = self.engine.wait_ready(h, 10.0, RunOptions())
        self.reactor.advance(0.05)
        f = self.failureResultOf(d, ContainerExited)
        self.assertEqual(f.value.exit_code, 2)
