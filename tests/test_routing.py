"""Unit tests for the routing helpers: Referer/cookie fallbacks, HostPolicy, CORS."""

from __future__ import annotations

import ipaddress
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from dockerspaces.web.routing import (
    Forbidden,
    HostPolicy,
    ResolveError,
    cors_headers,
    is_preflight,
    preflight,
    resolver_from,
    route_from_referer,
)

SEG = "x:selmaproject:tts:777:5002"


class RefererTests(SynchronousTestCase):
    def test_same_host(self) -> None:
        ref = b"https://ds.example/" + SEG.encode() + b"/index.html?a=b"
        self.assertEqual(route_from_referer(ref, b"ds.example"), SEG)

    def test_other_host(self) -> None:
        ref = b"https://evil.example/" + SEG.encode() + b"/"
        self.assertIsNone(route_from_referer(ref, b"ds.example"))

    def test_path_only(self) -> None:
        self.assertEqual(route_from_referer(b"/host:example.org:8080/app", None), "host:example.org:8080")

    def test_env_segment_kept_raw(self) -> None:
        seg = "y:team:app:1:80:A=1%3B2;B=x"
        self.assertEqual(route_from_referer(b"http://h/" + seg.encode() + b"/p", b"h"), seg)

    def test_not_a_route(self) -> None:
        for ref in (
            b"http://h/static/app.js",
            b"http://h/x:Bad:1",
            b"http://h/",
            b"",
            None,
            b"http://h/monitor:broker/",
        ):
            self.assertIsNone(route_from_referer(ref, b"h"), ref)


def resolver(table: dict[str, list[str]]) -> Any:
    def resolve(name: str) -> Deferred[list[str]]:
        return succeed(table.get(name, []))

    return resolve


