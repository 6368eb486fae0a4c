"""Unit tests for the backend side (dockerspaces/web/backend.py): reading answers off
the backend connection, pooling it, and the backend descriptions."""

from __future__ import annotations

from twisted.internet import error as ierror
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.testing import (
    GET,
    ProxyHarness,
    head_of,
    values,
)
from dockerspaces.web.backend import Backend
from dockerspaces.web.proxy import ExchangeEnd


class BackendConnectionTests(SynchronousTestCase):
    """The connection reads each answer's framing, goes back to the pool when
    clean, and a stale pooled one is retried once."""

    def test_pooled_connection_reused(self) -> None:
        h = ProxyHarness()
        h.client(GET)
        p, bt = h.accept()
        p.dataReceived(b"HTTP/1.1 204 No Content\r\n\r\n")
        bt.clear()
        h.client(GET)
        self.assertEqual(h.pending, [])
        self.assertTrue(bt.value().startswith(b"GET /path?q=1 HTTP/1.1"))
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual([e.reason for e in h.ends], ["finished", "finished"])

    def test_pooled_while_paused_reads_again(self) -> None:
        """A response that ends while the client has us paused leaves a reading connection."""
        h = ProxyHarness()
        channel, _ = h.client(GET)
        p, bt = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nab")
        channel.pauseProducing()
        self.assertEqual(bt.producerState, "paused")
        p.dataReceived(b"cd")
        self.assertEqual(h.proxy.idle_connections(), 1)
        self.assertEqual(bt.producerState, "producing")

    def test_no_body_statuses(self) -> None:
        for status in (b"204 No Content", b"304 Not Modified"):
            h = ProxyHarness()
            _, ct = h.client(GET)
            p, _ = h.accept()
            p.dataReceived(b"HTTP/1.1 " + status + b'\r\nETag: "x"\r\n\r\n')
            line, headers = head_of(ct.value())
            self.assertEqual(line, b"HTTP/1.1 " + status)
            self.assertEqual(values(headers, b"transfer-encoding"), [])
            self.assertEqual(values(headers, b"etag"), [b'"x"'])
            self.assertTrue(ct.value().endswith(b"\r\n\r\n"))
            self.assertEqual(h.proxy.idle_connections(), 1)

    def test_length_beside_chunked_not_passed_on(self) -> None:
        h = ProxyHarness()
        ct, _ = h.answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
        )
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"content-length"), [])
        self.assertEqual(values(headers, b"transfer-encoding"), [b"chunked"])
        self.assertTrue(ct.value().endswith(b"2\r\nok\r\n0\r\n\r\n"))

    def test_close_delimited_body(self) -> None:
        h = ProxyHarness()
        _, ct = h.client(GET)
        p, bt = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\n\r\nstream")
        self.assertTrue(bt.disconnecting is False)
        p.dataReceived(b"ing")
        p.connectionLost(Failure(ierror.ConnectionDone()))
        self.assertEqual(h.ends, [ExchangeEnd("finished", 200, 9)])
        self.assertEqual(h.proxy.idle_connections(), 0)
        self.assertIn(b"streaming", ct.value().replace(b"\r\n6\r\n", b"").replace(b"\r\n3\r\n", b""))

    def test_head_response(self) -> None:
        h = ProxyHarness()
        ct, _ = h.answer(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n", request=b"HEAD / HTTP/1.1\r\nHost: f\r\n\r\n"
        )
        self.assertIn(b"Content-Length: 1234", ct.value())
        self.assertTrue(ct.value().endswith(b"\r\n\r\n"))
        self.assertEqual(h.ends, [ExchangeEnd("finished", 200, 0)])
        self.assertEqual(h.proxy.idle_connections(), 1)

    def test_stale_pooled_connection_retried(self) -> None:
        h = ProxyHarness()
        h.client(GET)
        p, _ = h.accept()
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        h.client(GET)  # reuses p ...
        p.connectionLost(Failure(ierror.ConnectionDone()))  # ... which the backend had closed
        p2, bt2 = h.accept()
        self.assertTrue(bt2.value().startswith(b"GET /path"))
        p2.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertEqual([e.reason for e in h.ends], ["finished", "finished"])

    def test_bad_response_is_502(self) -> None:
        h = ProxyHarness()
        _, ct = h.client(GET)
        p, bt = h.accept()
        p.dataReceived(b"SSH-2.0-OpenSSH\r\n\r\n")
        self.assertTrue(ct.value().startswith(b"HTTP/1.1 502 "))
        self.assertTrue(bt.disconnecting)
        self.assertEqual([e.reason for e in h.ends], ["backend-error"])


class BackendDescriptionTests(SynchronousTestCase):
    def test_backend_descriptions(self) -> None:
        self.assertEqual(Backend.tcp("::1", 80).address(), ("::1", 80))
        b = Backend.tls("example.org", 443, address="93.184.216.34")
        self.assertEqual(b.address(), ("93.184.216.34", 443))
        self.assertEqual(b.default_host_header(), b"example.org")
        self.assertTrue(b.is_tls)
        self.assertEqual(Backend.tcp("10.0.0.1", 9100).default_host_header(), b"10.0.0.1:9100")
