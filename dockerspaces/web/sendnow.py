"""Writing to a plain TCP transport without waiting a reactor iteration.

Twisted's ``write`` queues every piece, registers the socket for writing and joins
the pieces on the next iteration. For the proxy's hot cases these send at once and
leave only what the kernel refused to Twisted: :func:`write_now` (a request head to a
backend), :func:`send_all_now` (a whole small answer, head and body, in one
``sendmsg``), :func:`send_now` (a large body chunk after the queued head, its unsent
tail kept as a view), :func:`flush_now` (what is queued, at the end of a response).
They touch ``FileDescriptor`` internals (``dataBuffer``, ``offset``,
``_tempDataBuffer``, ``_tempDataLen``, ``producer``): tested on Twisted 26.10.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp


def is_plain_tcp(transport: Any) -> bool:
    """True for Twisted's own TCP transport without TLS (:func:`send_now` may be used)."""
    return isinstance(transport, tcp.Connection) and not getattr(transport, "TLS", False)


def can_send_now(t: Any) -> bool:
    """True when :func:`send_now` may write on ``t`` (a :func:`is_plain_tcp` transport):
    connected, not closing, and Twisted's own buffer drained (no earlier send pending).
    """
    return bool(
        t.connected
        and not t.disconnecting
        and not t._writeDisconnecting
        and not t._writeDisconnected
        and t.offset >= len(t.dataBuffer)
    )


def send_now(t: Any, data: bytes | memoryview) -> bool:
    """Send ``data`` on the TCP transport ``t`` now, after what it has queued but not
    yet tried to send; True when the kernel took it all. Only when :func:`can_send_now`.

    Twisted's ``write`` queues every piece until the next reactor iteration and then
    joins the pieces into one bytes object (a copy of each large response chunk);
    this sends the queued pieces and ``data`` in one ``sendmsg`` and leaves only the
    unsent tail — a view into ``data``, not a copy — in the transport's buffer, for
    its ``doWrite`` to send when the socket is writable (touches ``FileDescriptor``
    internals: ``dataBuffer``, ``offset``, ``_tempDataBuffer``, ``_tempDataLen``).
    """
    pending: list[bytes] = t._tempDataBuffer
    queued = t._tempDataLen
    try:
        sent = t.socket.sendmsg([*pending, data]) if pending else t.socket.send(data)
    except OSError:
        # would block, or the connection broke: doWrite meets the error and
        # closes the transport the usual way
        sent = 0
    t._tempDataBuffer = []
    t._tempDataLen = 0
    t.offset = 0
    if sent >= queued + len(data):
        t.dataBuffer = b""
        return True
    if sent >= queued:
        t.dataBuffer = memoryview(data)[sent - queued :]
    else:  # not even the queued head went out (rare): one copy
        t.dataBuffer = b"".join([*pending, data])[sent:]
    t.startWriting()
    return False


def _idle_producer(t: Any) -> bool:
    # what FileDescriptor.doWrite would do once the buffer is empty: nothing, unless a
    # producer waits to be resumed (paused by the buffer, or a pull producer)
    return t.producer is None or (t.streamingProducer and not t.producerPaused)


def can_write_now(t: Any) -> bool:
    """True when bytes may go straight to the socket of the plain TCP transport ``t``
    (:func:`write_now`, :func:`send_all_now`): :func:`can_send_now`, nothing queued
    either, and no producer waiting for the buffer to drain."""
    return can_send_now(t) and not t._tempDataLen and _idle_producer(t)


def write_now(t: Any, data: bytes) -> None:
    """``t.write(data)``, sent at once when ``t`` is plain TCP with nothing queued.

    Twisted's ``write`` queues and registers the socket for writing; the bytes go out
    on the next reactor iteration, one more epoll wake-up and ``doWrite`` per request
    head sent to a backend. What the kernel does not take now is queued as usual.
    """
    if not (is_plain_tcp(t) and can_write_now(t)):
        t.write(data)
        return
    try:
        sent = t.socket.send(data)
    except OSError:
        sent = 0  # would block, or broken: the ordinary path finds out
    if sent < len(data):
        t.write(data[sent:])


def send_all_now(t: Any, pieces: list[bytes]) -> None:
    """Send ``pieces`` on the plain TCP transport ``t`` with one ``sendmsg`` (only when
    :func:`can_write_now`); what the kernel does not take is queued with ``t.write`` as
    usual."""
    try:
        sent = t.socket.sendmsg(pieces)
    except OSError:
        sent = 0  # would block, or broken: the ordinary path finds out
    if sent < sum(map(len, pieces)):
        t.write(b"".join(pieces)[sent:])


def flush_now(t: Any) -> None:
    """Send what the plain TCP transport ``t`` has queued now, not on its next writable
    event (a finished small response: saves the reactor a wake-up and a ``doWrite``)."""
    if (
        t._tempDataLen
        and can_send_now(t)
        and _idle_producer(t)
        and send_now(t, b"")
    ):
        t.stopWriting()
