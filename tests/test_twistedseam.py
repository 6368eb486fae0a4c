"""Unit tests for the seam to Twisted's internals: the self-test passes on the installed
Twisted, any mismatch or missing name turns every fast path off with one log line,
``DOCKERSPACES_FAST_PATHS=0`` does the same, and the answers are the same either way."""

from __future__ import annotations

import os
import socket
from typing import Any

from twisted.internet import tcp
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactor, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http, server
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource

from dockerspaces import twistedseam
from dockerspaces.engine import dockerseam
from dockerspaces.testing import CLIENT, GET, ProxyHarness, drain, socket_connection
from dockerspaces.twistedseam import (
    ENV,
    TWISTED_PARSE_REQUEST_LINE,
    SeamChannel,
    SeamRequest,
    decide,
    fast_paths_on,
    forced_off,
    install_request_line_parser,
    is_plain_tcp,
    missing_names,
    parse_request_line,
    self_test,
    why_off,
)
from dockerspaces.web import backend
from dockerspaces.web.sendnow import write_now
from dockerspaces.web.site import make_site


def _tcp_transport(test: SynchronousTestCase) -> tcp.Connection:
    a, b = socket.socketpair()
    test.addCleanup(a.close)
    test.addCleanup(b.close)
    return tcp.Connection(a, Protocol(), MemoryReactor())


def fast_paths_in_use(test: SynchronousTestCase) -> dict[str, bool]:
    """Which fast path is bound in, each read where it is bound."""
    return {
        "head": SeamChannel.dataReceived is not HTTPChannel.dataReceived,
        "process": SeamRequest.process is not server.Request.process,
        "requestReceived": SeamRequest.requestReceived is not server.Request.requestReceived,
        "request line": http._parseRequestLine is parse_request_line,
        "direct writes": is_plain_tcp(_tcp_transport(test)),
        "backend head": backend._write_head is write_now,
    }


class SeamTestCase(SynchronousTestCase):
    """Decides again after each test (the environment's choice), and records the
    seam's log events."""

    def setUp(self) -> None:
        install_request_line_parser()  # as make_site does
        # registered first: runs after any patch of the test is undone
        self.addCleanup(decide, dict(os.environ))
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def seam_lines(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("log_namespace") == "dockerspaces.twistedseam"]

    def assert_all_off(self, because: str) -> None:
        self.assertFalse(fast_paths_on())
        self.assertEqual(fast_paths_in_use(self), dict.fromkeys(fast_paths_in_use(self), False))
        reason = why_off()
        self.assertIsNotNone(reason)
        self.assertIn(because, str(reason))
        lines = self.seam_lines()
        self.assertEqual(len(lines), 1, lines)
        self.assertEqual(lines[0]["reason"], reason)


class SelfTestTests(SeamTestCase):
    def test_passes_on_the_installed_twisted(self) -> None:
        self.assertEqual(missing_names(), [])
        self.assertIsNone(self_test())

    def test_on_unless_the_environment_says_off(self) -> None:
        self.assertEqual(fast_paths_on(), not forced_off(os.environ))
        self.assertTrue(decide({}))
        self.assertIsNone(why_off())
        self.assertEqual(fast_paths_in_use(self), dict.fromkeys(fast_paths_in_use(self), True))
        self.assertEqual(self.seam_lines(), [])

    def test_the_environment_forces_them_off(self) -> None:
        for value in ("0", "off", "false", " No "):
            self.assertTrue(forced_off({ENV: value}), value)
        for value in ("1", "", "on"):
            self.assertFalse(forced_off({ENV: value}), value)
        self.assertFalse(decide({ENV: "0"}))
        self.assert_all_off(f"{ENV}=0")
        self.assertIs(http._parseRequestLine, TWISTED_PARSE_REQUEST_LINE)

    def test_back_on_after_off(self) -> None:
        decide({ENV: "0"})
        self.assertTrue(decide({}))
        self.assertEqual(fast_paths_in_use(self), dict.fromkeys(fast_paths_in_use(self), True))


