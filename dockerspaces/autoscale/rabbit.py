"""Reading one RabbitMQ queue through the management HTTP API, with treq.

Two GETs per reading, with HTTP basic auth and one timeout over both:

- ``/api/queues/VHOST/QUEUE``: ``messages_ready``, ``messages_unacknowledged``,
  ``consumers`` and ``consumer_details`` (each consumer's channel name and its
  connection's ``peer_host``: the consumer's address);
- ``/api/vhosts/VHOST/channels?columns=name,messages_unacknowledged,connection_details.peer_host``:
  the unacknowledged messages of every channel of the vhost, by peer address (so that a
  worker holding a message on any channel counts as busy).

The vhost and queue are percent-encoded as one path segment each (``/`` is ``%2F``).
Every failure -- refused connection, timeout, an HTTP status other than 200, a body
that is not the expected JSON -- is a :class:`RabbitUnreachable` whose message never
holds the password.

The API's statistics are sampled every ``collect_statistics_interval`` (5 s by
default): a reading can describe the queue as it was that long ago.  Its ``at`` is
when it was received; the service does not stop workers on a reading that is not
newer than its last launch or stop by that lag.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from attrs import field, frozen
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.defer import TimeoutError as DeferredTimeout
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers

from .policy import Occupancy, Reading


class RabbitUnreachable(Exception):
    """The management API could not be read; ``str()`` names what failed, never the
    password."""


@frozen
class QueueRef:
    """Where a queue is and how to read it: the management URL (``http(s)://HOST:PORT``,
    no credentials in it), vhost, queue, and the management user's credentials."""

    management: str
    vhost: str
    queue: str
    user: str
    password: str = field(repr=False)

    @property
    def base(self) -> str:
        """The management URL without a trailing ``/``."""
        return self.management.rstrip("/")

    @property
    def queue_url(self) -> str:
        """``{management}/api/queues/{vhost}/{queue}``, each percent-encoded."""
        return f"{self.base}/api/queues/{quote(self.vhost, safe='')}/{quote(self.queue, safe='')}"

    @property
    def channels_url(self) -> str:
        """The vhost's channels with only the columns a reading needs."""
        return (
            f"{self.base}/api/vhosts/{quote(self.vhost, safe='')}/channels"
            "?columns=name,messages_unacknowledged,connection_details.peer_host"
        )

    @property
    def display(self) -> str:
        """``queue Q on vhost V at URL`` for messages."""
        return f"queue {self.queue!r} on vhost {self.vhost!r} at {self.base}"


@frozen
class QueueReading:
    """One reading of a queue: its counts, its consumers and the vhost's unacked
    messages by peer address, received at ``at`` (clock seconds)."""

    ready: int
    unacked: int
    consumers: int
    at: float
    consumer_peers: Mapping[str, int] = field(factory=dict)  # address -> consumers
    unacked_by_peer: Mapping[str, int] = field(factory=dict)  # address -> unacked

    def reading(self) -> Reading:
        """The counts the policy needs."""
        return Reading(self.ready, self.unacked, self.consumers, self.at)

    def occupancy(self) -> Occupancy:
        """Consumers and unacked messages by address, for choosing idle workers."""
        return Occupancy(dict(self.consumer_peers), dict(self.unacked_by_peer))


def _scrub(text: str, ref: QueueRef) -> str:
    """``text`` without the password (belt and braces: no message should carry it)."""
    return text.replace(ref.password, "***") if ref.password else text


def _count(data: Mapping[str, Any], key: str, what: str) -> int:
    value = data.get(key)
    if value is None:
        raise RabbitUnreachable(f"{what} has no {key!r} statistics yet")
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RabbitUnreachable(f"{what}: {key!r} is not a count: {value!r}")
    return value


