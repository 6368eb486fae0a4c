"""What passes between the proxy's backend connection, the exchange and the tunnel.

A :class:`~dockerspaces.web.backend.BackendProtocol` sends one request at a time and
hands the answer, as it is read, to a :class:`ResponseSink` (the proxy's exchange).
When a backend answers an ``Upgrade`` request with ``101``, the exchange gives itself
and the connection to :func:`~dockerspaces.web.tunnel.start_tunnel`: the tunnel ends
the exchange through :class:`TunnelledExchange` and has the connection pass its bytes
and close events to a :class:`TunnelEnd` from then on (:meth:`BackendConnection.hand_over`).

Each side is typed by these protocols alone, so this module imports none of the
others, and ``backend``, ``proxy`` and ``tunnel`` need none of each other's names to
say what they exchange: the proxy imports ``backend`` and ``tunnel``, which import
neither each other nor the proxy (no import circle).

Transports are ``Any``: Twisted declares them as zope interfaces, which mypy does not
read.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.python.failure import Failure
from twisted.web.server import Request


class TunnelEnd(Protocol):
    """Where a tunnelled backend connection's bytes and close events go."""

    def dataReceived(self, data: bytes) -> None:
        """Bytes from the backend."""

    def readConnectionLost(self) -> None:
        """The backend closed its side for writing."""

    def writeConnectionLost(self) -> None:
        """Our side of the backend connection was closed for writing."""

    def connectionLost(self, reason: Failure | None) -> None:
        """The backend connection is gone."""


class BackendConnection(Protocol):
    """What a sink, and the tunnel, may ask of the backend connection serving them."""

    #: answers completed on this connection before the current one
    served: int
    #: whether any byte of the current answer has come
    got_bytes: bool
    #: the connection's transport
    transport: Any

    def abort(self) -> None:
        """Drop the connection now; it never goes back to the pool."""

    def hand_over(self, end: TunnelEnd) -> None:
        """From now on the backend's bytes and close events go to ``end`` (after a 101)."""


class ResponseSink(Protocol):
    """Receives one backend answer as the connection reads it.

    Exactly one of ``response_done``, ``response_closed``, ``backend_failed`` or
    ``response_upgraded`` ends an answer; ``response_head`` comes first (except on
    failure or upgrade), then any ``response_data``.
    """

    @property
    def request(self) -> Request:
        """The client's request (its method tells whether a body can follow)."""

    @property
    def upgrade(self) -> bytes | None:
        """The protocol the client asked to switch to, if any (a 101 is then expected)."""

    def response_head(
        self,
        status: int,
        reason: bytes,
        grouped: dict[bytes, list[bytes]],
        headers: list[tuple[bytes, bytes]],
        raw: bytes | None = None,
        whole: bool = False,
    ) -> None:
        """The answer's status line and headers: ``headers`` as sent, ``grouped`` by
        lower-cased name, ``raw`` the header block as received when it is plain;
        ``whole``: the whole answer came with its head."""

    def response_data(self, data: bytes | memoryview) -> None:
        """Body bytes (a view of the read that carried the head, or bytes)."""

    def response_done(self) -> None:
        """The answer is complete."""

    def response_closed(self, conn: BackendConnection) -> None:
        """A close-delimited body ended with the backend's FIN (complete, unless the
        sink learns that the backend died)."""

    def backend_failed(self, f: Failure, conn: BackendConnection) -> None:
        """The connection failed or ended before the answer was complete."""

    def response_upgraded(
        self,
        conn: BackendConnection,
        status: int,
        reason: bytes,
        headers: list[tuple[bytes, bytes]],
        rest: bytes,
    ) -> None:
        """``101``: the connection now belongs to a tunnel; ``rest``, the bytes read
        past the head."""


class TunnelledExchange(Protocol):
    """What the tunnel needs of the exchange whose client connection it takes over."""

    @property
    def request(self) -> Request:
        """The client's request."""

    @property
    def upgrade(self) -> bytes | None:
        """The protocol the client asked to switch to."""

    def detach(self) -> None:
        """Stop being the client request's producer."""

    def end(self, reason: str, bytes_out: int | None = None) -> None:
        """Report how the exchange ended (once; later calls do nothing); ``bytes_out``:
        the bytes that went to the client, when the exchange did not count them."""