class HostPolicyTests(SynchronousTestCase):
    def policy(self, allow: tuple[str, ...] = (), **kw: Any) -> HostPolicy:
        table = {
            "example.org": ["93.184.216.34", "2606:2800:220:1::1"],
            "localhost": ["127.0.0.1", "::1"],
            "sneaky.example": ["93.184.216.34", "127.0.0.1"],
            "meta.example": ["169.254.169.254"],
            "db.internal": ["10.0.0.5"],
            "gpu1.example": ["203.0.113.9"],
        }
        return HostPolicy(allow=allow, own_ports={8888}, resolve=resolver(table), **kw)

    def forbidden(self, d: Deferred[str]) -> str:
        f = self.failureResultOf(d, Forbidden)
        return str(f.value.reason)

    def test_public_name_resolves_prefer_ipv4(self) -> None:
        self.assertEqual(self.successResultOf(self.policy().check("example.org", 80)), "93.184.216.34")

    def test_private_network_allowed(self) -> None:
        self.assertEqual(self.successResultOf(self.policy().check("db.internal", 5432)), "10.0.0.5")

    def test_loopback_refused(self) -> None:
        self.assertIn("loopback", self.forbidden(self.policy().check("localhost", 80)))
        self.assertIn("loopback", self.forbidden(self.policy().check("127.0.0.2", 80)))
        self.assertIn("loopback", self.forbidden(self.policy().check("::1", 80)))
        self.assertIn("loopback", self.forbidden(self.policy().check("::ffff:127.0.0.1", 80)))
        self.assertIn("loopback", self.forbidden(self.policy().check("sneaky.example", 80)))

    def test_link_local_refused(self) -> None:
        self.assertIn("link-local", self.forbidden(self.policy().check("meta.example", 80)))
        self.assertIn("link-local", self.forbidden(self.policy().check("fe80::1", 80)))

    def test_unspecified_refused(self) -> None:
        self.forbidden(self.policy().check("0.0.0.0", 80))

    def test_allow_by_name_address_cidr(self) -> None:
        self.assertEqual(
            self.successResultOf(self.policy(("localhost",)).check("localhost", 9000)), "127.0.0.1"
        )
        self.assertEqual(
            self.successResultOf(self.policy(("127.0.0.1",)).check("127.0.0.1", 9000)), "127.0.0.1"
        )
        self.assertEqual(
            self.successResultOf(self.policy(("169.254.0.0/16",)).check("meta.example", 80)),
            "169.254.169.254",
        )

    def test_own_port_always_refused(self) -> None:
        p = self.policy(("127.0.0.0/8", "localhost"), local=frozenset({"10.9.9.9"}))
        self.assertIn("own port", self.forbidden(p.check("127.0.0.1", 8888)))
        self.assertIn("own port", self.forbidden(p.check("localhost", 8888)))
        self.assertIn("own port", self.forbidden(p.check("10.9.9.9", 8888)))
        self.assertEqual(self.successResultOf(p.check("127.0.0.1", 8889)), "127.0.0.1")

    def test_machine_docker_networks_engines_refused(self) -> None:
        """This machine's own addresses (any port), Docker's networks (slot
        containers), and the engines' and peers' names and addresses (any port):
        refused unless allowed."""
        p = self.policy(
            local=frozenset({"192.168.1.20", "172.17.0.1", "fd00::2"}),
            blocked=frozenset({ipaddress.ip_network("172.17.0.0/16")}),
            engines=frozenset({"10.0.0.5", "GPU1.example."}),
        )
        self.assertIn("address of this machine", self.forbidden(p.check("192.168.1.20", 80)))
        self.assertIn("address of this machine", self.forbidden(p.check("172.17.0.1", 80)))
        self.assertIn(
            "[fd00::2]:443 (fd00::2) is an address of this machine", self.forbidden(p.check("fd00::2", 443))
        )
        self.assertIn("Docker network", self.forbidden(p.check("172.17.0.2", 8080)))
        for port in (2375, 22, 8080):
            self.assertIn("engine or peer", self.forbidden(p.check("10.0.0.5", port)))
            self.assertIn("engine or peer", self.forbidden(p.check("db.internal", port)))
            self.assertIn("engine or peer", self.forbidden(p.check("gpu1.example", port)))
        self.assertEqual(self.successResultOf(p.check("example.org", 2375)), "93.184.216.34")
        allowed = self.policy(
            ("172.17.0.0/16", "10.0.0.5"),
            blocked=frozenset({ipaddress.ip_network("172.17.0.0/16")}),
            engines=frozenset({"10.0.0.5"}),
        )
        self.assertEqual(self.successResultOf(allowed.check("172.17.0.2", 8080)), "172.17.0.2")
        self.assertEqual(self.successResultOf(allowed.check("db.internal", 2375)), "10.0.0.5")

    def test_update_networks_and_addresses(self) -> None:
        """update() adds what an engine or a later read says; each change forgets the
        cached verdicts and raises the generation; the same news changes nothing."""
        p = self.policy(local=frozenset({"192.168.1.20"}))
        self.assertEqual(p.check_literal("10.77.0.5", 8080), "10.77.0.5")
        self.assertEqual(p.check_literal("192.168.1.30", 80), "192.168.1.30")
        self.assertEqual(p.generation, 0)
        net = ipaddress.ip_network("10.77.0.0/24")
        self.assertTrue(p.update("engine:gpu1", networks=[net]))
        self.assertEqual(p.generation, 1)
        with self.assertRaises(Forbidden) as e:
            p.check_literal("10.77.0.5", 8080)
        self.assertIn("Docker network", e.exception.reason)
        self.assertFalse(p.update("engine:gpu1", networks=[net]))
        self.assertFalse(p.update("local", local=[]))  # nothing added: no change
        self.assertEqual(p.generation, 1)
        self.assertTrue(p.update("local", local=["192.168.1.30"]))
        self.assertIn("address of this machine", self.forbidden(p.check("192.168.1.30", 80)))
        self.assertIn("address of this machine", self.forbidden(p.check("192.168.1.20", 80)))
        self.assertEqual(p.local_now, {"192.168.1.20", "192.168.1.30"})
        # a source's new answer replaces its old one; the others' stay
        self.assertTrue(p.update("engine:gpu1", networks=[]))
        self.assertEqual(p.check_literal("10.77.0.5", 8080), "10.77.0.5")
        self.assertEqual(p.generation, 3)
        self.assertEqual(p.blocked_now, frozenset())

    def test_unresolvable(self) -> None:
        self.assertIn("does not resolve", self.forbidden(self.policy().check("nope.example", 80)))

    def test_check_literal_cached_verdicts(self) -> None:
        """IP literals are decided at once (and cached, refusals too); names are not."""
        p = self.policy(("127.0.0.1",))
        for _ in range(2):
            self.assertEqual(p.check_literal("127.0.0.1", 9000), "127.0.0.1")
            self.assertEqual(p.check_literal("::ffff:10.0.0.5", 80), "10.0.0.5")
            with self.assertRaises(Forbidden) as own:
                p.check_literal("127.0.0.1", 8888)
            self.assertIn("own port", own.exception.reason)
            with self.assertRaises(Forbidden) as loop:
                p.check_literal("127.0.0.2", 80)
            self.assertIn("loopback", loop.exception.reason)
            self.assertIsNone(p.check_literal("example.org", 80))
        # the Deferred API gives the same verdicts through the cache
        self.assertIn("own port", self.forbidden(p.check("127.0.0.1", 8888)))
        self.assertEqual(self.successResultOf(p.check("example.org", 80)), "93.184.216.34")

    def test_verdict_cache_is_bounded(self) -> None:
        from dockerspaces.web import routing

        p = self.policy()
        for i in range(routing.VERDICT_CACHE + 10):
            p.check_literal("10.0.0.5", i + 1)
        self.assertLessEqual(len(p._verdicts), routing.VERDICT_CACHE)


