"""Who a request is from: :class:`Identity`, built from the accounts' snapshot, and the
``twisted.cred`` pieces that produce it (credentials, checkers, realm).

The checkers never touch SQLite on the reactor thread: tokens are checked against the
in-memory snapshot (a SHA-256 digest, a dictionary lookup), passwords (scrypt) and
sessions through :class:`~dockerspaces.accounts.service.AccountsService`, which runs
them in its own threads and caches what it verified.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from attrs import frozen
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import Attribute, Interface, implementer

from .model import Quota, Snapshot, Token, image_allowed, parse_token, token_matches

#: what ``ICredentialsChecker.requestAvatarId`` fires with (bytes, or ANONYMOUS' ``()``)
AvatarId = bytes | tuple[()]
#: what ``IRealm.requestAvatar`` returns: the interface, the avatar, its logout
AvatarResult = tuple[type[Interface], object, Callable[[], None]]


class IIdentity(Interface):
    """The avatar interface: an :class:`Identity`."""

    user = Attribute("the user's name")


@implementer(IIdentity)
@frozen
class Identity:
    """A user as the accounts stood when the request was checked: the routes and images
    their groups allow (narrowed by a token's scopes), their quota (the most generous
    of their groups': a limit holds only where every group sets one), admin or not."""

    user: str
    groups: tuple[str, ...]
    routes: frozenset[str]
    images: tuple[str, ...]
    admin: bool
    quota: Quota
    via: str  # "token", "password" or "session"
    token_id: str | None = None
    scopes: frozenset[str] | None = None  # the token's, when it narrows the routes

    @property
    def group(self) -> str | None:
        """The group named in metrics labels (the first, alphabetically)."""
        return self.groups[0] if self.groups else None

    def may_use(self, route: str) -> bool:
        """Whether the route (``x``, ``y``, ``worker``, ``host``, ``monitor``,
        ``docker-api``) is allowed."""
        return route in self.routes

    def may_run(self, ref: str, name: str) -> bool:
        """Whether image ``ref`` (``name:tag``) may be started."""
        return image_allowed(self.images, ref, name)


@frozen
class Principal:
    """A checked credential; the checkers hand the realm its bytes (:meth:`avatar_id`:
    ``ICredentialsChecker`` avatar ids are bytes)."""

    user: str
    via: str
    token_id: str | None = None

    def avatar_id(self) -> bytes:
        """``via NUL user NUL token-id`` (user names and token ids hold no NUL)."""
        return "\0".join((self.via, self.user, self.token_id or "")).encode()

    @classmethod
    def from_avatar_id(cls, avatar_id: bytes) -> Principal:
        """The inverse of :meth:`avatar_id`."""
        via, user, token_id = avatar_id.decode().split("\0")
        return cls(user, via, token_id or None)


def _merge(values: list[int | None]) -> int | None:
    if not values or any(v is None for v in values):
        return None
    return max(v for v in values if v is not None)


def identity_for(snapshot: Snapshot, principal: Principal) -> Identity | None:
    """The :class:`Identity` of ``principal`` in ``snapshot``; None when the user is
    unknown or disabled, or the token is gone."""
    user = snapshot.users.get(principal.user)
    if user is None or not user.enabled:
        return None
    groups = [snapshot.groups[g] for g in user.groups if g in snapshot.groups]
    routes: frozenset[str] = frozenset().union(*(g.routes for g in groups))
    if principal.token_id is not None:
        token = snapshot.tokens.get(principal.token_id)
        if token is None:
            return None
        if token.scopes is not None:
            routes &= token.scopes
    images: list[str] = []
    for g in groups:
        images += [p for p in g.images if p not in images]
    quota = Quota(
        containers=_merge([g.quota.containers for g in groups]),
        gpus=_merge([g.quota.gpus for g in groups]),
        queued=_merge([g.quota.queued for g in groups]),
    )
    scopes = None
    if principal.token_id is not None:
        scopes = snapshot.tokens[principal.token_id].scopes
    return Identity(
        user.name,
        tuple(g.name for g in groups),
        routes,
        tuple(images),
        any(g.admin for g in groups),
        quota,
        principal.via,
        principal.token_id,
        scopes,
    )


# -- credentials ---------------------------------------------------------------------


class ITokenCredentials(Interface):
    """An API token (``Authorization: Bearer``)."""

    token: str = Attribute("the token string")


@implementer(ITokenCredentials)
@frozen
class TokenCredentials:
    """A bearer token as presented."""

    token: str


class ISessionCredentials(Interface):
    """A browser session cookie."""

    session: str = Attribute("the session id")


@implementer(ISessionCredentials)
@frozen
class SessionCredentials:
    """A session id as presented."""

    session: str


class Verifier(Protocol):
    """What the checkers need from the accounts service."""

    snapshot: Snapshot

    def verify_password(self, user: str, password: str) -> Deferred[bool]:
        """Whether ``password`` is ``user``'s (scrypt, off the reactor thread)."""

    def session_user(self, session: str) -> Deferred[str | None]:
        """The user of a live session, or None."""

    def now(self) -> float:
        """The current time (Unix seconds)."""


def check_token(service: Verifier, text: str, user: str | None = None) -> Token | None:
    """The live token ``text`` names (and, with ``user``, that belongs to them)."""
    parsed = parse_token(text)
    if parsed is None:
        return None
    token = service.snapshot.tokens.get(parsed[0])
    if token is None or not token_matches(token, parsed[1]):
        return None
    if token.expires is not None and token.expires <= service.now():
        return None
    if user is not None and token.user != user:
        return None
    return token


@implementer(ICredentialsChecker)
class TokenChecker:
    """Bearer tokens, against the snapshot (no I/O)."""

    credentialInterfaces = (ITokenCredentials,)

    def __init__(self, service: Verifier):
        self.service = service

    def requestAvatarId(self, credentials: ITokenCredentials) -> Deferred[AvatarId]:
        """The token's user, or UnauthorizedLogin."""
        token = check_token(self.service, credentials.token)
        if token is None:
            return fail(UnauthorizedLogin("unknown, revoked or expired token"))
        return succeed(Principal(token.user, "token", token.id).avatar_id())


@implementer(ICredentialsChecker)
class PasswordChecker:
    """``Authorization: Basic`` and the login form: a user with a token (``curl -u
    user:TOKEN``) or with their password (scrypt, in the service's thread)."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, service: Verifier):
        self.service = service

    def requestAvatarId(self, credentials: IUsernamePassword) -> Deferred[AvatarId]:
        """The user, or UnauthorizedLogin (the same answer for every failure)."""
        user = _text(credentials.username)
        password = _text(credentials.password)
        if parse_token(password) is not None:
            token = check_token(self.service, password, user)
            if token is None:
                return fail(UnauthorizedLogin("wrong user or token"))
            return succeed(Principal(token.user, "token", token.id).avatar_id())

        def checked(ok: bool) -> AvatarId:
            if not ok:
                raise UnauthorizedLogin("wrong user or password")
            return Principal(user, "password").avatar_id()

        return self.service.verify_password(user, password).addCallback(checked)


@implementer(ICredentialsChecker)
class SessionChecker:
    """Browser sessions (the ``dssession`` cookie), through the service."""

    credentialInterfaces = (ISessionCredentials,)

    def __init__(self, service: Verifier):
        self.service = service

    def requestAvatarId(self, credentials: ISessionCredentials) -> Deferred[AvatarId]:
        """The session's user, or UnauthorizedLogin."""

        def found(user: str | None) -> AvatarId:
            if user is None:
                raise UnauthorizedLogin("no such session")
            return Principal(user, "session").avatar_id()

        return self.service.session_user(credentials.session).addCallback(found)


@implementer(IRealm)
class AccountsRealm:
    """Turns a checked :class:`Principal` into its :class:`Identity`."""

    def __init__(self, snapshot: Callable[[], Snapshot]):
        self.snapshot = snapshot

    def requestAvatar(self, avatarId: AvatarId, mind: object, *interfaces: type[Interface]) -> AvatarResult:
        """``(IIdentity, identity, logout)``; UnauthorizedLogin for a disabled user."""
        if IIdentity not in interfaces:
            raise NotImplementedError("only IIdentity avatars")
        if not isinstance(avatarId, bytes):  # ANONYMOUS: none of the checkers gives it
            raise UnauthorizedLogin("anonymous")
        identity = identity_for(self.snapshot(), Principal.from_avatar_id(avatarId))
        if identity is None:
            raise UnauthorizedLogin("the account is disabled or gone")
        return IIdentity, identity, lambda: None


def make_portal(service: Verifier) -> Portal:
    """The portal with the three checkers over ``service``."""
    return Portal(
        AccountsRealm(lambda: service.snapshot),
        [TokenChecker(service), PasswordChecker(service), SessionChecker(service)],
    )


def _text(value: bytes | str) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)
