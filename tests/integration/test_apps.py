"""Several real web apps at once in one browser (issue 14): two Jupyter Notebook
servers, two tabs of one headless Chromium (one cookie jar).

Two keys of the same image, ``…:jupyter:1:8888:NB=a`` and ``…:NB=b`` (two containers).
Tab A opens A's notebook, then tab B opens B's (so a route cookie, if any, would name
B from then on). Each tab is a cold start: the waiting page first, then the notebook.
In each tab a cell prints the container's hostname, its ``NB``, the kernel's pid and
``DOCKERSPACES_PUBLIC_PATH``; then each kernel is restarted -- Jupyter's page closes
the kernel WebSocket and opens a new one, a request carrying neither a ``Referer``
nor anything but its own URL -- and a cell runs again. Every answer must come from the
tab's own container, the second from a new kernel process.

- :class:`KeepPrefix`: ``prefix = "keep"``, Jupyter told its base URL (the route
  prefix); every URL the page makes carries it, no ``dsroute`` cookie is set.
- :class:`AppDomain`: ``--app-domain apps.localhost`` (Chromium resolves
  ``*.localhost`` to loopback); the browser is sent to the key's own host and the
  notebook lives at its root.

The image: :func:`tests.integration.jupyter.ensure_jupyter_image`. Screenshots go to
``test-artifacts/apps-*.png``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from twisted.trial.unittest import TestCase

from dockerspaces.spec import JobSpec, parse_route
from dockerspaces.web.apphosts import app_label

from .browser import Browser, Session, chromium_missing
from .dockerutil import docker_available, docker_client
from .jupyter import NOTEBOOK, ensure_jupyter_image, profile
from .procs import Server
from .wait import eventually_async

SEGMENTS = {"a": "y:dockerspaces-test:jupyter:1:8888:NB=a", "b": "y:dockerspaces-test:jupyter:1:8888:NB=b"}
TABS = ("a", "b")
#: seconds each container waits before starting Jupyter: the waiting page shows surely
START_DELAY = 2

#: the page's notebook is loaded and its kernel connected, answered kernel_info, idle
_READY = (
    "(!!window.Jupyter && !!Jupyter.notebook && !!Jupyter.notebook._fully_loaded"
    " && !!Jupyter.notebook.kernel && Jupyter.notebook.kernel.is_connected()"
    " && !!Jupyter.notebook.kernel.info_reply && Jupyter.notebook.kernel.info_reply.status === 'ok'"
    " && !Jupyter.notebook.kernel_busy)"
)
#: what the tab shows: the waiting page, the ready notebook, its address
_STATE = (
    "JSON.stringify({wait: !!document.getElementById('ds-wait'), ready: " + _READY + ", href: location.href})"
)
#: a new code cell at the bottom, executed; its index
_RUN_CELL = r"""(function () {
  var nb = Jupyter.notebook, cell = nb.insert_cell_at_bottom('code');
  cell.set_text("import os, socket\n"
    + "print('host=' + socket.gethostname(), 'nb=' + os.environ.get('NB', ''))\n"
    + "print('pid=%d' % os.getpid(), 'path=' + os.environ.get('DOCKERSPACES_PUBLIC_PATH', ''))");
  cell.execute();
  return nb.find_cell_index(cell);
})()"""
#: the text of cell N's output area once it has output (JS format: the index)
_CELL_OUTPUT = r"""(function (i) {
  var c = Jupyter.notebook.get_cell(i);
  if (!c || !c.output_area.outputs.length) return null;
  return c.output_area.element.text().trim();
})(%d)"""
#: restart the kernel (no dialog); remembers the old WebSocket to tell the new one
_RESTART = r"""(function () {
  var k = Jupyter.notebook.kernel;
  window.__dsOldWs = k.ws; window.__dsRestarted = false;
  Jupyter.notebook.events.one('kernel_ready.Kernel', function () { window.__dsRestarted = true; });
  k.restart();
  return k.id;
})()"""
#: the restarted kernel is back on a new WebSocket, connected and idle
_RESTARTED = (
    "(window.__dsRestarted === true && Jupyter.notebook.kernel.ws !== window.__dsOldWs && " + _READY + ")"
)


def parse_output(text: str) -> dict[str, str]:
    """``name=value`` words of a cell's output (``host=… nb=…`` / ``pid=… path=…``)."""
    out = {}
    for word in text.split():
        name, sep, value = word.partition("=")
        if sep:
            out[name] = value
    return out


