"""``--auth accounts`` in the web layer: the gate in the root's dispatch (Bearer,
Basic with token or password, session cookie; 401/303/403/429), the sign-in and
sign-out forms (CSRF, cookies), the home page, cached identities, and that our
credentials never reach a backend. Real site, real root, in-memory transports; the
accounts service is a fake whose answers the tests control."""

from __future__ import annotations

import base64
import re
from typing import Any
from urllib.parse import urlencode

from attrs import define, field
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from dockerspaces.accounts.identity import make_portal
from dockerspaces.accounts.model import Group, Quota, Snapshot, Token, User, token_digest
from dockerspaces.config import Config
from dockerspaces.web.accesslog import IDENTITY_ATTR
from dockerspaces.web.auth import AuthGate, Throttle
from dockerspaces.web.headers import read_client_head
from dockerspaces.web.root import Root
from dockerspaces.web.site import make_site

CLIENT = IPv4Address("TCP", "10.1.2.3", 5000)
TOKEN = "dst_0123456789ab_" + "s" * 43
NARROW = "dst_ba9876543210_" + "n" * 43  # scopes: y only
DOCKER = "dst_abcdefabcdef_" + "d" * 43  # scopes: docker-api


def _token(
    tid: str, user: str, secret: str, scopes: frozenset[str] | None, expires: float | None = None
) -> Token:
    return Token(tid, user, token_digest(secret), scopes, expires, 0.0, None)


def snapshot(enabled: bool = True) -> Snapshot:
    groups = {
        "ml": Group(
            "ml",
            images=("team/*",),
            routes=frozenset({"x", "y", "docker-api"}),
            quota=Quota(containers=2, gpus=1, queued=5),
        ),
        "ops": Group("ops", images=("*",), routes=frozenset({"monitor"}), admin=True),
    }
    users = {
        "alice": User("alice", enabled, ("ml",), "HASH"),
        "root": User("root", True, ("ml", "ops"), "HASH"),
    }
    tokens = {
        "0123456789ab": _token("0123456789ab", "alice", "s" * 43, None),
        "ba9876543210": _token("ba9876543210", "alice", "n" * 43, frozenset({"y"})),
        "abcdefabcdef": _token("abcdefabcdef", "alice", "d" * 43, frozenset({"docker-api"})),
    }
    return Snapshot(users=users, groups=groups, tokens=tokens)


@define
class FakeAccounts:
    """The parts of AccountsService the gate and the checkers use."""

    snapshot: Snapshot = field(factory=snapshot)
    clock: Any = None
    generation: int = 0
    passwords: dict[str, str] = field(factory=lambda: {"alice": "pw-alice", "root": "pw-root"})
    pending: list[tuple[str, Deferred[bool]]] = field(factory=list)
    hold: bool = False  # verify_password waits for the test
    sessions: dict[str, str] = field(factory=dict)
    used: list[str] = field(factory=list)
    ended: list[str] = field(factory=list)

    def now(self) -> float:
        return float(self.clock.seconds())

    def verify_password(self, user: str, password: str) -> Deferred[bool]:
        ok = self.passwords.get(user) == password
        if self.hold:
            d: Deferred[bool] = Deferred()
            self.pending.append((user, d))
            return d
        return succeed(ok)

    def session_user(self, session: str) -> Deferred[str | None]:
        return succeed(self.sessions.get(session))

    def create_session(self, user: str, lifetime: float) -> Deferred[str]:
        sid = f"session-{len(self.sessions)}"
        self.sessions[sid] = user
        return succeed(sid)

    def end_session(self, session: str) -> Deferred[None]:
        self.ended.append(session)
        self.sessions.pop(session, None)
        return succeed(None)

    def token_used(self, token_id: str) -> None:
        self.used.append(token_id)

    def replace(self, snap: Snapshot) -> None:
        self.snapshot = snap
        self.generation += 1


