"""Engine URLs to docker-py clients.

Supported forms (SPEC "Slots, hosts, sources"):

- ``unix:///var/run/docker.sock``
- ``tcp://host:port`` (plain HTTP)
- ``http://host:port[/path]`` -- the path is kept as a prefix of every API call, so
  ``http://front:8888/docker:local`` reaches a peer's ``/docker:local`` gateway
- ``https://host:port`` -- TLS; client certificate, key and CA from :class:`EngineTLS`
  (default: ``$DOCKER_CERT_PATH`` or ``~/.docker`` with ``ca.pem``/``cert.pem``/``key.pem``
  when those files exist, else the system CAs without a client certificate)
- ``ssh://user@host[:port]`` -- paramiko (``~/.ssh`` keys, agent, ``~/.ssh/config`` and
  ``known_hosts``: unknown host keys are rejected); the far side runs
  ``docker system dial-stdio``

:func:`make_client` blocks (it asks the engine for its API version): call it only in
an engine's pool thread.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from attrs import frozen

from .dockerseam import server_api_version, set_api_version

DEFAULT_TIMEOUT = 60


@frozen
class EngineTLS:
    """TLS material for an ``https://`` engine (paths); ``verify=False`` skips CA checks."""

    ca_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    verify: bool = True

    @classmethod
    def from_cert_path(cls, path: str | None = None) -> EngineTLS | None:
        """Docker's convention: ``ca.pem``, ``cert.pem``, ``key.pem`` in ``path``
        (default ``$DOCKER_CERT_PATH``, else ``~/.docker``); None when absent."""
        path = path or os.environ.get("DOCKER_CERT_PATH") or os.path.expanduser("~/.docker")
        ca, cert, key = (os.path.join(path, n) for n in ("ca.pem", "cert.pem", "key.pem"))
        if not (os.path.exists(cert) and os.path.exists(key)):
            return None
        return cls(ca_cert=ca if os.path.exists(ca) else None, client_cert=cert, client_key=key)

    def to_docker(self) -> Any:
        """The ``docker.tls.TLSConfig`` for these files."""
        import docker.tls  # type: ignore[import-untyped]

        client_cert = (self.client_cert, self.client_key) if self.client_cert and self.client_key else None
        verify: bool | str = self.verify
        if self.verify and self.ca_cert:
            verify = self.ca_cert
        return docker.tls.TLSConfig(client_cert=client_cert, ca_cert=self.ca_cert, verify=verify)


def scheme_of(url: str) -> str:
    """The scheme of an engine URL (``unix``, ``tcp``, ``http``, ``https``, ``ssh``)."""
    return urlsplit(url).scheme


def docker_base_url(url: str) -> str:
    """The ``base_url`` docker-py gets for an engine URL (``http://`` stays HTTP, path kept)."""
    parts = urlsplit(url)
    if parts.scheme == "tcp":
        return "http://" + parts.netloc + parts.path.rstrip("/")
    if parts.scheme in ("http", "https"):
        return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
    return url


def make_client(
    url: str,
    timeout: int = DEFAULT_TIMEOUT,
    tls: EngineTLS | None = None,
    extra_headers: Mapping[str, str] | None = None,
    version: str = "auto",
) -> Any:
    """A new docker-py ``APIClient`` for ``url`` (blocking: asks for the API version).

    ``extra_headers`` go on every request (e.g. a token for a peer's ``/docker:local``).
    (The engine makes its pulls with an explicit ``X-Registry-Auth`` header, so the local
    ``~/.docker/config.json`` credentials are never consulted.)
    """
    import docker  # type: ignore[import-untyped]

    scheme = scheme_of(url)
    kwargs: dict[str, Any] = {"timeout": timeout}
    if scheme == "https":
        tls = tls or EngineTLS.from_cert_path()
        kwargs["tls"] = tls.to_docker() if tls else True
    if scheme == "ssh":
        kwargs["use_ssh_client"] = False
    # Construct with a pinned version (no I/O), fix it up, then ask for the version.
    client = docker.APIClient(base_url=docker_base_url(url), version="1.41", **kwargs)
    # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override the session's CA
    # (psf/requests#3829), which breaks https:// engines with their own CA; proxies
    # from the environment make no sense for an engine either.
    client.trust_env = False
    if extra_headers:
        client.headers.update(extra_headers)
    if version == "auto":
        try:
            set_api_version(client, server_api_version(client))
        except Exception:
            client.close()
            raise
    else:
        set_api_version(client, version)
    return client