def label(segment: str) -> str:
    """The app host label of a route segment."""
    spec = parse_route(segment)
    assert isinstance(spec, JobSpec)
    return app_label(spec)


class _TwoNotebooks(TestCase):
    """The scenario of the module docstring; subclasses choose the mode."""

    skip = docker_available() or chromium_missing()
    timeout = 900  # the first build installs Jupyter from Debian's mirror; cached: ~25 s
    keep = False
    args: tuple[str, ...] = ()
    workers = 1  # the *Workers2 variants: --workers 2

    def setUp(self) -> None:
        ensure_jupyter_image()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        config = os.path.join(directory, "dockerspaces.toml")
        with open(config, "w") as f:
            f.write(profile(keep=self.keep, start_delay=START_DELAY))
        self.srv = Server("--config", config, *self.args, slots=2, workers=self.workers)
        self.addCleanup(self.srv.cleanup)
        self.srv.start()
        self.browser = Browser()
        self.addCleanup(self.browser.close)

    def main_url(self, tab: str) -> str:
        """The notebook's address on the main host, as a user would type it."""
        return f"http://127.0.0.1:{self.srv.port}/{SEGMENTS[tab]}/notebooks/{NOTEBOOK}"

    def run_tabs(self) -> dict[str, Any]:
        """Drive both tabs (module docstring); what was seen, with each key's container
        hostname (``hosts``) and the server's log."""
        t0 = time.monotonic()
        seen: dict[str, Any] = {}
        try:
            asyncio.run(self._drive(seen))
        except AssertionError as e:  # a wait ran out: say what was seen, and the log
            raise AssertionError(f"{e}\nseen: {seen}\n{self.srv.output()[-4000:]}") from None
        seen["seconds"] = round(time.monotonic() - t0, 1)
        seen["hosts"] = self.container_hosts()
        seen["log"] = self.srv.output()[-4000:]
        return seen

    def check(self, seen: dict[str, Any], public_path: dict[str, str], urls: dict[str, str]) -> None:
        """Each tab showed the waiting page at ``urls[tab]``, then the notebook there; its
        cells ran in its own container, which was told ``public_path[tab]``; after the
        restart in a new kernel process, reached by a new WebSocket."""
        hosts = seen["hosts"]
        self.assertEqual(sorted(hosts), ["a", "b"], seen)
        self.assertNotEqual(hosts["a"], hosts["b"])
        for tab in TABS:
            before, after = parse_output(seen[f"{tab}_before"]), parse_output(seen[f"{tab}_after"])
            for out in (before, after):
                self.assertEqual(out.get("host"), hosts[tab], seen)
                self.assertEqual(out.get("nb"), tab, seen)
                self.assertEqual(out.get("path"), public_path[tab], seen)
            self.assertNotEqual(before["pid"], after["pid"], f"tab {tab}: the kernel was not restarted")
            self.assertTrue(seen[f"{tab}_waited"], f"tab {tab}: no waiting page while its container started")
            self.assertEqual(seen[f"{tab}_wait_href"], urls[tab], seen)
            self.assertEqual(seen[f"{tab}_href"], urls[tab], seen)
            self.assertGreater(os.path.getsize(seen[f"{tab}_shot"]), 1000)

    def container_hosts(self) -> dict[str, str]:
        """Each of the server's containers' hostname, by its ``NB`` env value."""
        c = docker_client()
        try:
            out = {}
            for x in self.srv.containers():
                info = c.inspect_container(x["Id"])
                env = dict(e.split("=", 1) for e in info["Config"]["Env"] if "=" in e)
                out[env.get("NB", "?")] = str(info["Config"]["Hostname"])
            return out
        finally:
            c.close()

    async def _drive(self, seen: dict[str, Any]) -> None:
        """The browser's part (module docstring), noting what it saw in ``seen``."""
        import websockets

        name = type(self).__name__
        async with websockets.connect(self.browser.ws_url, max_size=None) as wa:
            first = Session(wa)
            target = await first.call("Target.createTarget", url="about:blank")
            second_url = self.browser.ws_url.rsplit("/", 1)[0] + "/" + target["targetId"]
            async with websockets.connect(second_url, max_size=None) as wb:
                tabs = {"a": first, "b": Session(wb)}
                for s in tabs.values():
                    await s.call("Page.enable")
                    await s.call("Network.enable")
                for tab in TABS:  # A first, fully loaded; then B
                    await tabs[tab].call("Page.navigate", url=self.main_url(tab))
                    await self._open(tabs[tab], tab, seen)
                for tab in TABS:
                    seen[f"{tab}_before"] = await self._cell(tabs[tab], tab)
                for tab in TABS:  # the kernel WebSocket closes and opens again
                    seen[f"{tab}_kernel"] = await tabs[tab].evaluate(_RESTART)
                for tab in TABS:
                    await self._until(tabs[tab], _RESTARTED, f"tab {tab}: the restarted kernel back", 60)
                for tab in TABS:
                    seen[f"{tab}_after"] = await self._cell(tabs[tab], tab)
                    seen[f"{tab}_href"] = await tabs[tab].evaluate("location.href")
                    seen[f"{tab}_shot"] = await tabs[tab].screenshot(f"apps-{name}-{tab}.png")
                cookies = await first.call("Network.getAllCookies")
                seen["cookies"] = sorted({c["name"] for c in cookies.get("cookies", [])})

    async def _open(self, s: Session, tab: str, seen: dict[str, Any]) -> None:
        """Wait for the tab's notebook to be ready, noting whether the waiting page
        showed first (a screenshot of it for tab A)."""
        seen[f"{tab}_waited"] = False

        async def ready() -> bool:
            try:
                raw = await s.evaluate(_STATE)
            except (AssertionError, TimeoutError):
                return False  # navigating: no context for a moment
            view = json.loads(raw) if isinstance(raw, str) else {}
            if view.get("wait") and not seen[f"{tab}_waited"]:
                seen[f"{tab}_waited"] = True
                seen[f"{tab}_wait_href"] = view.get("href")
                if tab == "a":
                    await s.screenshot(f"apps-{type(self).__name__}-waiting.png")
            return bool(view.get("ready"))

        await eventually_async(ready, 120, f"tab {tab}: the notebook with a ready kernel", interval=0.1)

    async def _cell(self, s: Session, tab: str) -> str:
        index = await s.evaluate(_RUN_CELL)
        out: str = await self._until(s, _CELL_OUTPUT % index, f"tab {tab}: the cell's output", 60)
        return out

    async def _until(self, s: Session, expr: str, what: str, timeout: float) -> Any:
        async def check() -> Any:
            try:
                return await s.evaluate(expr)
            except (AssertionError, TimeoutError):
                return None

        return await eventually_async(check, timeout, what, interval=0.2)


