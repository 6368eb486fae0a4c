"""ConfigWatcher (dockerspaces.autoscale.watch): SIGHUP and mtime polling with a temp
file and a task.Clock."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.task import Clock
from twisted.logger import ILogObserver, Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.autoscale import watch as watch_module
from dockerspaces.autoscale.config import Entry, load_entries
from dockerspaces.autoscale.watch import ConfigWatcher, sighup_installer

ENTRY_TOML = """
[[autoscale]]
name = "{name}"
image = "team/worker"
amqp = "amqp://rabbit/"
credentials = "rabbit.cred"
queue = "jobs"
max = {max}
"""


class WatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        with open(os.path.join(self.dir, "rabbit.cred"), "w") as f:
            f.write("scaler:secret\n")
        self.path = os.path.join(self.dir, "ds.toml")
        self.write(max=2)
        self.clock = Clock()
        self.got: list[tuple[Entry, ...]] = []
        self.handlers: list[Callable[[], None]] = []
        self.uninstalled = 0
        self.events: list[dict[str, Any]] = []
        self.patch(watch_module, "log", Logger(observer=cast(ILogObserver, self.events.append)))
        self.watcher = ConfigWatcher(
            self.path, load_entries(self.path), self.got.append, self.clock, install_sighup=self.install
        )
        self.watcher.startService()
        self.addCleanup(self._stop)

    def _stop(self) -> None:
        if self.watcher.running:
            self.watcher.stopService()

    def install(self, callback: Callable[[], None]) -> Callable[[], None]:
        self.handlers.append(callback)

        def uninstall() -> None:
            self.uninstalled += 1

        return uninstall

    def write(self, text: str | None = None, mtime: int | None = None, **kw: Any) -> None:
        with open(self.path, "w") as f:
            f.write(text if text is not None else ENTRY_TOML.format(name="jobs", **kw))
        if mtime is not None:
            os.utime(self.path, ns=(mtime, mtime))

    def errors(self) -> list[str]:
        return [formatEvent(e) for e in self.events if e["log_level"] == LogLevel.error]

    def test_mtime_change(self) -> None:
        """A changed file is read within a second; the callback gets the new entries;
        an unchanged poll does nothing."""
        self.clock.advance(1)
        self.assertEqual(self.got, [])
        self.write(max=5, mtime=1_000_000_000_000)
        self.clock.advance(1)
        self.assertEqual([e.max for e in self.got[-1]], [5])
        self.clock.advance(1)
        self.assertEqual(len(self.got), 1)

    def test_same_entries_no_callback(self) -> None:
        """A touched file with the same entries: no callback."""
        self.write(max=2, mtime=1_000_000_000_000)
        self.clock.advance(1)
        self.assertEqual(self.got, [])

    def test_sighup(self) -> None:
        """SIGHUP re-reads at once (e.g. a rotated credentials file: same TOML)."""
        self.assertEqual(len(self.handlers), 1)
        with open(os.path.join(self.dir, "rabbit.cred"), "w") as f:
            f.write("scaler:rotated\n")
        self.handlers[0]()
        self.assertEqual([e.password for e in self.got[-1]], ["rotated"])
        self.handlers[0]()
        self.assertEqual(len(self.got), 1)
        self.watcher.stopService()
        self.assertEqual(self.uninstalled, 1)
        calls = len(self.got)
        self.write(max=7, mtime=1_000_000_000_000)
        self.clock.advance(5)
        self.assertEqual(len(self.got), calls)  # stopped: no more polling

    def test_bad_file_keeps_entries(self) -> None:
        """A bad file: an error naming the problem, the old entries stay; fixed: read."""
        self.write(ENTRY_TOML.format(name="jobs", max=0), mtime=1_000_000_000_000)
        self.clock.advance(1)
        self.assertEqual(self.got, [])
        self.assertEqual(len(self.errors()), 1)
        self.assertIn("[[autoscale]] jobs: max: must be >= 1", self.errors()[0])
        self.assertIn("the entries in force stay", self.errors()[0])
        self.assertEqual(self.watcher.current[0].max, 2)
        self.assertEqual(self.watcher.errors, 1)
        self.write("[[autoscale", mtime=2_000_000_000_000)
        self.clock.advance(1)
        self.assertIn("is not valid TOML", self.errors()[-1])
        os.remove(self.path)
        self.clock.advance(1)
        self.assertIn("cannot read", self.errors()[-1])
        self.write(max=3)
        self.clock.advance(1)
        self.assertEqual([e.max for e in self.got[-1]], [3])

    def test_removed_entries(self) -> None:
        self.write("slots = 2\n", mtime=1_000_000_000_000)
        self.clock.advance(1)
        self.assertEqual(self.got, [()])


class SighupInstallerTests(SynchronousTestCase):
    """The default installer: signal.signal, the call handed to the reactor, the
    previous handler chained and put back."""

    def test_install_chain_uninstall(self) -> None:
        before_calls: list[int] = []
        queued: list[Callable[..., object]] = []

        class Reactor:
            def callFromThread(self, f: Callable[..., object], *a: object, **kw: object) -> None:
                queued.append(f)

        original = signal.getsignal(signal.SIGHUP)
        self.addCleanup(signal.signal, signal.SIGHUP, original)
        signal.signal(signal.SIGHUP, lambda n, f: before_calls.append(n))
        previous = signal.getsignal(signal.SIGHUP)
        called: list[bool] = []
        uninstall = sighup_installer(Reactor())(lambda: called.append(True))
        handler = signal.getsignal(signal.SIGHUP)
        self.assertTrue(callable(handler))
        cast(Callable[[int, object], None], handler)(signal.SIGHUP, None)
        self.assertEqual(before_calls, [signal.SIGHUP])
        self.assertEqual(called, [])  # not in the signal handler: on the reactor
        queued[0]()
        self.assertEqual(called, [True])
        uninstall()
        self.assertIs(signal.getsignal(signal.SIGHUP), previous)
