"""Headless Chromium driven over the DevTools protocol (for the browser tests).

:class:`Browser` starts ``/usr/bin/chromium --headless`` with a throw-away profile and
finds its page's DevTools websocket; :class:`Session` sends DevTools calls over it
(``call``, ``evaluate``, ``screenshot`` into :data:`ARTIFACTS`).  Tests skip with
:func:`chromium_missing` when Chromium or the ``websockets`` package is absent.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from typing import Any

from .dockerutil import free_port
from .procs import REPO
from .wait import eventually

CHROMIUM = os.environ.get("DOCKERSPACES_TEST_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = os.path.join(REPO, "test-artifacts")


def chromium_missing() -> str | None:
    """``None`` when the browser tests can run, else why not (a skip reason)."""
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is not installed (apt-get install chromium)"
    try:
        import websockets  # noqa: F401 - only whether it imports
    except ImportError:
        return "the websockets package is not installed"
    return None


class Browser:
    """Headless Chromium with a DevTools websocket to one page (blocking helpers)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.profile = tempfile.mkdtemp(prefix="ds-chromium-")
        self.proc = subprocess.Popen(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                f"--user-data-dir={self.profile}",
                f"--remote-debugging-port={self.port}",
                "--remote-allow-origins=*",
                "--window-size=1000,700",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.ws_url = self._page_ws()

    def _page_ws(self, timeout: float = 30.0) -> str:
        def page() -> str | None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as r:
                    targets = json.loads(r.read())
            except OSError:
                return None  # not listening yet
            pages = [t for t in targets if t.get("type") == "page"]
            return str(pages[0]["webSocketDebuggerUrl"]) if pages else None

        return eventually(page, timeout, "Chromium's DevTools endpoint", interval=0.2)

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
