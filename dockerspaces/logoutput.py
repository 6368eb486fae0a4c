"""Where log lines go, and how they get there cheaply.

Under twistd the text log is twistd's own ``FileLogObserver`` unless the Application
brings an observer. That observer formats a timestamp (``strftime`` plus a time-zone
lookup) and makes an unbuffered ``write`` for every event: with one request line per
proxied request it was a sixth of the proxy's CPU. Here instead:

- :func:`twistd_destination` picks the file twistd would have written to (its
  ``--logfile``/``--nodaemon`` rules, ``SIGUSR1`` rotating a log file), or ``None``
  when twistd must keep logging itself (``--syslog``, ``--logger``, or ``--logfile -``
  for a daemon, which twistd refuses with its own message);
- :class:`TextObserver` writes twistd's classic line format
  (``2026-11-29T17:45:00+0000 [namespace#level] text``), its timestamp formatted once
  per second;
- :class:`LineWriter` batches the lines logged during one reactor iteration into one
  ``write`` at the end of it (a ``callLater(0)``), writes through at once what is
  logged at ``warn`` or above, from another thread, or while the reactor is not
  running, and flushes whatever is pending before that — so nothing waits longer than
  one reactor iteration and nothing is lost on an orderly stop.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from threading import get_ident
from types import FrameType
from typing import IO, Protocol

from twisted.internet.interfaces import IDelayedCall
from twisted.logger import (
    ILogObserver,
    LogEvent,
    LogLevel,
    formatEventAsClassicLogText,
    formatTime,
)
from twisted.python import logfile
from zope.interface import implementer  # type: ignore[import-untyped]

#: this many pending lines are written at once
FLUSH_LINES = 512


class LoopReactor(Protocol):
    """What a :class:`LineWriter` uses of the reactor: whether it runs, and a call on
    its next iteration."""

    running: bool

    def callLater(
        self, delay: float, callable: Callable[..., object], *args: object, **kw: object
    ) -> IDelayedCall:
        """Run ``callable`` after ``delay`` seconds."""


class LineWriter:
    """Writes log lines to ``out`` in batches, one ``write`` per reactor iteration.

    Only the thread that built it (the reactor's) batches; lines from other threads
    (the Docker pools') are written through at once, as are ``urgent`` ones.
    """

    def __init__(self, out: IO[str], reactor: LoopReactor):
        self.out = out
        self.reactor = reactor
        self._thread = threading.get_ident()
        self._pending: list[str] = []
        self._call: IDelayedCall | None = None

    def write(self, line: str, urgent: bool = False) -> None:
        """Queue ``line`` (ending in a newline) or, where it cannot wait, write it now."""
        if get_ident() != self._thread:
            self._write(line)  # not queued: the list belongs to the reactor thread
            return
        pending = self._pending
        pending.append(line)
        if urgent or len(pending) >= FLUSH_LINES or not self.reactor.running:
            self.flush()
        elif self._call is None:
            self._call = self.reactor.callLater(0, self._flush_later)

    def _flush_later(self) -> None:
        self._call = None
        self.flush()

    def flush(self) -> None:
        """Write what is pending (reactor thread only)."""
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()
        if self._pending:
            text = "".join(self._pending)
            self._pending = []
            self._write(text)

    def _write(self, text: str) -> None:
        try:
            self.out.write(text)
            self.out.flush()
        except (OSError, ValueError):
            # a full disk or a closed file must not take the proxy down; lines are
            # lost the way twistd's own observer would lose them
            pass


class _Stamp:
    """twistd's timestamp text (``formatTime``), computed once per second."""

    def __init__(self) -> None:
        self.second: int | None = None
        self.text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self.second:  # (a new second: formatted again)
            self.text = formatTime(second)
            self.second = second
        return self.text


#: levels whose lines are written at once
URGENT = frozenset({LogLevel.warn, LogLevel.error, LogLevel.critical})


@implementer(ILogObserver)
class TextObserver:
    """twistd's classic text log lines, through a :class:`LineWriter`."""

    def __init__(self, writer: LineWriter):
        self.writer = writer
        self.stamp = _Stamp()

    def __call__(self, event: LogEvent) -> None:
        """Format and queue one event (``warn`` and above are written at once)."""
        level = event.get("log_level")
        text = event.get("ds_text")
        if text is not None and "log_failure" not in event and "log_system" not in event:
            # a request line: its text is ready (dockerspaces.logs.log_request)
            self.line(
                f" [{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}] ",
                text,
                event.get("log_time"),
                level in URGENT,
            )
            return
        formatted = formatEventAsClassicLogText(event, formatTime=self.stamp)
        if formatted is not None:
            self.writer.write(formatted, level in URGENT)

    def line(self, head: str, text: str, when: float | None, urgent: bool = False) -> None:
        """Queue the line ``<time of when><head><text>`` (``head`` is
        ``" [namespace#level] "``), continuation lines indented as twistd does."""
        if "\n" in text:
            text = text.replace("\n", "\n\t")
        self.writer.write(f"{self.stamp(when)}{head}{text}\n", urgent)


def twistd_destination(twistd_options: object) -> IO[str] | None:
    """The file twistd would write its text log to, for its parsed ``ServerOptions``.

    ``None`` where twistd must keep logging itself: ``--syslog``, ``--logger``, or
    ``--logfile -`` without ``--nodaemon`` (twistd exits with its own message). A log
    file is rotated by ``SIGUSR1`` as under twistd, unless that signal is handled
    already.
    """
    get = getattr(twistd_options, "get", None)
    if get is None:
        return None
    if get("syslog") or get("logger"):
        return None
    name = get("logfile")
    nodaemon = bool(get("nodaemon"))
    if name == "-":
        return sys.stdout if nodaemon else None
    if nodaemon and not name:
        return sys.stdout
    log_file = logfile.LogFile.fromFullPath(name or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):

        def rotate(signum: int, frame: FrameType | None) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    return log_file  # type: ignore[return-value]