class _Leaf(Resource):
    isLeaf = True

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def render(self, request: Any) -> bytes:
        identity = getattr(request, IDENTITY_ATTR, None)
        head = read_client_head(request)
        return f"{self.name} for {identity.user if identity else '-'}\n".encode() + head.kept


class Routes:
    def job(self, spec: Any, prefix: bytes, path: bytes) -> Resource:
        return _Leaf(f"job {spec.display}")

    def host(self, target: Any, prefix: bytes, path: bytes, cookie: bool) -> Resource:
        return _Leaf("host")

    def host_route(self, target: Any, prefix: bytes) -> Resource:
        return _Leaf("host")

    def monitor(self, route: Any) -> Resource:
        return _Leaf(f"monitor {route.name}")

    def docker_api(self, path: bytes) -> Resource:
        return _Leaf("docker")


class GateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_800_000_000)
        self.accounts = FakeAccounts(clock=self.clock)
        self.gate = AuthGate(
            self.accounts,
            make_portal(self.accounts),  # type: ignore[arg-type]
            self.clock,
            session_lifetime=3600,
            containers=lambda user: (
                [
                    ("x:team/app:1:80 env[]#0", "busy", "/x:team:app:1:80/"),
                    ("x:team/app:2:80 env[K]#1", "idle", None),
                ]
                if user == "alice"
                else []
            ),
        )
        routes: Any = Routes()
        self.site = make_site(Root(Config(), routes, gate=self.gate), self.clock, max_body=1 << 20)

    def get(
        self, path: str, *headers: tuple[str, str], method: str = "GET", body: bytes = b""
    ) -> tuple[int, dict[str, list[str]], bytes]:
        ch = self.site.buildProtocol(CLIENT)
        t = StringTransport(peerAddress=CLIENT)
        ch.makeConnection(t)
        lines = [f"{method} {path} HTTP/1.1", "Host: front"]
        lines += [f"{k}: {v}" for k, v in headers]
        if body:
            lines.append(f"Content-Length: {len(body)}")
            lines.append("Content-Type: application/x-www-form-urlencoded")
        ch.dataReceived(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        return parse(t.value())

    def bearer(self, token: str = TOKEN) -> tuple[str, str]:
        return ("Authorization", "Bearer " + token)

    def basic(self, user: str, secret: str) -> tuple[str, str]:
        return ("Authorization", "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode())

    # -- who -------------------------------------------------------------------------
    def test_no_credentials_api_401_browser_303(self) -> None:
        status, headers, body = self.get("/x:team:app:1:80/p")
        self.assertEqual(status, 401)
        self.assertEqual(
            headers["www-authenticate"],
            ['Basic realm="dockerspaces", charset="UTF-8"', 'Bearer realm="dockerspaces"'],
        )
        self.assertIn(b"sign in first", body)
        status, headers, _ = self.get("/x:team:app:1:80/p?q=1", ("Accept", "text/html"))
        self.assertEqual(status, 303)
        self.assertEqual(headers["location"], ["/auth:login?next=%2Fx%3Ateam%3Aapp%3A1%3A80%2Fp%3Fq%3D1"])

    def test_bearer_basic_token_basic_password(self) -> None:
        for creds in (self.bearer(), self.basic("alice", TOKEN), self.basic("alice", "pw-alice")):
            status, _, body = self.get("/x:team:app:1:80/p", creds)
            self.assertEqual(status, 200, creds)
            self.assertTrue(body.startswith(b"job x:team/app:1:80 env[]#e3b0c4 for alice"), body)
        self.assertEqual(self.accounts.used, ["0123456789ab", "0123456789ab"])

    def test_bad_credentials(self) -> None:
        for creds in (
            self.bearer("dst_0123456789ab_" + "x" * 43),
            self.bearer("nonsense"),
            self.basic("bob", TOKEN),
            self.basic("alice", "wrong"),
            ("Authorization", "Basic !!!"),
            ("Authorization", "Digest x"),
        ):
            status, _, body = self.get("/x:team:app:1:80/p", creds)
            self.assertEqual(status, 401, creds)
            self.assertNotIn(TOKEN.encode(), body)
            self.assertNotIn(b"pw-alice", body)
            self.clock.advance(61)  # (not throttled here)

    def test_expired_token(self) -> None:
        snap = snapshot()
        tokens = dict(snap.tokens)
        tokens["0123456789ab"] = _token(
            "0123456789ab", "alice", "s" * 43, None, expires=self.clock.seconds() + 10
        )
        self.accounts.replace(Snapshot(snap.users, snap.groups, tokens))
        self.assertEqual(self.get("/x:team:app:1:80/", self.bearer())[0], 200)
        self.clock.advance(11)
        self.assertEqual(self.get("/x:team:app:1:80/", self.bearer())[0], 401)

    def test_disabled_user_takes_effect_with_the_next_snapshot(self) -> None:
        self.assertEqual(self.get("/x:team:app:1:80/", self.bearer())[0], 200)
        self.accounts.replace(snapshot(enabled=False))
        self.assertEqual(self.get("/x:team:app:1:80/", self.bearer())[0], 401)

    def test_password_check_waits_without_blocking(self) -> None:
        self.accounts.hold = True
        ch = self.site.buildProtocol(CLIENT)
        t = StringTransport(peerAddress=CLIENT)
        ch.makeConnection(t)
        auth = self.basic("alice", "pw-alice")
        ch.dataReceived(f"GET /x:team:app:1:80/ HTTP/1.1\r\nHost: f\r\n{auth[0]}: {auth[1]}\r\n\r\n".encode())
        self.assertEqual(t.value(), b"")  # the KDF runs elsewhere
        self.accounts.pending[0][1].callback(True)
        self.assertEqual(parse(t.value())[0], 200)
        # verified once: the next request is answered at once
        self.accounts.pending.clear()
        self.assertEqual(self.get("/x:team:app:1:80/", auth)[0], 200)
        self.assertEqual(self.accounts.pending, [])

    # -- what ------------------------------------------------------------------------
    def test_403_names_the_route_or_image(self) -> None:
        status, _, body = self.get("/x:other:app:1:80/", self.bearer())
        self.assertEqual(status, 403)
        self.assertIn(b"alice may not run image other/app:1", body)
        status, _, body = self.get("/host:example.org:80/", self.bearer())
        self.assertEqual(status, 403)
        self.assertIn(b"alice may not use the 'host' route (not allowed by the groups: ml)", body)
        status, _, body = self.get("/x:team:app:1:80/", self.bearer(NARROW))
        self.assertEqual(status, 403)
        self.assertIn(b"alice may not use the 'x' route (not in the token's scopes: y)", body)
        status, _, body = self.get("/host:example.org:80/", self.bearer(NARROW))
        self.assertIn(b"(not in the token's scopes: y)", body)
        self.assertEqual(self.get("/y:team:app:1:80/", self.bearer(NARROW))[0], 200)
        status, _, body = self.get("/monitor:broker/", self.bearer())
        self.assertEqual(status, 403)
        self.assertIn(b"'monitor' route", body)

    def test_monitor_health_open_progress_for_anyone_signed_in(self) -> None:
        self.assertEqual(self.get("/monitor:health")[0], 200)
        self.assertEqual(self.get("/monitor:progress/abc")[0], 401)
        self.assertEqual(self.get("/monitor:progress/abc", self.bearer())[0], 200)
        self.assertEqual(self.get("/monitor:broker/", self.basic("root", "pw-root"))[0], 200)

    def test_docker_api_takes_scoped_tokens_only(self) -> None:
        self.assertEqual(self.get("/docker:local/_ping", self.bearer(DOCKER))[0], 200)
        self.assertEqual(self.get("/docker:local/_ping", self.bearer(TOKEN))[0], 200)  # all scopes
        self.assertEqual(self.get("/docker:local/_ping", self.bearer(NARROW))[0], 403)
        status, _, body = self.get("/docker:local/_ping", self.basic("alice", "pw-alice"))
        self.assertEqual(status, 403)
        self.assertIn(b"API tokens", body)

    def test_our_credentials_never_reach_the_backend(self) -> None:
        _, _, body = self.get(
            "/x:team:app:1:80/", self.bearer(), ("Cookie", "dssession=abc; theme=dark; dscsrf=zzz")
        )
        self.assertNotIn(b"authorization", body.lower())
        self.assertNotIn(b"dssession", body)
        self.assertNotIn(b"dscsrf", body)
        self.assertIn(b"theme=dark", body)

    # -- throttling ------------------------------------------------------------------
    def test_repeated_failures_get_429(self) -> None:
        for _ in range(5):
            self.assertEqual(self.get("/x:team:app:1:80/", self.basic("alice", "bad"))[0], 401)
        status, headers, body = self.get("/x:team:app:1:80/", self.basic("alice", "pw-alice"))
        self.assertEqual(status, 429)
        self.assertIn(b"too many failed sign-ins", body)
        self.assertEqual(headers["retry-after"], ["60"])
        self.clock.advance(61)
        self.assertEqual(self.get("/x:team:app:1:80/", self.basic("alice", "pw-alice"))[0], 200)

    def test_throttle_per_address_and_per_user(self) -> None:
        clock = MemoryReactorClock()
        th = Throttle(clock, limit=2, window=10)
        th.failed("a:1", "u:alice")
        self.assertIsNone(th.retry_after("a:1", "u:alice"))
        clock.advance(4)
        th.failed("a:2", "u:alice")  # another address, same user
        self.assertEqual(th.retry_after("a:3", "u:alice"), 6)
        self.assertIsNone(th.retry_after("a:1", "u:bob"))
        th.succeeded("u:alice")
        self.assertIsNone(th.retry_after("a:3", "u:alice"))
        clock.advance(10)
        self.assertIsNone(th.retry_after("a:1", "a:2"))
        self.assertEqual(th._fails, {})

    # -- browsers ----------------------------------------------------------------------
    def login_form(self, next_url: str = "/x:team:app:1:80/") -> tuple[str, str]:
        status, headers, body = self.get("/auth:login?next=" + next_url.replace(":", "%3A"))
        self.assertEqual(status, 200)
        cookie = headers["set-cookie"][0]
        self.assertIn("SameSite=Strict", cookie)
        self.assertIn("HttpOnly", cookie)
        csrf = cookie.split(";")[0].split("=", 1)[1]
        self.assertIn(f"value='{csrf}'".encode(), body)
        self.assertIn(b"name=next value='/x:team:app:1:80/'", body)
        return csrf, f"dscsrf={csrf}"

    def post_login(
        self,
        csrf: str,
        cookie: str,
        password: str = "pw-alice",  # noqa: S107 - a test user's
        *extra: tuple[str, str],
    ) -> tuple[int, dict[str, list[str]], bytes]:
        form = urlencode(
            {"user": "alice", "password": password, "csrf": csrf, "next": "/x:team:app:1:80/"}
        ).encode()
        return self.get("/auth:login", ("Cookie", cookie), *extra, method="POST", body=form)

    def test_login_session_logout(self) -> None:
        csrf, cookie = self.login_form()
        status, headers, _ = self.post_login(csrf, cookie)
        self.assertEqual(status, 303)
        self.assertEqual(headers["location"], ["/x:team:app:1:80/"])
        (set_cookie,) = headers["set-cookie"]
        self.assertTrue(set_cookie.startswith("dssession=session-0;"))
        for attr in ("HttpOnly", "SameSite=Lax", "Max-Age=3600", "Path=/"):
            self.assertIn(attr, set_cookie)
        self.assertNotIn("Secure", set_cookie)  # a plain TCP listener
        session = ("Cookie", "dssession=session-0")
        status, _, body = self.get("/x:team:app:1:80/", session)
        self.assertEqual(status, 200)
        self.assertTrue(body.startswith(b"job x:team/app:1:80 env[]#e3b0c4 for alice"))
        status, _, body = self.get("/", session, ("Accept", "text/html"))
        self.assertEqual(status, 200)
        self.assertIn(b"<b id=user>alice</b>", body)
        self.assertIn(b"<a href='/x:team:app:1:80/'>x:team/app:1:80 env[]#0</a>", body)
        self.assertIn(b"<td>x:team/app:2:80 env[K]#1</td>", body)
        self.assertNotIn(b"Dashboard", body)
        # sign out: the form, then the POST
        status, headers, body = self.get("/auth:logout", session)
        self.assertEqual(status, 200)
        csrf2 = re.search(rb"name=csrf value='([^']+)'", body).group(1).decode()  # type: ignore[union-attr]
        status, headers, _ = self.get(
            "/auth:logout",
            ("Cookie", f"dssession=session-0; dscsrf={csrf2}"),
            method="POST",
            body=urlencode({"csrf": csrf2}).encode(),
        )
        self.assertEqual(status, 303)
        self.assertEqual(self.accounts.ended, ["session-0"])
        self.assertIn("dssession=;", headers["set-cookie"][0])
        status, headers, _ = self.get("/x:team:app:1:80/", session, ("Accept", "text/html"))
        self.assertEqual(status, 303)
        self.assertTrue(headers["location"][0].startswith("/auth:login?next="))

    def test_login_refuses_forged_forms_and_wrong_passwords(self) -> None:
        csrf, cookie = self.login_form()
        self.assertEqual(self.post_login("other", cookie)[0], 403)  # token mismatch
        self.assertEqual(self.post_login(csrf, "")[0], 403)  # no CSRF cookie
        self.assertEqual(
            self.post_login(csrf, cookie, "pw-alice", ("Origin", "https://evil.example"))[0], 403
        )
        self.assertEqual(self.post_login(csrf, cookie, "pw-alice", ("Origin", "http://front"))[0], 303)
        status, _, body = self.post_login(csrf, cookie, "wrong")
        self.assertEqual(status, 401)
        self.assertIn(b"Wrong user or password.", body)
        self.assertNotIn(b"wrong'", body)  # the password is not echoed

    def test_login_next_stays_on_this_site(self) -> None:
        csrf, cookie = self.login_form()
        for target in ("https://evil.example/", "//evil.example/", "/\\evil", "javascript:x"):
            form = urlencode({"user": "alice", "password": "pw-alice", "csrf": csrf, "next": target}).encode()
            status, headers, _ = self.get("/auth:login", ("Cookie", cookie), method="POST", body=form)
            self.assertEqual((status, headers["location"]), (303, ["/"]), target)

    def test_admin_home_links_the_dashboard(self) -> None:
        status, _, body = self.get("/", self.basic("root", "pw-root"), ("Accept", "text/html"))
        self.assertEqual(status, 200)
        self.assertIn(b"Dashboard", body)
        self.assertIn(b"ml, ops, admin", body)

    def test_expired_session_is_cleared(self) -> None:
        status, headers, _ = self.get(
            "/x:team:app:1:80/", ("Cookie", "dssession=gone"), ("Accept", "text/html")
        )
        self.assertEqual(status, 303)
        self.assertIn("dssession=;", headers["set-cookie"][0])


def parse(raw: bytes) -> tuple[int, dict[str, list[str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    if "transfer-encoding" in headers:  # de-chunk
        out, rest = b"", body
        while rest:
            size_line, _, rest = rest.partition(b"\r\n")
            n = int(size_line, 16)
            if n == 0:
                break
            out, rest = out + rest[:n], rest[n + 2 :]
        body = out
    return status, headers, body
