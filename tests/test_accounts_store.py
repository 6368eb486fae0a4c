"""The state file: users, groups, tokens, sessions, usage, the snapshot, the change
counter another process sees, WAL, and forward migrations from every earlier version."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable

from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.accounts import store as store_module
from dockerspaces.accounts.model import (
    ROUTES,
    AccountsError,
    Group,
    Quota,
    User,
    parse_token,
    token_digest,
    token_matches,
)
from dockerspaces.accounts.passwords import hash_password, verify_password
from dockerspaces.accounts.store import MIGRATIONS, SCHEMA_VERSION, UNSET, Store

T0 = 1_800_000_000.0


class Clock:
    """A clock the test moves."""

    def __init__(self, t: float = T0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def temp_state(case: SynchronousTestCase) -> str:
    """A state file path in a new directory of the test's own."""
    directory = case.mktemp()
    os.makedirs(directory)
    return os.path.join(directory, "state.sqlite")


def file_bytes(path: str) -> bytes:
    """The database and its WAL and shared-memory files, concatenated."""
    directory = os.path.dirname(path)
    out = b""
    for name in sorted(os.listdir(directory)):
        with open(os.path.join(directory, name), "rb") as f:
            out += f.read()
    return out


class StoreCase(SynchronousTestCase):
    """A Store on a temporary file, with a clock the test moves and a fast KDF."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.path = temp_state(self)
        # scrypt at its real cost is tested in test_accounts_passwords; here it only
        # has to be scrypt
        self.patch(store_module, "hash_password", lambda pw: hash_password(pw, n=2**4))
        self.store = self.open()

    def open(self) -> Store:
        store = Store(self.path, clock=self.clock)
        self.addCleanup(store.close)
        return store

    def raises(self, message: str, f: Callable[..., object], *args: object, **kwargs: object) -> None:
        """``f(*args, **kwargs)`` raises AccountsError containing ``message``."""
        error = self.assertRaises(AccountsError, f, *args, **kwargs)
        self.assertIn(message, str(error))


class OpenTests(StoreCase):
    def test_a_new_file_is_created_in_wal_mode_at_the_current_version(self) -> None:
        self.assertEqual(self.store.schema_version(), SCHEMA_VERSION)
        pragma = self.store.db.execute
        self.assertEqual(pragma("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(pragma("PRAGMA busy_timeout").fetchone()[0], 5000)
        self.assertEqual(pragma("PRAGMA foreign_keys").fetchone()[0], 1)
        self.store.add_user("alice")
        self.assertTrue(os.path.exists(self.path + "-wal"))

    def test_memory(self) -> None:
        store = Store(":memory:")
        self.addCleanup(store.close)
        self.assertEqual(store.schema_version(), SCHEMA_VERSION)
        store.add_user("alice")
        self.assertEqual([u.name for u in store.users()], ["alice"])

    def test_an_empty_file(self) -> None:
        path = temp_state(self)
        open(path, "wb").close()
        store = Store(path)
        self.addCleanup(store.close)
        self.assertEqual(store.schema_version(), SCHEMA_VERSION)
        self.assertEqual(store.users(), [])

    def test_reopening_keeps_everything(self) -> None:
        self.store.add_user("alice", "pw")
        self.store.add_group("ml", routes=("x",))
        self.store.add_member("ml", "alice")
        self.store.close()
        again = self.open()
        self.assertEqual(again.user("alice").groups, ("ml",))
        self.assertEqual(again.group("ml").routes, frozenset({"x"}))

    def test_an_unopenable_path(self) -> None:
        self.raises("cannot open the state file", Store, os.path.join(self.path, "no", "such"))

    def test_not_a_database(self) -> None:
        path = temp_state(self)
        with open(path, "w") as f:
            f.write("this is not sqlite" * 100)
        self.raises("is not a dockerspaces database", Store, path)

    def test_close(self) -> None:
        self.store.close()
        self.assertRaises(sqlite3.ProgrammingError, self.store.users)


class MigrationTests(SynchronousTestCase):
    def build(self, version: int) -> str:
        """A file at ``version``, made by hand from MIGRATIONS[:version], with a few rows
        in whatever tables that version has."""
        path = temp_state(self)
        db = sqlite3.connect(path)
        for script in MIGRATIONS[:version]:
            db.executescript(script)
        db.execute(f"PRAGMA user_version = {version}")
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "users" in tables:
            db.execute("INSERT INTO users (name, enabled, password_hash, created) VALUES ('old', 1, NULL, 1)")
        if "groups" in tables:
            db.execute("INSERT INTO groups (name, routes) VALUES ('team', '[\"x\"]')")
        if "members" in tables:
            db.execute("INSERT INTO members (grp, user) VALUES ('team', 'old')")
        if "tokens" in tables:
            db.execute(
                "INSERT INTO tokens (id, user, digest, created) VALUES ('0123456789ab', 'old', 'd', 1)"
            )
        if "usage" in tables:
            db.execute(
                "INSERT INTO usage (user, container, display, gpus, started, stopped) "
                "VALUES ('old', 'c', 'x:a', 1, 10, 20)"
            )
        db.commit()
        db.close()
        return path

    def test_from_every_earlier_version(self) -> None:
        for version in range(SCHEMA_VERSION):
            path = self.build(version)
            store = Store(path)
            self.addCleanup(store.close)
            self.assertEqual(store.schema_version(), SCHEMA_VERSION, version)
            if version >= 1:
                self.assertEqual(store.user("old"), User("old", True, ("team",), None))
                self.assertEqual(store.group("team"), Group("team", (), frozenset({"x"})))
                self.assertEqual([t.id for t in store.tokens("old")], ["0123456789ab"])
                self.assertEqual(store.usage(0, 100)[0].seconds, 10.0)
            store.add_user("new")  # every table usable at the current version
            store.add_group("g", quota=Quota(1, 2, 3))
            store.add_member("g", "new")
            store.create_token("new")
            store.create_session("new", 60)
            store.usage_start("new", "c2", "x:b", 0, 1)

    def test_a_newer_file_is_refused(self) -> None:
        path = temp_state(self)
        db = sqlite3.connect(path)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        db.close()
        error = self.assertRaises(AccountsError, Store, path)
        self.assertIn(
            f"was written by a newer dockerspaces (schema {SCHEMA_VERSION + 1}, "
            f"this one knows {SCHEMA_VERSION})",
            str(error),
        )

    def test_a_failed_migration_leaves_the_file_as_it_was(self) -> None:
        path = self.build(SCHEMA_VERSION)
        self.patch(store_module, "MIGRATIONS", [*MIGRATIONS, "CREATE TABLE x (a); SELECT nope"])
        self.patch(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
        self.assertRaises(AccountsError, Store, path)
        db = sqlite3.connect(path)
        self.addCleanup(db.close)
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'x'").fetchone()[0], 0)

    def test_a_later_migration_may_hold_semicolons(self) -> None:
        path = self.build(SCHEMA_VERSION)
        later = """
            -- a comment; with a semicolon
            CREATE TABLE notes (text TEXT DEFAULT 'a; b');
            CREATE TRIGGER note_user AFTER INSERT ON users BEGIN
                INSERT INTO notes (text) VALUES ('new user; ' || new.name);
            END;
        """
        self.patch(store_module, "MIGRATIONS", [*MIGRATIONS, later])
        self.patch(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
        store = Store(path)
        self.addCleanup(store.close)
        self.assertEqual(store.schema_version(), SCHEMA_VERSION + 1)
        store.add_user("bob")
        self.assertEqual(store.db.execute("SELECT text FROM notes").fetchall(), [("new user; bob",)])


class UserTests(StoreCase):
    def test_add_and_read(self) -> None:
        alice = self.store.add_user("alice", "pw")
        self.assertEqual((alice.name, alice.enabled, alice.groups), ("alice", True, ()))
        self.assertTrue(verify_password("pw", alice.password_hash or ""))
        self.assertEqual(self.store.add_user("bob"), User("bob"))
        self.assertEqual(self.store.user("alice"), alice)
        self.assertEqual([u.name for u in self.store.users()], ["alice", "bob"])
        self.assertNotIn("pw", repr(alice))

    def test_names(self) -> None:
        for good in ("a", "a" * 64, "x.y_z@host-1", "ALICE"):
            self.assertEqual(self.store.add_user(good).name, good)
        for bad in ("", "a" * 65, "has space", "a/b", "a:b", "ünï"):
            self.raises("use 1 to 64 of A-Z a-z 0-9 . _ @ -", self.store.add_user, bad)

    def test_errors(self) -> None:
        self.store.add_user("alice")
        self.raises("user 'alice' exists already", self.store.add_user, "alice")
        for f, args in (
            (self.store.user, ("bob",)),
            (self.store.set_password, ("bob", "x")),
            (self.store.set_enabled, ("bob", True)),
            (self.store.remove_user, ("bob",)),
        ):
            self.raises("no user 'bob'", f, *args)

    def test_password_and_enabled(self) -> None:
        self.store.add_user("bob")
        self.store.set_password("bob", "secret")
        hashed = self.store.user("bob").password_hash or ""
        self.assertTrue(verify_password("secret", hashed))
        self.assertFalse(verify_password("other", hashed))
        self.store.set_enabled("bob", False)
        self.assertFalse(self.store.user("bob").enabled)
        self.store.set_enabled("bob", True)
        self.assertTrue(self.store.user("bob").enabled)

    def test_remove_takes_memberships_tokens_and_sessions_but_not_usage(self) -> None:
        self.store.add_user("bob")
        self.store.add_group("ml")
        self.store.add_member("ml", "bob")
        self.store.create_token("bob")
        session = self.store.create_session("bob", 60)
        self.store.usage_start("bob", "c1", "x:a", 0, T0)
        self.store.remove_user("bob")
        self.assertEqual(self.store.users(), [])
        self.assertEqual(self.store.members("ml"), [])
        self.assertIsNone(self.store.session_user(session))
        count = self.store.db.execute
        self.assertEqual(count("SELECT count(*) FROM tokens").fetchone()[0], 0)
        self.assertEqual(count("SELECT count(*) FROM sessions").fetchone()[0], 0)
        self.assertEqual([r.user for r in self.store.usage(T0, T0 + 10)], ["bob"])
        self.store.add_user("bob")  # the name is free again, with nothing left over
        self.assertEqual(self.store.user("bob").groups, ())


class GroupTests(StoreCase):
    def test_add(self) -> None:
        g = self.store.add_group(
            "ml",
            images=("team/*", "redis:7"),
            routes=("y", "x"),
            quota=Quota(containers=2, gpus=1),
            admin=True,
        )
        self.assertEqual(
            g, Group("ml", ("team/*", "redis:7"), frozenset({"x", "y"}), Quota(2, 1, None), True)
        )
        self.assertEqual(self.store.group("ml"), g)
        self.assertEqual(self.store.add_group("empty"), Group("empty"))
        self.assertEqual([x.name for x in self.store.groups()], ["empty", "ml"])

    def test_add_errors(self) -> None:
        self.store.add_group("ml")
        self.raises("group 'ml' exists already", self.store.add_group, "ml")
        self.raises("group name 'a b'", self.store.add_group, "a b")
        self.raises(
            "unknown route(s) root, ssh: use x, y, worker, host, monitor, docker-api",
            self.store.add_group,
            "g",
            routes=("x", "ssh", "root"),
        )
        self.raises(
            "the containers quota must be a whole number >= 0",
            self.store.add_group,
            "g",
            quota=Quota(containers=-1),
        )
        self.raises("the gpus quota", self.store.add_group, "g", quota=Quota(gpus=True))
        self.raises("image pattern ''", self.store.add_group, "g", images=("",))
        self.raises("image pattern 'a b'", self.store.add_group, "g", images=("a b",))
        self.assertEqual([x.name for x in self.store.groups()], ["ml"])

    def test_update_changes_only_what_is_given(self) -> None:
        self.store.add_group("ml", images=("a",), routes=("x",), quota=Quota(1, 2, 3))
        self.assertEqual(self.store.update_group("ml"), self.store.group("ml"))
        g = self.store.update_group("ml", containers=None, queued=4, admin=True)
        self.assertEqual(g, Group("ml", ("a",), frozenset({"x"}), Quota(None, 2, 4), True))
        g = self.store.update_group("ml", images=("b", "c"), routes=(), gpus=UNSET, admin=False)
        self.assertEqual(g, Group("ml", ("b", "c"), frozenset(), Quota(None, 2, 4), False))
        self.assertEqual(self.store.update_group("ml", routes=ROUTES).routes, frozenset(ROUTES))

    def test_update_errors(self) -> None:
        self.store.add_group("ml", quota=Quota(1, 1, 1))
        self.raises("no group 'nope'", self.store.update_group, "nope")
        self.raises("no group 'nope'", self.store.update_group, "nope", admin=True)
        self.raises("unknown route(s) ssh", self.store.update_group, "ml", routes=("ssh",))
        self.raises("the queued quota", self.store.update_group, "ml", queued=-5)
        self.assertEqual(self.store.group("ml").quota, Quota(1, 1, 1))

    def test_members(self) -> None:
        for name in ("bob", "alice"):
            self.store.add_user(name)
        self.store.add_group("ml")
        self.store.add_group("admins")
        self.store.add_member("ml", "bob")
        self.store.add_member("ml", "alice")
        self.store.add_member("ml", "alice")  # nothing: a member already
        self.store.add_member("admins", "alice")
        self.assertEqual(self.store.members("ml"), ["alice", "bob"])
        self.assertEqual(self.store.user("alice").groups, ("admins", "ml"))
        self.store.remove_member("ml", "bob")
        self.assertEqual(self.store.members("ml"), ["alice"])
        self.raises("user 'bob' is not in group 'ml'", self.store.remove_member, "ml", "bob")
        self.raises("no user 'carol'", self.store.add_member, "ml", "carol")
        self.raises("no group 'nope'", self.store.add_member, "nope", "alice")
        self.raises("no group 'nope'", self.store.remove_member, "nope", "alice")
        self.raises("no group 'nope'", self.store.members, "nope")

    def test_remove_takes_the_memberships(self) -> None:
        self.store.add_user("alice")
        self.store.add_group("ml")
        self.store.add_member("ml", "alice")
        self.store.remove_group("ml")
        self.assertEqual(self.store.groups(), [])
        self.assertEqual(self.store.user("alice").groups, ())
        self.raises("no group 'ml'", self.store.remove_group, "ml")
        self.raises("no group 'ml'", self.store.group, "ml")


class TokenTests(StoreCase):
    def test_create(self) -> None:
        self.store.add_user("alice")
        text, token = self.store.create_token(
            "alice", scopes=("x", "docker-api"), expires=T0 + 60, description="ci"
        )
        self.assertTrue(text.startswith("dst_"))
        parsed = parse_token(text)
        assert parsed is not None
        token_id, secret = parsed
        self.assertEqual(len(token_id), 12)
        self.assertEqual(token.id, token_id)
        self.assertEqual(
            (token.user, token.scopes, token.expires, token.created, token.last_used, token.description),
            ("alice", frozenset({"x", "docker-api"}), T0 + 60, T0, None, "ci"),
        )
        self.assertEqual(token.digest, token_digest(secret))
        self.assertTrue(token_matches(token, secret))
        self.assertFalse(token_matches(token, secret + "x"))
        _, every = self.store.create_token("alice")
        self.assertIsNone(every.scopes)
        self.assertIsNone(every.expires)
        self.assertNotEqual(every.id, token.id)

    def test_only_the_digest_is_stored(self) -> None:
        self.store.add_user("alice")
        text, token = self.store.create_token("alice")
        parsed = parse_token(text)
        assert parsed is not None
        stored = self.store.db.execute("SELECT * FROM tokens").fetchall()
        self.assertIn(token.digest, str(stored))
        self.assertNotIn(parsed[1], str(stored))
        self.store.close()
        raw = file_bytes(self.path)
        self.assertIn(token.digest.encode(), raw)
        self.assertNotIn(parsed[1].encode(), raw)

    def test_create_errors(self) -> None:
        self.store.add_user("alice")
        self.raises("no user 'nobody'", self.store.create_token, "nobody")
        self.raises("unknown route(s) root", self.store.create_token, "alice", scopes=("root",))
        self.raises("would expire before it is created", self.store.create_token, "alice", expires=T0)
        self.assertEqual(self.store.tokens(), [])

    def test_revoke(self) -> None:
        self.store.add_user("alice")
        _, kept = self.store.create_token("alice")
        _, token = self.store.create_token("alice")
        self.store.revoke_token(token.id)
        self.assertEqual(self.store.tokens(), [kept])
        self.assertNotIn(token.id, self.store.snapshot().tokens)
        self.raises(f"token '{token.id}' is revoked already", self.store.revoke_token, token.id)
        self.raises("no token '000000000000'", self.store.revoke_token, "000000000000")

    def test_list_by_user(self) -> None:
        for name in ("bob", "alice"):
            self.store.add_user(name)
        _, b = self.store.create_token("bob")
        self.clock.t += 1
        _, a1 = self.store.create_token("alice")
        self.clock.t += 1
        _, a2 = self.store.create_token("alice")
        self.assertEqual(self.store.tokens(), [a1, a2, b])
        self.assertEqual(self.store.tokens("alice"), [a1, a2])
        self.assertEqual(self.store.tokens("bob"), [b])
        self.raises("no user 'carol'", self.store.tokens, "carol")

    def test_touch(self) -> None:
        self.store.add_user("alice")
        _, a = self.store.create_token("alice")
        _, b = self.store.create_token("alice")
        version = self.store.data_version()
        self.store.touch_tokens({})
        self.assertEqual(self.store.data_version(), version)  # nothing written
        self.store.touch_tokens({a.id: T0 + 5, b.id: T0 + 7, "unknown00000": T0})
        self.assertEqual({t.id: t.last_used for t in self.store.tokens()}, {a.id: T0 + 5, b.id: T0 + 7})
        self.store.touch_tokens({a.id: T0 + 2})  # late news: never moves back
        self.assertEqual(self.store.snapshot().tokens[a.id].last_used, T0 + 5)


class SessionTests(StoreCase):
    def test_lifetime(self) -> None:
        self.store.add_user("alice")
        session = self.store.create_session("alice", 100)
        self.assertEqual(self.store.session_user(session), "alice")
        self.assertIsNone(self.store.session_user(session + "x"))
        self.assertIsNone(self.store.session_user(""))
        self.clock.t += 99.5
        self.assertEqual(self.store.session_user(session), "alice")
        self.clock.t += 0.5
        self.assertIsNone(self.store.session_user(session))

    def test_disabled_and_removed_users(self) -> None:
        for name in ("alice", "bob"):
            self.store.add_user(name)
        a = self.store.create_session("alice", 100)
        b = self.store.create_session("bob", 100)
        self.store.set_enabled("alice", False)
        self.assertIsNone(self.store.session_user(a))
        self.store.set_enabled("alice", True)
        self.assertEqual(self.store.session_user(a), "alice")
        self.store.remove_user("bob")
        self.assertIsNone(self.store.session_user(b))
        self.raises("no user 'bob'", self.store.create_session, "bob", 100)

    def test_end_and_purge(self) -> None:
        self.store.add_user("alice")
        ended = self.store.create_session("alice", 100)
        self.store.create_session("alice", 10)
        self.store.create_session("alice", 20)
        live = self.store.create_session("alice", 1000)
        self.store.end_session(ended)
        self.store.end_session(ended)  # nothing: gone already
        self.assertIsNone(self.store.session_user(ended))
        self.assertEqual(self.store.purge_sessions(), 0)
        self.clock.t += 50
        self.assertEqual(self.store.purge_sessions(), 2)
        self.assertEqual(self.store.purge_sessions(), 0)
        self.assertEqual(self.store.session_user(live), "alice")

    def test_only_a_digest_is_stored(self) -> None:
        self.store.add_user("alice")
        session = self.store.create_session("alice", 100)
        self.assertGreaterEqual(len(session), 43)
        rows = self.store.db.execute("SELECT * FROM sessions").fetchall()
        self.assertEqual(len(rows), 1)
        self.assertNotIn(session, str(rows))
        self.store.close()
        self.assertNotIn(session.encode(), file_bytes(self.path))


class UsageTests(StoreCase):
    def test_clipped_to_the_period(self) -> None:
        self.store.usage_start("alice", "c1", "x:a", 2, T0)
        self.store.usage_stop("c1", T0 + 100)
        self.store.usage_stop("c1", T0 + 500)  # idempotent: closed already
        self.store.usage_start("alice", "c2", "x:b", 0, T0 + 50)  # still running
        self.store.usage_start("bob", "c3", "x:c", 1, T0 - 1000)
        self.store.usage_stop("c3", T0 - 900)
        self.store.usage_stop("never-started", T0)  # nothing
        rows = self.store.usage(T0 + 50, T0 + 150)
        self.assertEqual([(r.user, r.containers) for r in rows], [("alice", 1)])
        (alice,) = rows
        self.assertEqual(alice.seconds, 50 + 100)  # c1 clipped to 50, c2 running to the end
        self.assertEqual(alice.gpu_seconds, 2 * 50)
        (bob,) = self.store.usage(T0 - 2000, T0)
        self.assertEqual((bob.user, bob.containers, bob.seconds, bob.gpu_seconds), ("bob", 1, 100.0, 100.0))

    def test_whole_rows_and_order(self) -> None:
        self.store.usage_start("zoe", "c1", "x:a", 1, T0)
        self.store.usage_stop("c1", T0 + 3600)
        self.store.usage_start("adam", "c2", "x:b", 4, T0 + 10)
        self.store.usage_stop("c2", T0 + 20)
        self.store.usage_start("zoe", "c3", "x:a", 0, T0 + 100)
        rows = self.store.usage(T0 - 10, T0 + 7200)
        self.assertEqual(
            [(r.user, r.containers, r.seconds, r.gpu_seconds) for r in rows],
            [("adam", 1, 10.0, 40.0), ("zoe", 2, 3600 + 7100, 3600.0)],
        )

    def test_a_container_started_before_the_period_is_not_counted_as_started(self) -> None:
        self.store.usage_start("alice", "c1", "x:a", 0, T0 - 100)
        (row,) = self.store.usage(T0, T0 + 10)
        self.assertEqual((row.containers, row.seconds), (0, 10.0))

    def test_a_stop_before_the_start_counts_no_time(self) -> None:
        self.store.usage_start("alice", "c1", "x:a", 1, T0)
        self.store.usage_stop("c1", T0 - 5)
        (row,) = self.store.usage(T0 - 100, T0 + 100)
        self.assertEqual((row.containers, row.seconds, row.gpu_seconds), (1, 0.0, 0.0))
        self.raises("ends before it begins", self.store.usage, T0, T0 - 1)


class SnapshotTests(StoreCase):
    def test_snapshot(self) -> None:
        self.store.add_user("alice", "pw")
        self.store.add_user("bob")
        self.store.set_enabled("bob", False)
        self.store.add_group("ml", routes=("x",))
        self.store.add_member("ml", "alice")
        _, live = self.store.create_token("alice", expires=T0 + 1)
        _, revoked = self.store.create_token("alice")
        self.store.revoke_token(revoked.id)
        self.clock.t += 10  # live has expired: still in the snapshot, the server checks
        snap = self.store.snapshot()
        self.assertEqual(set(snap.users), {"alice", "bob"})
        self.assertEqual(snap.users["alice"].groups, ("ml",))
        self.assertFalse(snap.users["bob"].enabled)
        self.assertEqual(snap.groups, {"ml": self.store.group("ml")})
        self.assertEqual(snap.tokens, {live.id: live})

    def test_data_version_counts_this_store_and_another(self) -> None:
        other = self.open()  # the admin tool beside the server
        v0 = self.store.data_version()
        self.assertEqual(self.store.data_version(), v0)
        self.store.snapshot()
        self.store.users()
        self.assertEqual(self.store.data_version(), v0)  # reads change nothing
        other.add_user("carol")
        v1 = self.store.data_version()
        self.assertNotEqual(v1, v0)
        self.assertIn("carol", self.store.snapshot().users)
        self.assertEqual(self.store.data_version(), v1)
        self.store.add_user("dave")
        v2 = self.store.data_version()
        self.assertNotIn(v2, (v0, v1))
        other.set_enabled("dave", False)
        self.store.add_group("g")  # both at once: still a new number
        self.assertNotIn(self.store.data_version(), (v0, v1, v2))

    def test_a_failed_change_is_not_a_change(self) -> None:
        v = self.store.data_version()
        self.assertRaises(AccountsError, self.store.set_enabled, "nobody", True)
        self.assertEqual(self.store.data_version(), v)
