"""Re-reading the ``[[autoscale]]`` entries of the config file without a restart.

:class:`ConfigWatcher` reads the file again on SIGHUP and when its modification time
(or size, or inode) changes, polled every second.  New entries that differ from the
current ones go to a callback (``AutoscaleService.reconfigure``); a file that cannot be
read or holds a bad entry is logged as an error naming the problem, and the entries
in force stay.  Only ``[[autoscale]]`` is taken from the file again: every other
option needs a restart.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..config import ConfigError
from .config import Entry, load_entries

log = Logger()

Loader = Callable[[str], Sequence[Entry]]
#: installs a SIGHUP handler calling its argument on the reactor; returns an uninstaller
SignalInstaller = Callable[[Callable[[], None]], Callable[[], None]]


class ThreadCaller(Protocol):
    """The reactor's ``callFromThread`` (``IReactorFromThreads``)."""

    def callFromThread(self, f: Callable[..., object], *args: object, **kwargs: object) -> None:
        """Run ``f`` on the reactor thread."""


def sighup_installer(reactor: ThreadCaller) -> SignalInstaller:
    """A :data:`SignalInstaller` with ``signal.signal``: the handler hands the call to
    the reactor (``callFromThread``: safe from a signal handler) and chains to the
    handler installed before, which the uninstaller puts back."""

    def install(callback: Callable[[], None]) -> Callable[[], None]:
        before = signal.getsignal(signal.SIGHUP)

        def handler(signum: int, frame: FrameType | None) -> None:
            reactor.callFromThread(callback)
            if callable(before):
                before(signum, frame)

        signal.signal(signal.SIGHUP, handler)

        def uninstall() -> None:
            if signal.getsignal(signal.SIGHUP) is handler:
                signal.signal(signal.SIGHUP, before if before is not None else signal.SIG_DFL)

        return uninstall

    return install


def _fingerprint(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class ConfigWatcher(Service):
    """Calls ``on_change`` with the file's entries when they change (module docstring)."""

    def __init__(
        self,
        path: str,
        current: Sequence[Entry],
        on_change: Callable[[tuple[Entry, ...]], None],
        clock: IReactorTime,
        install_sighup: SignalInstaller | None = None,
        load: Loader | None = None,
        poll: float = 1.0,
        fingerprint: Callable[[str], object] = _fingerprint,
    ) -> None:
        self.path = path
        self.current: tuple[Entry, ...] = tuple(current)
        self.on_change = on_change
        self._clock = clock
        self._install = install_sighup
        self._load: Loader = load or load_entries
        self._poll = poll
        self._fingerprint = fingerprint
        self._seen: object = None
        self._loop: LoopingCall | None = None
        self._uninstall: Callable[[], None] | None = None
        #: failed re-reads (a metric)
        self.errors = 0

    def startService(self) -> None:
        """Note the file's state, install the SIGHUP handler, start polling."""
        super().startService()
        self._seen = self._fingerprint(self.path)
        if self._install is not None:
            self._uninstall = self._install(self.sighup)
        self._loop = LoopingCall(self.check)
        self._loop.clock = self._clock
        self._loop.start(self._poll, now=False).addErrback(
            lambda f: log.failure("autoscale: config watch stopped", f)
        )

    def stopService(self) -> None:
        """Stop polling and put the previous SIGHUP handler back."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._uninstall is not None:
            self._uninstall()
            self._uninstall = None

    def sighup(self) -> None:
        """SIGHUP: read the entries again."""
        self.reload("SIGHUP")

    def check(self) -> None:
        """Re-read the file when it changed since the last look."""
        now = self._fingerprint(self.path)
        if now != self._seen:
            self._seen = now
            self.reload("the file changed")

    def reload(self, why: str) -> bool:
        """Read the entries again; True when they changed (and the callback ran)."""
        try:
            entries = tuple(self._load(self.path))
        except (ConfigError, OSError, ValueError) as e:
            self.errors += 1
            log.error("autoscale: {why}: not reloaded, the entries in force stay: {e}", why=why, e=str(e))
            return False
        if entries == self.current:
            if why == "SIGHUP":
                log.info("autoscale: SIGHUP: [[autoscale]] unchanged ({n} entries)", n=len(entries))
            return False
        self.current = entries
        log.info(
            "autoscale: {why}: [[autoscale]] re-read: {names}",
            why=why,
            names=", ".join(e.name for e in entries) or "none",
        )
        self.on_change(entries)
        return True
