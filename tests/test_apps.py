"""Several apps at once (issue 14): labels of app hosts, Host routing, the browser
redirect, ``prefix = "keep"`` forwarding, the public path and URL told to containers,
``Set-Cookie`` paths under the prefix and our own cookies kept from every backend."""

from __future__ import annotations

import random
import re
import string
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from dockerspaces.app import Routes
from dockerspaces.config import Config, ConfigError, ImageProfile
from dockerspaces.options import build_config, load_config_file
from dockerspaces.profiles import Profiles
from dockerspaces.spec import JobSpec, parse_route
from dockerspaces.testing import ProxyHarness, head_of, values
from dockerspaces.web.apphosts import AppHosts, app_label, public_path
from dockerspaces.web.headers import rewrite_cookie_path
from dockerspaces.web.jobs import JobResource
from dockerspaces.web.root import Root

DNS_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
JUPYTER_A = "y:acme:jupyter:1:8888:NB=alpha;TOKEN=s3cr3t-value"
JUPYTER_B = "y:acme:jupyter:1:8888:NB=beta;TOKEN=s3cr3t-value"


def spec(segment: str) -> JobSpec:
    """The JobSpec of a route segment."""
    s = parse_route(segment)
    assert isinstance(s, JobSpec)
    return s


class LabelTests(SynchronousTestCase):
    """``app_label``: stable, DNS-safe, one per key, never an env value."""

    def test_readable_part_and_hash(self) -> None:
        label = app_label(spec("x:selmaproject:tts:777:5002"))
        self.assertRegex(label, r"^tts-777-[a-z2-7]{10}$")
        self.assertEqual(label, app_label(spec("x:selmaproject:tts:777:5002")))  # stable

    def test_same_key_any_spelling_one_label(self) -> None:
        self.assertEqual(
            app_label(spec("y:a:b:1:80:P=1;Q=2")),
            app_label(spec("y:a:b:1:80:Q=2;P=1")),
        )

    def test_every_part_of_the_key_counts(self) -> None:
        labels = {
            app_label(spec(s))
            for s in ("x:a:b:1:80", "y:a:b:1:80", "x:a:b:2:80", "x:a:b:1:81", "x:a:c:1:80", "x:a:b:1:80:E=1")
        }
        self.assertEqual(len(labels), 6)

    def test_no_env_value_and_dns_safe(self) -> None:
        for seg in (
            JUPYTER_A,
            "x:weird_org:image.name:V1.2_rc:80",
            "x:a:" + "long" * 30 + ":t:80",
            "x:a:b__c:_-_:80",
        ):
            label = app_label(spec(seg))
            self.assertLessEqual(len(label), 63, seg)
            self.assertIsNotNone(DNS_LABEL.fullmatch(label), (seg, label))
            self.assertNotIn("s3cr3t", label)
            self.assertNotIn("alpha", label)

    def test_no_collisions_among_many_keys(self) -> None:
        rnd = random.Random(14)
        seen: dict[str, str] = {}
        for i in range(20000):
            value = "".join(rnd.choice(string.ascii_letters) for _ in range(8))
            seg = f"y:team:app:1:8888:N={value}{i}"
            label = app_label(spec(seg))
            self.assertNotIn(label, seen, (seg, seen.get(label)))
            seen[label] = seg

    def test_public_path_is_canonical(self) -> None:
        self.assertEqual(public_path(spec("y:acme:jupyter:1:8888")), "/y:acme:jupyter:1:8888/")
        self.assertEqual(public_path(spec("y:a:b:1:80:Q=2;P=1")), "/y:a:b:1:80:P=1;Q=2/")


