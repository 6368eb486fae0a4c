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

import hashlib
import json
import re
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .model import (
    ROUTES,
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
        images TEXT NOT NULL DEFAULT '[]',
        routes TEXT NOT NULL DEFAULT '[]',
        quota_containers INTEGER,
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
        digest TEXT NOT NULL,
        scopes TEXT,
        expires REAL,
        created REAL NOT NULL,
        last_used REAL,
        description TEXT NOT NULL DEFAULT '',
        revoked INTEGER NOT NULL DEFAULT 0
    );
    CREATE TABLE sessions (
        digest TEXT PRIMARY KEY,
        user TEXT NOT NULL REFERENCES users(name) ON DELETE CASCADE,
        created REAL NOT NULL,
        expires REAL NOT NULL
    );
    CREATE TABLE usage (
        id INTEGER PRIMARY KEY,
        user TEXT NOT NULL,
        container TEXT NOT NULL,
        display TEXT NOT NULL,
        gpus INTEGER NOT NULL,
        started REAL NOT NULL,
        stopped REAL
    );
    CREATE INDEX usage_open ON usage (container) WHERE stopped IS NULL;
    CREATE INDEX usage_time ON usage (started);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)
_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


#: "leave this quota as it is" in :meth:`Store.update_group`
UNSET: Any = _Unset()


def check_name(kind: str, name: str) -> str:
    """``name`` if it is a valid user or group name, else AccountsError."""
    if not _NAME.fullmatch(name):
        raise AccountsError(f"{kind} name {name!r}: use 1 to 64 of A-Z a-z 0-9 . _ @ -")
    return name


def check_routes(routes: Iterable[str]) -> frozenset[str]:
    """The routes as a set, or AccountsError naming the valid ones."""
    out = frozenset(routes)
    bad = sorted(out - set(ROUTES))
    if bad:
        raise AccountsError(f"unknown route(s) {', '.join(bad)}: use {', '.join(ROUTES)}")
    return out


def _quota(value: int | None, what: str) -> int | None:
    if value is not None and (not isinstance(value, int) or value < 0):
        raise AccountsError(f"the {what} quota must be a whole number >= 0")
    return value


def _digest(session: str) -> str:
    return hashlib.sha256(session.encode()).hexdigest()


