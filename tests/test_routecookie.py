"""The ``dsroute`` cookie is an opaque, bounded reference; our cookies and token never
reach a backend."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from dockerspaces.web.headers import read_client_head
from dockerspaces.web.routecookie import RouteCookies, without_own_cookies

SEG = "x:team:app:1:80:TOKEN=hunter22;B=2"


def value_of(header: bytes) -> bytes:
    return header.split(b";", 1)[0].split(b"=", 1)[1]


def with_cookie(value: bytes) -> DummyRequest:
    req = DummyRequest([b""])
    req.requestHeaders.setRawHeaders(b"cookie", [b"a=1; dsroute=" + value + b"; b=2"])
    return req


class RouteCookieTests(SynchronousTestCase):
    def test_opaque_round_trip(self) -> None:
        """The value names the segment without containing it (nor its env values)."""
        rc = RouteCookies()
        header = rc.header(SEG, secure=False)
        assert header is not None
        self.assertTrue(header.endswith(b"; Path=/; HttpOnly; SameSite=Lax"))
        value = value_of(header)
        for leak in (b"hunter22", b"TOKEN", b"team", b"app"):
            self.assertNotIn(leak, value)
        self.assertLessEqual(len(value), 24)
        self.assertEqual(rc.from_request(with_cookie(value)), SEG)

    def test_secure_on_tls(self) -> None:
        header = RouteCookies().header(SEG, secure=True)
        assert header is not None
        self.assertTrue(header.endswith(b"; Secure"))

    def test_same_segment_same_reference(self) -> None:
        rc = RouteCookies()
        self.assertEqual(rc.ref(SEG), rc.ref(SEG))
        self.assertNotEqual(rc.ref(SEG), RouteCookies().ref(SEG))  # a key per start

    def test_unknown_forged_or_evicted(self) -> None:
        rc = RouteCookies(size=2)
        first = rc.ref("x:a:1:80")
        assert first is not None
        rc.ref("x:b:1:80")
        rc.ref("x:c:1:80")  # evicts the least recently used
        for value in (first, b"AAAAAAAAAAAAAAAAAAAAAA", b"x%3Ateam%3Aapp%3A1%3A80", b"", b"A" * 500):
            self.assertIsNone(rc.from_request(with_cookie(value)), value)
        self.assertEqual(len(rc._table), 2)

    def test_lookup_keeps_an_entry_fresh(self) -> None:
        rc = RouteCookies(size=2)
        a = rc.ref("x:a:1:80")
        assert a is not None
        rc.ref("x:b:1:80")
        self.assertEqual(rc.segment(a), "x:a:1:80")
        rc.ref("x:c:1:80")  # evicts b, not the one just used
        self.assertEqual(rc.segment(a), "x:a:1:80")

    def test_too_long_gets_no_cookie(self) -> None:
        self.assertIsNone(RouteCookies().header("x:" + "a" * 5000 + ":1:80", secure=False))


class NotForwardedTests(SynchronousTestCase):
    """What of the client's head reaches a backend."""

    def head(self, headers: dict[bytes, list[bytes]], external: bool = False) -> bytes:
        req = DummyRequest([b""])
        for k, v in headers.items():
            req.requestHeaders.setRawHeaders(k, v)
        return read_client_head(req, external).kept

    def test_own_cookie_taken_out_others_kept(self) -> None:
        kept = self.head({b"cookie": [b"a=1; dsroute=abc; b=2"]})
        self.assertIn(b"a=1", kept)
        self.assertIn(b"b=2", kept)
        self.assertNotIn(b"dsroute", kept)
        self.assertNotIn(b"cookie", self.head({b"cookie": [b"dsroute=abc"]}).lower())

    def test_token_never_forwarded(self) -> None:
        kept = self.head({b"x-dockerspaces-token": [b"s3cret"], b"accept": [b"*/*"]})
        self.assertNotIn(b"s3cret", kept)
        self.assertIn(b"*/*", kept)

    def test_authorization_kept_for_containers_not_for_host_targets(self) -> None:
        self.assertIn(b"Bearer x", self.head({b"authorization": [b"Bearer x"]}))
        self.assertNotIn(b"Bearer x", self.head({b"authorization": [b"Bearer x"]}, external=True))

    def test_without_own_cookies(self) -> None:
        self.assertEqual(without_own_cookies(b"a=1"), b"a=1")
        self.assertEqual(without_own_cookies(b"dsroute=x;a=1"), b"a=1")
        self.assertIsNone(without_own_cookies(b"dsroute=x"))
        self.assertEqual(without_own_cookies(b"mydsroute=1"), b"mydsroute=1")

    def test_referer_with_env_not_sent_to_host_targets(self) -> None:
        """A page of ours with env in its route links elsewhere: the Referer naming
        the env values stays here for host: targets; other Referers go on."""
        leaky = b"https://ds.example/x:team:app:1:80:TOKEN=hunter22/page"
        self.assertNotIn(b"hunter22", self.head({b"referer": [leaky]}, external=True))
        self.assertIn(b"hunter22", self.head({b"referer": [leaky]}))  # our own container
        plain = b"https://ds.example/x:team:app:1:80/page?a=b"
        self.assertIn(plain, self.head({b"referer": [plain]}, external=True))
        self.assertIn(b"/y:a:1:80/", self.head({b"referer": [b"/y:a:1:80/"]}, external=True))
