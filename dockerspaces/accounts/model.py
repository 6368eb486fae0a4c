"""The accounts' values: users, groups with their quotas, API tokens, usage rows, and
the :class:`Snapshot` the server checks every request against.

A token string is ``dst_<id>_<secret>``: the 12-hex-digit id is public (listed,
revoked by), the secret is shown once at creation and stored only as its SHA-256
digest. Random 256-bit secrets need no slow hash: a digest cannot be reversed and a
guess is hopeless, so a token is checked with one hash and a dictionary lookup.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
from collections.abc import Mapping

from attrs import field, frozen

#: route names a group may be allowed
ROUTES = ("x", "y", "worker", "host", "monitor", "docker-api")
#: how every token string starts (``dst_<id>_<secret>``)
TOKEN_PREFIX = "dst_"  # noqa: S105 - a prefix, not a secret
_TOKEN = re.compile(re.escape(TOKEN_PREFIX) + r"([0-9a-f]{12})_([A-Za-z0-9_-]{20,128})")


class AccountsError(Exception):
    """Something about the accounts a user can fix: a clear message, never a secret."""


@frozen
class Quota:
    """A group's limits per user (None: unlimited)."""

    containers: int | None = None
    gpus: int | None = None
    queued: int | None = None


@frozen
class Group:
    """A group: the images (``--allow-image`` patterns) and routes its members may use,
    their quota, and whether they are admins (the whole monitor)."""

    name: str
    images: tuple[str, ...] = ()
    routes: frozenset[str] = frozenset()
    quota: Quota = Quota()
    admin: bool = False


@frozen
class User:
    """A user; ``password_hash`` is :func:`~dockerspaces.accounts.passwords.hash_password`'s
    encoding (None: tokens only)."""

    name: str
    enabled: bool = True
    groups: tuple[str, ...] = ()
    password_hash: str | None = field(default=None, repr=False)


@frozen
class Token:
    """An API token as stored (the digest of its secret, never the secret)."""

    id: str
    user: str
    digest: str = field(repr=False)
    scopes: frozenset[str] | None  # None: every route the user's groups allow
    expires: float | None
    created: float
    last_used: float | None
    description: str = ""


@frozen
class UsageRow:
    """One user's use of containers within a period."""

    user: str
    containers: int
    seconds: float
    gpu_seconds: float


@frozen
class Snapshot:
    """Everything a request is checked against, loaded at once."""

    users: Mapping[str, User]
    groups: Mapping[str, Group]
    tokens: Mapping[str, Token]


def parse_token(text: str) -> tuple[str, str] | None:
    """``(id, secret)`` of a token string, or None when it is not one."""
    m = _TOKEN.fullmatch(text.strip()) if isinstance(text, str) else None
    return (m.group(1), m.group(2)) if m else None


def token_digest(secret: str) -> str:
    """The stored form of a token's secret."""
    return hashlib.sha256(secret.encode()).hexdigest()


def token_matches(token: Token, secret: str) -> bool:
    """Whether ``secret`` is ``token``'s (constant time)."""
    return hmac.compare_digest(token.digest, token_digest(secret))


def image_allowed(patterns: tuple[str, ...], ref: str, name: str) -> bool:
    """Whether image ``ref`` (``name:tag``) or its bare ``name`` matches a pattern
    (fnmatch, as ``--allow-image``); no pattern allows nothing."""
    return any(fnmatch.fnmatchcase(ref, p) or fnmatch.fnmatchcase(name, p) for p in patterns)