class AppHostsTests(SynchronousTestCase):
    """Which Host is an app host; labels remembered or found among the broker's."""

    def test_label_of(self) -> None:
        apps = AppHosts("apps.localhost")
        self.assertEqual(apps.label_of(b"tts-777-abc.apps.localhost:8080"), "tts-777-abc")
        self.assertEqual(apps.label_of(b"TTS-777-ABC.Apps.Localhost"), "tts-777-abc")
        for host in (
            b"apps.localhost",
            b".apps.localhost",
            b"a.b.apps.localhost",
            b"x.apps.localhost.evil.org",
            b"xapps.localhost",
            b"127.0.0.1:8080",
            b"[::1]:8080",
            None,
        ):
            self.assertIsNone(apps.label_of(host), host)
        self.assertIsNone(AppHosts().label_of(b"a.apps.localhost"))

    def test_lookup_remembered_or_from_the_broker(self) -> None:
        a, b = spec(JUPYTER_A), spec(JUPYTER_B)
        apps = AppHosts("apps.localhost", known=lambda: [a])
        self.assertEqual(apps.lookup(app_label(a)), a)  # a container of the broker's
        self.assertIsNone(apps.lookup(app_label(b)))  # never handed out, not running
        apps.remember(b)
        self.assertEqual(apps.lookup(app_label(b)), b)
        self.assertIsNone(apps.lookup("nothing-0000000000"))


class _Routes:
    """The root's RouteResources, recording what it is asked for."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def job(self, spec: JobSpec, prefix: bytes, path: bytes) -> Any:
        self.calls.append(("job", spec.key, prefix, path))
        return "job"

    def monitor(self, route: Any) -> Any:
        self.calls.append(("monitor", route.name))
        return "monitor"

    def host(self, *a: Any) -> Any:
        self.calls.append(("host",))
        return "host"


def request(uri: bytes, host: bytes, accept: bytes | None = None, method: bytes = b"GET") -> Any:
    """A request for ``uri`` with ``Host`` and ``Accept``."""
    req = DummyRequest([b""])
    req.uri, req.method = uri, method
    req.isSecure = lambda: False  # type: ignore[attr-defined]
    req.requestHeaders.setRawHeaders(b"host", [host])
    if accept is not None:
        req.requestHeaders.setRawHeaders(b"accept", [accept])
    return req


HTML = b"text/html,application/xhtml+xml,*/*;q=0.8"


class AppDomainRootTests(SynchronousTestCase):
    """``--app-domain``: Host routing, the browser redirect, API clients served in place."""

    def setUp(self) -> None:
        self.apps = AppHosts("apps.localhost")
        self.routes = _Routes()
        self.root = Root(Config(app_domain="apps.localhost"), self.routes, apps=self.apps)  # type: ignore[arg-type]
        self.a = spec(JUPYTER_A)
        self.seg = b"/" + JUPYTER_A.encode()

    def test_browser_redirected_to_the_apps_host_path_and_query_kept(self) -> None:
        child = self.root.getChildWithDefault(
            b"", request(self.seg + b"/tree/x?a=1&b=2", b"front:8080", HTML)
        )
        self.assertEqual(child.status, 307)  # type: ignore[attr-defined]
        label = app_label(self.a)
        self.assertEqual(child.location, f"http://{label}.apps.localhost:8080/tree/x?a=1&b=2".encode())  # type: ignore[attr-defined]
        self.assertNotIn(b"s3cr3t", child.location)  # type: ignore[attr-defined]
        self.assertEqual(self.routes.calls, [])

    def test_redirect_without_slash_and_over_tls(self) -> None:
        req = request(self.seg, b"front", HTML)
        req.isSecure = lambda: True
        child = self.root.getChildWithDefault(b"", req)
        self.assertEqual(child.location, f"https://{app_label(self.a)}.apps.localhost/".encode())  # type: ignore[attr-defined]

    def test_public_url_gives_scheme_and_port(self) -> None:
        apps = AppHosts("apps.example.org", "https://spaces.example.org:8443")
        root = Root(Config(app_domain="apps.example.org"), _Routes(), apps=apps)  # type: ignore[arg-type]
        child = root.getChildWithDefault(b"", request(self.seg + b"/", b"10.0.0.1:8080", HTML))
        self.assertEqual(child.location, f"https://{app_label(self.a)}.apps.example.org:8443/".encode())  # type: ignore[attr-defined]

    def test_api_clients_posts_and_workers_served_in_place(self) -> None:
        for req in (
            request(self.seg + b"/api/x", b"front", b"application/json"),
            request(self.seg + b"/api/x", b"front"),
            request(self.seg + b"/form", b"front", HTML, method=b"POST"),
        ):
            self.assertEqual(self.root.getChildWithDefault(b"", req), "job")
        self.assertEqual(self.routes.calls[0], ("job", self.a.key, self.seg, b"/api/x"))
        worker = b"/x:acme:worker:1:3"
        self.assertEqual(self.root.getChildWithDefault(b"", request(worker, b"front", HTML, b"POST")), "job")

    def test_app_host_routes_its_key_with_the_path_untouched(self) -> None:
        label = self.apps.remember(self.a)
        host = f"{label}.apps.localhost:8080".encode()
        for uri in (
            b"/",
            b"/api/kernels/k1/channels?session_id=9",
            b"/x:other:image:1:80/z",
            b"/monitor:broker/",
        ):
            self.assertEqual(self.root.getChildWithDefault(b"", request(uri, host)), "job")
        self.assertEqual(
            [c[3] for c in self.routes.calls],
            [b"/", b"/api/kernels/k1/channels?session_id=9", b"/x:other:image:1:80/z", b"/monitor:broker/"],
        )
        self.assertEqual({c[1] for c in self.routes.calls}, {self.a.key})
        self.assertEqual({c[2] for c in self.routes.calls}, {b""})  # no prefix: no dsroute

    def test_app_host_browser_not_redirected_and_waiting_page_progress(self) -> None:
        label = self.apps.remember(self.a)
        host = f"{label}.apps.localhost".encode()
        self.assertEqual(
            self.root.getChildWithDefault(b"", request(b"/notebooks/t.ipynb", host, HTML)), "job"
        )
        self.assertEqual(
            self.root.getChildWithDefault(b"", request(b"/monitor:progress/tok", host)), "monitor"
        )
        self.assertEqual(self.routes.calls[-1], ("monitor", "progress"))

    def test_unknown_app_host_is_404_with_a_hint(self) -> None:
        child = self.root.getChildWithDefault(b"", request(b"/", b"nothing-0000000000.apps.localhost"))
        self.assertEqual(child.status, 404)  # type: ignore[attr-defined]
        self.assertIn("open the app from its /x:", child.message)  # type: ignore[attr-defined]
        self.assertEqual(self.routes.calls, [])


class StripCookieLimitationTests(SynchronousTestCase):
    """The known limitation of ``strip`` apps (docs/apps.md): the ``dsroute`` cookie
    names one app per browser, so a request without the prefix and without a Referer
    (a reconnecting WebSocket) goes to whichever app's page was loaded last."""

    def test_the_cookie_names_the_last_app_only(self) -> None:
        from dockerspaces.web.routecookie import RouteCookies

        cookies = RouteCookies(key=b"k" * 32)
        routes = _Routes()
        root = Root(Config(), routes, route_cookies=cookies)  # type: ignore[arg-type]
        for seg in (JUPYTER_A, JUPYTER_B):  # tab A's page, then tab B's
            ref = cookies.ref(seg)
            assert ref is not None
            last = ref
        req = request(b"/api/kernels/k1/channels", b"front")  # tab A's WebSocket
        req.requestHeaders.setRawHeaders(b"cookie", [b"dsroute=" + last])
        root.getChildWithDefault(b"", req)
        self.assertEqual(routes.calls[0][1], spec(JUPYTER_B).key)  # B's, not A's


