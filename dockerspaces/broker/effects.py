"""The broker's side effects, run once its state is consistent: a job queue drained at the
end of every entry point, by construction.

Every change to the broker's state is a synchronous *mutation*; what it causes outside
the broker — firing a caller's Deferred, calling an engine, publishing progress — is
queued here as a job (:meth:`Effects.later`). Each way into the broker (a public call, a
timer, an engine's answer, a lease's release) is an *entry point*, marked with
:func:`entry` (methods) or :meth:`Effects.wrap` (callbacks); when the outermost one
returns, the queue is drained (:meth:`Effects.flush`). So a caller's callback that
re-enters the broker (a lease released from inside its own callback) never sees
half-updated state and never recurses, and no call site has to remember to flush.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from .model import Lease, Progress, Waiter

log = Logger()

P = ParamSpec("P")
R = TypeVar("R")


class Effects:
    """The job queue and the trampoline that drains it.

    ``before`` is asked before every job; it returns True when it did some work of its
    own first (the broker serves users whose holdings dropped before any caller's
    callback can run again)."""

    def __init__(self, before: Callable[[], bool] | None = None) -> None:
        self._jobs: deque[Callable[[], object]] = deque()
        self._flushing = False
        self.depth = 0  # entry points under way (nested ones do not flush)
        self.entries = 0  # entry points run (events, for benchmarks)
        self.before = before

    def later(self, job: Callable[[], object]) -> None:
        """Run ``job`` once the state is consistent, at the end of the entry point."""
        self._jobs.append(job)

    def fire(self, d: Deferred[Any], result: object) -> None:
        """Fire ``d`` with ``result`` (a Failure errbacks) as a job; a lease for a
        Deferred cancelled meanwhile is given straight back."""

        def job() -> None:
            if d.called:
                if isinstance(result, Lease):
                    result.release()
                return
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

        self._jobs.append(job)

    def publish(self, w: Waiter, p: Progress) -> None:
        """Tell ``w``'s progress callback (if any) about ``p``, as a job."""
        cb = w.progress
        if cb is not None:
            self._jobs.append(lambda: cb(p))

    def flush(self) -> None:
        """Run the queued jobs, and those they queue, until none is left (a no-op when a
        flush is under way further up the stack: that one runs them)."""
        if self._flushing:
            return
        self._flushing = True
        jobs, before = self._jobs, self.before
        try:
            while jobs or before is not None:
                if before is not None and before():
                    continue
                if not jobs:
                    break
                job = jobs.popleft()
                try:
                    job()
                except Exception:  # noqa: BLE001 - one bad job must not stop the rest
                    log.failure("broker job failed")
        finally:
            self._flushing = False

    def wrap(self, fn: Callable[P, R]) -> Callable[P, R]:
        """``fn`` as an entry point (a callback from outside: engine, timer)."""

        @functools.wraps(fn)
        def run(*args: P.args, **kwargs: P.kwargs) -> R:
            self.entries += 1
            self.depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self.depth -= 1
                if not self.depth:
                    self.flush()

        return run


class HasEffects(Protocol):
    """A part of the broker: it holds the broker's :class:`Effects`."""

    fx: Effects


S = TypeVar("S", bound=HasEffects)


def entry(method: Callable[Concatenate[S, P], R]) -> Callable[Concatenate[S, P], R]:
    """Mark ``method`` as an entry point: when the outermost entry point returns (or
    raises), the jobs its mutations queued run."""

    @functools.wraps(method)
    def run(self: S, *args: P.args, **kwargs: P.kwargs) -> R:
        fx = self.fx
        fx.entries += 1
        fx.depth += 1
        try:
            return method(self, *args, **kwargs)
        finally:
            fx.depth -= 1
            if not fx.depth:
                fx.flush()

    return run
