"""Errors a waiting request can end with; each knows its HTTP status and Retry-After.

The web layer turns any :class:`BrokerError` into an HTTP answer with ``status``,
``str(error)`` as the message and, when ``retry_after`` is set, a ``Retry-After``
header.  Messages never contain env values or credentials.
"""

from __future__ import annotations


class BrokerError(Exception):
    """Base of the broker's errors: ``status`` and ``retry_after`` for the HTTP answer."""

    status: int = 503
    default_retry_after: int | None = None

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after if retry_after is not None else self.default_retry_after


class Overloaded(BrokerError):
    """503 at once: the admission queue (``--queue``) is full."""

    status = 503
    default_retry_after = 5


class QueueTimeout(BrokerError):
    """503: no container was assigned within ``--queue-timeout``."""

    status = 503
    default_retry_after = 10


class StartTimeout(BrokerError):
    """504: pull + start + ready took longer than ``--start-timeout``."""

    status = 504


class StartFailed(BrokerError):
    """502: the container could not be started (engine message / log tail included)."""

    status = 502


class Draining(BrokerError):
    """503: the service is shutting down and admits nothing new."""

    status = 503
    default_retry_after = 5


class NoCapacity(BrokerError):
    """503: no slot could be had (worker timeout, no slots, or every host down)."""

    status = 503
    default_retry_after = 30


class ContainerLost(BrokerError):
    """502: the container died (or its host went away) while the request used it."""

    status = 502


class BackendRefused(BrokerError):
    """503: the request was handed back unforwarded (container refused or reset the
    connection) more often than :data:`~dockerspaces.broker.leases.MAX_RETRIES`."""

    status = 503
    default_retry_after = 5


class OverQuota(BrokerError):
    """429 at once: the request's user reached a quota of their group (containers or
    GPUs held at once, requests waiting at once). ``retry_after`` is at least 1 s;
    ``user`` and ``quota`` (``"containers"``, ``"gpus"``, ``"queued"``) say which."""

    status = 429
    default_retry_after = 1

    def __init__(self, message: str, retry_after: int | None = None, *, user: str = "", quota: str = ""):
        super().__init__(message, max(1, retry_after) if retry_after is not None else None)
        self.user = user
        self.quota = quota
