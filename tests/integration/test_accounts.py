"""``--auth accounts`` end to end: a real dockerspaces process, the real engine, the real
``dockerspaces-admin`` (``python -m dockerspaces.admin``), the docker CLI and Chromium.

- :class:`LiveAdmin`: users, groups and tokens made (and revoked, disabled) with the
  admin tool while the server runs take effect within about a second (the server reads
  the SQLite change counter twice a second); Bearer, Basic with a token and Basic with
  the password all reach an ``x:`` container; usage is recorded; no secret reaches the
  server's log.
- :class:`Refusals`: 401 with ``WWW-Authenticate``, a browser's 303 to the sign-in page,
  403 naming the image or route, 429 with ``Retry-After`` for the container and queued
  quotas and for repeated failed sign-ins (per user, per address, the form).
- :class:`DockerCli`: the docker CLI through ``/docker:local`` with a ``docker-api``
  scoped token in ``HttpHeaders``; refused without it, with a token lacking the scope
  and with a password.
- :class:`BrowserSignIn`: headless Chromium opens a cold ``x:`` WebSocket app, signs in
  on the form, sees the waiting page, the app and its WebSocket echo (all on the
  session cookie), signs out, and is sent to the sign-in page again.

Every failed check counts as a failed sign-in for the client address, and five within a
minute block that address (as they should); polls that expect failures until a change
lands therefore use a fresh loopback source address each (``127.0.x.y``).
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import parse_qs, quote, urlencode, urlsplit

from twisted.trial import unittest

from .browser import Browser, Session, chromium_missing
from .dockerutil import docker_available, docker_client
from .images import TTS, WEB, WSAPP, ensure_test_images, ensure_wsapp_image
from .procs import REPO, Server
from .wait import eventually, eventually_async

TTS_PATH = "/x:selmaproject:tts:777:5002/"
WEB_PATH = "/x:dockerspaces-test:web:1:8080/"
BROWSER = {
    "Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8",
    "Sec-Fetch-Mode": "navigate",
}
#: how soon an admin change must show (README: "within a second"), with a little slack
#: for this shared 2-core machine
LIVE = 1.5
CLIS = [p for p in ("/usr/bin/docker", "/usr/local/bin/docker") if os.access(p, os.X_OK)]


def basic(user: str, secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": "Bearer " + token}


class AccountsCase(unittest.TestCase):
    """A dockerspaces process with ``--auth accounts`` and a fresh state file."""

    skip = docker_available()
    timeout = 240
    slots = 2
    extra: tuple[str, ...] = ()
    workers = 1  # the *Workers2 variants: --workers 2

    def setUp(self) -> None:
        ensure_test_images(TTS, WEB)
        self.state = os.path.abspath(self.mktemp()) + ".sqlite"
        self.srv = self.server(*self.extra, slots=self.slots)
        self._sources: Iterator[int] = itertools.count()
        self.secrets: list[str] = []

    def server(self, *extra: str, slots: int) -> Server:
        """A started ``--auth accounts`` server on ``self.state``. Its log goes to this
        test's own temp directory: a concurrent trial run in this checkout may empty
        the shared ``_trial_temp`` where :class:`Server` puts it by default."""
        srv = Server(
            "--auth",
            "accounts",
            "--state",
            self.state,
            *extra,
            slots=slots,
            probe="/monitor:health",
            workers=self.workers,
        )
        srv.log_path = os.path.abspath(self.mktemp()) + ".log"
        self.addCleanup(srv.cleanup)
        return srv.start()

    # -- the admin tool --------------------------------------------------------------
    def admin(self, *args: str, stdin: str | None = None) -> Any:
        """``dockerspaces-admin --state STATE --json ARGS``; its parsed JSON output."""
        argv = [sys.executable, "-m", "dockerspaces.admin", "--state", self.state, "--json", *args]
        p = subprocess.run(
            argv,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            env=dict(os.environ, PYTHONPATH=REPO),
            check=False,
        )
        if p.returncode != 0:
            raise AssertionError(
                f"dockerspaces-admin {' '.join(args)} exited {p.returncode}:\n{p.stdout}{p.stderr}"
            )
        out = p.stdout.strip()
        return json.loads(out) if out else None

    def add_user(self, name: str, password: str) -> None:
        self.secrets.append(password)
        self.admin("user", "add", name, "--password-stdin", stdin=password + "\n")

    def add_group(self, name: str, *args: str, members: tuple[str, ...] = ()) -> None:
        self.admin("group", "add", name, *args)
        for m in members:
            self.admin("group", "add-member", name, m)

    def token(self, user: str, *args: str) -> tuple[str, str]:
        """A new token of ``user``: (token, its id)."""
        out = self.admin("token", "create", user, *args)
        token = out["token"]
        self.secrets += [token, token.split("_", 2)[2]]  # dst_<id>_<secret>: the id may show
        return token, str(out["id"])

    # -- HTTP ------------------------------------------------------------------------
    def source(self) -> str:
        """A loopback address no request of this test came from yet."""
        n = next(self._sources)
        return f"127.0.{n // 250}.{n % 250 + 2}"

    def request(
        self,
        path: str,
        headers: dict[str, str] | None = None,
        method: str = "GET",
        body: bytes | None = None,
        source: str | None = None,
        timeout: float = 120.0,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(
            "127.0.0.1", self.srv.port, timeout=timeout, source_address=(source, 0) if source else None
        )
        try:
            conn.request(method, path, body=body, headers=headers or {})
            r = conn.getresponse()
            data = r.read()
            got: dict[str, str] = {}
            for k, v in r.getheaders():  # repeated ones joined (Set-Cookie by newlines)
                k = k.lower()
                got[k] = got[k] + ("\n" if k == "set-cookie" else ", ") + v if k in got else v
            return r.status, got, data
        finally:
            conn.close()

    def status(self, path: str, headers: dict[str, str], fresh: bool = False) -> int:
        return self.request(path, headers, source=self.source() if fresh else None)[0]

    def snapshot(self, token: str) -> dict[str, Any]:
        status, _, body = self.request("/monitor:broker/", bearer(token), timeout=10)
        self.assertEqual(status, 200, body)
        return json.loads(body)  # type: ignore[no-any-return]

    def assert_no_secrets_logged(self) -> None:
        """No password, token or session id -- nor an Authorization value -- in the log."""
        log = self.srv.output()
        for s in self.secrets:
            if s in log:
                line = next(x for x in log.splitlines() if s in x)
                self.fail(f"a password, token or session id ({s[:6]}…) reached the server's log: {line}")
        self.assertNotRegex(log, r"(Basic|Bearer) [A-Za-z0-9+/_=-]{8,}")


class LiveAdmin(AccountsCase):
    """The admin tool beside the running server."""

    def test_admin_changes_take_effect_live(self) -> None:
        """user, group, token made while the server runs: usable within ~1 s; revoking
        the token and disabling the user lock them out within ~1 s."""
        self.add_user("alice", "correct horse battery staple")
        self.add_group(
            "ml",
            "--image",
            "selmaproject/*",
            "--route",
            "x",
            "--route",
            "y",
            "--containers",
            "2",
            "--gpus",
            "0",
            "--queued",
            "10",
            members=("alice",),
        )
        token, tid = self.token("alice")
        self.assertTrue(token.startswith("dst_"), token[:4])
        # "/" passes the gate without starting anything: the cheap probe of the change
        eventually(lambda: self.status("/", bearer(token), fresh=True) == 200, LIVE, "the new token accepted")
        status, _, body = self.request(TTS_PATH, bearer(token))
        self.assertEqual(status, 200, body[:500])
        self.assertIn(b"image=selmaproject/tts:777", body)
        status, _, body = self.request(TTS_PATH + "cgi-bin/env", basic("alice", token))
        self.assertEqual(status, 200, body[:500])
        status, _, body = self.request(TTS_PATH, basic("alice", "correct horse battery staple"))
        self.assertEqual(status, 200, body[:500])
        # the credentials do not reach the container
        _, _, env = self.request(TTS_PATH + "cgi-bin/env", bearer(token))
        self.assertNotIn(b"HTTP_AUTHORIZATION", env)
        self.assertNotIn(token.encode(), env)
        # the home page names the user
        status, _, home = self.request("/", bearer(token))
        self.assertEqual(status, 200)
        self.assertIn(b"alice", home)

        # usage: the container that ran for alice
        def alice_usage() -> Any:
            mine = [r for r in self.admin("usage")["users"] if r["user"] == "alice"]
            return mine and mine[0]["containers"] >= 1 and mine[0]

        eventually(alice_usage, 10, "usage lists alice with a container", interval=0.5)

        self.admin("token", "revoke", tid)
        eventually(
            lambda: self.status(TTS_PATH, bearer(token), fresh=True) == 401, LIVE, "the revoked token refused"
        )
        status, headers, body = self.request(TTS_PATH, basic("alice", token), source=self.source())
        self.assertEqual(status, 401, body)
        self.assertIn("www-authenticate", headers)
        # the password still works, until the user is disabled
        pw = basic("alice", "correct horse battery staple")
        self.assertEqual(self.status(TTS_PATH, pw), 200)
        self.admin("user", "disable", "alice")
        eventually(lambda: self.status(TTS_PATH, pw, fresh=True) == 401, LIVE, "the disabled user refused")
        log = self.srv.output()
        self.assertRegex(
            log, r"x:selmaproject/tts:777:5002 .*-> 200 .*user=alice", "the request log names the user"
        )
        self.assert_no_secrets_logged()


class Refusals(AccountsCase):
    """401, 303, 403 and 429, each with its message."""

    def setUp(self) -> None:
        super().setUp()
        self.add_user("alice", "pw-alice-1234")
        self.add_group(
            "ml",
            "--image",
            "selmaproject/*",
            "--image",
            "dockerspaces-test/*",
            "--route",
            "x",
            "--containers",
            "1",
            "--queued",
            "1",
            members=("alice",),
        )
        self.add_user("watcher", "pw-watcher-1357")
        self.add_group("ops", "--route", "monitor", "--admin", members=("watcher",))
        self.tok, _ = self.token("alice")
        self.watch, _ = self.token("watcher")
        eventually(
            lambda: self.status("/", bearer(self.watch), fresh=True) == 200, LIVE, "the tokens accepted"
        )

    def test_no_credentials(self) -> None:
        """An API client gets 401 with both challenges; a browser a 303 to the sign-in
        page that names where to come back to."""
        status, headers, body = self.request(TTS_PATH + "speak")
        self.assertEqual(status, 401, body)
        challenge = headers.get("www-authenticate", "")
        self.assertIn("Basic", challenge)
        self.assertIn("Bearer", challenge)
        self.assertIn(b"sign in", body.lower())
        status, headers, body = self.request(TTS_PATH + "speak?a=1", BROWSER)
        self.assertEqual(status, 303, body)
        where = urlsplit(headers["location"])
        self.assertEqual(where.path, "/auth:login")
        self.assertEqual(parse_qs(where.query)["next"], [TTS_PATH + "speak?a=1"])
        # Sec-Fetch-Mode absent counts as a navigation; a script's fetch and a POST do not
        status, headers, _ = self.request(TTS_PATH, {"Accept": "text/html"})
        self.assertEqual(status, 303)
        self.assertEqual(self.request(TTS_PATH, dict(BROWSER, **{"Sec-Fetch-Mode": "cors"}))[0], 401)
        self.assertEqual(self.request(TTS_PATH, BROWSER, method="POST", body=b"x")[0], 401)
        # the sign-in page itself is open, with a CSRF cookie for its form
        status, headers, body = self.request(headers["location"], BROWSER)
        self.assertEqual(status, 200, body)
        self.assertIn(b"name=user", body)
        self.assertIn("dscsrf=", headers.get("set-cookie", ""))
        # a wrong token is a 401 too (not a 403: nobody was identified)
        status, _, body = self.request(TTS_PATH, bearer("dst_" + "x" * 40), source=self.source())
        self.assertEqual(status, 401, body)
        # the health check stays open
        self.assertEqual(self.request("/monitor:health")[0], 200)

    def test_forbidden_image_and_routes(self) -> None:
        """403 naming the image or the route the groups do not allow."""
        status, _, body = self.request("/x:team:private:1:8080/", bearer(self.tok))
        self.assertEqual(status, 403, body)
        self.assertIn(b"team/private:1", body)
        status, _, body = self.request("/y:selmaproject:tts:777:5002/", bearer(self.tok))
        self.assertEqual(status, 403, body)
        self.assertRegex(body, rb"'y' route")
        status, _, body = self.request(f"/host:127.0.0.1:{self.srv.start_port}/", bearer(self.tok))
        self.assertEqual(status, 403, body)
        self.assertRegex(body, rb"'host' route")
        status, _, body = self.request("/monitor:broker/", bearer(self.tok))
        self.assertEqual(status, 403, body)
        self.assertRegex(body, rb"'monitor' route")
        # a token scoped to y only may not use x:, which the group allows
        scoped, _ = self.token("alice", "--scope", "y")
        eventually(
            lambda: self.status("/", bearer(scoped), fresh=True) == 200, LIVE, "the scoped token accepted"
        )
        status, _, body = self.request(TTS_PATH, bearer(scoped))
        self.assertEqual(status, 403, body)
        self.assertRegex(body, rb"'x' route")
        self.assertEqual(self.srv.containers(all=True), [], "a refused request started something")
        self.assert_no_secrets_logged()

    def test_quotas(self) -> None:
        """--containers 1 --queued 1: while alice's one container serves her, another
        image is 429 (containers); one more request of the same image waits for it, and
        the next is 429 (queued)."""
        self.assertEqual(self.status(TTS_PATH, bearer(self.tok)), 200)  # warm
        # a streaming answer holds the container for ~6 s once its head is here
        conn = http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=60)
        self.addCleanup(conn.close)
        conn.request("GET", TTS_PATH + "cgi-bin/stream?7", headers=bearer(self.tok))
        held = conn.getresponse()
        self.assertEqual(held.status, 200)
        t0 = time.monotonic()
        users = [s["Users"] for s in self.snapshot(self.watch)["TargetSlots"] if s["Key"]]
        self.assertEqual(users, [["alice"]])
        # her home page lists the application she holds
        status, _, home = self.request("/", bearer(self.tok))
        self.assertEqual(status, 200)
        self.assertIn(b"selmaproject/tts:777", home)
        status, headers, body = self.request(WEB_PATH, bearer(self.tok))
        self.assertEqual(status, 429, body)
        self.assertIn(b"alice: quota of 1 container at once reached", body)
        self.assertGreaterEqual(int(headers["retry-after"]), 1)
        # the same image: waits for alice's container (and counts as queued) ...
        waited: list[tuple[int, bytes]] = []
        t = threading.Thread(
            target=lambda: waited.append(self.request(TTS_PATH + "cgi-bin/env", bearer(self.tok))[::2])
        )
        t.start()
        self.addCleanup(t.join, 60)
        eventually(
            lambda: sum(self.snapshot(self.watch)["Queues"].values()) == 1,
            3,
            "alice's second request waiting",
        )
        # ... so one more is over the queued quota, at once
        status, headers, body = self.request(TTS_PATH, bearer(self.tok))
        self.assertEqual(status, 429, body)
        self.assertIn(b"alice: quota of 1 queued request at once reached", body)
        self.assertGreaterEqual(int(headers["retry-after"]), 1)
        self.assertLess(time.monotonic() - t0, 5, "the refusals must not wait")
        self.assertIn(b"line 7", held.read())
        t.join(60)
        self.assertEqual(waited[0][0], 200, waited)
        self.assertEqual(len(self.srv.containers()), 1)
        # metrics: labelled by group, never by user
        status, _, metrics = self.request("/monitor:metrics", bearer(self.watch))
        self.assertEqual(status, 200, metrics[:300])
        self.assertRegex(metrics, rb'group_requests_total\{group="ml",kind="x",status="429"\} 2')
        self.assertNotIn(b"alice", metrics)

    def test_failed_sign_ins(self) -> None:
        """Five failures within a minute block the user (from any address), the address
        (for any user), and the form likewise: 429 with Retry-After."""
        for _ in range(5):  # alice, wrong password, five addresses
            self.assertEqual(self.status(TTS_PATH, basic("alice", "wrong"), fresh=True), 401)
        status, headers, body = self.request(TTS_PATH, basic("alice", "pw-alice-1234"), source=self.source())
        self.assertEqual(status, 429, body)
        self.assertIn(b"too many failed sign-ins", body.lower())
        self.assertTrue(1 <= int(headers["retry-after"]) <= 60, headers)
        # a token names no user: only its address counts, and 127.0.0.1 has no failures
        self.assertEqual(self.status(TTS_PATH, bearer(self.tok)), 200)
        # one address, five unknown users: that address is blocked for a known one too
        self.add_user("bob", "pw-bob-5678")
        self.admin("group", "add-member", "ml", "bob")
        bob, _ = self.token("bob")
        eventually(lambda: self.status("/", bearer(bob), fresh=True) == 200, LIVE, "bob accepted")
        self.assertEqual(self.status("/", basic("bob", "pw-bob-5678"), fresh=True), 200)
        here = self.source()
        for i in range(5):
            self.assertEqual(self.request("/", basic(f"nobody{i}", "x"), source=here)[0], 401)
        status, headers, body = self.request(TTS_PATH, basic("bob", "pw-bob-5678"), source=here)
        self.assertEqual(status, 429, body)
        self.assertIn("retry-after", headers)
        # the sign-in form: five wrong passwords for carol, then 429 even for the right one
        self.add_user("carol", "pw-carol-9012")
        self.admin("group", "add-member", "ml", "carol")
        form = self.source()
        status, headers, _ = self.request("/auth:login", BROWSER, source=form)
        csrf = re.search(r"dscsrf=([^;]+)", headers["set-cookie"]).group(1)  # type: ignore[union-attr]

        posted = dict(BROWSER, Cookie=f"dscsrf={csrf}")
        posted["Content-Type"] = "application/x-www-form-urlencoded"

        def sign_in(password: str) -> tuple[int, dict[str, str], bytes]:
            body = urlencode({"user": "carol", "password": password, "csrf": csrf, "next": TTS_PATH}).encode()
            return self.request("/auth:login", posted, "POST", body, source=form)

        for _ in range(5):
            status, _, body = sign_in("wrong")
            self.assertEqual(status, 401, body[:300])
            self.assertIn(b"Wrong user or password", body)
        status, headers, body = sign_in("pw-carol-9012")
        self.assertEqual(status, 429, body[:300])
        self.assertTrue(1 <= int(headers["retry-after"]) <= 60, headers)
        self.assertIn(b"Too many failed sign-ins", body)
        self.assertNotRegex(headers.get("set-cookie", ""), r"dssession=[^;]")
        self.assert_no_secrets_logged()

    def test_form_sign_in_without_a_browser(self) -> None:
        """The form's contract: the CSRF field must equal the dscsrf cookie; then a
        session cookie (HttpOnly, SameSite=Lax) and a 303 back to ``next``."""
        status, headers, _ = self.request("/auth:login?next=" + quote(TTS_PATH, safe=""), BROWSER)
        csrf = re.search(r"dscsrf=([^;]+)", headers["set-cookie"]).group(1)  # type: ignore[union-attr]
        form = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": f"dscsrf={csrf}"}
        fields = {"user": "alice", "password": "pw-alice-1234", "next": TTS_PATH}
        status, _, body = self.request(
            "/auth:login", form, "POST", urlencode(dict(fields, csrf="forged" * 5)).encode()
        )
        self.assertEqual(status, 403, body[:300])
        status, headers, body = self.request(
            "/auth:login", form, "POST", urlencode(dict(fields, csrf=csrf)).encode()
        )
        self.assertEqual(status, 303, body[:300])
        self.assertEqual(headers["location"], TTS_PATH)
        cookie = headers["set-cookie"]
        self.assertRegex(cookie, r"dssession=[^;]+;")
        self.assertIn("HttpOnly", cookie)
        self.assertIn("SameSite=Lax", cookie)
        session = re.search(r"dssession=([^;]+)", cookie).group(1)  # type: ignore[union-attr]
        self.secrets.append(session)
        status, _, body = self.request(TTS_PATH, dict(BROWSER, Cookie=f"dssession={session}"))
        self.assertEqual(status, 200, body[:300])
        self.assertIn(b"image=selmaproject/tts:777", body)
        self.assert_no_secrets_logged()
        # the session survives a restart (sessions live in the state file)
        self.srv.stop()
        self.srv = self.server(slots=1)
        status, _, body = self.request("/", {"Cookie": f"dssession={session}"})
        self.assertEqual(status, 200, body[:300])
        self.assertIn(b"<b id=user>alice</b>", body)
        self.assert_no_secrets_logged()


class DockerCli(AccountsCase):
    """The docker CLI through /docker:local with a docker-api scoped token."""

    skip = docker_available() or (
        None if CLIS else "no docker CLI at /usr/bin/docker or /usr/local/bin/docker"
    )
    slots = 0
    extra = ("--docker-api",)

    def setUp(self) -> None:
        super().setUp()
        self.add_user("ops", "pw-ops-3456")
        self.add_group("admins", "--image", "*", "--route", "x", "--route", "docker-api", members=("ops",))
        self.add_user("dev", "pw-dev-7890")
        self.add_group("devs", "--image", "*", "--route", "x", members=("dev",))
        self.api, _ = self.token("ops", "--scope", "docker-api")
        self.x_only, _ = self.token("ops", "--scope", "x")
        self.dev_token, _ = self.token("dev")
        # the last change seen means every earlier one is
        eventually(
            lambda: self.status("/", bearer(self.dev_token), fresh=True) == 200, LIVE, "the tokens accepted"
        )

    def docker(
        self, cli: str, headers: dict[str, str] | None, *args: str
    ) -> subprocess.CompletedProcess[str]:
        d = self.mktemp()
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"HttpHeaders": headers} if headers else {}, f)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(
            DOCKER_HOST=f"tcp://127.0.0.1:{self.srv.port}/docker:local",
            DOCKER_CONFIG=d,
            DOCKER_CLI_HINTS="false",
        )
        return subprocess.run([cli, *args], env=env, capture_output=True, text=True, timeout=60, check=False)

    def test_scoped_token_works(self) -> None:
        """``docker version`` and ``docker ps`` with the token in HttpHeaders, as Bearer
        and as Basic with the user."""
        c = docker_client()
        try:
            real = c.version()["Version"]
        finally:
            c.close()
        for cli in CLIS:
            r = self.docker(cli, bearer(self.api), "version", "--format", "{{.Server.Version}}")
            self.assertEqual((r.returncode, r.stdout.strip()), (0, real), (cli, r.stderr))
            r = self.docker(cli, bearer(self.api), "ps")
            self.assertEqual(r.returncode, 0, (cli, r.stderr))
            self.assertIn("CONTAINER ID", r.stdout)
            r = self.docker(cli, basic("ops", self.api), "ps")
            self.assertEqual(r.returncode, 0, (cli, "Basic with the token", r.stderr))
        self.assert_no_secrets_logged()

    def test_refused_without_the_scope(self) -> None:
        """No header: 401; a token without the docker-api scope, a user whose groups lack
        the route, or a password: 403 -- each said in the CLI's output."""
        cases = [
            ("no credentials", None, r"401 Unauthorized: sign in first"),
            (
                "token without the docker-api scope",
                bearer(self.x_only),
                r"403 Forbidden: ops may not use the 'docker-api' route",
            ),
            (
                "user without the docker-api route",
                bearer(self.dev_token),
                r"403 Forbidden: dev may not use the 'docker-api' route",
            ),
            (
                "password",
                basic("ops", "pw-ops-3456"),
                r"403 Forbidden: /docker:local takes API tokens with the docker-api scope only",
            ),
        ]
        for cli in CLIS:
            for what, headers, said in cases:
                r = self.docker(cli, headers, "ps")
                self.assertNotEqual(r.returncode, 0, (cli, what, r.stdout))
                self.assertRegex(r.stderr, said, (cli, what))
        status, _, body = self.request("/docker:local/_ping", basic("ops", "pw-ops-3456"))
        self.assertEqual(status, 403, body)
        self.assertIn(b"docker-api", body)
        status, _, body = self.request("/docker:local/_ping", bearer(self.api))
        self.assertEqual((status, body), (200, b"OK"))
        self.assert_no_secrets_logged()


