"""The readiness probe: does an HTTP response come back for ``GET path``?

Docker's userland proxy accepts a connection on a published port and closes it when
nothing listens inside the container, so "connected" or "accepted then closed" is
*not* ready; only an HTTP response head (a status line and its headers, any code: a
404 or a 503 is an app that answers) is.  :class:`ProbeResult` says why not in plain
words: the waiting page shows them.

The probe is a treq request (the control plane's HTTP client) through an
:class:`~twisted.web.client.Agent` that :func:`probe_agent` makes with a
*non-persistent* :class:`~twisted.web.client.HTTPConnectionPool`: a probe's one
connection ends with its answer.  A cached connection would be worse than useless
here: a slot's ``address:port`` passes from one container to the next, so a
connection kept from probing the last container could answer for the new one, and an
idle keep-alive connection occupies a worker of a single-threaded app that is about
to get its first real request.  The agent connects straight to the published address
(no resolver, no happy eyeballs) with a connect timeout; the request as a whole is
bounded by treq's ``timeout``.  Only the response head is read: the body (which may
never end, e.g. an event stream) is dropped by stopping the connection at once.
Redirects are not followed (a 3xx is an answer) and cookies are not kept between
probes.
"""

from __future__ import annotations

import math
from typing import Any

from attrs import frozen
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectingCancelledError, ConnectionDone, ConnectionLost
from twisted.internet.error import TimeoutError as TxTimeoutError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IAgentEndpointFactory, IResponse
from zope.interface import implementer

USER_AGENT = b"dockerspaces-probe"
_CLOSED = (ConnectionDone, ConnectionLost, ConnectionError)


@frozen
class ProbeResult:
    """Outcome of one probe: ``ready`` and, when not, ``reason`` in plain words."""

    ready: bool
    reason: str = ""
    status_line: str = ""


# hyperlink (which treq parses URLs with) cannot turn a URL with an IPv6 literal into
# a URI (python-hyper/hyperlink#68, open): a probe of an IPv6 address names it in the
# URL by this stand-in (the address's text in hex, in labels of at most 60 digits,
# under a reserved top-level domain) and AddressEndpoints connects to the address.
_V6_DOMAIN = ".ipv6.invalid"


def url_host(address: str) -> str:
    """``address`` as the host of a probe's URL: itself, or an IPv6 address's stand-in."""
    if ":" not in address:
        return address
    digits = address.encode("ascii").hex()
    return ".".join(digits[i : i + 60] for i in range(0, len(digits), 60)) + _V6_DOMAIN


@implementer(IAgentEndpointFactory)
class AddressEndpoints:
    """Endpoints straight to a URL's host (an address, or the stand-in of an IPv6
    one: :func:`url_host`), with a connect timeout of ``timeout`` seconds."""

    def __init__(self, reactor: Any, timeout: float) -> None:
        self._reactor = reactor
        self._timeout = max(1, math.ceil(timeout))

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        """A TCP endpoint for ``uri``'s host and port."""
        host = uri.host.decode("ascii")
        if host.endswith(_V6_DOMAIN):
            address = bytes.fromhex(host[: -len(_V6_DOMAIN)].replace(".", "")).decode("ascii")
            return TCP6ClientEndpoint(self._reactor, address, uri.port, timeout=self._timeout)
        return TCP4ClientEndpoint(self._reactor, host, uri.port, timeout=self._timeout)


def probe_agent(reactor: Any, connect_timeout: float = 5.0) -> IAgent:
    """The agent probes go through: non-persistent pool, direct endpoints (see the
    module docstring); ``reactor`` provides ``IReactorTCP`` and ``IReactorTime``."""
    pool = HTTPConnectionPool(reactor, persistent=False)
    return Agent.usingEndpointFactory(reactor, AddressEndpoints(reactor, connect_timeout), pool=pool)


class _DropBody(Protocol):
    """Receives a probe's response body and drops it."""

    def dataReceived(self, data: bytes) -> None:
        """Nobody reads a probe's body."""


def _not_ready(f: Failure, timeout: float) -> ProbeResult:
    """Why a failed probe is not ready, in plain words."""
    if f.check(ConnectingCancelledError, TxTimeoutError):
        return ProbeResult(False, f"no answer within {timeout:g}s")
    if f.check(RequestNotSent, RequestTransmissionFailed):
        return ProbeResult(False, "accepted then closed without an HTTP answer")
    if not f.check(ResponseFailed):
        return ProbeResult(False, f"cannot connect: {f.getErrorMessage()}")
    reasons: list[Failure] = f.value.reasons
    if any(r.check(CancelledError) for r in reasons):  # treq's timeout
        return ProbeResult(False, f"no status line within {timeout:g}s")
    if f.check(ResponseNeverReceived):
        return ProbeResult(False, "accepted then closed without an HTTP answer")
    bad = [r for r in reasons if not r.check(*_CLOSED)]
    if not bad:
        return ProbeResult(False, "closed after a partial answer")
    data = getattr(bad[0].value, "data", None)  # the line a ParseError could not read
    if isinstance(data, bytes):
        return ProbeResult(False, f"answer is not HTTP: {data.decode('latin-1')[:200]!r}")
    return ProbeResult(False, f"answer is not HTTP: {bad[0].getErrorMessage()}")


def _ready(response: IResponse) -> ProbeResult:
    _http, major, minor = response.version
    phrase = response.phrase.decode("latin-1")
    line = f"HTTP/{major}.{minor} {response.code} {phrase}".rstrip()[:200]
    body = _DropBody()
    response.deliverBody(body)
    # the body's transport is the connection as a producer: stopping it closes the
    # connection (a no-op when the body had already ended)
    transport: Any = body.transport
    if transport is not None:
        transport.stopProducing()
    return ProbeResult(True, status_line=line)


def probe_status_line(
    reactor: Any,
    host: str,
    port: int,
    path: str = "/",
    timeout: float = 5.0,
    *,
    agent: IAgent | None = None,
) -> Deferred[ProbeResult]:
    """Probe ``host:port`` once with ``GET path``; never fails, fires a
    :class:`ProbeResult` within ``timeout`` seconds (on ``reactor``'s clock).

    ``agent``: the one of :func:`probe_agent` the caller keeps (default: a new one);
    tests pass one over a memory reactor or treq.testing's ``RequestTraversalAgent``.
    """
    if agent is None:
        agent = probe_agent(reactor, timeout)
    host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    # a fresh client per probe: no cookie jar shared between containers
    client = HTTPClient(agent)
    d = client.get(
        f"http://{url_host(host)}:{port}{path}",
        headers=Headers({b"Host": [host_header.encode("ascii")], b"User-Agent": [USER_AGENT]}),
        allow_redirects=False,
        unbuffered=True,
        reactor=reactor,
        timeout=timeout,
    )
    return d.addCallbacks(_ready, _not_ready, errbackArgs=(timeout,))
