"""The server's accounts service: snapshot refresh when another process changes the
state file, sessions, cached password checks, token last use, usage rows -- on a real
SQLite file, with the threads replaced by inline pools (synchronous)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.accounts.identity import Identity, make_portal
from dockerspaces.accounts.model import Quota
from dockerspaces.accounts.service import AccountsService, open_snapshot
from dockerspaces.accounts.store import Store

from .test_engine_harness import InlinePool, Reactor


class Counting(InlinePool):
    """An inline pool that counts its calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def callInThreadWithCallback(self, onResult: Any, func: Any, *args: Any) -> None:
        self.calls += 1
        super().callInThreadWithCallback(onResult, func, *args)


class ServiceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="ds-acc-")
        self.path = os.path.join(self.dir, "state.sqlite")
        self.admin = Store(self.path)  # "the admin tool": another connection
        self.addCleanup(self.admin.close)
        self.admin.add_group("ml", images=("team/*",), routes=("x", "y"), quota=Quota(containers=2))
        self.admin.add_user("alice")
        self.admin.add_member("ml", "alice")
        self.reactor = Reactor()
        self.reactor.advance(1_800_000_000)
        self.pools: dict[str, Counting] = {}

        def pool(name: str) -> Counting:
            self.pools[name] = Counting()
            return self.pools[name]

        self.service = AccountsService(self.path, self.reactor, open_snapshot(self.path), pool_factory=pool)
        self.service.startService()
        self.addCleanup(self.service.stopService)

    def login(self, creds: Any) -> Any:
        return self.successResultOf(make_portal(self.service).login(creds, None, _iid()))[1]

    def test_admin_changes_reach_the_snapshot_within_a_refresh(self) -> None:
        from dockerspaces.accounts.identity import TokenCredentials

        token, _ = self.admin.create_token("alice")
        self.assertNotIn(_id(token), self.service.snapshot.tokens)
        generation = self.service.generation
        self.reactor.advance(self.service.refresh)
        self.assertIn(_id(token), self.service.snapshot.tokens)
        self.assertGreater(self.service.generation, generation)
        identity = self.login(TokenCredentials(token))
        self.assertIsInstance(identity, Identity)
        self.assertEqual(
            (identity.user, identity.routes, identity.quota.containers), ("alice", frozenset({"x", "y"}), 2)
        )
        # nothing changed: no reload, the generation stays
        generation = self.service.generation
        self.reactor.advance(self.service.refresh)
        self.assertEqual(self.service.generation, generation)

    def test_token_last_use_is_written_with_the_refresh(self) -> None:
        _, tok = self.admin.create_token("alice")
        self.reactor.advance(self.service.refresh)
        self.service.token_used(tok.id)
        self.reactor.advance(self.service.refresh)
        (listed,) = self.admin.tokens("alice")
        self.assertEqual(listed.last_used, self.reactor.seconds() - self.service.refresh)

    def test_sessions_survive_a_new_service(self) -> None:
        session = self.successResultOf(self.service.create_session("alice", 3600))
        self.assertEqual(self.successResultOf(self.service.session_user(session)), "alice")
        again = AccountsService(
            self.path, self.reactor, open_snapshot(self.path), pool_factory=lambda name: InlinePool()
        )
        again.startService()
        self.addCleanup(again.stopService)
        self.assertEqual(self.successResultOf(again.session_user(session)), "alice")
        self.successResultOf(again.end_session(session))
        self.assertIsNone(self.successResultOf(again.session_user(session)))

    def test_disabling_a_user_drops_cached_sessions(self) -> None:
        session = self.successResultOf(self.service.create_session("alice", 3600))
        self.assertEqual(self.successResultOf(self.service.session_user(session)), "alice")
        self.admin.set_enabled("alice", False)
        self.reactor.advance(self.service.refresh)
        self.assertIsNone(self.successResultOf(self.service.session_user(session)))

    def test_password_checked_once_then_cached(self) -> None:
        self.admin.set_password("alice", "correct horse")
        self.reactor.advance(self.service.refresh)
        kdf = self.pools["accounts-kdf"]
        self.assertTrue(self.successResultOf(self.service.verify_password("alice", "correct horse")))
        self.assertTrue(self.successResultOf(self.service.verify_password("alice", "correct horse")))
        self.assertEqual(kdf.calls, 1)
        self.assertFalse(self.successResultOf(self.service.verify_password("alice", "wrong")))
        # an unknown user pays the KDF too (the time does not tell who exists)
        self.assertFalse(self.successResultOf(self.service.verify_password("mallory", "x")))
        self.assertEqual(kdf.calls, 3)
        # a new password: the cached one no longer passes
        self.admin.set_password("alice", "battery staple")
        self.reactor.advance(self.service.refresh)
        self.assertFalse(self.successResultOf(self.service.verify_password("alice", "correct horse")))

    def test_usage_rows_from_container_events(self) -> None:
        start = self.reactor.seconds()
        self.service.container_event("start", "c1", "x:team:a:1:80", "alice", 1)
        self.service.container_event("ready", "c1", "x:team:a:1:80", "alice", 1)
        self.reactor.advance(100)
        self.service.container_event("evict", "c1", "x:team:a:1:80", "alice", 1)
        self.service.container_event("start", "c2", "x:team:b:1:80", None, 0)  # no owner
        (row,) = self.admin.usage(start - 1, start + 1000)
        self.assertEqual((row.user, row.containers), ("alice", 1))
        self.assertAlmostEqual(row.gpu_seconds, 100, delta=1)


def _iid() -> Any:
    from dockerspaces.accounts.identity import IIdentity

    return IIdentity


def _id(token: str) -> str:
    from dockerspaces.accounts.model import parse_token

    parsed = parse_token(token)
    assert parsed is not None
    return parsed[0]
