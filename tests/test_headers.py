"""Unit tests for the header rules (dockerspaces/web/headers.py): the head a backend
receives, the response head parsed, and what of it reaches the client."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.testing import (
    GET,
    ProxyHarness,
    head_of,
    values,
)
from dockerspaces.web.headers import (
    BadResponse,
    drop_hop_by_hop,
    drop_lines,
    parse_header_lines,
    parse_response_head,
    rewrite_location,
)
from dockerspaces.web.proxy import ExchangeEnd


class RequestHeadTests(SynchronousTestCase):
    """What the backend receives."""

    def test_forwarded_headers_and_hop_by_hop(self) -> None:
        h = ProxyHarness()
        h.client(
            b"GET /a/b?c=d HTTP/1.1\r\nHost: front.example\r\n"
            b"Connection: keep-alive, X-Private\r\nKeep-Alive: timeout=5\r\n"
            b"X-Private: secret\r\nTE: trailers\r\nProxy-Authorization: Basic x\r\n"
            b"X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-Host: spoofed\r\n"
            b"Accept: a\r\nAccept: b\r\n\r\n"
        )
        _, bt = h.accept()
        line, headers = head_of(bt.value())
        self.assertEqual(line, b"GET /a/b?c=d HTTP/1.1")
        self.assertEqual(values(headers, b"host"), [b"front.example"])
        for gone in (b"connection", b"keep-alive", b"x-private", b"te", b"proxy-authorization"):
            self.assertEqual(values(headers, gone), [], gone)
        self.assertEqual(values(headers, b"x-forwarded-for"), [b"1.1.1.1, 10.1.2.3"])
        self.assertEqual(values(headers, b"x-forwarded-host"), [b"front.example"])
        self.assertEqual(values(headers, b"x-forwarded-proto"), [b"http"])
        self.assertEqual(values(headers, b"x-forwarded-prefix"), [b"/x:team:app:1:8080"])
        self.assertEqual(values(headers, b"accept"), [b"a", b"b"])
        self.assertEqual(values(headers, b"content-length"), [])

    def own_credentials_request(self, extra: bytes = b"") -> bytes:
        return (
            b"GET /p HTTP/1.1\r\nHost: f\r\nCookie: a=1; dsroute=AbCd; b=2\r\n"
            b"Cookie: dsroute=EfGh\r\nCookie: c=3\r\nX-Dockerspaces-Token: t0ken\r\n"
            b"x-dockerspaces-token: t1ken\r\nAuthorization: Bearer app-credential\r\n" + extra + b"\r\n"
        )

    def test_own_cookies_and_token_never_reach_a_container(self) -> None:
        """Issue 12 item 7: the dsroute cookie (each Cookie line) and X-Dockerspaces-Token
        (any spelling) stay here; the app's own cookies and, for one of our containers,
        Authorization go on."""
        h = ProxyHarness()
        h.client(self.own_credentials_request())
        _, bt = h.accept()
        sent = bt.value()
        _, headers = head_of(sent)
        self.assertEqual(values(headers, b"cookie"), [b"a=1; b=2", b"c=3"])
        self.assertEqual(values(headers, b"authorization"), [b"Bearer app-credential"])
        for gone in (b"dsroute", b"AbCd", b"EfGh", b"t0ken", b"t1ken"):
            self.assertNotIn(gone, sent)
        self.assertEqual(values(headers, b"x-dockerspaces-token"), [])

    def test_host_target_gets_no_authorization(self) -> None:
        """A host:/shost: target (``external``) gets neither our cookie and token nor the
        client's Authorization."""
        h = ProxyHarness()
        h.external = True
        h.client(self.own_credentials_request())
        _, bt = h.accept()
        sent = bt.value()
        _, headers = head_of(sent)
        self.assertEqual(values(headers, b"cookie"), [b"a=1; b=2", b"c=3"])
        self.assertEqual(values(headers, b"authorization"), [])
        for gone in (b"dsroute", b"app-credential", b"t0ken", b"t1ken"):
            self.assertNotIn(gone, sent)

    def test_upgrade_head_filtered_too(self) -> None:
        """A WebSocket handshake (tunnelled) carries no more of ours than a request."""
        h = ProxyHarness()
        h.external = True
        h.client(
            self.own_credentials_request(
                b"Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\n"
                b"Sec-WebSocket-Version: 13\r\n"
            )
        )
        _, bt = h.accept()
        sent = bt.value()
        _, headers = head_of(sent)
        self.assertEqual(values(headers, b"upgrade"), [b"websocket"])
        self.assertEqual(values(headers, b"cookie"), [b"a=1; b=2", b"c=3"])
        for gone in (b"dsroute", b"app-credential", b"t0ken", b"t1ken"):
            self.assertNotIn(gone, sent)

    def test_host_override(self) -> None:
        h = ProxyHarness()
        h.host_header = b"backend.example:8080"
        h.client(GET)
        _, bt = h.accept()
        _, headers = head_of(bt.value())
        self.assertEqual(values(headers, b"host"), [b"backend.example:8080"])
        self.assertEqual(values(headers, b"x-forwarded-host"), [b"front.example"])

    def test_body_streamed_with_length(self) -> None:
        h = ProxyHarness()
        body = b"0123456789" * 50
        h.client(b"POST /up HTTP/1.1\r\nHost: f\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        _, bt = h.accept()
        head, _, sent = bt.value().partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: 500", head)
        self.assertEqual(sent, body)

    def test_chunked_upload_arrives_intact(self) -> None:
        h = ProxyHarness()
        h.client(
            b"POST /up HTTP/1.1\r\nHost: f\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        _, bt = h.accept()
        head, _, sent = bt.value().partition(b"\r\n\r\n")
        self.assertIn(b"Content-Length: 11", head)
        self.assertNotIn(b"Transfer-Encoding", head)
        self.assertEqual(sent, b"hello world")


_NAME = st.text(alphabet="!#$%&'*+-.^_`|~" + "AZaz09Xx-", min_size=1, max_size=8)


_VALUE = st.binary(max_size=12).filter(lambda v: b"\r\n" not in v)


class HeadParserTests(SynchronousTestCase):
    """The regex fast path reads every header block it accepts as the line-by-line
    parser does."""

    @settings(max_examples=1500, deadline=None)
    @given(
        st.lists(
            st.tuples(
                _NAME,
                st.sampled_from([b"", b" ", b"\t", b"  "]),
                _VALUE,
                st.sampled_from([b"", b" ", b"\t "]),
            ),
            max_size=6,
        )
    )
    def test_fast_path_agrees(self, lines: list[tuple[str, bytes, bytes, bytes]]) -> None:
        block = b"".join(k.encode() + b":" + pre + v + post + b"\r\n" for k, pre, v, post in lines)
        try:
            slow: Any = parse_header_lines(block) if block else []
        except Exception as e:  # noqa: BLE001 - compared below
            slow = type(e)
        try:
            head = b"HTTP/1.1 200 OK" + (b"\r\n" + block[:-2] if block else b"")
            fast: Any = parse_response_head(head)[3]
        except Exception as e:  # noqa: BLE001 - compared below
            fast = type(e)
        self.assertEqual(fast, slow)

    @settings(max_examples=1000, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(
                    [
                        "Connection",
                        "connection",
                        "TE",
                        "te",
                        "Test",
                        "Keep-Alive",
                        "Connection-X",
                        "X-Connection",
                        "Upgrade",
                        "A",
                    ]
                ),
                st.sampled_from([b"", b" x", b"connection:", b"\nTE: y"[1:], b"te:"]),
            ),
            max_size=6,
        ),
        st.sets(st.sampled_from([b"connection", b"te", b"keep-alive", b"upgrade"])),
    )
    def test_drop_lines(self, lines: list[tuple[str, bytes]], names: set[bytes]) -> None:
        """drop_lines keeps exactly the lines whose name (any case) is not in names."""
        block = b"".join(k.encode() + b":" + v + b"\r\n" for k, v in lines)
        expected = b"".join(
            k.encode() + b":" + v + b"\r\n" for k, v in lines if k.lower().encode() not in names
        )
        self.assertEqual(drop_lines(block, frozenset(names)), expected)

    def test_folded_and_odd_lines_take_the_slow_path(self) -> None:
        head = b"HTTP/1.1 200 OK\r\nX-A: one\r\n  two\r\nX-B:\x0bv\x0c\r\nX C: d\r\nX-D: a\nb\rc"
        # a name that is not a token is dropped, CR/LF inside a value become spaces
        self.assertEqual(
            parse_response_head(head)[3], [(b"X-A", b"one two"), (b"X-B", b"v"), (b"X-D", b"a b c")]
        )
        self.assertRaises(BadResponse, parse_response_head, b"HTTP/1.1 200 OK\r\n X: y")
        self.assertRaises(BadResponse, parse_response_head, b"HTTP/1.1 200 OK\r\nno colon")

    def test_invalid_header_name_dropped(self) -> None:
        h = ProxyHarness()
        ct, _ = h.answer(b"HTTP/1.1 200 OK\r\nX C: d\r\nX-Ok: 1\r\nContent-Length: 2\r\n\r\nhi")
        line, headers = head_of(ct.value())
        self.assertEqual(line, b"HTTP/1.1 200 OK")
        self.assertEqual(values(headers, b"x-ok"), [b"1"])
        self.assertEqual(values(headers, b"x c"), [])
        self.assertTrue(ct.value().endswith(b"hi"))
        self.assertEqual(h.ends, [ExchangeEnd("finished", 200, 2)])


