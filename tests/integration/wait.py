"""Waiting in integration tests: poll a condition with a deadline, never sleep a fixed
time and hope (issue 15)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Call ``check`` until it returns something true and return that; fail with
    ``what`` and the last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")
        time.sleep(interval)


async def eventually_async(
    check: Callable[[], Awaitable[T | None]], timeout: float, what: str, interval: float = 0.1
) -> T:
    """:func:`eventually` inside an asyncio loop (the browser tests): ``check`` is a
    coroutine function, and the pause between calls lets the loop run."""
    deadline = time.monotonic() + timeout
    while True:
        last = await check()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s (last: {last!r})")
        await asyncio.sleep(interval)