class KeepPrefixTests(SynchronousTestCase):
    """``prefix = "keep"``: the whole path in the key's one spelling, no prefix header,
    no Location rewriting, no route cookie."""

    def routes(self, **config: Any) -> Routes:
        profiles = (ImageProfile("acme/jupyter:*", prefix="keep"),)
        c = Config(profiles=profiles, **config)
        p = Profiles(c, AppHosts(c.app_domain))
        return Routes(c, proxy=None, broker=None, policy=None, profiles=p)  # type: ignore[arg-type]

    def test_keep_forwards_the_whole_path(self) -> None:
        seg = "y:acme:jupyter:1:8888:TOKEN=s;NB=a"  # not in canonical order
        job = self.routes().job(spec(seg), b"/" + seg.encode(), b"/api/kernels?x=1")
        assert isinstance(job, JobResource)
        self.assertEqual(job.path, b"/y:acme:jupyter:1:8888:NB=a;TOKEN=s/api/kernels?x=1")
        self.assertEqual(job.prefix, b"")

    def test_strip_for_other_images_and_on_app_hosts(self) -> None:
        other = "y:acme:rstudio:1:8787"
        job = self.routes().job(spec(other), b"/" + other.encode(), b"/a")
        assert isinstance(job, JobResource)
        self.assertEqual((job.prefix, job.path), (b"/" + other.encode(), b"/a"))
        seg = "y:acme:jupyter:1:8888"
        job = self.routes(app_domain="apps.localhost").job(spec(seg), b"/" + seg.encode(), b"/a")
        assert isinstance(job, JobResource)
        self.assertEqual((job.prefix, job.path), (b"/" + seg.encode(), b"/a"))  # an API client there