_HOP = ["Connection", "Keep-Alive", "TE", "Trailer", "Upgrade", "Proxy-Connection"]


class ForwardedHeadTests(SynchronousTestCase):
    """What reaches the client is the backend's header list less the hop-by-hop ones
    (and those named in Connection), values trimmed, order kept, whichever way the
    head was built."""

    @settings(max_examples=300, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.one_of(
                    st.sampled_from(_HOP + ["X-A", "x-a", "ETag", "Vary", "X-Named"]),
                    st.text(alphabet="abcXYZ-_", min_size=1, max_size=5),
                ),
                st.sampled_from(
                    [b"1", b" padded ", b"a, b", b"close", b"keep-alive", b"X-Named", b"\tt\t", b""]
                ),
            ),
            max_size=6,
        ),
        st.booleans(),
    )
    def test_client_sees_end_to_end_headers(self, lines: list[tuple[str, bytes]], plain: bool) -> None:
        block = b"".join(k.encode() + (b": " if plain else b":") + v + b"\r\n" for k, v in lines)
        h = ProxyHarness()
        ct, _ = h.answer(b"HTTP/1.1 200 OK\r\n" + block + b"Content-Length: 0\r\n\r\n")
        named = {
            t.strip().lower() for k, v in lines if k.lower() == "connection" for t in v.decode().split(",")
        }
        dropped = {x.lower() for x in _HOP} | named
        expected = [
            (k.lower().encode(), v.strip())
            for k, v in lines
            if k.lower() not in dropped and k.lower() != "content-length"
        ]
        got = [(k, v) for k, v in head_of(ct.value())[1] if k not in (b"date", b"content-length")]
        if "content-length" not in dropped:
            self.assertIn((b"content-length", b"0"), head_of(ct.value())[1])
        self.assertEqual(got, [kv for kv in expected if kv[0] != b"date"])


class HelperTests(SynchronousTestCase):
    def test_drop_hop_by_hop(self) -> None:
        got = drop_hop_by_hop(
            [
                (b"Connection", b"close, X-A"),
                (b"X-A", b"1"),
                (b"x-b", b"2"),
                (b"Upgrade", b"h2c"),
                (b"x-b", b"3"),
            ]
        )
        self.assertEqual(got, [(b"x-b", b"2"), (b"x-b", b"3")])

    def test_rewrite_location(self) -> None:
        pre = b"/host:b.example:8080"
        cases = {
            b"/a?b": pre + b"/a?b",
            b"http://b.example:8080/a": pre + b"/a",
            b"https://b.example:8080": pre + b"/",
            b"http://other.example/a": b"http://other.example/a",
            b"//b.example:8080/a": b"//b.example:8080/a",
            pre + b"/already": pre + b"/already",
            b"relative/x": b"relative/x",
        }
        for value, want in cases.items():
            self.assertEqual(rewrite_location(value, prefix=pre, backend_host=b"b.example:8080"), want, value)
        self.assertEqual(
            rewrite_location(b"http://b.example:80/a", prefix=b"/p", backend_host=b"b.example"),
            b"/p/a",
        )