async def _get_json(client: HTTPClient, url: str, ref: QueueRef) -> object:
    response = await client.get(
        url, auth=(ref.user, ref.password), headers=Headers({b"Accept": [b"application/json"]})
    )
    body = await response.content()
    if response.code == 401:
        raise RabbitUnreachable(f"the management API refused user {ref.user!r} (401) for {ref.display}")
    if response.code == 404:
        raise RabbitUnreachable(f"{ref.display}: not found (404)")
    if response.code != 200:
        raise RabbitUnreachable(f"{ref.display}: HTTP {response.code}")
    try:
        return json.loads(body)
    except ValueError:
        raise RabbitUnreachable(f"{ref.display}: the answer is not JSON") from None


def parse_queue(data: object, ref: QueueRef) -> tuple[int, int, int, dict[str, int], dict[str, str]]:
    """From ``/api/queues/V/Q``: ready, unacked, consumers, consumers by peer address,
    and each consumer channel's peer address by channel name."""
    if not isinstance(data, dict):
        raise RabbitUnreachable(f"{ref.display}: the queue answer is not an object")
    what = f"queue {ref.queue!r}"
    ready = _count(data, "messages_ready", what)
    unacked = _count(data, "messages_unacknowledged", what)
    consumers = _count(data, "consumers", what)
    peers: dict[str, int] = {}
    channels: dict[str, str] = {}
    for c in data.get("consumer_details") or []:
        details = c.get("channel_details") if isinstance(c, dict) else None
        if not isinstance(details, dict):
            continue
        peer = details.get("peer_host")
        if isinstance(peer, str) and peer:
            peers[peer] = peers.get(peer, 0) + 1
            if isinstance(details.get("name"), str):
                channels[details["name"]] = peer
    return ready, unacked, consumers, peers, channels


def parse_channels(data: object, ref: QueueRef, peer_of_channel: Mapping[str, str]) -> dict[str, int]:
    """From ``/api/vhosts/V/channels``: unacknowledged messages by peer address (the
    connection's ``peer_host``, else the consumer channel's, by channel name)."""
    if not isinstance(data, list):
        raise RabbitUnreachable(f"{ref.display}: the channel list is not a list")
    out: dict[str, int] = {}
    for ch in data:
        if not isinstance(ch, dict):
            continue
        n = ch.get("messages_unacknowledged")
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            continue
        conn = ch.get("connection_details")
        peer = conn.get("peer_host") if isinstance(conn, dict) else None
        if not isinstance(peer, str) or not peer:
            peer = peer_of_channel.get(str(ch.get("name")))
        if peer is None:
            peer = "?"  # held somewhere we cannot place: counts for no worker
        out[peer] = out.get(peer, 0) + n
    return out


def read_queue(
    client: HTTPClient, ref: QueueRef, reactor: IReactorTime, timeout: float = 10.0
) -> Deferred[QueueReading]:
    """Read ``ref``'s queue (see the module docstring); fails with
    :class:`RabbitUnreachable` (also after ``timeout`` seconds)."""

    async def read() -> QueueReading:
        queue = await _get_json(client, ref.queue_url, ref)
        ready, unacked, consumers, peers, channels = parse_queue(queue, ref)
        listing = await _get_json(client, ref.channels_url, ref)
        return QueueReading(
            ready, unacked, consumers, reactor.seconds(), peers, parse_channels(listing, ref, channels)
        )

    def timed_out(result: object, timeout: float) -> QueueReading:
        # whatever the cancelled request failed with (treq: ResponseNeverReceived)
        raise RabbitUnreachable(f"{ref.display}: no answer within {timeout:g}s")

    d = Deferred.fromCoroutine(read())
    d.addTimeout(timeout, reactor, onTimeoutCancel=timed_out)

    def failed(f: Failure) -> QueueReading:
        if f.check(RabbitUnreachable):
            raise RabbitUnreachable(_scrub(f.getErrorMessage(), ref))
        if f.check(CancelledError, DeferredTimeout, TimeoutError):
            raise RabbitUnreachable(f"{ref.display}: cancelled or timed out")
        raise RabbitUnreachable(
            _scrub(f"{ref.display}: {getattr(f.type, '__name__', f.type)}: {f.getErrorMessage()}", ref)
        )

    return d.addErrback(failed)