class KeepPrefix(_TwoNotebooks):
    """``prefix = "keep"``: each notebook under its own route prefix on the main host,
    every request (the kernel WebSockets too) routed by its own path, no cookie."""

    keep = True

    def test_two_notebooks_in_two_tabs_survive_kernel_restarts(self) -> None:
        seen = self.run_tabs()
        # the tabs stayed where they were opened, each app told its route prefix
        urls = {tab: self.main_url(tab) for tab in TABS}
        self.check(seen, {tab: f"/{SEGMENTS[tab]}/" for tab in TABS}, urls)
        self.assertNotIn("dsroute", seen["cookies"], seen)


class AppDomain(_TwoNotebooks):
    """``--app-domain apps.localhost``: each notebook at the root of its own host."""

    args = ("--app-domain", "apps.localhost")

    def test_two_notebooks_on_two_app_hosts_survive_kernel_restarts(self) -> None:
        seen = self.run_tabs()
        labels = {tab: label(SEGMENTS[tab]) for tab in TABS}
        self.assertNotEqual(labels["a"], labels["b"])
        # sent from the main host to the key's own host (the waiting page too), where
        # the app lives at the root
        urls = {
            tab: f"http://{labels[tab]}.apps.localhost:{self.srv.port}/notebooks/{NOTEBOOK}" for tab in TABS
        }
        self.check(seen, {tab: "/" for tab in TABS}, urls)
        self.assertNotIn("dsroute", seen["cookies"], seen)


class KeepPrefixWorkers2(KeepPrefix):
    """KeepPrefix (the kernel WebSockets too) with --workers 2."""

    workers = 2


class AppDomainWorkers2(AppDomain):
    """AppDomain (the kernel WebSockets too) with --workers 2."""

    workers = 2
