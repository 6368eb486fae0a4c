"""The state file: users, groups, tokens, sessions, usage, the change counter another
process sees, WAL, and forward migrations from every earlier schema version."""

from __future__ import annotations

import os
import sqlite3
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.accounts import store as store_module
from dockerspaces.accounts.model import AccountsError, Quota, parse_token, token_matches
from dockerspaces.accounts.passwords import verify_password
from dockerspaces.accounts.store import MIGRATIONS, SCHEMA_VERSION, Store


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def temp_path(case: SynchronousTestCase) -> str:
    d = tempfile.mkdtemp(prefix="ds-store-")
    case.addCleanup(lambda: [os.remove(os.path.join(d, f)) for f in os.listdir(d)])
    return os.path.join(d, "state.sqlite")


class StoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.path = temp_path(self)
        self.store = Store(self.path, clock=self.clock)
        self.addCleanup(self.store.close)

    def test_users(self) -> None:
        u = self.store.add_user("alice", "pw")
        self.assertEqual((u.name, u.enabled, u.groups), ("alice", True, ()))
        self.assertTrue(verify_password("pw", u.password_hash or ""))
        self.assertIsNone(self.store.add_user("bob").password_hash)
        self.store.set_password("bob", "secret")
        self.assertTrue(verify_password("secret", self.store.user("bob").password_hash or ""))
        self.store.set_enabled("bob", False)
        self.assertFalse(self.store.user("bob").enabled)
        self.assertEqual([x.name for x in self.store.users()], ["alice", "bob"])
        self.store.remove_user("bob")
        self.assertEqual([x.name for x in self.store.users()], ["alice"])
        for bad in (lambda: self.store.add_user("alice"), lambda: self.store.user("bob"),
                    lambda: self.store.add_user("has space"), lambda: self.store.add_user(""),
                    lambda: self.store.set_enabled("nobody", True),
                    lambda: self.store.remove_user("nobody")):
            self.assertRaises(AccountsError, bad)

    def test_groups_and_members(self) -> None:
        self.store.add_user("alice")
        g = self.store.add_group("ml", images=("team/*",), routes=("x", "y"),
                                 quota=Quota(containers=2, gpus=1), admin=False)
        self.assertEqual((g.images, g.routes, g.quota), (("team/*",), frozenset({"x", "y"}),
                                                         Quota(2, 1, None)))
        self.store.add_member("ml", "alice")
        self.store.add_member("ml", "alice")  # idempotent
        self.assertEqual(self.store.members("ml"), ["alice"])
        self.assertEqual(self.store.user("alice").groups, ("ml",))
        g = self.store.update_group("ml", containers=None, queued=4, admin=True)
        self.assertEqual((g.quota, g.admin, g.routes), (Quota(None, 1, 4), True,
                                                        frozenset({"x", "y"})))
        with self.assertRaises(AccountsError) as e:
            self.store.add_group("bad", routes=("x", "ssh"))
        self.assertIn("unknown route(s) ssh: use x, y, worker, host, monitor, docker-api",
                      str(e.exception))
        self.assertRaises(AccountsError, self.store.add_group, "q", quota=Quota(containers=-1))
        self.assertRaises(AccountsError, self.store.add_member, "ml", "nobody")
        self.assertRaises(AccountsError, self.store.add_member, "nogroup", "alice")
        self.store.remove_member("ml", "alice")
        self.assertRaises(AccountsError, self.store.remove_member, "ml", "alice")
        self.store.add_member("ml", "alice")
        self.store.remove_group("ml")
        self.assertEqual(self.store.user("alice").groups, ())
        self.assertEqual(self.store.groups(), [])

    def test_tokens_store_only_a_digest(self) -> None:
        self.store.add_user("alice")
        text, token = self.store.create_token("alice", scopes=("x", "docker-api"),
                                              expires=self.clock.t + 60, description="ci")
        parsed = parse_token(text)
        assert parsed is not None
        self.assertEqual(parsed[0], token.id)
        self.assertTrue(token_matches(token, parsed[1]))
        self.assertFalse(token_matches(token, parsed[1] + "x"))
        self.assertEqual(token.scopes, frozenset({"x", "docker-api"}))
        self.store.close()
        with open(self.path, "rb") as f:
            raw = f.read()
        for name in os.listdir(os.path.dirname(self.path)):  # the WAL too
            with open(os.path.join(os.path.dirname(self.path), name), "rb") as f:
                raw += f.read()
        self.assertNotIn(parsed[1].encode(), raw)
        self.store = Store(self.path, clock=self.clock)
        self.store.touch_tokens({token.id: self.clock.t + 5})
        (listed,) = self.store.tokens("alice")
        self.assertEqual(listed.last_used, self.clock.t + 5)
        self.assertIn(token.id, self.store.snapshot().tokens)
        self.store.revoke_token(token.id)
        self.assertEqual(self.store.tokens(), [])
        self.assertNotIn(token.id, self.store.snapshot().tokens)
        self.assertRaises(AccountsError, self.store.revoke_token, token.id)
        self.assertRaises(AccountsError, self.store.create_token, "nobody")
        self.assertRaises(AccountsError, self.store.create_token, "alice", scopes=("root",))

    def test_sessions(self) -> None:
        self.store.add_user("alice")
        sid = self.store.create_session("alice", 100)
        self.assertEqual(self.store.session_user(sid), "alice")
        self.assertIsNone(self.store.session_user(sid + "x"))
        self.store.set_enabled("alice", False)
        self.assertIsNone(self.store.session_user(sid))
        self.store.set_enabled("alice", True)
        self.clock.t += 101
        self.assertIsNone(self.store.session_user(sid))
        self.assertEqual(self.store.purge_sessions(), 1)
        sid = self.store.create_session("alice", 100)
        self.store.end_session(sid)
        self.assertIsNone(self.store.session_user(sid))
        row = self.store.db.execute("SELECT digest FROM sessions").fetchall()
        self.assertNotIn(sid, str(row))

    def test_usage_clipped_to_the_period(self) -> None:
        t = self.clock.t
        self.store.usage_start("alice", "c1", "x:a", 2, t)
        self.store.usage_stop("c1", t + 100)
        self.store.usage_stop("c1", t + 500)  # idempotent: closed already
        self.store.usage_start("alice", "c2", "x:b", 0, t + 50)  # still open
        self.store.usage_start("bob", "c3", "x:c", 1, t - 1000)
        self.store.usage_stop("c3", t - 900)
        rows = self.store.usage(t + 50, t + 150)
        self.assertEqual([(r.user, r.containers) for r in rows], [("alice", 1)])
        (alice,) = rows
        self.assertEqual(alice.seconds, 50 + 100)  # c1 clipped to 50, c2 open to the end
        self.assertEqual(alice.gpu_seconds, 2 * 50)
        self.assertEqual([r.user for r in self.store.usage(t - 2000, t)], ["bob"])

    def test_data_version_sees_another_connection(self) -> None:
        other = Store(self.path, clock=self.clock)
        self.addCleanup(other.close)
        v = self.store.data_version()
        self.assertEqual(self.store.data_version(), v)
        self.store.snapshot()  # reading changes nothing
        self.assertEqual(self.store.data_version(), v)
        other.add_user("carol")
        v2 = self.store.data_version()
        self.assertNotEqual(v2, v)
        self.store.add_user("dave")
        self.assertNotEqual(self.store.data_version(), v2)
        self.assertIn("carol", self.store.snapshot().users)

    def test_wal(self) -> None:
        self.assertEqual(self.store.db.execute("PRAGMA journal_mode").fetchone()[0], "wal")


