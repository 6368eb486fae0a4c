"""/monitor:broker/ with accounts: a non-admin sees only their own containers and
queues; admins and --auth none see everything."""

from __future__ import annotations

import json
from typing import Any

from twisted.trial.unittest import SynchronousTestCase
from twisted.web.test.requesthelper import DummyRequest

from dockerspaces.accounts.identity import Identity
from dockerspaces.accounts.model import Quota
from dockerspaces.web.accesslog import IDENTITY_ATTR
from dockerspaces.web.monitor import MonitorResource, own_view

SNAP: dict[str, Any] = {
    "SourceSlots": [{"State": "Run", "Key": "x:team/a:1:80 env[]#0", "RefInfo": "h:9100"}],
    "TargetSlots": [
        {
            "State": "Run",
            "Key": "x:team/a:1:80 env[]#0",
            "Container": "c-alice",
            "Users": ["alice"],
            "InFlight": 1,
            "RefInfo": "h:9100",
            "LastError": None,
            "SlotType": "x",
            "Port": 9100,
        },
        {
            "State": "Run",
            "Key": "x:team/b:1:80 env[S]#1",
            "Container": "c-bob",
            "Users": ["bob"],
            "InFlight": 2,
            "RefInfo": "h:9101",
            "LastError": "boom",
            "SlotType": "x",
            "Port": 9101,
        },
        {"State": "Free", "Key": None, "Container": None, "Users": [], "InFlight": 0, "Port": 9102},
    ],
    "Queues": {"x:team/a:1:80 env[]#0": 3, "x:team/b:1:80 env[S]#1": 1},
    "QueueUsers": {"x:team/a:1:80 env[]#0": {"alice": 1, "bob": 2}, "x:team/b:1:80 env[S]#1": {"bob": 1}},
    "Estimates": {"x:team/a:1:80 env[]#0": {"Service": 1.0}, "x:team/b:1:80 env[S]#1": {}},
    "Pulls": [{"Ref": "team/b:1"}],
    "Hosts": [{"Name": "local", "Up": True}],
}


def who(user: str, admin: bool = False) -> Identity:
    return Identity(user, ("ml",), frozenset({"monitor"}), (), admin, Quota(), "token")


class OwnViewTests(SynchronousTestCase):
    def test_own_containers_and_queues_only(self) -> None:
        view = own_view(SNAP, "alice")
        mine, bobs, free = view["TargetSlots"]
        self.assertEqual((mine["Container"], mine["InFlight"]), ("c-alice", 1))
        self.assertEqual(bobs, {"State": "Run", "Users": [], "InFlight": 0, "Port": 9101})
        self.assertEqual(free["State"], "Free")
        self.assertEqual(view["Queues"], {"x:team/a:1:80 env[]#0": 1})
        self.assertNotIn("QueueUsers", view)
        self.assertEqual(list(view["Estimates"]), ["x:team/a:1:80 env[]#0"])
        self.assertEqual(view["SourceSlots"][0]["Key"], "")
        self.assertEqual(view["Pulls"], [])
        self.assertNotIn("bob", json.dumps(view))
        self.assertEqual(view["Hosts"], SNAP["Hosts"])

    def test_resource_filters_for_non_admins(self) -> None:
        resource = MonitorResource(lambda: SNAP)
        for identity, sees_bob in ((None, True), (who("root", admin=True), True), (who("alice"), False)):
            request = DummyRequest([b""])
            if identity is not None:
                setattr(request, IDENTITY_ATTR, identity)
            body = resource.render_GET(request)
            self.assertEqual(b"c-bob" in body, sees_bob, identity)