class _Resolver:
    """An IHostnameResolver that answers only when told to."""

    def __init__(self, fail_with: Exception | None = None) -> None:
        self.asked: list[tuple[Any, str]] = []
        self.fail_with = fail_with

    def resolveHostName(self, receiver: Any, name: str, port: int = 0) -> Any:
        if self.fail_with is not None:
            raise self.fail_with
        self.asked.append((receiver, name))
        receiver.resolutionBegan(None)
        return receiver

    def answer(self, *hosts: str) -> None:
        receiver, _ = self.asked.pop(0)
        for h in hosts:
            receiver.addressResolved(IPv4Address("TCP", h, 0))
        receiver.resolutionComplete()


class ResolverTests(SynchronousTestCase):
    """resolver_from: a lookup always fires -- with the addresses, or a ResolveError for
    a name getaddrinfo cannot encode (twisted's GAIResolver would fail in a Deferred of
    its own and never complete: the request hung) or after the timeout."""

    def test_addresses(self) -> None:
        r = _Resolver()
        d = resolver_from(r, Clock())("example.org")
        self.assertNoResult(d)
        r.answer("93.184.216.34", "93.184.216.35")
        self.assertEqual(self.successResultOf(d), ["93.184.216.34", "93.184.216.35"])

    def test_unencodable_name_fails_at_once(self) -> None:
        r = _Resolver()
        for name in ("a" * 64 + ".example", "a..b"):
            f = self.failureResultOf(resolver_from(r)(name), ResolveError)
            self.assertIn("cannot look up", f.getErrorMessage())
        self.assertEqual(r.asked, [])
        f = self.failureResultOf(resolver_from(_Resolver(ValueError("no")))("x.example"), ResolveError)
        self.assertIn("no", f.getErrorMessage())

    def test_timeout_then_late_answer_ignored(self) -> None:
        clock, r = Clock(), _Resolver()
        d = resolver_from(r, clock, timeout=5)("slow.example")
        clock.advance(4.9)
        self.assertNoResult(d)
        clock.advance(0.2)
        f = self.failureResultOf(d, ResolveError)
        self.assertIn("within 5 s", f.getErrorMessage())
        r.answer("10.0.0.1")  # the resolver's own late answer: dropped, no error
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_answer_cancels_timer(self) -> None:
        clock, r = Clock(), _Resolver()
        d = resolver_from(r, clock, timeout=5)("example.org")
        r.answer("10.0.0.1")
        self.assertEqual(self.successResultOf(d), ["10.0.0.1"])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_policy_passes_resolve_errors_on(self) -> None:
        p = HostPolicy(allow=(), own_ports=set(), resolve=resolver_from(_Resolver()))
        self.failureResultOf(p.check("a" * 64 + ".example", 80), ResolveError)


