"""Helpers for integration tests that talk to the real Docker engine.

- :func:`docker_available` -- ``None`` when the engine answers, else a skip reason;
  use it as ``skip = docker_available()`` on an integration ``TestCase`` class
  (trial skips a class whose ``skip`` attribute is a non-empty string).
- :func:`docker_client` -- a blocking docker-py ``APIClient`` (tests only, never
  inside the reactor of code under test; fine in test setUp/tearDown).
- :func:`unique_instance` -- a fresh ``--instance`` name for one test, so cleanup
  removes only that test's containers; :func:`remove_instance_containers` removes them.
- :func:`free_port` / :func:`free_ports` -- loopback TCP ports nothing listens on.
- :data:`TEST_LABEL` -- put it on any container a test creates by hand, so
  :func:`remove_test_containers` can clean up after crashed runs.

The test images themselves live in :mod:`tests.integration.images`.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

from .wait import eventually

DOCKER_URL = os.environ.get("DOCKERSPACES_TEST_DOCKER") or os.environ.get(
    "DOCKER_HOST", "unix:///var/run/docker.sock"
)
TEST_LABEL = "dockerspaces.test"
INSTANCE_PREFIX = "dstest-"

_reason: str | None = None
_checked = False


def docker_client(timeout: int = 60) -> Any:
    """A new blocking ``docker.APIClient`` for :data:`DOCKER_URL` (tests only)."""
    import docker

    return docker.APIClient(base_url=DOCKER_URL, timeout=timeout, version="auto")


def docker_available() -> str | None:
    """``None`` if the Docker engine answers a ping, else why not (a skip reason)."""
    global _reason, _checked
    if _checked:
        return _reason
    _checked = True
    try:
        import docker  # noqa: F401 - only whether it imports
    except ImportError:  # pragma: no cover
        _reason = "docker-py is not installed"
        return _reason
    try:
        c = docker_client(timeout=5)
        try:
            c.ping()
        finally:
            c.close()
    except Exception as e:  # noqa: BLE001 - any failure means "skip"
        _reason = f"no Docker engine reachable at {DOCKER_URL}: {e.__class__.__name__}: {e}"
    return _reason


def unique_instance(tag: str = "") -> str:
    """A fresh instance name (``dstest-<tag>-<hex>``) for one test's containers."""
    short = uuid.uuid4().hex[:8]
    return f"{INSTANCE_PREFIX}{tag + '-' if tag else ''}{short}"


def remove_containers(filters: dict[str, Any]) -> list[str]:
    """Force-remove every container (running or not) matching docker ``filters``."""
    c = docker_client()
    removed = []
    try:
        for info in c.containers(all=True, filters=filters):
            try:
                c.remove_container(info["Id"], force=True, v=True)
                removed.append(info["Id"])
            except Exception:  # noqa: BLE001, S110 - already gone is fine
                pass
    finally:
        c.close()
    return removed


def remove_instance_containers(instance: str) -> list[str]:
    """Remove all containers labelled with dockerspaces instance ``instance``."""
    return remove_containers({"label": [f"dockerspaces.instance={instance}"]})


def remove_test_containers() -> list[str]:
    """Remove every container carrying :data:`TEST_LABEL` (hand-made test containers)."""
    return remove_containers({"label": [TEST_LABEL]})


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free on ``host`` a moment ago."""
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def free_port(host: str = "127.0.0.1") -> int:
    """One TCP port that was free on ``host`` a moment ago."""
    return free_ports(1, host)[0]


def wait_http_status(host: str, port: int, timeout: float = 10.0, path: str = "/") -> bytes:
    """Block until ``GET path`` on host:port answers a status line; return that line.

    Blocking: for test setup outside the reactor or for benchmarks only.
    """

    def status_line() -> bytes | None:
        try:
            with socket.create_connection((host, port), timeout=2) as s:
                s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
                data = b""
                while b"\n" not in data:  # reading until the status line is in
                    chunk = s.recv(1024)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return None  # not listening yet
        return data.split(b"\r\n", 1)[0] if data.startswith(b"HTTP/") and b"\n" in data else None

    try:
        return eventually(status_line, timeout, f"an HTTP status line from {host}:{port}")
    except AssertionError as e:
        raise TimeoutError(str(e)) from None  # what the callers (and bench/) catch


def http_get(host: str, port: int, path: str = "/", timeout: float = 10.0) -> tuple[int, bytes]:
    """Blocking ``GET`` (HTTP/1.0): ``(status, body)``. For tests and benchmarks only."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, body