class RunOptionsTests(SynchronousTestCase):
    """Every container is told its public path and URL; profile placeholders filled."""

    def test_defaults_without_a_profile(self) -> None:
        apps = AppHosts()
        s = spec("y:acme:web:1:80")
        apps.note(request(b"/y:acme:web:1:80/", b"front:8080"), s)
        env = dict(Profiles(Config(), apps).run_options(s).env)
        self.assertEqual(env["DOCKERSPACES_PUBLIC_PATH"], "/y:acme:web:1:80/")
        self.assertEqual(env["DOCKERSPACES_PUBLIC_URL"], "http://front:8080/y:acme:web:1:80/")

    def test_placeholders_in_command_env_and_ready_path(self) -> None:
        profile = ImageProfile(
            "acme/jupyter:*",
            prefix="keep",
            command=("jupyter-notebook", "--NotebookApp.base_url={public_path}", "--x={{literal}}"),
            env=(("BASE", "{public_url}"),),
            ready_path="{public_path}api",
        )
        s = spec("y:acme:jupyter:1:8888")
        opts = Profiles(
            Config(profiles=(profile,)), AppHosts(None, "https://spaces.example.org")
        ).run_options(s)
        self.assertEqual(
            opts.command,
            ("jupyter-notebook", "--NotebookApp.base_url=/y:acme:jupyter:1:8888/", "--x={literal}"),
        )
        env = dict(opts.env)
        self.assertEqual(env["BASE"], "https://spaces.example.org/y:acme:jupyter:1:8888/")
        self.assertEqual(env["DOCKERSPACES_PUBLIC_URL"], env["BASE"])
        self.assertEqual(opts.ready_path, "/y:acme:jupyter:1:8888/api")

    def test_app_domain_apps_live_at_the_root(self) -> None:
        apps = AppHosts("apps.localhost")
        s = spec(JUPYTER_A)
        req = request(b"/x", b"127.0.0.1:9999")
        apps.note(req, s)
        env = dict(Profiles(Config(app_domain="apps.localhost"), apps).run_options(s).env)
        self.assertEqual(env["DOCKERSPACES_PUBLIC_PATH"], "/")
        self.assertEqual(env["DOCKERSPACES_PUBLIC_URL"], f"http://{app_label(s)}.apps.localhost:9999/")

    def test_no_origin_known_gives_the_path(self) -> None:
        s = spec("x:acme:worker:1:3")
        env = dict(Profiles(Config()).run_options(s).env)
        self.assertEqual(env["DOCKERSPACES_PUBLIC_URL"], "/x:acme:worker:1:3/")

    def test_fake_engine_container_gets_env_and_command(self) -> None:
        from twisted.internet.task import Clock

        from dockerspaces.config import HostConfig
        from dockerspaces.engine.fake import FakeEngine
        from dockerspaces.engine.interface import RunOptions, SlotInfo

        engine = FakeEngine(Clock(), HostConfig("local", "unix:///x", 9100, 1))
        s = spec("y:acme:web:1:80:A=url;DOCKERSPACES_PUBLIC_PATH=spoofed")
        opts = RunOptions(command=("serve",), env=(("A", "profile"), ("DOCKERSPACES_PUBLIC_PATH", "/p/")))
        handle = self.successResultOf(engine.create(s, SlotInfo("local", 9100), opts))
        c = engine.containers[handle.id]
        self.assertEqual(c.command, ("serve",))
        self.assertEqual(c.env, {"A": "profile", "DOCKERSPACES_PUBLIC_PATH": "/p/"})


