"""docker-py and transport exceptions to the engine's typed errors.

:func:`translate` turns what a docker-py call raised into an
:class:`~dockerspaces.engine.interface.EngineError` (unreachable engine, API error);
:func:`pull_error` reads the error message of a pull; :func:`explanation`,
:func:`status_of` and :func:`is_not_found` read an ``APIError`` for the engine's own
classification of create, start and stop failures.
"""

from __future__ import annotations

import re

import docker.errors  # type: ignore[import-untyped]
from twisted.internet.defer import CancelledError

from .interface import EngineError, EngineUnreachable, ImageNotFound, Unauthorized

# a 401 status in the text, not the digits of a port or a size ("localhost:51401")
_STATUS_401 = re.compile(r"(?<![\w:.])401(?!\w)")


def explanation(e: Exception) -> str:
    """The engine's own words for an error (``APIError.explanation``), else its text."""
    if isinstance(e, docker.errors.APIError):
        return str(e.explanation or e)
    return str(e) or e.__class__.__name__


def status_of(e: Exception) -> int | None:
    """The HTTP status of an ``APIError``; None for anything else."""
    if isinstance(e, docker.errors.APIError):
        try:
            return e.status_code
        except AttributeError:  # pragma: no cover - response without status
            return None
    return None


def is_not_found(e: Exception) -> bool:
    """Whether the engine answered 404 (no such image, container, network)."""
    return isinstance(e, docker.errors.NotFound) or status_of(e) == 404


def pull_error(ref: str, registry: str, message: str, had_credentials: bool) -> EngineError:
    """Classify a pull error message from the engine into a typed :class:`EngineError`."""
    low = message.lower()
    where = "Docker Hub" if registry == "docker.io" else f"registry {registry}"
    if any(
        s in low
        for s in (
            "unauthorized",
            "authentication required",
            "no basic auth credentials",
            "incorrect username or password",
        )
    ) or _STATUS_401.search(low):
        who = "the configured credentials" if had_credentials else "access without credentials"
        return Unauthorized(f"{where} refused {who} for {ref}: {message}")
    if "denied" in low:
        if had_credentials:
            return Unauthorized(f"{where} denied access to {ref}: {message}")
        return ImageNotFound(f"image {ref} not found on {where} (or it needs credentials): {message}")
    if any(s in low for s in ("not found", "manifest unknown", "does not exist", "no such")):
        return ImageNotFound(f"image {ref} not found on {where}: {message}")
    return EngineError(f"pulling {ref} from {where} failed: {message}")


def translate(e: BaseException, engine: str, url: str) -> BaseException:
    """Map a docker-py / transport exception to an :class:`EngineError` (others unchanged)."""
    if isinstance(e, (EngineError, CancelledError)):
        return e
    import requests.exceptions

    unreachable: tuple[type[BaseException], ...] = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        ConnectionError,
        TimeoutError,
    )
    try:
        import paramiko  # type: ignore[import-untyped]

        unreachable += (paramiko.SSHException,)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(e, unreachable):
        return EngineUnreachable(f"Docker engine {engine} ({url}) does not answer: {e}")
    if isinstance(e, docker.errors.APIError):
        return EngineError(f"Docker engine {engine}: {explanation(e)}")
    if isinstance(e, docker.errors.DockerException):
        return EngineUnreachable(f"Docker engine {engine} ({url}): {e}")
    if isinstance(e, OSError):
        return EngineUnreachable(f"Docker engine {engine} ({url}) does not answer: {e}")
    return e
