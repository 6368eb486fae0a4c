"""The state file: :class:`Store`, blocking sqlite3 on one connection, used from one
thread at a time (the server's accounts thread, or the admin tool).

The schema's version is ``PRAGMA user_version``; :data:`MIGRATIONS` entry *i* takes a
file from version *i* to *i + 1*, each in its own transaction, when a Store opens it.
A file of a newer version than this code knows is refused. Files are in WAL mode, so
the server reads while the admin tool writes; :meth:`Store.data_version` tells either
of them that someone changed something.

Secrets are never stored: passwords as scrypt hashes, token secrets and session ids as
SHA-256 digests.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Final, Literal

from attrs import define, field

from .model import (
    ROUTES,
    TOKEN_PREFIX,
    AccountsError,
    Group,
    Quota,
    Snapshot,
    Token,
    UsageRow,
    User,
    token_digest,
)
from .passwords import hash_password

#: a value bound to a statement's ``?``
SQLValue = str | int | float | bytes | None
#: a row as SQLite gives it: its columns' types are the schema's, not known to mypy
Row = tuple[Any, ...]

MIGRATIONS: list[str] = [
    # 1: the initial schema
    """
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        enabled INTEGER NOT NULL DEFAULT 1,
        password_hash TEXT,
        created REAL NOT NULL
    );
    CREATE TABLE groups (
        name TEXT PRIMARY KEY,
        images TEXT NOT NULL DEFAULT '[]',  -- a JSON list of patterns
        routes TEXT NOT NULL DEFAULT '[]',  -- a JSON list of ROUTES
        quota_containers INTEGER,           -- NULL: unlimited
        quota_gpus INTEGER,
        quota_queued INTEGER,
        admin INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE members (
        grp TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
        user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        PRIMARY KEY (grp, user)
    );
    CREATE TABLE tokens (
        id TEXT PRIMARY KEY,
        user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        digest TEXT NOT NULL,               -- sha256 of the secret; never the secret
        scopes TEXT,                        -- a JSON list; NULL: all the user's routes
        expires REAL,
        created REAL NOT NULL,
        last_used REAL,
        description TEXT NOT NULL DEFAULT '',
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE sessions (
        digest TEXT PRIMARY KEY,            -- sha256 of the session id
        user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        created REAL NOT NULL,
        expires REAL NOT NULL
    );
    CREATE TABLE usage (                    -- no foreign key: usage outlives its user
        id INTEGER PRIMARY KEY,
        user TEXT NOT NULL,
        container TEXT NOT NULL,
        display TEXT NOT NULL,
        gpus INTEGER NOT NULL,
        started REAL NOT NULL,
        stopped REAL                        -- NULL: still running
    );
    CREATE INDEX usage_open ON usage (container) WHERE stopped IS NULL;
    CREATE INDEX usage_time ON usage (started);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)

_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
_NO_QUOTA = Quota()
_GROUPS = "SELECT name, images, routes, quota_containers, quota_gpus, quota_queued, admin FROM groups"
_TOKENS = "SELECT id, user, digest, scopes, expires, created, last_used, description FROM tokens"


class Unset(enum.Enum):
    """The type of :data:`UNSET`."""

    UNSET = "UNSET"


#: "leave this quota as it is" in :meth:`Store.update_group`
UNSET: Final = Unset.UNSET
#: a quota change: a limit, None (unlimited), or :data:`UNSET` (unchanged)
QuotaChange = int | None | Literal[Unset.UNSET]


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid user or group name, else AccountsError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise AccountsError(f"{kind} name {name!r}: use 1 to 64 of A-Z a-z 0-9 . _ @ -")
    return name


def check_routes(routes: Iterable[str]) -> frozenset[str]:
    """The routes as a set, or AccountsError naming the valid ones."""
    out = frozenset(routes)
    bad = sorted(out - set(ROUTES))
    if bad:
        raise AccountsError(f"unknown route(s) {', '.join(bad)}: use {', '.join(ROUTES)}")
    return out


def check_images(images: Iterable[str]) -> tuple[str, ...]:
    """The image patterns as a tuple, or AccountsError for an empty or spaced one."""
    out = tuple(images)
    for pattern in out:
        if not pattern or pattern != pattern.strip() or " " in pattern:
            raise AccountsError(
                f"image pattern {pattern!r}: give a name or name:tag pattern "
                "without spaces (as --allow-image)"
            )
    return out


def check_quota(value: int | None, what: str) -> int | None:
    """A quota limit (None: unlimited), or AccountsError unless a whole number >= 0."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise AccountsError(f"the {what} quota must be a whole number >= 0, not {value!r}")
    return value


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _statements(script: str) -> Iterator[str]:
    """The statements of an SQL script, one by one (a ``;`` inside a string, a comment
    or a trigger's body does not end a statement)."""
    pending = ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if _has_sql(pending):
                yield pending
            pending = ""
    if _has_sql(pending):
        yield pending  # incomplete: sqlite's error will say what is wrong


def _has_sql(text: str) -> bool:
    lines = (line.split("--", 1)[0] for line in text.splitlines())
    return bool("".join(lines).strip(" \t\r\n;"))


def _connect(path: str) -> sqlite3.Connection:
    """A connection with explicit transactions (autocommit otherwise), waiting up to
    5 s for a lock, foreign keys enforced, and a file in WAL mode (readers never block
    the writer, nor it them). The caller keeps it to one thread at a time."""
    try:
        db = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as e:
        raise AccountsError(f"cannot open the state file {path!r}: {e}") from None
    try:
        db.execute("PRAGMA busy_timeout = 5000")
        db.execute("PRAGMA foreign_keys = ON")
        if path not in ("", ":memory:"):
            db.execute("PRAGMA journal_mode = WAL")
    except sqlite3.DatabaseError as e:
        db.close()
        raise AccountsError(_not_ours(path, e)) from None
    return db


def _not_ours(path: str, e: Exception) -> str:
    return f"the state file {path!r} is not a dockerspaces database ({e})"


@define(eq=False)  # a connection: equal only to itself
class Store:
    """The accounts database (see the module docstring): ``Store(path)`` opens it,
    creating and migrating it as needed; ``":memory:"`` is a private database."""

    path: str
    clock: Callable[[], float] = field(default=time.time, kw_only=True)
    db: sqlite3.Connection = field(init=False, repr=False)
    _changes: int = field(init=False, default=0)  # see data_version
    _seen: int = field(init=False, default=0)  # PRAGMA data_version when last read

    def __attrs_post_init__(self) -> None:
        self.db = _connect(self.path)
        try:
            self._migrate()
            self._seen = self._others()
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise AccountsError(_not_ours(self.path, e)) from None
        except AccountsError:
            self.db.close()
            raise

    # -- schema, transactions, change counter ---------------------------------------------
    def _migrate(self) -> None:
        """Bring the file to SCHEMA_VERSION, one transaction per step. The version is
        read again inside each, so two processes opening a new file at once take turns
        instead of both creating the tables."""
        while (version := self._checked_version()) < SCHEMA_VERSION:
            with self._write():
                if self.schema_version() == version:
                    for statement in _statements(MIGRATIONS[version]):
                        self.db.execute(statement)
                    self.db.execute(f"PRAGMA user_version = {version + 1}")

    def _checked_version(self) -> int:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise AccountsError(
                f"the state file {self.path!r} was written by a newer "
                f"dockerspaces (schema {version}, this one knows "
                f"{SCHEMA_VERSION})"
            )
        return version

    def schema_version(self) -> int:
        """The file's schema version (``PRAGMA user_version``)."""
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def data_version(self) -> int:
        """A number that changes whenever any connection -- this one, or another
        process's -- committed a change since the last call (comparable only between
        calls on this Store). ``PRAGMA data_version`` sees only other connections'
        commits, so this Store counts its own and adds each change of the pragma."""
        others = self._others()
        if others != self._seen:
            self._seen = others
            self._changes += 1
        return self._changes

    def _others(self) -> int:
        return int(self.db.execute("PRAGMA data_version").fetchone()[0])

    def close(self) -> None:
        """Close the connection (the Store is unusable afterwards)."""
        self.db.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        """A write transaction; nested uses join the outer one. ``BEGIN IMMEDIATE`` takes
        the write lock at once, so a busy file waits out ``busy_timeout`` at the start
        instead of failing at the first write of a transaction that has already read."""
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")
        self._changes += 1

    @contextmanager
    def _read(self) -> Iterator[None]:
        """One consistent view for several queries (nothing is counted as a change)."""
        if self.db.in_transaction:
            yield
            return
        self.db.execute("BEGIN")
        try:
            yield
        finally:
            self.db.execute("COMMIT")

    def _row(self, sql: str, *args: SQLValue) -> Row | None:
        return self.db.execute(sql, args).fetchone()

    def _change(self, sql: str, args: tuple[SQLValue, ...], missing: str) -> None:
        """Run one statement in a transaction; AccountsError(missing) if it hit no row."""
        with self._write():
            if self.db.execute(sql, args).rowcount == 0:
                raise AccountsError(missing)

    def _need_user(self, name: str) -> None:
        if self._row("SELECT 1 FROM users WHERE name = ?", name) is None:
            raise AccountsError(f"no user {name!r}")

    def _need_group(self, name: str) -> None:
        if self._row("SELECT 1 FROM groups WHERE name = ?", name) is None:
            raise AccountsError(f"no group {name!r}")

    # -- the snapshot ---------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Users (with their groups), groups and unrevoked tokens, read at one moment
        (expired tokens included: the server checks ``expires``)."""
        with self._read():
            groups = {g.name: g for g in self.groups()}
            users = {u.name: u for u in self.users()}
            tokens = {t.id: t for t in self.tokens()}
        return Snapshot(users=users, groups=groups, tokens=tokens)

    # -- users ----------------------------------------------------------------------------
    def add_user(self, name: str, password: str | None = None) -> User:
        """A new user, with a password or none (tokens only)."""
        check_name("user", name)
        hashed = None if password is None else hash_password(password)
        with self._write():
            if self._row("SELECT 1 FROM users WHERE name = ?", name) is not None:
                raise AccountsError(f"user {name!r} exists already")
            self.db.execute(
                "INSERT INTO users (name, enabled, password_hash, created) VALUES (?, 1, ?, ?)",
                (name, hashed, self.clock()),
            )
        return self.user(name)

    def user(self, name: str) -> User:
        """One user, or AccountsError."""
        row = self._row("SELECT name, enabled, password_hash FROM users WHERE name = ?", name)
        if row is None:
            raise AccountsError(f"no user {name!r}")
        groups = tuple(
            r[0] for r in self.db.execute("SELECT grp FROM members WHERE user = ? ORDER BY grp", (name,))
        )
        return User(row[0], bool(row[1]), groups, row[2])

    def users(self) -> list[User]:
        """Every user, by name, with their sorted groups."""
        groups: dict[str, list[str]] = {}
        for grp, user in self.db.execute("SELECT grp, user FROM members ORDER BY grp"):
            groups.setdefault(user, []).append(grp)
        return [
            User(name, bool(enabled), tuple(groups.get(name, ())), hashed)
            for name, enabled, hashed in self.db.execute(
                "SELECT name, enabled, password_hash FROM users ORDER BY name"
            )
        ]

    def set_password(self, name: str, password: str) -> None:
        """Set or replace a user's password."""
        self._need_user(name)
        self._change(
            "UPDATE users SET password_hash = ? WHERE name = ?",
            (hash_password(password), name),
            f"no user {name!r}",
        )

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Enable or disable a user (a disabled user's tokens and sessions stop working)."""
        self._change("UPDATE users SET enabled = ? WHERE name = ?", (int(enabled), name), f"no user {name!r}")

    def remove_user(self, name: str) -> None:
        """Remove a user with their memberships, tokens and sessions (usage rows stay)."""
        self._change("DELETE FROM users WHERE name = ?", (name,), f"no user {name!r}")

    # -- groups ---------------------------------------------------------------------------
    def add_group(
        self,
        name: str,
        *,
        images: Iterable[str] = (),
        routes: Iterable[str] = (),
        quota: Quota = _NO_QUOTA,
        admin: bool = False,
    ) -> Group:
        """A new group: the images and routes its members may use, their quota, and
        whether they are admins."""
        check_name("group", name)
        image_list, route_set = check_images(images), check_routes(routes)
        for what in ("containers", "gpus", "queued"):
            check_quota(getattr(quota, what), what)
        with self._write():
            if self._row("SELECT 1 FROM groups WHERE name = ?", name) is not None:
                raise AccountsError(f"group {name!r} exists already")
            self.db.execute(
                "INSERT INTO groups (name, images, routes, quota_containers, quota_gpus, "
                "quota_queued, admin) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    name,
                    json.dumps(image_list),
                    json.dumps(sorted(route_set)),
                    quota.containers,
                    quota.gpus,
                    quota.queued,
                    int(admin),
                ),
            )
        return self.group(name)

    def update_group(
        self,
        name: str,
        *,
        images: Iterable[str] | None = None,
        routes: Iterable[str] | None = None,
        containers: QuotaChange = UNSET,
        gpus: QuotaChange = UNSET,
        queued: QuotaChange = UNSET,
        admin: bool | None = None,
    ) -> Group:
        """Change the given fields of a group (None or UNSET: unchanged; a quota of None
        means unlimited) and return it."""
        changes: dict[str, SQLValue] = {}
        if images is not None:
            changes["images"] = json.dumps(check_images(images))
        if routes is not None:
            changes["routes"] = json.dumps(sorted(check_routes(routes)))
        for what, value in (("containers", containers), ("gpus", gpus), ("queued", queued)):
            if value is not UNSET:
                changes[f"quota_{what}"] = check_quota(value, what)
        if admin is not None:
            changes["admin"] = int(admin)
        if changes:
            assignments = ", ".join(f"{column} = ?" for column in changes)
            self._change(
                f"UPDATE groups SET {assignments} WHERE name = ?",  # noqa: S608 - column names are ours
                (*changes.values(), name),
                f"no group {name!r}",
            )
        return self.group(name)

    def group(self, name: str) -> Group:
        """One group, or AccountsError."""
        row = self._row(_GROUPS + " WHERE name = ?", name)
        if row is None:
            raise AccountsError(f"no group {name!r}")
        return _group(row)

    def groups(self) -> list[Group]:
        """Every group, by name."""
        return [_group(r) for r in self.db.execute(_GROUPS + " ORDER BY name")]

    def remove_group(self, name: str) -> None:
        """Remove a group (its memberships go with it)."""
        self._change("DELETE FROM groups WHERE name = ?", (name,), f"no group {name!r}")

    def add_member(self, group: str, user: str) -> None:
        """Put ``user`` into ``group`` (nothing if they are in it already)."""
        with self._write():
            self._need_group(group)
            self._need_user(user)
            self.db.execute("INSERT OR IGNORE INTO members (grp, user) VALUES (?, ?)", (group, user))

    def remove_member(self, group: str, user: str) -> None:
        """Take ``user`` out of ``group``."""
        with self._write():
            self._need_group(group)
            self._need_user(user)
            self._change(
                "DELETE FROM members WHERE grp = ? AND user = ?",
                (group, user),
                f"user {user!r} is not in group {group!r}",
            )

    def members(self, group: str) -> list[str]:
        """The users of ``group``, by name."""
        with self._read():
            self._need_group(group)
            return [
                r[0]
                for r in self.db.execute("SELECT user FROM members WHERE grp = ? ORDER BY user", (group,))
            ]

    # -- tokens ---------------------------------------------------------------------------
    def create_token(
        self,
        user: str,
        *,
        scopes: Iterable[str] | None = None,
        expires: float | None = None,
        description: str = "",
    ) -> tuple[str, Token]:
        """A new API token of ``user``: the token string (to show once: only its digest is
        stored) and the stored token. ``scopes`` None: every route the user's groups
        allow."""
        scope_set = None if scopes is None else check_routes(scopes)
        now = self.clock()
        if expires is not None and expires <= now:
            raise AccountsError("the token would expire before it is created")
        secret = secrets.token_urlsafe(32)
        with self._write():
            self._need_user(user)
            token_id = secrets.token_hex(6)
            while self._row("SELECT 1 FROM tokens WHERE id = ?", token_id) is not None:
                token_id = secrets.token_hex(6)  # a 48-bit collision: practically never
            self.db.execute(
                "INSERT INTO tokens (id, user, digest, scopes, expires, created, description) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    token_id,
                    user,
                    token_digest(secret),
                    None if scope_set is None else json.dumps(sorted(scope_set)),
                    expires,
                    now,
                    description,
                ),
            )
        return f"{TOKEN_PREFIX}{token_id}_{secret}", self._token(token_id)

    def _token(self, token_id: str) -> Token:
        row = self._row(_TOKENS + " WHERE id = ?", token_id)
        if row is None:  # only called for a token just written
            raise AccountsError(f"no token {token_id!r}")
        return _token(row)

    def revoke_token(self, token_id: str) -> None:
        """Revoke a token (the server stops taking it at its next refresh)."""
        with self._write():
            row = self._row("SELECT revoked FROM tokens WHERE id = ?", token_id)
            if row is None:
                raise AccountsError(f"no token {token_id!r}")
            if row[0]:
                raise AccountsError(f"token {token_id!r} is revoked already")
            self.db.execute("UPDATE tokens SET revoked = 1 WHERE id = ?", (token_id,))

    def tokens(self, user: str | None = None) -> list[Token]:
        """The unrevoked tokens (of ``user``: AccountsError if there is no such user), by
        user and creation."""
        if user is None:
            return [
                _token(r) for r in self.db.execute(_TOKENS + " WHERE revoked = 0 ORDER BY user, created, id")
            ]
        with self._read():
            self._need_user(user)
            return [
                _token(r)
                for r in self.db.execute(
                    _TOKENS + " WHERE revoked = 0 AND user = ? ORDER BY created, id", (user,)
                )
            ]

    def touch_tokens(self, uses: Mapping[str, float]) -> None:
        """Record when tokens were last used (one transaction; unknown ids are ignored,
        and a time never moves back)."""
        if not uses:
            return
        with self._write():
            self.db.executemany(
                "UPDATE tokens SET last_used = max(coalesce(last_used, ?), ?) WHERE id = ?",
                [(t, t, token_id) for token_id, t in uses.items()],
            )

    # -- sessions -------------------------------------------------------------------------
    def create_session(self, user: str, lifetime: float) -> str:
        """A new browser session of ``user`` for ``lifetime`` seconds; returns its id,
        which is stored only as a digest."""
        session = secrets.token_urlsafe(32)
        now = self.clock()
        with self._write():
            self._need_user(user)
            self.db.execute(
                "INSERT INTO sessions (digest, user, created, expires) VALUES (?, ?, ?, ?)",
                (_digest(session), user, now, now + lifetime),
            )
        return session

    def session_user(self, session_id: str) -> str | None:
        """The user of a live session; None when the session is unknown or expired or
        its user is disabled or removed."""
        row = self._row(
            "SELECT s.user FROM sessions s JOIN users u ON u.name = s.user "
            "WHERE s.digest = ? AND s.expires > ? AND u.enabled = 1",
            _digest(session_id),
            self.clock(),
        )
        return None if row is None else str(row[0])

    def end_session(self, session_id: str) -> None:
        """Log a session out (nothing if it is unknown)."""
        with self._write():
            self.db.execute("DELETE FROM sessions WHERE digest = ?", (_digest(session_id),))

    def purge_sessions(self) -> int:
        """Remove the expired sessions; how many there were."""
        with self._write():
            return int(self.db.execute("DELETE FROM sessions WHERE expires <= ?", (self.clock(),)).rowcount)

    # -- usage ----------------------------------------------------------------------------
    def usage_start(self, user: str, container: str, display: str, gpus: int, at: float) -> None:
        """Container ``container`` (``display``: what it runs) started for ``user`` at
        ``at``, holding ``gpus`` GPUs."""
        with self._write():
            self.db.execute(
                "INSERT INTO usage (user, container, display, gpus, started) VALUES (?, ?, ?, ?, ?)",
                (user, container, display, gpus, at),
            )

    def usage_stop(self, container: str, at: float) -> None:
        """The container ended at ``at`` (idempotent; nothing when no row is open)."""
        with self._write():
            self.db.execute(
                "UPDATE usage SET stopped = max(started, ?) WHERE container = ? AND stopped IS NULL",
                (at, container),
            )

    def usage(self, since: float, until: float) -> list[UsageRow]:
        """Per user, by name: the containers started within ``[since, until)``, and the
        container-seconds and GPU-seconds within it (running containers count up to
        ``until``)."""
        if until < since:
            raise AccountsError("the usage period ends before it begins")
        totals: dict[str, tuple[int, float, float]] = {}
        for user, gpus, started, stopped in self.db.execute(
            "SELECT user, gpus, started, stopped FROM usage "
            "WHERE started < ? AND (stopped IS NULL OR stopped > ?)",
            (until, since),
        ):
            end = until if stopped is None else min(until, stopped)
            seconds = max(0.0, end - max(since, started))
            count, total, gpu_total = totals.get(user, (0, 0.0, 0.0))
            totals[user] = (count + (started >= since), total + seconds, gpu_total + gpus * seconds)
        return [UsageRow(user, *t) for user, t in sorted(totals.items())]


def _group(row: Row) -> Group:
    name, images, routes, containers, gpus, queued, admin = row
    return Group(
        name,
        tuple(json.loads(images)),
        frozenset(json.loads(routes)),
        Quota(containers, gpus, queued),
        bool(admin),
    )


def _token(row: Row) -> Token:
    token_id, user, digest, scopes, expires, created, last_used, description = row
    return Token(
        token_id,
        user,
        digest,
        None if scopes is None else frozenset(json.loads(scopes)),
        expires,
        created,
        last_used,
        description or "",
    )