class ConfigTests(SynchronousTestCase):
    """Profile keys and the two options, validated with clear errors."""

    def load(self, text: str) -> Any:
        path = self.mktemp()
        with open(path, "w") as f:
            f.write(text)
        return load_config_file(path)[1]

    def test_profile_keys(self) -> None:
        (p,) = self.load(
            '[[profile]]\nimage = "acme/jupyter:*"\nprefix = "keep"\n'
            'command = ["jupyter-notebook", "--base={public_path}"]\nenv = { BASE = "{public_url}" }\n'
        )
        self.assertEqual(
            (p.prefix, p.command, p.env),
            ("keep", ("jupyter-notebook", "--base={public_path}"), (("BASE", "{public_url}"),)),
        )

    def test_bad_profiles(self) -> None:
        for body, words in (
            ('prefix = "drop"', "'prefix' must be"),
            ("command = []", "'command' must be"),
            ('command = "jupyter"', "'command' must be"),
            ("env = { A = 1 }", "'env' must be"),
            ('command = ["--base={publicpath}"]', "only {public_path} and {public_url}"),
            ('env = { A = "{" }', "only {public_path}"),
            ('ready-path = "{nope}"', "only {public_path}"),
            ('cookie-path = "root"', "'cookie-path' must be"),
        ):
            with self.assertRaises(ConfigError) as e:
                self.load(f'[[profile]]\nimage = "a"\n{body}\n')
            self.assertIn(words, str(e.exception), body)

    def test_options(self) -> None:
        c = build_config(
            {"app-domain": "Apps.Example.org.", "public-url": "https://spaces.example.org:8443/"}
        )
        self.assertEqual(
            (c.app_domain, c.public_url), ("apps.example.org", "https://spaces.example.org:8443")
        )
        for given, words in (
            ({"app-domain": "apps_x.org"}, "not a DNS name"),
            ({"app-domain": ""}, "not a DNS name"),
            ({"public-url": "ftp://x"}, "expected http(s)"),
            ({"public-url": "https://x/path"}, "no path"),
            ({"app-domain": "apps.localhost", "auth": "accounts"}, "needs --public-url"),
        ):
            with self.assertRaises(ConfigError) as e:
                build_config(given)
            self.assertIn(words, str(e.exception), given)


