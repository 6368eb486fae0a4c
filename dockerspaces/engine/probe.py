"""The readiness probe: does an HTTP status line come back for ``GET path``?

Docker's userland proxy accepts a connection on a published port and closes it when
nothing listens inside the container, so "connected" or "accepted then EOF" is *not*
ready; only a status line (``HTTP/1.x NNN``, any code) is.
"""

from __future__ import annotations

import re
from typing import Any

from attrs import frozen
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import TimeoutError as TxTimeoutError
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure

_STATUS = re.compile(rb"HTTP/\d(?:\.\d)? [0-9]{3}(?: |\r?\n|$)")
_MAX_LINE = 4096


@frozen
class ProbeResult:
    """Outcome of one probe: ``ready`` and, when not, ``reason`` in plain words."""

    ready: bool
    reason: str = ""
    status_line: str = ""


class StatusLineProbe(Protocol):
    """Send ``GET path HTTP/1.0``; fire ``result`` with the first line's verdict."""

    def __init__(self, host_header: str, path: str = "/") -> None:
        self.result: Deferred[ProbeResult] = Deferred()
        self._request = (
            f"GET {path} HTTP/1.0\r\nHost: {host_header}\r\n"
            "User-Agent: dockerspaces-probe\r\nConnection: close\r\n\r\n"
        ).encode("latin-1")
        self._buf = b""

    def _finish(self, res: ProbeResult) -> None:
        if not self.result.called:
            self.result.callback(res)
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()

    def connectionMade(self) -> None:
        """Send the request at once."""
        transport: Any = self.transport
        transport.write(self._request)

    def dataReceived(self, data: bytes) -> None:
        """Judge the first line as soon as it is complete."""
        if self.result.called:
            return
        self._buf += data
        nl = self._buf.find(b"\n")
        if nl < 0:
            if len(self._buf) > _MAX_LINE:
                self._finish(ProbeResult(False, "answer is not HTTP (no status line)"))
            return
        line = self._buf[: nl + 1]
        text = line.rstrip(b"\r\n").decode("latin-1")[:200]
        if _STATUS.match(line):
            self._finish(ProbeResult(True, status_line=text))
        else:
            self._finish(ProbeResult(False, f"answer is not HTTP: {text!r}"))

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        """Closed before a status line: not ready."""
        if not self.result.called:
            what = "accepted then closed without an HTTP answer"
            if self._buf:
                what = "closed after a partial answer"
            self.result.callback(ProbeResult(False, what))


def probe_status_line(
    reactor: Any, host: str, port: int, path: str = "/", timeout: float = 5.0
) -> Deferred[ProbeResult]:
    """Probe ``host:port`` once; never fails, fires a :class:`ProbeResult`."""
    host_header = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    endpoint_cls = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    endpoint = endpoint_cls(reactor, host, port, timeout=max(1, int(timeout + 0.999)))
    proto = StatusLineProbe(host_header, path)
    out: Deferred[ProbeResult] = Deferred()

    def connected(p: StatusLineProbe) -> Deferred[ProbeResult]:
        return p.result

    def failed(f: Failure) -> ProbeResult:
        if f.check(TxTimeoutError):
            return ProbeResult(False, f"no answer within {timeout:g}s")
        return ProbeResult(False, f"cannot connect: {f.getErrorMessage()}")

    def on_timeout(_result: object, _timeout: float) -> ProbeResult:
        if proto.transport is not None:
            proto.transport.abortConnection()  # type: ignore[attr-defined]
        return ProbeResult(False, f"no status line within {timeout:g}s")

    factory: Any = Factory.forProtocol(lambda: proto)
    factory.noisy = False
    d: Deferred[Any] = endpoint.connect(factory)
    d.addCallbacks(connected, failed)
    d.addTimeout(timeout, reactor, onTimeoutCancel=on_timeout)
    d.chainDeferred(out)
    return out
