"""Unit tests for make_site: body limit, request-head deadline, HTTP/1.1 only, log hook."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import server
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.test.requesthelper import DummyRequest

from dockerspaces.testing import FAST_PATH_ONLY
from dockerspaces.web.site import (
    TWISTED_PARSE_REQUEST_LINE,
    HeadDeadlineChannel,
    done_or_gone,
    make_site,
    parse_request_line,
)


class Echo(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[bytes] = []

    def render(self, request: Any) -> bytes:
        body = request.content.read()
        self.seen.append(body)
        return b"got %d" % len(body)


class SiteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.logged: list[Any] = []
        self.resource = Echo()
        self.site = make_site(
            self.resource,
            self.clock,
            max_body=100,
            head_timeout=5.0,
            on_request_logged=self.logged.append,
        )

    def connect(self) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
        t = StringTransport()
        channel.makeConnection(t)
        return channel, t

    def test_over_long_heads_get_414_and_431(self) -> None:
        """A URI over the line limit gets 414, a header line over it or a head over
        the total or count limits 431 -- not a silent close."""
        heads = {
            b"414": b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"431": b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 16_500 + b"\r\n\r\n",
            b"431 ": b"GET / HTTP/1.1\r\n"
            + b"".join(b"X%d: %s\r\n" % (i, b"a" * 900) for i in range(110))
            + b"\r\n",
            b"431  ": b"GET / HTTP/1.1\r\n" + b"".join(b"X%d: a\r\n" % i for i in range(600)) + b"\r\n",
        }
        for status, raw in heads.items():
            channel, t = self.connect()
            for i in range(0, len(raw), 4096):
                channel.dataReceived(raw[i : i + 4096])
            self.assertTrue(t.value().startswith(b"HTTP/1.1 " + status.strip() + b" "), t.value()[:60])
            self.assertTrue(t.disconnecting)
            self.assertEqual(t.value().count(b"HTTP/1.1 "), 1)

    def test_refusals_reach_on_refused(self) -> None:
        """Every answer the channel gives itself (400, 413, 414, 431) is reported to
        the site's on_refused once, with what is known of the request line (at most
        200 bytes of the URI) and the client -- so it can be logged and counted."""
        refused: list[tuple[Any, ...]] = []
        self.site.on_refused = lambda *a: refused.append(a)
        heads = [
            b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /p?q=1 HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 16_500 + b"\r\n\r\n",
            b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /h HTTP/1.1\r\nHost x\r\n\r\n",
            b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n",
        ]
        for raw in heads:
            channel = self.site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
            t = StringTransport(peerAddress=IPv4Address("TCP", "10.0.0.9", 5))
            channel.makeConnection(t)
            for i in range(0, len(raw), 4096):
                channel.dataReceived(raw[i : i + 4096])
            channel.dataReceived(b"GET / HTTP/1.1\r\n\r\n")  # nothing more is read
            status = int(t.value()[9:12])
            self.assertEqual(refused[-1][0], status)
        self.assertEqual([r[0] for r in refused], [414, 431, 400, 400, 413])
        self.assertEqual(
            [r[4] for r in refused],
            ["uri-too-long", "head-too-large", "bad-request", "bad-request", "body-too-large"],
        )
        self.assertEqual(refused[0][1:3], (b"GET", b"/" + b"a" * 195))
        self.assertEqual(refused[1][1:3], (b"GET", b"/p?q=1"))
        self.assertEqual(refused[3][1:3], (b"GET", b"/h"))
        self.assertEqual(refused[4][1:3], (b"POST", b"/up"))
        self.assertEqual({r[3].host for r in refused}, {"10.0.0.9"})
        self.assertEqual(self.logged, [])  # no request was processed

    def test_request_line_over_the_head_total_is_414(self) -> None:
        """A request line within the line limit but over ``totalHeadersSize`` (a site
        with a smaller total) is a URI too long, not a header problem."""
        channel, t = self.connect()
        channel.totalHeadersSize = 1000
        channel.dataReceived(b"GET /" + b"a" * 2000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 414 URI Too Long\r\n"), t.value()[:40])
        channel, t = self.connect()
        channel.totalHeadersSize = 1000
        channel.dataReceived(b"GET / HTTP/1.1\r\nX: " + b"a" * 2000 + b"\r\n\r\n")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 431 "), t.value()[:40])

    def test_body_within_limit(self) -> None:
        ch, t = self.connect()
        ch.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n\r\n" + b"a" * 100)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 200 "))
        self.assertEqual(self.resource.seen, [b"a" * 100])
        self.assertEqual(len(self.logged), 1)

    def test_form_upload_not_parsed(self) -> None:
        """A multipart POST stays in the spool (twisted.web would read it into args)."""
        body = b'--xx\r\nContent-Disposition: form-data; name="f"\r\n\r\n' + b"v" * 20 + b"\r\n--xx--\r\n"
        ch, t = self.connect()
        ch.dataReceived(
            b"POST / HTTP/1.1\r\nHost: h\r\n"
            b"Content-Type: multipart/form-data; boundary=xx\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body) + body
        )
        self.assertTrue(t.value().startswith(b"HTTP/1.1 200 "), t.value())
        self.assertEqual(self.resource.seen, [body])
        self.assertEqual(self.logged[0].args, {})

    def test_query_args_parsed_when_read(self) -> None:
        from twisted.web.http import parse_qs

        seen = _serve(b"GET /p?a=1&b=x%20y&a=2&flag HTTP/1.1\r\nHost: h\r\n\r\n", whole=True)[0]
        self.assertEqual(seen[0][4], parse_qs(b"a=1&b=x%20y&a=2&flag", 1))
        self.assertEqual(seen[0][4], {b"a": [b"1", b"2"], b"b": [b"x y"]})

    def test_own_pages_get_server_and_date(self) -> None:
        ch, t = self.connect()
        ch.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        head = t.value().split(b"\r\n\r\n")[0].lower()
        self.assertIn(b"\r\nserver: twistedweb", head)
        self.assertRegex(head, rb"\r\ndate: \w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d gmt")

    def test_host_address_asked_once_per_connection(self) -> None:
        ch, t = self.connect()
        asked: list[int] = []
        real = t.getHost

        def get_host() -> Any:
            asked.append(1)
            return real()

        t.getHost = get_host  # type: ignore[method-assign]
        for _ in range(3):
            ch.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(t.value().count(b"HTTP/1.1 200 "), 3)
        self.assertEqual(len(self.logged), 3)
        self.assertIs(self.logged[0].getHost(), self.logged[2].getHost())
        self.assertEqual(len(asked), 1)

    def test_declared_length_over_limit(self) -> None:
        ch, t = self.connect()
        ch.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 101\r\n\r\n" + b"a" * 50)
        self.assertTrue(t.value().startswith(b"HTTP/1.1 413 "))
        self.assertIn(b"101 bytes exceeds the limit of 100 bytes", t.value())
        self.assertTrue(t.disconnecting)
        ch.dataReceived(b"a" * 51 + b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(self.resource.seen, [])
        self.assertEqual(t.value().count(b"HTTP/1.1"), 1)

    def test_chunked_body_over_limit(self) -> None:
        ch, t = self.connect()
        ch.dataReceived(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        ch.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n")
        self.assertEqual(t.value(), b"")
        ch.dataReceived(b"40\r\n" + b"a" * 64 + b"\r\n0\r\n\r\n")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 413 "))
        self.assertTrue(t.disconnecting)
        self.assertEqual(self.resource.seen, [])

    def test_head_deadline_not_reset_by_bytes(self) -> None:
        ch, t = self.connect()
        for _ in range(4):
            ch.dataReceived(b"G")
            self.clock.advance(1.0)
        self.assertFalse(t.disconnected)
        self.clock.advance(1.0)
        self.assertTrue(t.disconnected)  # aborted at 5 s though bytes kept coming

    def test_head_deadline_restarts_after_request(self) -> None:
        ch, t = self.connect()
        self.clock.advance(4.0)
        ch.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 200 "))
        self.clock.advance(4.0)  # 8 s after connect, 4 s after the request
        self.assertFalse(t.disconnected)
        self.clock.advance(1.0)
        self.assertTrue(t.disconnected)

    def test_no_idle_timer_besides_the_deadline(self) -> None:
        """twisted.web's idle timeout is off: the head deadline is the only timer."""
        ch, _ = self.connect()
        self.assertIsNone(ch.timeOut)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_deadline_stops_while_handling(self) -> None:
        """A slow response (not a slow head) is not cut by the head deadline."""

        class Slow(Resource):
            isLeaf = True

            def render(self, request: Any) -> Any:
                return 1  # NOT_DONE_YET

        site = make_site(Slow(), self.clock, max_body=10, head_timeout=5.0)
        ch = site.buildProtocol(None)
        t = StringTransport()
        ch.makeConnection(t)
        ch.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.clock.advance(60)
        self.assertFalse(t.disconnected)
        ch.connectionLost(None)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadline_after_a_long_request(self) -> None:
        """The deadline timer is reused across requests: one that fires while a request is
        being handled does nothing, and the next head gets a full period from the end of
        the previous request."""
        held: list[Any] = []

        class Slow(Resource):
            isLeaf = True

            def render(self, request: Any) -> Any:
                held.append(request)
                return 1  # NOT_DONE_YET

        site = make_site(Slow(), self.clock, max_body=10, head_timeout=5.0)
        ch = site.buildProtocol(None)
        t = StringTransport()
        ch.makeConnection(t)
        ch.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
        self.clock.advance(12)  # the old deadline passes, disarmed
        self.assertFalse(t.disconnected)
        held[0].finish()
        self.assertTrue(t.value().startswith(b"HTTP/1.1 200 "))
        self.clock.advance(4.5)
        self.assertFalse(t.disconnected)
        self.clock.advance(0.6)
        self.assertTrue(t.disconnected)
        self.assertLessEqual(len(self.clock.getDelayedCalls()), 2)  # deadline + idle timeout

    def test_connection_lost_hooks(self) -> None:
        """``on_connection_lost`` hooks run (in order) when the client goes mid-request,
        not when the request finishes."""
        held: list[Any] = []

        class Hold(Resource):
            isLeaf = True

            def render(self, request: Any) -> Any:
                held.append(request)
                return 1  # NOT_DONE_YET

        site = make_site(Hold(), self.clock, max_body=10, head_timeout=5.0)
        calls: list[str] = []
        for gone in (False, True):
            ch = site.buildProtocol(None)
            t = StringTransport()
            ch.makeConnection(t)
            ch.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            req = held[-1]
            d = req.notifyFinish()
            req.on_connection_lost(lambda r, g=gone: calls.append(f"first {g}"))
            req.on_connection_lost(lambda r, g=gone: calls.append(f"second {g}"))
            if gone:
                ch.connectionLost(Exception("gone"))
                self.failureResultOf(d)  # the Deferred way still works, and ran first
            else:
                req.finish()
                self.successResultOf(d)
                ch.connectionLost(Exception("closed later"))
        self.assertEqual(calls, ["first True", "second True"])

    def test_done_or_gone(self) -> None:
        """done_or_gone: False while a request waits on a live connection, True once it
        is finished or its client went (as Twisted's ``_disconnected`` says), on both a
        plain twisted.web ``Request`` and ours; a test double counts as connected."""
        held: list[Any] = []

        class Hold(Resource):
            isLeaf = True

            def render(self, request: Any) -> Any:
                held.append(request)
                return 1  # NOT_DONE_YET

        for site in (make_site(Hold(), self.clock, max_body=10), server.Site(Hold(), reactor=self.clock)):
            for ending in ("finish", "lost", "lost-after-finish"):
                ch = site.buildProtocol(None)
                ch.makeConnection(StringTransport())
                ch.dataReceived(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
                req = held[-1]
                self.assertFalse(done_or_gone(req))
                if ending != "lost":
                    req.finish()
                    self.assertTrue(done_or_gone(req))
                if ending != "finish":
                    ch.connectionLost(Exception("gone"))
                    self.assertTrue(done_or_gone(req))
                self.assertEqual(done_or_gone(req), bool(req.finished or req._disconnected), ending)
        self.assertFalse(done_or_gone(DummyRequest([b""])))

    def test_http11_only_and_quiet(self) -> None:
        ch, _ = self.connect()
        self.assertIsInstance(ch, HeadDeadlineChannel)
        self.assertIsInstance(ch, HTTPChannel)
        self.assertFalse(self.site.noisy)


def _outcome(parse: Any, line: bytes) -> Any:
    try:
        return ("ok", parse(line))
    except ValueError as e:
        return ("ValueError", str(e))


class RequestLineTests(SynchronousTestCase):
    """parse_request_line answers exactly as twisted.web's own parser."""

    @settings(max_examples=2000, deadline=None)
    @given(
        st.one_of(
            st.binary(max_size=40),
            st.builds(
                lambda m, t, v: m + b" " + t + b" " + v,
                st.sampled_from([b"GET", b"POST", b"M-SEARCH", b"G@T", b"", b"get"]),
                st.binary(max_size=30),
                st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"http/1.1", b""]),
            ),
            st.builds(lambda t: b"GET /" + t + b" HTTP/1.1", st.binary(min_size=0, max_size=30)),
        )
    )
    def test_same_as_twisted(self, line: bytes) -> None:
        self.assertEqual(_outcome(parse_request_line, line), _outcome(TWISTED_PARSE_REQUEST_LINE, line))

    def test_every_byte_in_the_target(self) -> None:
        for c in range(256):
            line = b"GET /a" + bytes([c]) + b"b HTTP/1.1"
            self.assertEqual(
                _outcome(parse_request_line, line), _outcome(TWISTED_PARSE_REQUEST_LINE, line), c
            )
            method = b"G" + bytes([c]) + b"T / HTTP/1.1"
            self.assertEqual(
                _outcome(parse_request_line, method), _outcome(TWISTED_PARSE_REQUEST_LINE, method), c
            )

    def test_installed_by_make_site(self) -> None:
        from twisted.web import http

        make_site(Resource(), MemoryReactorClock(), max_body=1)
        self.assertIs(http._parseRequestLine, parse_request_line)
        ch = make_site(Echo(), MemoryReactorClock(), max_body=10).buildProtocol(
            IPv4Address("TCP", "10.0.0.1", 1)
        )
        t = StringTransport()
        ch.makeConnection(t)
        ch.dataReceived(b"GET /a\x7fb HTTP/1.1\r\nHost: h\r\n\r\nGET /a\x01 HTTP/1.1\r\n\r\n")
        self.assertTrue(t.value().startswith(b"HTTP/1.1 200 "))
        self.assertIn(b"400 Bad Request", t.value())

    test_installed_by_make_site.skip = FAST_PATH_ONLY  # type: ignore[attr-defined]