class CookiePathTests(SynchronousTestCase):
    """``Set-Cookie`` paths of a stripped app under its prefix."""

    P = b"/y:acme:app:1:80"

    def test_rewrite_cookie_path(self) -> None:
        for value, want in (
            (b"sid=1; Path=/", b"sid=1; Path=/y:acme:app:1:80/"),
            (b"sid=1; path=/api; HttpOnly", b"sid=1; path=/y:acme:app:1:80/api; HttpOnly"),
            (b"sid=1; HttpOnly; PATH = /a ; Secure", b"sid=1; HttpOnly; PATH = /y:acme:app:1:80/a ; Secure"),
            (b"sid=1; Path=/y:acme:app:1:80/x", b"sid=1; Path=/y:acme:app:1:80/x"),  # already under it
            (b"sid=1", b"sid=1"),  # the default path is the request's (public) directory
            (b"sid=1; Path=relative", b"sid=1; Path=relative"),
            (b"sid=/; Domain=x", b"sid=/; Domain=x"),
        ):
            self.assertEqual(rewrite_cookie_path(value, prefix=self.P), want, value)
        self.assertEqual(rewrite_cookie_path(b"a=1; Path=/", prefix=b""), b"a=1; Path=/")

    def test_through_the_proxy_strip_and_keep(self) -> None:
        h = ProxyHarness()
        h.prefix = self.P
        answer = b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1; Path=/\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n"
        ct, _ = h.answer(answer)
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"set-cookie"), [b"a=1; Path=/y:acme:app:1:80/", b"b=2"])
        h = ProxyHarness()
        h.prefix = b""  # keep mode and app hosts: the app's own cookies as they are
        ct, _ = h.answer(answer)
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"set-cookie"), [b"a=1; Path=/", b"b=2"])

    def test_as_sent_when_the_profile_says_so(self) -> None:
        """``cookie-path = "as-sent"``: one stripped app whose pages use absolute URLs
        keeps its cookies on ``/`` (they go with its Referer/dsroute-routed requests)."""
        calls: list[dict[str, Any]] = []

        class FakeProxy:
            def forward(self, request: Any, backend: Any, path: bytes, **kw: Any) -> int:
                calls.append(kw)
                return 1

        class Lease:
            endpoint = "tcp:127.0.0.1:9100"
            queued_for = 0.0

        profiles = (
            ImageProfile("acme/dash:*", cookie_path="as-sent"),
            ImageProfile("acme/*"),
        )
        c = Config(profiles=profiles)
        routes = Routes(c, proxy=FakeProxy(), broker=None, policy=None, profiles=Profiles(c))  # type: ignore[arg-type]
        for seg, want in (("y:acme:dash:1:80", False), ("y:acme:web:1:80", True), ("y:other:x:1:80", True)):
            job = routes.job(spec(seg), b"/" + seg.encode(), b"/")
            assert isinstance(job, JobResource)
            job._forward(request(b"/" + seg.encode() + b"/", b"front"), Lease())
            self.assertEqual(calls[-1]["cookie_paths"], want, seg)
        h = ProxyHarness()
        h.prefix = self.P
        real = h.proxy.forward
        h.proxy.forward = lambda *a, **kw: real(*a, **{**kw, "cookie_paths": False})  # type: ignore[method-assign]
        ct, _ = h.answer(b"HTTP/1.1 200 OK\r\nSet-Cookie: _xsrf=1; Path=/\r\nContent-Length: 0\r\n\r\n")
        _, headers = head_of(ct.value())
        self.assertEqual(values(headers, b"set-cookie"), [b"_xsrf=1; Path=/"])

    def test_own_cookies_never_forwarded_and_no_dsroute_without_prefix(self) -> None:
        h = ProxyHarness()
        h.prefix, h.cookie = b"", None
        raw = (
            b"GET /notebooks/t.ipynb HTTP/1.1\r\nHost: lab-1-abc.apps.localhost\r\n"
            b"Cookie: dsroute=abc; _xsrf=k; dssession=s; dscsrf=c\r\n\r\n"
        )
        _, ct = h.client(raw)
        p, bt = h.accept()
        self.assertIn(b"Cookie: _xsrf=k\r\n", bt.value())
        for own in (b"dsroute", b"dssession", b"dscsrf"):
            self.assertNotIn(own, bt.value())
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: 2\r\n\r\nhi")
        self.assertNotIn(b"dsroute", ct.value())
        self.assertTrue(ct.value().endswith(b"hi"))


