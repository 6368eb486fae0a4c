"""A service collection that stops its children one after another."""

from __future__ import annotations

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()


class StopInOrder(MultiService):
    """A ``MultiService`` whose children stop one at a time, last added first, each
    once the one before it has finished stopping.

    ``MultiService`` stops every child at once: the engines' thread pools would shut
    down while the broker is still draining and stopping containers through them.
    A child whose stop fails is logged and the next one stops all the same.
    """

    def stopService(self) -> Deferred[None]:  # type: ignore[override]
        """Stop the children in reverse order, one after another."""
        Service.stopService(self)
        d: Deferred[object] = succeed(None)
        for child in reversed(list(self)):
            d.addCallback(self._stop, child)
            d.addErrback(self._stop_failed, child)
        return d.addCallback(lambda _: None)

    @staticmethod
    def _stop(_: object, child: IService) -> Deferred[object]:
        return maybeDeferred(child.stopService)

    @staticmethod
    def _stop_failed(f: Failure, child: IService) -> None:
        log.failure("stopping {child} failed", f, child=child)
