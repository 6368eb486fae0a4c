"""Writing to a plain TCP transport without waiting a reactor iteration.

Twisted's ``write`` queues every piece, registers the socket for writing and joins
the pieces on the next iteration. For the proxy's hot cases these send at once and
leave only what the kernel refused to Twisted: :func:`write_now` (a request head to a
backend), :func:`send_all_now` (a whole small answer, head and body, in one
``sendmsg``), :func:`send_now` (a large body chunk after the queued head, its unsent
tail kept as a view), :func:`flush_now` (what is queued, at the end of a response),
:func:`relay_now` (a tunnel's bytes).

They touch ``FileDescriptor`` internals, so they live in
:mod:`dockerspaces.twistedseam` with its other fast paths: checked against Twisted's
own ``write`` when the process starts, and :func:`is_plain_tcp` -- which callers ask
before using any of them -- says no to every transport while the fast paths are off.
"""

from __future__ import annotations

from ..twistedseam import (
    can_send_now,
    can_write_now,
    flush_now,
    is_plain_tcp,
    relay_now,
    send_all_now,
    send_now,
    write_now,
)

__all__ = [
    "can_send_now",
    "can_write_now",
    "flush_now",
    "is_plain_tcp",
    "relay_now",
    "send_all_now",
    "send_now",
    "write_now",
]