class AppHostSignInTests(SynchronousTestCase):
    """``--auth accounts`` with app hosts: a browser signs in on the main host and is
    handed over with a one-time ticket; the app host gets its own session cookie."""

    def setUp(self) -> None:
        from twisted.internet.testing import MemoryReactorClock

        from dockerspaces.accounts.identity import make_portal
        from dockerspaces.web.auth import AuthGate
        from dockerspaces.web.site import make_site
        from tests.test_auth import FakeAccounts, Routes

        self.clock = MemoryReactorClock()
        self.clock.advance(1_800_000_000)
        self.accounts = FakeAccounts(clock=self.clock)
        self.apps = AppHosts("apps.example.org", "https://spaces.example.org")
        self.gate = AuthGate(
            self.accounts,
            make_portal(self.accounts),  # type: ignore[arg-type]
            self.clock,
            public_url=self.apps.public_url,
            app_origin=self.apps.origin_of,
            app_domain="apps.example.org",
        )
        config = Config(app_domain="apps.example.org", public_url=self.apps.public_url, auth="accounts")
        root = Root(config, Routes(), gate=self.gate, apps=self.apps)  # type: ignore[arg-type]
        self.site = make_site(root, self.clock, max_body=1 << 20)
        self.spec = spec("y:team:lab:1:8888:NB=a")
        self.label = self.apps.remember(self.spec)
        self.app_host = f"{self.label}.apps.example.org"

    def get(self, host: str, path: str, *headers: tuple[str, str]) -> tuple[int, dict[str, list[str]], bytes]:
        from twisted.internet.testing import StringTransport

        from tests.test_auth import CLIENT, parse

        ch = self.site.buildProtocol(CLIENT)
        t = StringTransport(peerAddress=CLIENT)
        ch.makeConnection(t)
        lines = [f"GET {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers)]
        ch.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode())
        return parse(t.value())

    def test_hand_off_through_the_main_host(self) -> None:
        html = ("Accept", "text/html")
        status, headers, _ = self.get(self.app_host, "/notebooks/t.ipynb?a=1", html)
        self.assertEqual(status, 303)
        handoff = (
            f"https://spaces.example.org/auth:handoff?to={self.label}&path=%2Fnotebooks%2Ft.ipynb%3Fa%3D1"
        )
        self.assertEqual(headers["location"], [handoff])
        main_path = handoff.removeprefix("https://spaces.example.org")
        # not signed in on the main host: its sign-in page first, then back here
        status, headers, _ = self.get("spaces.example.org", main_path, html)
        self.assertEqual(status, 303)
        self.assertTrue(headers["location"][0].startswith("/auth:login?next=%2Fauth%3Ahandoff"), headers)
        # signed in: a ticket for the app host
        self.accounts.sessions["main-session"] = "alice"
        status, headers, _ = self.get(
            "spaces.example.org", main_path, html, ("Cookie", "dssession=main-session")
        )
        self.assertEqual(status, 303)
        to = headers["location"][0]
        m = re.fullmatch(rf"https://{self.label}\.apps\.example\.org/auth:ticket\?t=([\w-]+)&path=(.*)", to)
        assert m is not None, to
        self.assertEqual(m.group(2), "%2Fnotebooks%2Ft.ipynb%3Fa%3D1")
        ticket_path = to.removeprefix(f"https://{self.app_host}")
        # the ticket on another app host is refused (and used up)
        other = self.apps.remember(spec("y:team:lab:1:8888:NB=b"))
        status, _, _ = self.get(f"{other}.apps.example.org", ticket_path)
        self.assertEqual(status, 403)
        status, _, _ = self.get(self.app_host, ticket_path)
        self.assertEqual(status, 403)  # used up by the wrong host's try

    def test_sign_in_form_may_lead_on_to_app_hosts(self) -> None:
        """CSP form-action governs a form's redirects too: the sign-in form's answer
        goes on (through /auth:handoff) to an app host, so those are allowed."""
        _, headers, _ = self.get("spaces.example.org", "/auth:login?next=%2F")
        (csp,) = headers["content-security-policy"]
        self.assertIn("form-action 'self' *.apps.example.org:*", csp)

    def test_ticket_sets_the_app_hosts_own_session(self) -> None:
        ticket = self.gate.ticket("alice", self.label)
        status, headers, _ = self.get(self.app_host, f"/auth:ticket?t={ticket}&path=%2Fnotebooks%2Ft.ipynb")
        self.assertEqual(status, 303)
        self.assertEqual(headers["location"], ["/notebooks/t.ipynb"])
        (cookie,) = headers["set-cookie"]
        self.assertRegex(cookie, r"^dssession=session-\d+; Path=/; HttpOnly; SameSite=Lax; Max-Age=\d+$")
        session = cookie.split(";")[0]
        status, _, body = self.get(self.app_host, "/notebooks/t.ipynb", ("Cookie", session + "; _xsrf=k"))
        self.assertEqual(status, 200)
        self.assertTrue(body.startswith(b"job y:team/lab:1:8888 env[NB]#"), body)
        self.assertIn(b"for alice", body)
        self.assertNotIn(b"dssession", body)  # never forwarded to the app
        self.assertIn(b"_xsrf=k", body)
        # once only
        status, _, _ = self.get(self.app_host, f"/auth:ticket?t={ticket}&path=%2F")
        self.assertEqual(status, 403)

    def test_expired_ticket_bad_paths_and_other_auth_pages(self) -> None:
        ticket = self.gate.ticket("alice", self.label)
        self.clock.advance(61)
        status, _, body = self.get(self.app_host, f"/auth:ticket?t={ticket}&path=%2F")
        self.assertEqual(status, 403)
        self.assertIn(b"has expired", body)
        ticket = self.gate.ticket("alice", self.label)
        status, headers, _ = self.get(
            self.app_host, f"/auth:ticket?t={ticket}&path=https%3A%2F%2Fevil.org%2F"
        )
        self.assertEqual(headers["location"], ["/"])  # only a path on this host
        status, _, _ = self.get(self.app_host, "/auth:login")
        self.assertEqual(status, 404)  # no password form on an app's origin
        self.accounts.sessions["main-session"] = "alice"
        status, _, _ = self.get(
            "spaces.example.org",
            "/auth:handoff?to=nothing-0000000000&path=%2F",
            ("Cookie", "dssession=main-session"),
        )
        self.assertEqual(status, 404)

    def test_api_clients_on_app_hosts_use_tokens(self) -> None:
        from tests.test_auth import TOKEN

        status, _, _ = self.get(self.app_host, "/api/contents")
        self.assertEqual(status, 401)
        bearer = ("Authorization", "Bearer " + TOKEN)
        status, _, body = self.get(self.app_host, "/api/contents", bearer)
        self.assertEqual(status, 200)
        self.assertIn(b"for alice", body)
        self.assertNotIn(b"Bearer", body)  # our credential is not the app's
        # the groups' image patterns hold on app hosts as on the main host
        other = self.apps.remember(spec("y:other:lab:1:8888"))
        status, _, body = self.get(f"{other}.apps.example.org", "/api/contents", bearer)
        self.assertEqual(status, 403)
        self.assertIn(b"may not run image other/lab:1", body)


