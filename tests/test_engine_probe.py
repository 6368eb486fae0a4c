"""The readiness probe (dockerspaces.engine.probe): treq over an agent on a memory
reactor (and over treq.testing's RequestTraversalAgent); what counts as ready and the
plain words of what does not."""

from __future__ import annotations

from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Request

from dockerspaces.engine.probe import ProbeResult, probe_agent, probe_status_line, url_host

from .test_engine_harness import answer


def head(tr: StringTransport) -> tuple[str, dict[str, str]]:
    """The request line and the headers (lower-case names) a probe sent."""
    first, *rest = tr.value().decode("latin-1").split("\r\n\r\n", 1)[0].split("\r\n")
    headers = dict(line.split(": ", 1) for line in rest)
    return first, {k.lower(): v for k, v in headers.items()}


class ProbeTests(SynchronousTestCase):
    """probe_status_line over an agent on a memory reactor."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.agent = probe_agent(self.reactor, 5.0)

    def probe(
        self, host: str = "127.0.0.1", path: str = "/ready?x=1", timeout: float = 5.0
    ) -> Deferred[ProbeResult]:
        return probe_status_line(self.reactor, host, 9100, path, timeout, agent=self.agent)

    def test_request(self) -> None:
        d = self.probe()
        host, port, _factory, timeout, _bind = self.reactor.tcpClients[-1]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9100, 5))
        tr = answer(self.reactor, None, close=False)
        line, headers = head(tr)
        self.assertEqual(line, "GET /ready?x=1 HTTP/1.1")
        self.assertEqual(headers["host"], "127.0.0.1:9100")
        self.assertEqual(headers["user-agent"], "dockerspaces-probe")
        self.assertEqual(headers["connection"], "close")  # the pool is not persistent
        self.assertNoResult(d)

    def test_ipv6(self) -> None:
        self.probe(host="::1", path="/")
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("::1", 9100))
        line, headers = head(answer(self.reactor, None, close=False))
        self.assertEqual((line, headers["host"]), ("GET / HTTP/1.1", "[::1]:9100"))

    def test_long_ipv6_with_zone(self) -> None:
        """hyperlink cannot put an IPv6 literal in a URI: the URL names a stand-in the
        endpoint factory turns back into the address, however long."""
        address = "fe80::1234:5678:9abc:def0:1234:5678%eth0"
        self.assertNotIn(":", url_host(address))
        self.probe(host=address)
        self.assertEqual(self.reactor.tcpClients[-1][:2], (address, 9100))
        self.assertEqual(url_host("10.0.0.7"), "10.0.0.7")

    def test_any_status_code_is_ready(self) -> None:
        for data, line in [
            (b"HTTP/1.1 200 OK\r\n\r\n", "HTTP/1.1 200 OK"),
            (b"HTTP/1.0 503 Busy\r\n\r\n", "HTTP/1.0 503 Busy"),
            (b"HTTP/1.1 404\r\nContent-Length: 9\r\n\r\n", "HTTP/1.1 404"),
        ]:
            d = self.probe()
            tr = answer(self.reactor, data, close=False)
            r = self.successResultOf(d)
            self.assertEqual((r.ready, r.status_line), (True, line), data)
            self.assertEqual(tr.producerState, "stopped")  # the body is not read

    def test_redirect_is_an_answer(self) -> None:
        d = self.probe()
        answer(self.reactor, b"HTTP/1.1 302 Found\r\nLocation: http://elsewhere/\r\n\r\n")
        self.assertTrue(self.successResultOf(d).ready)
        self.assertEqual(len(self.reactor.tcpClients), 1)  # not followed

    def test_split_head(self) -> None:
        d = self.probe()
        _h, _p, factory, _t, _b = self.reactor.tcpClients[-1]
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        proto.dataReceived(b"HTTP/1.")
        proto.dataReceived(b"1 500 Internal\r\nX: y\r\n")
        self.assertNoResult(d)
        proto.dataReceived(b"\r\n")
        self.assertEqual(self.successResultOf(d).status_line, "HTTP/1.1 500 Internal")

    def test_eof_is_not_ready(self) -> None:
        d = self.probe()
        answer(self.reactor, None)  # docker-proxy: accept, then close
        r = self.successResultOf(d)
        self.assertFalse(r.ready)
        self.assertIn("accepted then closed", r.reason)

    def test_partial_then_eof(self) -> None:
        for partial in (b"HTTP/1.1 2", b"HTTP/1.1 200 OK\r\n"):  # a head ends with a blank line
            d = self.probe()
            answer(self.reactor, partial)
            r = self.successResultOf(d)
            self.assertFalse(r.ready)
            self.assertEqual(r.reason, "closed after a partial answer")

    def test_not_http(self) -> None:
        d = self.probe()
        answer(self.reactor, b"SSH-2.0-OpenSSH_9.2\r\n", close=False)
        r = self.successResultOf(d)
        self.assertFalse(r.ready)
        self.assertEqual(r.reason, "answer is not HTTP: 'SSH-2.0-OpenSSH_9.2'")

    def test_never_connects(self) -> None:
        d = self.probe(timeout=0.5)
        self.reactor.advance(0.5)
        r = self.successResultOf(d)
        self.assertEqual((r.ready, r.reason), (False, "no answer within 0.5s"))

    def test_no_head_in_time(self) -> None:
        d = self.probe(timeout=2)
        tr = answer(self.reactor, b"HTTP/1.1 200", close=False)
        self.reactor.advance(1.9)
        self.assertNoResult(d)
        self.reactor.advance(0.1)
        r = self.successResultOf(d)
        self.assertEqual((r.ready, r.reason), (False, "no status line within 2s"))
        self.assertTrue(tr.disconnecting)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_cannot_connect(self) -> None:
        d = self.probe()
        _h, _p, factory, _t, _b = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(self.reactor.connectors[-1], Failure(ConnectionRefusedError()))
        r = self.successResultOf(d)
        self.assertFalse(r.ready)
        self.assertTrue(r.reason.startswith("cannot connect: Connection was refused"), r.reason)
        self.assertEqual(self.reactor.getDelayedCalls(), [])

    def test_default_agent(self) -> None:
        d = probe_status_line(self.reactor, "10.0.0.7", 9100, "/", 3.0)
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("10.0.0.7", 9100))
        answer(self.reactor, b"HTTP/1.1 204 No Content\r\n\r\n")
        self.assertTrue(self.successResultOf(d).ready)


class Busy(Resource):
    """A resource that answers 503 to everything."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setResponseCode(503)
        return b"starting"


class TraversalTests(SynchronousTestCase):
    """probe_status_line over treq.testing's RequestTraversalAgent."""

    def test_503_is_ready(self) -> None:
        agent: Any = RequestTraversalAgent(Busy())
        d = probe_status_line(MemoryReactorClock(), "127.0.0.1", 9100, "/", 5.0, agent=agent)
        r = self.successResultOf(d)
        self.assertEqual((r.ready, r.status_line), (True, "HTTP/1.1 503 Service Unavailable"))