class MismatchTests(SeamTestCase):
    """A fast path that behaves otherwise than Twisted's road, or a private name gone:
    every fast path off, one log line naming the reason."""

    def test_a_head_read_otherwise(self) -> None:
        real = twistedseam.simple_head

        def drops_the_last_header(data: bytes) -> Any:
            simple = real(data)
            return None if simple is None else (simple[0], simple[1][:-1])

        self.patch(twistedseam, "simple_head", drops_the_last_header)
        self.assertFalse(decide({}))
        self.assert_all_off("request head")

    def test_a_request_line_read_otherwise(self) -> None:
        def lenient(line: bytes) -> tuple[bytes, bytes, bytes]:
            method, target, version = line.split(b" ")
            return method, target, version

        self.patch(twistedseam, "parse_request_line", lenient)
        self.assertFalse(decide({}))
        self.assert_all_off("request line")

    def test_a_request_processed_otherwise(self) -> None:
        real = twistedseam.process_request

        def no_unquoting(request: Any) -> None:
            request.path = request.path.replace(b"%41", b"A")
            real(request)

        self.patch(twistedseam, "process_request", no_unquoting)
        self.assertFalse(decide({}))
        self.assert_all_off("request b'GET /a/b%41")

    def test_a_direct_write_that_loses_bytes(self) -> None:
        real = twistedseam.send_now

        def forgets_the_queue(t: Any, data: Any) -> bool:
            t._tempDataBuffer, t._tempDataLen = [], 0
            return real(t, data)

        self.patch(twistedseam, "send_now", forgets_the_queue)
        self.assertFalse(decide({}))
        self.assert_all_off("send_now")

    def test_a_missing_private_name(self) -> None:
        names = twistedseam._private_names()
        self.patch(
            twistedseam,
            "_private_names",
            lambda: [*names, ("HTTPChannel", HTTPChannel, "_goneInANewRelease")],
        )
        self.assertFalse(decide({}))
        self.assert_all_off("missing Twisted internals: HTTPChannel._goneInANewRelease")

    def test_a_self_test_that_raises(self) -> None:
        def broken() -> None:
            raise AttributeError("'HTTPChannel' object has no attribute '_buffer'")

        self.patch(twistedseam, "_check_heads", broken)
        self.assertFalse(decide({}))
        self.assert_all_off("self-test raised AttributeError")

    def test_a_chunked_decoder_that_changed(self) -> None:
        self.patch(twistedseam, "ChunkedDecoder", lambda data, done: _Swallows(done))
        self.assertFalse(decide({}))
        self.assert_all_off("chunked body")


class _Swallows:
    """A decoder that ends every body at once with no data."""

    def __init__(self, done: Any) -> None:
        self.done = done

    def dataReceived(self, data: bytes) -> None:
        self.done(b"")


class _Pages(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        if request.path == b"/boom":
            raise ValueError("boom")
        return b"%s %s %r" % (request.method, request.path, sorted(request.args.items()))


def _head_and_body(raw: bytes) -> tuple[bytes, list[bytes], bytes]:
    """Status line, header lines without Date (the second it was sent in) in order of
    name, and the body, of each answer in ``raw``."""
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    return lines[0], sorted(x for x in lines[1:] if not x.lower().startswith(b"date:")), body


class SameAnswersTests(SeamTestCase):
    """With the fast paths off the service answers as with them on."""

    def both(self, serve: Any) -> list[Any]:
        out = []
        for environ in ({}, {ENV: "0"}):
            decide(environ)
            out.append(serve())
        return out

    def test_own_pages(self) -> None:
        for raw in (
            b"GET /a%41?x=1&x=2 HTTP/1.1\r\nHost: h\r\n\r\n",
            b"HEAD /h HTTP/1.0\r\n\r\n",
            b"POST /p HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi",
            b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /boom HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
        ):

            def serve(raw: bytes = raw) -> tuple[Any, bool]:
                site = make_site(_Pages(), MemoryReactorClock(), max_body=1)
                channel = site.buildProtocol(CLIENT)
                t = StringTransport(peerAddress=CLIENT)
                channel.makeConnection(t)
                channel.dataReceived(raw)
                return _head_and_body(t.value()), t.disconnecting

            on, off = self.both(serve)
            self.flushLoggedErrors(ValueError)
            self.assertEqual(on, off, raw)

    def test_proxied_answers_over_a_socket(self) -> None:
        """The direct socket writes send what the transport's write would."""
        answers = [  # each in the pieces the backend sends it in
            [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nETag: x\r\n\r\nhello"],
            [
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                b"4000\r\n" + b"b" * 0x4000 + b"\r\n0\r\n\r\n",
            ],
            [b"HTTP/1.1 200 OK\r\nContent-Length: 40000\r\n\r\n" + b"c" * 100, b"c" * 20_000, b"c" * 19_900],
        ]

        def serve() -> list[Any]:
            h = ProxyHarness()
            with socket.create_server(("127.0.0.1", 0)) as listener:
                peer = socket.create_connection(listener.getsockname())
                a, _ = listener.accept()
            channel = h.site.buildProtocol(CLIENT)
            t, peer, reactor = socket_connection(self, a, peer, channel)
            t.getPeer = lambda: CLIENT  # type: ignore[method-assign]
            t.getHost = lambda: IPv4Address("TCP", "127.0.0.1", 8000)  # type: ignore[method-assign]
            channel.makeConnection(t)
            got = []
            for answer in answers:
                channel.dataReceived(GET)
                if h.pending:
                    p, _ = h.accept()
                for piece in answer:
                    p.dataReceived(piece)
                out = drain(peer)
                while reactor.getWriters():
                    t.doWrite()
                    out += drain(peer)
                got.append(_head_and_body(out))
            return got

        on, off = self.both(serve)
        self.assertEqual(on, off)
        self.assertTrue(on[2][2].endswith(b"c" * 100))


class DockerSeamTests(SynchronousTestCase):
    """docker-py still has the private methods the engine reaches through dockerseam."""

    def test_the_names_exist(self) -> None:
        import docker  # type: ignore[import-untyped]

        for name in ("_post", "_url", "_raise_for_status", "_stream_helper", "_retrieve_server_version"):
            self.assertTrue(callable(getattr(docker.APIClient, name, None)), name)
        client = docker.APIClient(base_url="http://127.0.0.1:1", version="1.41")
        self.addCleanup(client.close)
        dockerseam.set_api_version(client, "1.43")
        self.assertIn("/v1.43/images/create", client._url("/images/create"))