class MonitorLinksTests(SynchronousTestCase):
    """``/monitor:broker/``'s ``Apps`` and the home page link each app at its public URL."""

    def broker(self, *segments: str) -> Any:
        from dockerspaces.broker.snapshot import ContainerView

        views = [
            ContainerView(
                f"c{i}", "local", 9100 + i, spec(s).key, spec(s).display, "idle", 0, spec(s), (), "alice"
            )
            for i, s in enumerate(segments)
        ]

        class Broker:
            def snapshot(self) -> dict[str, Any]:
                return {"Queues": {}}

            def containers(self) -> list[Any]:
                return views

        return Broker()

    def routes(self, apps: AppHosts, broker: Any) -> Routes:
        c = Config(app_domain=apps.domain, public_url=apps.public_url)
        return Routes(c, proxy=None, broker=broker, policy=None, profiles=Profiles(c, apps))  # type: ignore[arg-type]

    def test_main_host_links_only_without_env(self) -> None:
        broker = self.broker("y:acme:web:1:80", JUPYTER_A, "x:acme:worker:1:3")
        apps = self.routes(AppHosts(), broker).snapshot()["Apps"]
        self.assertEqual(
            apps,
            [
                {"Key": spec("y:acme:web:1:80").display, "Link": "/y:acme:web:1:80/", "Host": None},
                {"Key": spec(JUPYTER_A).display, "Link": None, "Host": None},  # env values stay out
            ],
        )

    def test_app_hosts_linked_with_env_too(self) -> None:
        broker = self.broker(JUPYTER_A)
        (entry,) = self.routes(AppHosts("apps.localhost"), broker).snapshot()["Apps"]
        label = app_label(spec(JUPYTER_A))
        self.assertEqual(entry["Host"], f"{label}.apps.localhost")
        self.assertIsNone(entry["Link"])  # no origin known and env values: no link
        (entry,) = self.routes(AppHosts("apps.example.org", "https://s.example.org:8443"), broker).snapshot()[
            "Apps"
        ]
        self.assertEqual(entry["Link"], f"https://{label}.apps.example.org:8443/")
        self.assertNotIn("s3cr3t", str(entry))

    def test_home_page_rows(self) -> None:
        from dockerspaces.app import user_containers

        broker = self.broker("y:acme:web:1:80", JUPYTER_A)
        rows = user_containers(broker, "alice", AppHosts("apps.example.org", "https://s.example.org"))
        label = app_label(spec(JUPYTER_A))
        self.assertEqual(rows[1][2], f"https://{label}.apps.example.org/")
        self.assertEqual(user_containers(broker, "alice")[0][2], "/y:acme:web:1:80/")
        self.assertIsNone(user_containers(broker, "alice")[1][2])
