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
import base64
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from typing import Any

from twisted.trial import unittest

from .dockerutil import docker_available, free_port
from .images import WEB, ensure_test_images
from .procs import REPO, Server

CHROMIUM = os.environ.get("DOCKERSPACES_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = os.path.join(REPO, "test-artifacts")


def _chromium_missing() -> str | None:
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        import websockets  # noqa: F401
    except ImportError:
        return "the websockets package is not installed"
    return None


class Browser:
    """Headless Chromium with a DevTools websocket to one page (blocking helpers)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="ds-chromium-")
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={self.profile}",
             f"--remote-debugging-port={self.port}", "--remote-allow-origins=*",
             "--window-size=1000,700", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ws_url = self._page_ws()

    def _page_ws(self, timeout: float = 30.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
                    targets = json.loads(r.read())
                pages = [t for t in targets if t.get("type") == "page"]
                if pages:
                    return str(pages[0]["webSocketDebuggerUrl"])
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError("Chromium's DevTools endpoint did not come up")

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)


class Session:
    """One DevTools websocket session (async)."""

    def __init__(self, ws: Any):
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        my = self.next_id
        await self.ws.send(json.dumps({"id": my, "method": method, "params": params}))
        while True:
            msg = json.loads(await self.ws.recv())
            if msg.get("id") == my:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg.get("result", {})  # type: ignore[no-any-return]

    async def evaluate(self, expr: str) -> Any:
        r = await self.call("Runtime.evaluate", expression=expr, returnByValue=True)
        return r.get("result", {}).get("value")

    async def screenshot(self, name: str) -> str:
        os.makedirs(ARTIFACTS, exist_ok=True)
        r = await self.call("Page.captureScreenshot", format="png")
        path = os.path.join(ARTIFACTS, name)
        _write(path, base64.b64decode(r["data"]))
        return path


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


class WaitingPageTests(unittest.TestCase):
    """A browser on a cold x: route sees the waiting page, then the application."""

    skip = docker_available() or _chromium_missing()
    timeout = 180

    def setUp(self) -> None:
        ensure_test_images(WEB)
        self.server = Server(slots=2).start()
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
        self.assertTrue(any(s in ("queued", "pulling", "starting") for s in seen["states"]),
                        seen["states"])

    async def _drive(self, ws_url: str, url: str) -> dict[str, Any]:
        import websockets

        seen: dict[str, Any] = {"waiting": False, "app": "", "states": [], "final_url": None}
        async with websockets.connect(ws_url, max_size=None) as ws:
            s = Session(ws)
            await s.call("Page.enable")
            await s.call("Runtime.enable")
            await s.call("Page.navigate", url=url)
            end = time.monotonic() + 90
            while time.monotonic() < end:
                await asyncio.sleep(0.2)
                try:
                    state = await s.evaluate(
                        "JSON.stringify({wait: !!document.getElementById('ds-wait'),"
                        " state: (document.getElementById('ds-state')||{}).textContent || null,"
                        " body: document.body ? document.body.innerText : '',"
                        " href: location.href})")
                except (TimeoutError, AssertionError):
                    continue  # navigating: the context is gone for a moment
                if not state:
                    continue
                view = json.loads(state)
                if view["wait"]:
                    if not seen["waiting"]:
                        seen["waiting"] = True
                        seen["shot_waiting"] = await s.screenshot("waiting-page.png")
                    seen["states"].append(await s.evaluate(
                        "(function(){var t=(document.getElementById('ds-state')||{}).textContent||'';"
                        "return /queue/i.test(t)?'queued':/download/i.test(t)?'pulling':"
                        "/start/i.test(t)?'starting':/ready/i.test(t)?'ready':t;})()"))
                elif "image=dockerspaces-test/web:1" in view["body"]:
                    seen["app"] = view["body"]
                    seen["final_url"] = view["href"]
                    seen["shot_app"] = await s.screenshot("waiting-page-app.png")
                    break
        return seen

    def test_api_client_blocks(self) -> None:
        """Without text/html the same cold route just takes longer and answers 200."""
        t0 = time.monotonic()
        status, _headers, body = self.server.get(
            "/x:dockerspaces-test:web:1:8080:DELAY=2/", headers={"Accept": "application/json"})
        self.assertEqual(status, 200, body[:500])
        self.assertIn(b"image=dockerspaces-test/web:1", body)
        self.assertGreater(time.monotonic() - t0, 1.5)

    def test_dashboard_for_browsers(self) -> None:
        status, headers, body = self.server.get(
            "/monitor:broker/", headers={"Accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
        self.assertEqual(status, 200)
        self.assertTrue(headers["content-type"].startswith("text/html"), headers)
        self.assertIn(b"<table", body)
        status, headers, body = self.server.get("/monitor:broker/")
        self.assertEqual(status, 200)
        self.assertIn("TargetSlots", json.loads(body))
