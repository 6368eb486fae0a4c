"""The broker's process with ``--workers N``: the broker's side as in one process, the
``/monitor:`` routes on a private UNIX socket, and the :class:`~.pool.WorkerPool`."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.application import strports
from twisted.application.service import MultiService, Service
from twisted.logger import Logger
from twisted.python.logfile import BaseLogFile

from ..config import Config
from ..web.pages import ProgressBoard, WaitingRoom
from .brokerside import Hub
from .pool import WorkerPool

if TYPE_CHECKING:
    from ..app import Core

log = Logger()


def relay_to(observer: Any) -> Callable[[str], None]:
    """Where a child's log lines go: this process's log output as they are (they are
    formatted by the child, as this process would), else as events."""
    writer = getattr(observer, "writer", None)
    if writer is not None:
        return lambda line: writer.write(line + "\n")
    out = getattr(observer, "out", None)
    if out is not None:

        def write(line: str) -> None:
            out.write(line + "\n")
            out.flush()

        return write
    return lambda line: log.info("{line}", line=line)


def shared_log_fd(observer: Any) -> int | None:
    """The file descriptor children may write their log lines to themselves: this
    process's log output when it is a plain stream (stdout, a journal); None for a
    file twistd rotates (``--logfile``: lines go through this process) or no stream."""
    out = getattr(getattr(observer, "writer", None), "out", None) or getattr(observer, "out", None)
    if out is None or isinstance(out, BaseLogFile):
        return None
    try:
        fd = out.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    return fd if isinstance(fd, int) else None


class RunDir(Service):
    """A private directory for the monitor socket, removed at the end."""

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="dockerspaces-")  # mode 0700

    def stopService(self) -> None:
        """Remove it."""
        super().stopService()
        shutil.rmtree(self.path, ignore_errors=True)


def build_parent(config: Config, reactor: Any, top: MultiService, core: Core) -> WorkerPool:
    """The broker's process: its ``/monitor:`` site for the children and the pool."""
    from ..app import build_web

    board = ProgressBoard(reactor)
    hub = Hub(core.broker, board, reactor, core.apps, core.watched, core.metrics)
    told = core.broker.state.on_container

    def on_container(*args: Any, **kw: Any) -> None:
        if told is not None:
            told(*args, **kw)
        hub.containers_changed()

    core.broker.state.on_container = on_container
    run = RunDir()
    run.setServiceParent(top)
    monitor = os.path.join(run.path, "monitor.sock")
    site = build_web(
        config,
        reactor,
        top,
        core,
        waiting=WaitingRoom(board, reactor),
        gather=hub.gather_metrics,
        internal=True,
    )
    strports.service(f"unix:{monitor}:mode=600", site).setServiceParent(top)
    pool = WorkerPool(
        config,
        reactor,
        hub,
        config.worker_count,
        monitor=monitor,
        cookie_key=os.urandom(32),
        engines=tuple(core.watched),
        has_slots=core.has_slots,
        relay=relay_to(core.observer),
        log_fd=shared_log_fd(core.observer),
    )
    pool.setServiceParent(top)
    return pool
