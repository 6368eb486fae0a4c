"""Deadlines kept in arrival order with one timer (``--queue-timeout``,
``--worker-timeout``): every waiter of one kind has the same timeout, so the earliest
deadline is the oldest waiter's, and one ``callLater`` serves them all."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from .effects import Effects, entry
from .model import Clock, IDelayedCall, Waiter


class Deadlines:
    """Waiters in deadline order (one timeout for all, so arrival order) with one timer.

    ``on_expired`` is called for each waiter whose deadline passed; the timer's firing
    is an entry point of the broker."""

    def __init__(self, clock: Clock, fx: Effects, on_expired: Callable[[Waiter], None]):
        self.items: OrderedDict[Waiter, float] = OrderedDict()
        self._clock = clock
        self.fx = fx
        self._on_expired = on_expired
        self._call: IDelayedCall | None = None

    def add(self, w: Waiter, deadline: float) -> None:
        """``w`` fails (or is looked at) at ``deadline``; out-of-order deadlines (a request
        handed back keeps its old one) are rare and re-sort the queue."""
        if self.items and deadline < next(reversed(self.items.values())):
            self.items[w] = deadline
            self.items = OrderedDict(sorted(self.items.items(), key=lambda kv: kv[1]))
            if self._call is not None and self._call.getTime() > deadline:
                self._call.cancel()
                self._call = None
        else:
            self.items[w] = deadline
        if self._call is None:
            first = next(iter(self.items.values()))
            self._call = self._clock.callLater(max(0.0, first - self._clock.seconds()), self._fire)

    def discard(self, w: Waiter) -> None:
        """``w`` no longer has this deadline."""
        self.items.pop(w, None)

    @entry
    def _fire(self) -> None:
        """The timer: every waiter whose deadline passed expires, oldest first; the
        timer is set again for the next one."""
        self._call = None
        now = self._clock.seconds()
        while self.items:
            w, deadline = next(iter(self.items.items()))
            if deadline > now:
                break
            del self.items[w]
            self._on_expired(w)
        if self.items and self._call is None:
            deadline = next(iter(self.items.values()))
            self._call = self._clock.callLater(max(0.0, deadline - now), self._fire)

    def stop(self) -> None:
        """Cancel the timer (shutdown)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