class Snapshot(Resource):
    """Records what a request looks like to a resource."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Any] = []

    def render(self, request: Any) -> bytes:
        self.seen.append(
            (
                request.method,
                request.uri,
                request.path,
                request.clientproto,
                request.args,
                sorted((k, list(v)) for k, v in request.requestHeaders.getAllRawHeaders()),
                request.content.read(),
                request.channel.persistent,
            )
        )
        return b"ok"


def _serve(raw: bytes, whole: bool) -> tuple[list[Any], bytes, bool, int]:
    """Feed ``raw`` to a fresh channel at once or a byte at a time."""
    resource = Snapshot()
    site = make_site(resource, MemoryReactorClock(), max_body=1000)
    ch = site.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1))
    t = StringTransport()
    ch.makeConnection(t)
    fast: list[int] = []
    real = ch._fast_head

    def spy(*args: Any) -> None:
        fast.append(1)
        real(*args)

    ch._fast_head = spy
    if whole:
        ch.dataReceived(raw)
    else:
        for i in range(len(raw)):
            if t.disconnecting:  # a real transport stops reading once closing
                break
            ch.dataReceived(raw[i : i + 1])
    out = t.value()
    # the Date header differs by the second it was sent in
    out = b"\r\n".join(x for x in out.split(b"\r\n") if not x.lower().startswith(b"date:"))
    return resource.seen, out, t.disconnecting, len(fast)


_TOKEN_CHARS = "!#$%&'*+-.^_`|~abcXYZ019"


class FastHeadTests(SynchronousTestCase):
    """A whole bodiless head read at once by regexes leaves what twisted.web's line
    parser leaves: same request, same response, same connection state."""

    def test_simple_head_takes_the_fast_path(self) -> None:
        raw = b"GET /a?b=1 HTTP/1.1\r\nHost: h\r\nX-Thing:  v  w \t\r\n\r\n"
        seen, out, closing, fast = _serve(raw, whole=True)
        self.assertEqual(fast, 1)
        self.assertEqual(seen[0][:5], (b"GET", b"/a?b=1", b"/a", b"HTTP/1.1", {b"b": [b"1"]}))
        self.assertIn((b"X-Thing", [b"v  w"]), seen[0][5])
        self.assertEqual((seen, out, closing), _serve(raw, whole=False)[:3])

    test_simple_head_takes_the_fast_path.skip = FAST_PATH_ONLY  # type: ignore[attr-defined]

    def test_a_value_naming_a_length_header_is_no_body(self) -> None:
        raw = b"GET / HTTP/1.1\r\nX-Note: see Content-Length: 5\r\n\r\n"
        whole = _serve(raw, whole=True)
        self.assertEqual(whole[3], 1)
        self.assertEqual(whole[:3], _serve(raw, whole=False)[:3])

    test_a_value_naming_a_length_header_is_no_body.skip = FAST_PATH_ONLY  # type: ignore[attr-defined]

    def test_bodies_and_pipelines_take_twisteds_parser(self) -> None:
        for raw in (
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nhi",
            b"POST / HTTP/1.1\r\nHost: h\r\ncontent-length: 0\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: h\r\nCONTENT-LENGTH:0\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: bare\rCR\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: bare\nLF\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: nul\x00\r\n\r\n",
            b"GET / HTTP/1.1\r\nBad Name: v\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: h\r\n\r\nGET /2 HTTP/1.1\r\nHost: h\r\n\r\n",
            b"\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n",
        ):
            whole = _serve(raw, whole=True)
            self.assertEqual(whole[3], 0, raw)
            self.assertEqual(whole[:3], _serve(raw, whole=False)[:3], raw)

    @settings(max_examples=400, deadline=None)
    @given(
        method=st.sampled_from([b"GET", b"HEAD", b"DELETE", b"M-SEARCH", b"G@T"]),
        target=st.binary(min_size=1, max_size=12).map(lambda b: b"/" + b.replace(b" ", b"")),
        version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/1.2"]),
        headers=st.lists(
            st.tuples(
                st.one_of(
                    st.text(alphabet=_TOKEN_CHARS, min_size=1, max_size=6).map(str.encode),
                    st.sampled_from([b"Connection", b"Expect", b"Host", b"Cookie", b"Bad Name", b"X\x00"]),
                ),
                st.one_of(
                    st.binary(max_size=8).filter(lambda v: b"\r\n" not in v),
                    st.sampled_from([b"close", b"100-continue", b" \tpadded\t ", b"a=1; b=2"]),
                ),
            ),
            max_size=5,
        ),
    )
    def test_same_as_twisted(
        self, method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]]
    ) -> None:
        raw = (
            method
            + b" "
            + target
            + b" "
            + version
            + b"\r\n"
            + b"".join(k + b":" + v + b"\r\n" for k, v in headers)
            + b"\r\n"
        )
        self.assertEqual(_serve(raw, whole=True)[:3], _serve(raw, whole=False)[:3])

    def test_second_request_on_a_connection(self) -> None:
        resource = Snapshot()
        ch = make_site(resource, MemoryReactorClock(), max_body=10).buildProtocol(
            IPv4Address("TCP", "10.0.0.1", 1)
        )
        t = StringTransport()
        ch.makeConnection(t)
        ch.dataReceived(b"GET /1 HTTP/1.1\r\nHost: h\r\n\r\n")
        ch.dataReceived(b"GET /2 HTTP/1.1\r\nHost: h\r\n\r\n")
        ch.dataReceived(b"GET /3 HTTP/1.1\r\nConnection: close\r\n\r\n")
        self.assertEqual([s[1] for s in resource.seen], [b"/1", b"/2", b"/3"])
        self.assertEqual(t.value().count(b"HTTP/1.1 200 OK"), 3)
        self.assertTrue(t.disconnecting)
        ch.dataReceived(b"GET /4 HTTP/1.1\r\nHost: h\r\n\r\n")  # after close: ignored
        self.assertEqual(len(resource.seen), 3)