class Store:
    """The accounts database (see the module docstring)."""

    def __init__(self, path: str, *, clock: Callable[[], float] = time.time):
        self.path = path
        self.clock = clock
        self._commits = 0
        try:
            self.db = sqlite3.connect(path, timeout=5.0, isolation_level=None)
        except sqlite3.Error as e:
            raise AccountsError(f"cannot open the state file {path!r}: {e}") from None
        try:
            self.db.execute("PRAGMA busy_timeout = 5000")
            self.db.execute("PRAGMA foreign_keys = ON")
            if path != ":memory:":
                self.db.execute("PRAGMA journal_mode = WAL")
            self._migrate()
        except sqlite3.DatabaseError as e:
            self.db.close()
            raise AccountsError(f"the state file {path!r} is not a dockerspaces "
                                f"database: {e}") from None
        except AccountsError:
            self.db.close()
            raise

    # -- schema --------------------------------------------------------------------------
    def _migrate(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise AccountsError(f"the state file {self.path!r} was written by a newer "
                                f"dockerspaces (schema {version}, this one knows "
                                f"{SCHEMA_VERSION})")
        for i in range(version, SCHEMA_VERSION):
            with self._tx():
                for statement in MIGRATIONS[i].split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {i + 1}")

    def schema_version(self) -> int:
        """The file's schema version."""
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def data_version(self) -> int:
        """A number that changes whenever any connection (this one, or another process)
        committed a change."""
        other = int(self.db.execute("PRAGMA data_version").fetchone()[0])
        return other * 1_000_003 + self._commits

    def close(self) -> None:
        """Close the connection."""
        self.db.close()

    def _tx(self) -> _Transaction:
        return _Transaction(self)

    def _one(self, sql: str, *args: Any) -> Any:
        return self.db.execute(sql, args).fetchone()

    # -- snapshot ------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Users (with their groups), groups and live (unrevoked) tokens, read at once."""
        with _Transaction(self, read=True):
            groups = {g.name: g for g in self.groups()}
            users = {u.name: u for u in self.users()}
            tokens = {t.id: t for t in self.tokens()}
        return Snapshot(users=users, groups=groups, tokens=tokens)

    # -- users ---------------------------------------------------------------------------
    def add_user(self, name: str, password: str | None = None) -> User:
        """A new user (with a password, or tokens only)."""
        check_name("user", name)
        hashed = hash_password(password) if password is not None else None
        with self._tx():
            if self._one("SELECT 1 FROM users WHERE name = ?", name):
                raise AccountsError(f"user {name!r} exists already")
            self.db.execute("INSERT INTO users (name, enabled, password_hash, created) "
                            "VALUES (?, 1, ?, ?)", (name, hashed, self.clock()))
        return self.user(name)

    def user(self, name: str) -> User:
        """One user, or AccountsError."""
        row = self._one("SELECT name, enabled, password_hash FROM users WHERE name = ?", name)
        if row is None:
            raise AccountsError(f"no user {name!r}")
        groups = tuple(r[0] for r in self.db.execute(
            "SELECT grp FROM members WHERE user = ? ORDER BY grp", (name,)))
        return User(row[0], bool(row[1]), groups, row[2])

    def users(self) -> list[User]:
        """Every user, by name."""
        members: dict[str, list[str]] = {}
        for grp, user in self.db.execute("SELECT grp, user FROM members ORDER BY grp"):
            members.setdefault(user, []).append(grp)
        return [User(n, bool(e), tuple(members.get(n, ())), h) for n, e, h in self.db.execute(
            "SELECT name, enabled, password_hash FROM users ORDER BY name")]

    def set_password(self, name: str, password: str) -> None:
        """Set (or replace) a user's password."""
        hashed = hash_password(password)
        self._update("UPDATE users SET password_hash = ? WHERE name = ?", (hashed, name),
                     f"no user {name!r}")

    def set_enabled(self, name: str, enabled: bool) -> None:
        """Enable or disable a user (a disabled user's tokens and sessions stop working)."""
        self._update("UPDATE users SET enabled = ? WHERE name = ?", (int(enabled), name),
                     f"no user {name!r}")

    def remove_user(self, name: str) -> None:
        """Remove a user with their memberships, tokens and sessions (usage stays)."""
        self._update("DELETE FROM users WHERE name = ?", (name,), f"no user {name!r}")

    def _update(self, sql: str, args: tuple[Any, ...], missing: str) -> None:
        with self._tx():
            if self.db.execute(sql, args).rowcount == 0:
                raise AccountsError(missing)

    # -- groups --------------------------------------------------------------------------
    def add_group(self, name: str, *, images: Iterable[str] = (), routes: Iterable[str] = (),
                  quota: Quota = Quota(), admin: bool = False) -> Group:  # noqa: B008 - frozen
        """A new group."""
        check_name("group", name)
        route_set = check_routes(routes)
        for what in ("containers", "gpus", "queued"):
            _quota(getattr(quota, what), what)
        with self._tx():
            if self._one("SELECT 1 FROM groups WHERE name = ?", name):
                raise AccountsError(f"group {name!r} exists already")
            self.db.execute(
                "INSERT INTO groups (name, images, routes, quota_containers, quota_gpus, "
                "quota_queued, admin) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, json.dumps(list(images)), json.dumps(sorted(route_set)),
                 quota.containers, quota.gpus, quota.queued, int(admin)))
        return self.group(name)

    def update_group(self, name: str, *, images: Iterable[str] | None = None,
                     routes: Iterable[str] | None = None, containers: Any = UNSET,
                     gpus: Any = UNSET, queued: Any = UNSET, admin: bool | None = None) -> Group:
        """Change a group: None/UNSET leave a field; a quota of None means unlimited."""
        sets: list[str] = []
        args: list[Any] = []
        if images is not None:
            sets.append("images = ?")
            args.append(json.dumps(list(images)))
        if routes is not None:
            sets.append("routes = ?")
            args.append(json.dumps(sorted(check_routes(routes))))
        for col, value, what in (("quota_containers", containers, "containers"),
                                 ("quota_gpus", gpus, "gpus"), ("quota_queued", queued, "queued")):
            if value is not UNSET:
                sets.append(f"{col} = ?")
                args.append(_quota(value, what))
        if admin is not None:
            sets.append("admin = ?")
            args.append(int(admin))
        if sets:
            self._update(f"UPDATE groups SET {', '.join(sets)} WHERE name = ?",  # noqa: S608 - column names are ours
                         (*args, name), f"no group {name!r}")
        return self.group(name)

    def group(self, name: str) -> Group:
        """One group, or AccountsError."""
        row = self._one("SELECT name, images, routes, quota_containers, quota_gpus, "
                        "quota_queued, admin FROM groups WHERE name = ?", name)
        if row is None:
            raise AccountsError(f"no group {name!r}")
        return _group(row)

    def groups(self) -> list[Group]:
        """Every group, by name."""
        return [_group(r) for r in self.db.execute(
            "SELECT name, images, routes, quota_containers, quota_gpus, quota_queued, admin "
            "FROM groups ORDER BY name")]

    def remove_group(self, name: str) -> None:
        """Remove a group (its memberships go with it)."""
        self._update("DELETE FROM groups WHERE name = ?", (name,), f"no group {name!r}")

    def add_member(self, group: str, user: str) -> None:
        """Put ``user`` into ``group``."""
        with self._tx():
            self.group(group)
            self.user(user)
            self.db.execute("INSERT OR IGNORE INTO members (grp, user) VALUES (?, ?)",
                            (group, user))

    def remove_member(self, group: str, user: str) -> None:
        """Take ``user`` out of ``group``."""
        self._update("DELETE FROM members WHERE grp = ? AND user = ?", (group, user),
                     f"user {user!r} is not in group {group!r}")

    def members(self, group: str) -> list[str]:
        """The users of ``group``, by name."""
        self.group(group)
        return [r[0] for r in self.db.execute(
            "SELECT user FROM members WHERE grp = ? ORDER BY user", (group,))]

    # -- tokens --------------------------------------------------------------------------
    def create_token(self, user: str, *, scopes: Iterable[str] | None = None,
                     expires: float | None = None, description: str = "") -> tuple[str, Token]:
        """A new token for ``user``: the token string (shown once) and what is stored."""
        scope_set = None if scopes is None else check_routes(scopes)
        secret = secrets.token_urlsafe(32)
        with self._tx():
            self.user(user)
            token_id = secrets.token_hex(6)
            while self._one("SELECT 1 FROM tokens WHERE id = ?", token_id):
                token_id = secrets.token_hex(6)  # pragma: no cover - 48 random bits
            self.db.execute(
                "INSERT INTO tokens (id, user, digest, scopes, expires, created, description) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (token_id, user, token_digest(secret),
                 None if scope_set is None else json.dumps(sorted(scope_set)), expires,
                 self.clock(), description))
        return f"dst_{token_id}_{secret}", self._token(token_id)

    def _token(self, token_id: str) -> Token:
        row = self._one("SELECT id, user, digest, scopes, expires, created, last_used, "
                        "description FROM tokens WHERE id = ? AND revoked = 0", token_id)
        if row is None:
            raise AccountsError(f"no token {token_id!r}")
        return _tokenrow(row)

    def revoke_token(self, token_id: str) -> None:
        """Revoke a token (it stops working within the server's next refresh)."""
        self._update("UPDATE tokens SET revoked = 1 WHERE id = ? AND revoked = 0", (token_id,),
                     f"no token {token_id!r}")

    def tokens(self, user: str | None = None) -> list[Token]:
        """Live tokens (of ``user``), by user and creation."""
        sql = ("SELECT id, user, digest, scopes, expires, created, last_used, description "
               "FROM tokens WHERE revoked = 0")
        args: tuple[Any, ...] = ()
        if user is not None:
            sql += " AND user = ?"
            args = (user,)
        return [_tokenrow(r) for r in self.db.execute(sql + " ORDER BY user, created", args)]

    def touch_tokens(self, uses: Mapping[str, float]) -> None:
        """Record tokens' last use (one transaction)."""
        if not uses:
            return
        with self._tx():
            self.db.executemany(
                "UPDATE tokens SET last_used = max(coalesce(last_used, 0), ?) WHERE id = ?",
                [(t, i) for i, t in uses.items()])

    # -- sessions ------------------------------------------------------------------------
    def create_session(self, user: str, lifetime: float) -> str:
        """A new browser session of ``user``; returns its id (stored only as a digest)."""
        session = secrets.token_urlsafe(32)
        now = self.clock()
        with self._tx():
            self.user(user)
            self.db.execute("INSERT INTO sessions (digest, user, created, expires) "
                            "VALUES (?, ?, ?, ?)", (_digest(session), user, now, now + lifetime))
        return session

    def session_user(self, session: str) -> str | None:
        """The user of a live session (None: unknown, expired, or the user is disabled)."""
        row = self._one("SELECT s.user FROM sessions s JOIN users u ON u.name = s.user "
                        "WHERE s.digest = ? AND s.expires > ? AND u.enabled = 1",
                        _digest(session), self.clock())
        return None if row is None else str(row[0])

    def end_session(self, session: str) -> None:
        """Log a session out."""
        with self._tx():
            self.db.execute("DELETE FROM sessions WHERE digest = ?", (_digest(session),))

    def purge_sessions(self) -> int:
        """Remove expired sessions; how many."""
        with self._tx():
            return int(self.db.execute("DELETE FROM sessions WHERE expires <= ?",
                                       (self.clock(),)).rowcount)

    # -- usage ---------------------------------------------------------------------------
    def usage_start(self, user: str, container: str, display: str, gpus: int, at: float) -> None:
        """A container started for ``user``."""
        with self._tx():
            self.db.execute("INSERT INTO usage (user, container, display, gpus, started) "
                            "VALUES (?, ?, ?, ?, ?)", (user, container, display, gpus, at))

    def usage_stop(self, container: str, at: float) -> None:
        """The container ended (idempotent; nothing when it was not recorded)."""
        with self._tx():
            self.db.execute("UPDATE usage SET stopped = ? WHERE container = ? AND stopped IS NULL",
                            (at, container))

    def usage(self, since: float, until: float) -> list[UsageRow]:
        """Per user: containers started within the period, and container-seconds and
        GPU-seconds within it (open rows count up to ``until``)."""
        rows: dict[str, list[float]] = {}
        for user, gpus, started, stopped in self.db.execute(
                "SELECT user, gpus, started, stopped FROM usage "
                "WHERE started < ? AND (stopped IS NULL OR stopped > ?)", (until, since)):
            seconds = max(0.0, min(until, stopped if stopped is not None else until)
                          - max(since, started))
            r = rows.setdefault(user, [0, 0.0, 0.0])
            r[0] += 1 if started >= since else 0
            r[1] += seconds
            r[2] += seconds * gpus
        return [UsageRow(u, int(r[0]), r[1], r[2]) for u, r in sorted(rows.items())]


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` (nested uses join the outer one)."""

    def __init__(self, store: Store, read: bool = False):
        self.store = store
        self.read = read  # a consistent read: BEGIN DEFERRED, and no change counted
        self.outer = False

    def __enter__(self) -> None:
        if not self.store.db.in_transaction:
            self.store.db.execute("BEGIN" if self.read else "BEGIN IMMEDIATE")
            self.outer = True

    def __exit__(self, kind: Any, value: Any, tb: Any) -> None:
        if not self.outer:
            return
        if kind is None:
            self.store.db.execute("COMMIT")
            if not self.read:
                self.store._commits += 1
        else:
            self.store.db.execute("ROLLBACK")


def _group(row: Any) -> Group:
    name, images, routes, qc, qg, qq, admin = row
    return Group(name, tuple(json.loads(images)), frozenset(json.loads(routes)),
                 Quota(qc, qg, qq), bool(admin))


def _tokenrow(row: Any) -> Token:
    tid, user, digest, scopes, expires, created, last_used, description = row
    return Token(tid, user, digest, None if scopes is None else frozenset(json.loads(scopes)),
                 expires, created, last_used, description or "")
