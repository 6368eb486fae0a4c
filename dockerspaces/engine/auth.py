"""Registry credentials, kept per registry and handed out only for that registry.

``--registry/--user/--password/--email`` name one registry (Docker Hub when
``--registry`` is absent); ``--auths FILE`` (docker ``config.json`` form) names more.
:meth:`RegistryAuth.for_ref` gives the docker-py ``auth_config`` for an image
reference -- only when credentials for *that image's* registry are known.  Neither
``repr`` nor ``str`` of anything here shows a password.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from attrs import field, frozen

if TYPE_CHECKING:
    from ..config import Config

DOCKER_HUB = "docker.io"
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"
_HUB_ALIASES = frozenset(
    {
        "docker.io",
        "index.docker.io",
        "registry-1.docker.io",
        "registry.hub.docker.com",
        "hub.docker.com",
    }
)


class AuthError(ValueError):
    """A credentials file or option that cannot be used; the message names it."""


def normalize_registry(text: str) -> str:
    """Canonical registry key: host[:port], lower-case; every Docker Hub alias is ``docker.io``.

    Accepts ``https://index.docker.io/v1/``, ``http://localhost:5000``, ``localhost:5000/``.
    """
    t = text.strip()
    for scheme in ("https://", "http://"):
        if t.lower().startswith(scheme):
            t = t[len(scheme) :]
    t = t.split("/", 1)[0].lower()
    if not t or t in _HUB_ALIASES:
        return DOCKER_HUB
    return t


def registry_of(ref: str) -> str:
    """The registry an image reference is pulled from (docker's rule).

    The first path component is a registry when it contains ``.`` or ``:`` or is
    ``localhost``; otherwise the image lives on Docker Hub.
    ``localhost:5000/team/app:1`` -> ``localhost:5000``; ``selmaproject/tts:777`` ->
    ``docker.io``; ``ubuntu`` -> ``docker.io``.
    """
    first, sep, _ = ref.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return normalize_registry(first)
    return DOCKER_HUB


def split_ref(ref: str) -> tuple[str, str]:
    """Split ``repo[:tag][@digest]`` into ``(repository, tag-or-digest)``; tag defaults to latest."""
    if "@" in ref:
        repo, _, digest = ref.partition("@")
        return repo, digest
    slash = ref.rfind("/")
    colon = ref.rfind(":")
    if colon > slash:
        return ref[:colon], ref[colon + 1 :]
    return ref, "latest"


@frozen
class Credentials:
    """User name, password (never shown) and optional e-mail for one registry."""

    username: str
    password: str = field(repr=False)
    email: str | None = None

    def __str__(self) -> str:
        return f"Credentials(username={self.username!r}, password=***)"


@frozen
class RegistryAuth:
    """Credentials per normalized registry name (see :func:`normalize_registry`)."""

    entries: Mapping[str, Credentials] = field(factory=dict, repr=False)

    def __repr__(self) -> str:
        return f"RegistryAuth(registries={sorted(self.entries)!r})"

    __str__ = __repr__

    @property
    def registries(self) -> list[str]:
        """The registries credentials are known for (names only)."""
        return sorted(self.entries)

    def credentials_for(self, registry: str) -> Credentials | None:
        """Credentials for ``registry`` (any spelling), or None."""
        return self.entries.get(normalize_registry(registry))

    def for_ref(self, ref: str) -> dict[str, str] | None:
        """docker-py ``auth_config`` for pulling ``ref``, or None (send nothing)."""
        reg = registry_of(ref)
        cred = self.entries.get(reg)
        if cred is None:
            return None
        out = {
            "username": cred.username,
            "password": cred.password,
            "serveraddress": DOCKER_HUB_SERVER if reg == DOCKER_HUB else reg,
        }
        if cred.email:
            out["email"] = cred.email
        return out

    @classmethod
    def from_options(
        cls,
        registry: str | None = None,
        user: str | None = None,
        password: str | None = None,
        email: str | None = None,
        auths_file: str | None = None,
    ) -> RegistryAuth:
        """Build from the command-line options; ``--user`` wins over ``--auths`` for its registry."""
        entries: dict[str, Credentials] = {}
        if auths_file:
            entries.update(load_auths_file(auths_file))
        if user is not None or password is not None:
            if user is None or password is None:
                raise AuthError("--user and --password (or --password-file) go together")
            entries[normalize_registry(registry or DOCKER_HUB)] = Credentials(user, password, email)
        return cls(entries)

    @classmethod
    def from_config(cls, config: Config) -> RegistryAuth:
        """Build from a :class:`dockerspaces.config.Config`."""
        return cls.from_options(
            registry=config.registry,
            user=config.user,
            password=config.read_password(),
            email=config.email,
            auths_file=config.auths,
        )


def parse_auths(data: Any, source: str = "--auths") -> dict[str, Credentials]:
    """Parse a docker ``config.json``-style ``{"auths": {host: {...}}}`` mapping.

    Each entry has ``auth`` (base64 of ``user:password``) or ``username`` + ``password``;
    ``email`` is optional.  Entries with neither (e.g. credential-helper stubs) are skipped.
    """
    if not isinstance(data, dict) or not isinstance(data.get("auths"), dict):
        raise AuthError(f'{source}: expected a JSON object {{"auths": {{"HOST": {{...}}}}}}')
    out: dict[str, Credentials] = {}
    for host, entry in data["auths"].items():
        if not isinstance(entry, dict):
            raise AuthError(f"{source}: entry for {host!r} is not an object")
        email = entry.get("email") or None
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode("utf-8")
            except (ValueError, UnicodeDecodeError):
                raise AuthError(f"{source}: 'auth' of {host!r} is not base64 of user:password") from None
            user, sep, pw = decoded.partition(":")
            if not sep:
                raise AuthError(f"{source}: 'auth' of {host!r} is not base64 of user:password")
        elif "username" in entry and "password" in entry:
            user, pw = str(entry["username"]), str(entry["password"])
        else:
            continue
        out[normalize_registry(host)] = Credentials(user, pw, email)
    return out


def load_auths_file(path: str) -> dict[str, Credentials]:
    """Read and parse an ``--auths`` file (see :func:`parse_auths`)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise AuthError(f"--auths {path}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise AuthError(f"--auths {path}: not JSON: {e}") from None
    return parse_auths(data, f"--auths {path}")