class MigrationTests(SynchronousTestCase):
    def test_from_every_earlier_version(self) -> None:
        for version in range(SCHEMA_VERSION):
            path = temp_path(self)
            db = sqlite3.connect(path)
            for script in MIGRATIONS[:version]:
                db.executescript(script)
            db.execute(f"PRAGMA user_version = {version}")
            if version >= 1:
                db.execute("INSERT INTO users (name, enabled, created) VALUES ('old', 1, 0)")
            db.commit()
            db.close()
            s = Store(path)
            try:
                self.assertEqual(s.schema_version(), SCHEMA_VERSION)
                if version >= 1:
                    self.assertEqual([u.name for u in s.users()], ["old"])
                s.add_user("new")  # every table usable
                s.create_token("new")
            finally:
                s.close()

    def test_newer_file_is_refused(self) -> None:
        path = temp_path(self)
        db = sqlite3.connect(path)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        db.close()
        with self.assertRaises(AccountsError) as e:
            Store(path)
        self.assertIn(f"written by a newer dockerspaces (schema {SCHEMA_VERSION + 1}, this "
                      f"one knows {SCHEMA_VERSION})", str(e.exception))

    def test_not_a_database(self) -> None:
        path = temp_path(self)
        with open(path, "w") as f:
            f.write("this is not sqlite" * 100)
        with self.assertRaises(AccountsError) as e:
            Store(path)
        self.assertIn("is not a dockerspaces database", str(e.exception))

    def test_a_failed_migration_leaves_the_file_as_it_was(self) -> None:
        path = temp_path(self)
        self.patch(store_module, "MIGRATIONS", [*MIGRATIONS, "CREATE TABLE x (a); SELECT nope"])
        self.patch(store_module, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
        self.assertRaises(AccountsError, Store, path)
        db = sqlite3.connect(path)
        self.assertEqual(db.execute("PRAGMA user_version").fetchone()[0], SCHEMA_VERSION)
        self.assertEqual(db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'x'")
                         .fetchone()[0], 0)
        db.close()
