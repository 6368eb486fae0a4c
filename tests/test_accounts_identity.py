"""Who a request is from (:mod:`dockerspaces.accounts.identity`): the identity built from
a snapshot, the avatar id round trip, the realm. The checkers through a portal and a
real service are in ``test_accounts_service``; through the web gate in ``test_auth``."""

from __future__ import annotations

from twisted.cred.checkers import ANONYMOUS
from twisted.cred.error import UnauthorizedLogin
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.accounts.identity import (
    AccountsRealm,
    Identity,
    IIdentity,
    Principal,
    identity_for,
)
from dockerspaces.accounts.model import Group, Quota, Snapshot, Token, User


def snapshot() -> Snapshot:
    groups = {
        "ml": Group("ml", ("team/*",), frozenset({"x", "y"}), Quota(containers=2, gpus=1)),
        "ops": Group(
            "ops", ("ops/*", "team/*"), frozenset({"monitor"}), Quota(containers=4, gpus=None), admin=True
        ),
    }
    users = {"alice": User("alice", groups=("ml", "ops")), "bob": User("bob", enabled=False, groups=("ml",))}
    tokens = {"t1": Token("t1", "alice", "digest", frozenset({"x", "monitor"}), None, 0.0, None)}
    return Snapshot(users, groups, tokens)


class IdentityForTests(SynchronousTestCase):
    def test_groups_merge(self) -> None:
        """Routes and images are the union; a quota holds only where every group sets
        one (the most generous); admin if any group is."""
        identity = identity_for(snapshot(), Principal("alice", "password"))
        assert identity is not None
        self.assertEqual(identity.groups, ("ml", "ops"))
        self.assertEqual(identity.routes, frozenset({"x", "y", "monitor"}))
        self.assertEqual(identity.images, ("team/*", "ops/*"))
        self.assertEqual(identity.quota, Quota(containers=4, gpus=None, queued=None))
        self.assertTrue(identity.admin)
        self.assertEqual((identity.via, identity.token_id, identity.scopes), ("password", None, None))
        self.assertEqual(identity.group, "ml")

    def test_a_token_narrows_the_routes(self) -> None:
        identity = identity_for(snapshot(), Principal("alice", "token", "t1"))
        assert identity is not None
        self.assertEqual(identity.routes, frozenset({"x", "monitor"}))
        self.assertEqual(identity.scopes, frozenset({"x", "monitor"}))
        self.assertTrue(identity.may_use("x"))
        self.assertFalse(identity.may_use("y"))

    def test_nobody(self) -> None:
        """Unknown or disabled users and gone tokens have no identity."""
        snap = snapshot()
        self.assertIsNone(identity_for(snap, Principal("carol", "password")))
        self.assertIsNone(identity_for(snap, Principal("bob", "password")))
        self.assertIsNone(identity_for(snap, Principal("alice", "token", "gone")))


class PrincipalTests(SynchronousTestCase):
    def test_avatar_id_round_trip(self) -> None:
        for p in (Principal("alice", "password"), Principal("alice", "token", "t1")):
            self.assertEqual(Principal.from_avatar_id(p.avatar_id()), p)


class RealmTests(SynchronousTestCase):
    def test_identity_avatar(self) -> None:
        realm = AccountsRealm(snapshot)
        interface, avatar, logout = realm.requestAvatar(
            Principal("alice", "session").avatar_id(), None, IIdentity
        )
        self.assertIs(interface, IIdentity)
        self.assertIsInstance(avatar, Identity)
        self.assertIsNone(logout())

    def test_refusals(self) -> None:
        realm = AccountsRealm(snapshot)
        self.assertRaises(
            UnauthorizedLogin, realm.requestAvatar, Principal("bob", "password").avatar_id(), None, IIdentity
        )
        self.assertRaises(UnauthorizedLogin, realm.requestAvatar, ANONYMOUS, None, IIdentity)
        self.assertRaises(
            NotImplementedError, realm.requestAvatar, Principal("alice", "password").avatar_id(), None
        )