class BrowserSignIn(AccountsCase):
    """Chromium: sign in, waiting page, app, WebSocket, sign out -- on the cookie."""

    skip = docker_available() or chromium_missing()

    def setUp(self) -> None:
        super().setUp()
        ensure_wsapp_image()
        self.add_user("alice", "pw-alice-browser")
        self.add_group("web", "--image", "dockerspaces-test/*", "--route", "x", members=("alice",))
        probe, _ = self.token("alice")
        eventually(lambda: self.status("/", bearer(probe), fresh=True) == 200, LIVE, "alice accepted")

    def test_sign_in_wait_app_websocket_sign_out(self) -> None:
        browser = Browser()
        self.addCleanup(browser.close)
        base = f"http://127.0.0.1:{self.srv.port}"
        url = base + "/x:dockerspaces-test:wsapp:1:8080:DELAY=2/"
        seen = asyncio.run(self._drive(browser.ws_url, base, url))
        log = self.srv.output()[-3000:]
        self.assertEqual(seen["login_path"], "/auth:login", f"{seen}\n{log}")
        self.assertTrue(seen["waiting"], f"the waiting page never showed: {seen}\n{log}")
        self.assertEqual(seen["final_url"], url, seen)
        self.assertEqual(seen["ws"], "echo: hello from the page", f"{seen}\n{log}")
        session = [c for c in seen["cookies"] if c["name"] == "dssession"]
        self.assertEqual(len(session), 1, seen["cookies"])
        self.assertTrue(session[0]["httpOnly"])
        self.assertEqual(session[0]["sameSite"], "Lax")
        self.assertEqual(seen["after_logout"], "/auth:login", seen)
        self.assertEqual(seen["reopened"], "/auth:login", seen)
        self.assertEqual(seen["reopened_next"], ["/x:dockerspaces-test:wsapp:1:8080:DELAY=2/"])
        for shot in ("shot_login", "shot_waiting", "shot_app", "shot_again"):
            self.assertGreater(os.path.getsize(seen[shot]), 1000, shot)
        # the echo came from the container, through the route (the prefix stripped)
        containers = self.srv.containers()
        self.assertIn(WSAPP, [c["Image"] for c in containers])
        c = docker_client()
        try:
            logs = "".join(c.logs(x["Id"]).decode(errors="replace") for x in containers)
        finally:
            c.close()
        self.assertIn('"GET /ws HTTP/1.1" 101', logs)
        self.assertIn("wsapp: echo 19 bytes", logs)
        self.assert_no_secrets_logged()

    async def _view(self, s: Session) -> dict[str, Any] | None:
        try:
            text = await s.evaluate(
                "JSON.stringify({path: location.pathname, href: location.href,"
                " search: location.search, wait: !!document.getElementById('ds-wait'),"
                " form: !!document.querySelector('input[name=user]'),"
                " logout: !!document.getElementById('logout'),"
                " app: !!document.getElementById('app'),"
                " ws: (document.getElementById('ws')||{}).textContent || null})"
            )
        except (TimeoutError, AssertionError):
            return None  # navigating: the context is gone for a moment
        return json.loads(text) if text else None

    async def _until(
        self, s: Session, pred: Callable[[dict[str, Any]], bool], what: str, timeout: float = 60
    ) -> dict[str, Any]:
        last: list[dict[str, Any] | None] = [None]

        async def matching() -> dict[str, Any] | None:
            view = last[0] = await self._view(s)
            return view if view and pred(view) else None

        try:
            return await eventually_async(matching, timeout, what)
        except AssertionError:
            raise AssertionError(f"{what}: not within {timeout} s (last view {last[0]})") from None

    async def _drive(self, ws_url: str, base: str, url: str) -> dict[str, Any]:
        import websockets

        seen: dict[str, Any] = {"waiting": False}
        async with websockets.connect(ws_url, max_size=None) as ws:
            s = Session(ws)
            await s.call("Page.enable")
            await s.call("Runtime.enable")
            await s.call("Network.enable")
            await s.call("Page.navigate", url=url)
            view = await self._until(s, lambda v: v["form"], "the sign-in page")
            seen["login_path"] = view["path"]
            seen["shot_login"] = await s.screenshot("accounts-sign-in.png")
            await s.evaluate(
                "(function(){var f=document.querySelector('form');"
                "f.querySelector('input[name=user]').value='alice';"
                "f.querySelector('input[name=password]').value='pw-alice-browser';"
                "f.submit(); return true;})()"
            )
            last: list[dict[str, Any] | None] = [None]

            async def echoed() -> dict[str, Any] | None:
                now = last[0] = await self._view(s)
                if now and now["wait"] and not seen["waiting"]:
                    seen["waiting"] = True
                    seen["shot_waiting"] = await s.screenshot("accounts-waiting.png")
                if now and now["app"] and (now["ws"] or "").startswith(("echo", "error")):
                    return now
                return None

            try:
                app = await eventually_async(echoed, 90, "the app's WebSocket echo")
            except AssertionError:
                raise AssertionError(f"the app's WebSocket echo never showed (last {last[0]})") from None
            seen["final_url"], seen["ws"] = app["href"], app["ws"]
            seen["shot_app"] = await s.screenshot("accounts-app.png")
            seen["cookies"] = (await s.call("Network.getCookies", urls=[base + "/"]))["cookies"]
            # sign out: the page's form, then the sign-in page
            await s.call("Page.navigate", url=base + "/auth:logout")
            await self._until(s, lambda v: v["logout"], "the sign-out page")
            await s.evaluate("document.getElementById('logout').click(); true")
            view = await self._until(s, lambda v: v["form"], "the sign-in page after sign-out")
            seen["after_logout"] = view["path"]
            await s.call("Page.navigate", url=url)
            view = await self._until(s, lambda v: v["form"], "the sign-in page again")
            seen["reopened"] = view["path"]
            seen["reopened_next"] = parse_qs(view["search"].lstrip("?")).get("next")
            seen["shot_again"] = await s.screenshot("accounts-signed-out.png")
        return seen


class BrowserSignInWorkers2(BrowserSignIn):
    """BrowserSignIn (its WebSocket too) with --workers 2."""

    workers = 2