class CorsTests(SynchronousTestCase):
    def request(self, method: bytes = b"GET", **headers: bytes) -> DummyRequest:
        req = DummyRequest([b""])
        req.method = method
        for k, v in headers.items():
            req.requestHeaders.setRawHeaders(k.replace("_", "-").encode(), [v])
        return req

    def test_echo_origin_replacing_backend(self) -> None:
        req = self.request(origin=b"https://app.example")
        rh = req.responseHeaders
        rh.setRawHeaders(b"access-control-allow-origin", [b"*"])
        rh.setRawHeaders(b"Access-Control-Expose-Headers", [b"X-A"])
        rh.setRawHeaders(b"vary", [b"Accept-Encoding"])
        cors_headers(req)
        cors_headers(req)  # idempotent: nothing duplicated
        self.assertEqual(rh.getRawHeaders(b"access-control-allow-origin"), [b"https://app.example"])
        self.assertEqual(rh.getRawHeaders(b"access-control-allow-credentials"), [b"true"])
        self.assertIsNone(rh.getRawHeaders(b"access-control-expose-headers"))
        self.assertEqual(rh.getRawHeaders(b"vary"), [b"Accept-Encoding, Origin"])

    def test_no_origin(self) -> None:
        req = self.request()
        cors_headers(req)
        self.assertIsNone(req.responseHeaders.getRawHeaders(b"access-control-allow-origin"))
        self.assertEqual(req.responseHeaders.getRawHeaders(b"vary"), [b"Origin"])

    def test_preflight(self) -> None:
        req = self.request(
            b"OPTIONS",
            origin=b"https://app.example",
            access_control_request_method=b"PUT",
            access_control_request_headers=b"X-Token, Content-Type",
        )
        self.assertTrue(is_preflight(req))
        self.assertEqual(preflight(req), b"")
        rh = req.responseHeaders
        self.assertEqual(req.responseCode, 204)
        self.assertEqual(rh.getRawHeaders(b"access-control-allow-methods"), [b"PUT"])
        self.assertEqual(rh.getRawHeaders(b"access-control-allow-headers"), [b"X-Token, Content-Type"])
        self.assertEqual(rh.getRawHeaders(b"access-control-allow-origin"), [b"https://app.example"])

    def test_plain_options_is_not_preflight(self) -> None:
        self.assertFalse(is_preflight(self.request(b"OPTIONS", origin=b"https://a")))
        self.assertFalse(
            is_preflight(self.request(b"GET", origin=b"https://a", access_control_request_method=b"GET"))
        )


class RouteCookieFallbackTests(SynchronousTestCase):
    """The root routes by the ``dsroute`` cookie only through the proxy's table: an
    unknown, evicted, forged or raw-segment cookie falls through (--root, else 404)."""

    SEG = "x:team:app:1:80:SECRET=hunter22"

    def root(self, root_target: Any = None, size: int = 8) -> tuple[Any, list[Any], Any]:
        from dockerspaces.config import Config
        from dockerspaces.web.root import Root
        from dockerspaces.web.routecookie import RouteCookies

        calls: list[Any] = []

        class Routes:
            def job(self, spec: Any, prefix: bytes, path: bytes) -> Any:
                calls.append(("job", spec.segment(), prefix, path))
                return "job"

            def host(self, target: Any, prefix: bytes, path: bytes, cookie: bool) -> Any:
                calls.append(("host", target.segment(), prefix, path, cookie))
                return "host"

        cookies = RouteCookies(size=size, key=b"k" * 32)
        routes: Any = Routes()
        return Root(Config(root=root_target), routes, route_cookies=cookies), calls, cookies

    def request(self, cookie: bytes | None) -> DummyRequest:
        req = DummyRequest([b""])
        req.uri = b"/static/app.js?v=1"
        if cookie is not None:
            req.requestHeaders.setRawHeaders(b"cookie", [b"theme=dark; dsroute=" + cookie])
        return req

    def test_reference_routes_to_its_segment(self) -> None:
        root, calls, cookies = self.root()
        ref = cookies.ref(self.SEG)
        assert ref is not None
        self.assertNotIn(b"hunter22", ref)
        self.assertEqual(root.getChildWithDefault(b"static", self.request(ref)), "job")
        self.assertEqual(calls, [("job", self.SEG, b"/" + self.SEG.encode(), b"/static/app.js?v=1")])

    def test_unknown_forged_evicted_or_raw_fall_through(self) -> None:
        from dockerspaces.spec import HostTarget

        for root_target, answer in ((None, 404), (HostTarget("example.org", 80), "host")):
            root, calls, cookies = self.root(root_target, size=2)
            evicted = cookies.ref("x:a:1:80")
            cookies.ref("x:b:1:80")
            cookies.ref("x:c:1:80")
            other_key = self.root()[2].ref(self.SEG)  # a reference of another start
            assert evicted is not None and other_key is not None
            for value in (
                evicted,
                other_key,
                b"AAAAAAAAAAAAAAAAAAAAAA",
                self.SEG.encode(),
                b"x%3Ateam%3Aapp%3A1%3A80",
                b"",
                None,
            ):
                child = root.getChildWithDefault(b"static", self.request(value))
                if answer == 404:
                    self.assertEqual(getattr(child, "status", None), 404, value)
                else:
                    self.assertEqual(child, answer, value)
            if answer == "host":
                self.assertEqual({c[:2] for c in calls}, {("host", "host:example.org:80")})
            else:
                self.assertEqual(calls, [])
