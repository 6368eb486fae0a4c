"""The waiting page in a real browser: headless Chromium driven over the DevTools protocol.

A browser opens ``/x:dockerspaces-test:web:1:8080:DELAY=3/`` on a real dockerspaces
process (``twistd -n dockerspaces``, see :mod:`tests.integration.procs`); the container
needs about 3 s to listen, so the browser must first get the waiting page (``202``,
``#ds-wait``), which then continues to the application by itself (its index page shows
``image=dockerspaces-test/web:1``).  Screenshots of both go to ``test-artifacts/``.
An API client (no ``text/html``) on the same cold route blocks and gets the app.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from twisted.trial import unittest

from .browser import Browser, Session
from .browser import chromium_missing as _chromium_missing
from .dockerutil import docker_available
from .images import WEB, ensure_test_images
from .procs import Server
from .wait import eventually_async


class WaitingPageTests(unittest.TestCase):
    """A browser on a cold x: route sees the waiting page, then the application."""

    skip = docker_available() or _chromium_missing()
    timeout = 180
    workers = 1  # WaitingPageTestsWorkers2: --workers 2

    def setUp(self) -> None:
        ensure_test_images(WEB)
        self.server = Server(slots=2, workers=self.workers).start()
        self.addCleanup(self.server.cleanup)

    def test_browser_waits_then_reaches_the_app(self) -> None:
        browser = Browser()
        self.addCleanup(browser.close)
        url = f"http://127.0.0.1:{self.server.port}/x:dockerspaces-test:web:1:8080:DELAY=3/"
        seen = asyncio.run(self._drive(browser.ws_url, url))
        log = self.server.output()[-3000:]
        self.assertTrue(seen["waiting"], f"the waiting page never showed: {seen}\n{log}")
        self.assertIn("image=dockerspaces-test/web:1", seen["app"], f"{seen}\n{log}")
        self.assertEqual(seen["final_url"], url)
        self.assertTrue(os.path.getsize(seen["shot_waiting"]) > 1000)
        self.assertTrue(os.path.getsize(seen["shot_app"]) > 1000)
        self.assertTrue(any(s in ("queued", "pulling", "starting") for s in seen["states"]), seen["states"])

    async def _drive(self, ws_url: str, url: str) -> dict[str, Any]:
        import websockets

        seen: dict[str, Any] = {"waiting": False, "app": "", "states": [], "final_url": None}
        async with websockets.connect(ws_url, max_size=None) as ws:
            s = Session(ws)
            await s.call("Page.enable")
            await s.call("Runtime.enable")
            await s.call("Page.navigate", url=url)

            async def app_shown() -> bool:
                try:
                    state = await s.evaluate(
                        "JSON.stringify({wait: !!document.getElementById('ds-wait'),"
                        " state: (document.getElementById('ds-state')||{}).textContent || null,"
                        " body: document.body ? document.body.innerText : '',"
                        " href: location.href})"
                    )
                except (TimeoutError, AssertionError):
                    return False  # navigating: the context is gone for a moment
                if not state:
                    return False
                view = json.loads(state)
                if view["wait"]:
                    if not seen["waiting"]:
                        seen["waiting"] = True
                        seen["shot_waiting"] = await s.screenshot("waiting-page.png")
                    seen["states"].append(
                        await s.evaluate(
                            "(function(){var t=(document.getElementById('ds-state')||{}).textContent||'';"
                            "return /queue/i.test(t)?'queued':/download/i.test(t)?'pulling':"
                            "/start/i.test(t)?'starting':/ready/i.test(t)?'ready':t;})()"
                        )
                    )
                elif "image=dockerspaces-test/web:1" in view["body"]:
                    seen["app"] = view["body"]
                    seen["final_url"] = view["href"]
                    seen["shot_app"] = await s.screenshot("waiting-page-app.png")
                    return True
                return False

            try:
                await eventually_async(app_shown, 90, "the app after the waiting page", interval=0.2)
            except AssertionError:
                pass  # the caller's assertions say what was seen, with the server's log
        return seen

    def test_api_client_blocks(self) -> None:
        """Without text/html the same cold route just takes longer and answers 200."""
        t0 = time.monotonic()
        status, _headers, body = self.server.get(
            "/x:dockerspaces-test:web:1:8080:DELAY=2/", headers={"Accept": "application/json"}
        )
        self.assertEqual(status, 200, body[:500])
        self.assertIn(b"image=dockerspaces-test/web:1", body)
        self.assertGreater(time.monotonic() - t0, 1.5)

    def test_dashboard_for_browsers(self) -> None:
        status, headers, body = self.server.get(
            "/monitor:broker/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
        )
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/html"), headers)
        self.assertIn(b"<table", body)
        status, headers, body = self.server.get("/monitor:broker/")
        self.assertEqual(status, 200)
        self.assertIn("TargetSlots", json.loads(body))


class WaitingPageTestsWorkers2(WaitingPageTests):
    """WaitingPageTests with --workers 2: the page and its progress polls may reach
    either child; the progress comes from the broker's process."""

    workers = 2
