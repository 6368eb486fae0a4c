"""``--auth accounts`` with apps on their own hosts, in headless Chromium: the browser
opens an app on the main host, is sent to the app's host, from there to sign in on the
main host, and back with a one-time ticket to the app -- whose page and WebSocket then
work on the app host's own session cookie. No sign-in form is ever shown on the app's
origin, and no ticket, password or session id reaches the log."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from dockerspaces.spec import JobSpec, parse_route
from dockerspaces.web.apphosts import app_label

from .browser import Browser, Session, chromium_missing
from .dockerutil import docker_available, free_port
from .images import ensure_wsapp_image
from .procs import Server
from .test_accounts import AccountsCase
from .wait import eventually_async

SEG = "y:dockerspaces-test:wsapp:1:8080:DELAY=2"


class AppHostSignIn(AccountsCase):
    """Sign in on the main host, handed over to the app's own host (see module)."""

    skip = docker_available() or chromium_missing()

    def setUp(self) -> None:
        ensure_wsapp_image()
        self.port = free_port()
        self.extra = ("--app-domain", "apps.localhost", "--public-url", f"http://127.0.0.1:{self.port}")
        super().setUp()
        self.add_user("alice", "pw-alice-apphost")
        self.add_group("web", "--image", "dockerspaces-test/*", "--route", "y", members=("alice",))

    def server(self, *extra: str, slots: int) -> Server:
        """The accounts server on the port ``--public-url`` names."""
        srv = Server(
            "--auth",
            "accounts",
            "--state",
            self.state,
            *extra,
            slots=slots,
            port=self.port,
            probe="/monitor:health",
            workers=self.workers,
        )
        srv.log_path = self.mktemp() + ".log"
        self.addCleanup(srv.cleanup)
        return srv.start()

    def test_sign_in_on_the_main_host_then_the_app_on_its_own(self) -> None:
        spec = parse_route(SEG)
        assert isinstance(spec, JobSpec)
        app_name = f"{app_label(spec)}.apps.localhost"
        app_host = f"{app_name}:{self.port}"
        browser = Browser()
        self.addCleanup(browser.close)
        seen = asyncio.run(self._drive(browser.ws_url, f"http://127.0.0.1:{self.port}/{SEG}/"))
        log = self.srv.output()
        # the sign-in form was the main host's; the app ended on its own host
        self.assertEqual(seen["form_at"], f"http://127.0.0.1:{self.port}/auth:login", seen)
        self.assertTrue(seen["form_next"].startswith("/auth:handoff?to="), seen)
        self.assertEqual(seen["final"], f"http://{app_host}/", seen)
        self.assertEqual(seen["ws"], "echo: hello from the page", f"{seen}\n{log[-3000:]}")
        # two sessions, each host-only on its own host
        by_domain = {c["domain"]: c for c in seen["cookies"] if c["name"] == "dssession"}
        self.assertEqual(set(by_domain), {"127.0.0.1", app_name}, seen["cookies"])
        for c in by_domain.values():
            self.assertTrue(c["httpOnly"])
            self.assertEqual(c["sameSite"], "Lax")
        self.assertNotEqual(by_domain["127.0.0.1"]["value"], by_domain[app_name]["value"])
        self.secrets += [c["value"] for c in by_domain.values()]
        # the ticket went through the log only with its value redacted
        ticket_lines = [x for x in log.splitlines() if "/auth:ticket" in x]
        self.assertTrue(ticket_lines, log[-3000:])
        for line in ticket_lines:
            self.assertRegex(line, r"/auth:ticket\?t=…&path=…")
        self.assert_no_secrets_logged()

    async def _drive(self, ws_url: str, url: str) -> dict[str, Any]:
        import websockets

        seen: dict[str, Any] = {}
        async with websockets.connect(ws_url, max_size=None) as ws:
            s = Session(ws)
            await s.call("Page.enable")
            await s.call("Runtime.enable")
            await s.call("Network.enable")
            await s.call("Page.navigate", url=url)
            view = await self._until(s, lambda v: v["form"], "the sign-in form")
            seen["form_at"] = view["href"].split("?")[0]
            seen["form_next"] = await s.evaluate("document.querySelector('input[name=next]').value")
            await s.evaluate(
                "(function(){var f=document.querySelector('form');"
                "f.querySelector('input[name=user]').value='alice';"
                "f.querySelector('input[name=password]').value='pw-alice-apphost';"
                "f.submit(); return true;})()"
            )
            view = await self._until(
                s, lambda v: (v["ws"] or "").startswith(("echo", "error")), "the app's echo", 90
            )
            seen["final"], seen["ws"] = view["href"], view["ws"]
            seen["cookies"] = (await s.call("Network.getAllCookies"))["cookies"]
            await s.screenshot("accounts-app-host.png")
        return seen

    async def _until(self, s: Session, pred: Any, what: str, timeout: float = 60) -> dict[str, Any]:
        last: list[Any] = [None]

        async def matching() -> dict[str, Any] | None:
            try:
                text = await s.evaluate(
                    "JSON.stringify({href: location.href,"
                    " form: !!document.querySelector('input[name=user]'),"
                    " text: (document.body && document.body.innerText || '').slice(0, 200),"
                    " ws: (document.getElementById('ws')||{}).textContent || null})"
                )
            except (TimeoutError, AssertionError):
                return None  # navigating
            view = last[0] = json.loads(text) if text else None
            return view if view and pred(view) else None

        try:
            return await eventually_async(matching, timeout, what)
        except AssertionError:
            raise AssertionError(f"{what}: not within {timeout} s (last view {last[0]})") from None


class AppHostSignInWorkers2(AppHostSignIn):
    """AppHostSignIn (its WebSocket too) with --workers 2."""

    workers = 2
