"""``/monitor:broker/``: the broker's JSON snapshot (with ``--auth accounts``, a
non-admin sees only their own containers and queues: :func:`own_view`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request

from .accesslog import IDENTITY_ATTR

#: what a slot shows of a container someone else holds
_OTHERS = ("Container", "Key", "RefInfo", "LastError", "SlotType")


def own_view(snapshot: dict[str, Any], user: str) -> dict[str, Any]:
    """The snapshot as ``user`` may see it: slots keep their state (how busy the house
    is), but only the user's own containers keep their key, id and errors; queues and
    estimates only of keys the user waits for, counting only the user's requests."""
    view = dict(snapshot)
    slots = []
    for s in snapshot.get("TargetSlots", []):
        users = s.get("Users") or []
        if user in users:
            slots.append({**s, "Users": [user]})
        else:
            slots.append({**{k: v for k, v in s.items() if k not in _OTHERS}, "Users": [], "InFlight": 0})
    view["TargetSlots"] = slots
    view["SourceSlots"] = [{**s, "Key": "", "RefInfo": ""} for s in snapshot.get("SourceSlots", [])]
    queues: dict[str, int] = {}
    for key, waiting in (snapshot.get("QueueUsers") or {}).items():
        mine = int(waiting.get(user, 0))
        if mine:
            queues[key] = mine
    view["Queues"] = queues
    view.pop("QueueUsers", None)
    view["Estimates"] = {
        k: v
        for k, v in (snapshot.get("Estimates") or {}).items()
        if k in queues or any(s.get("Key") == k for s in slots)
    }
    view["Pulls"] = []
    return view


class MonitorResource(Resource):
    """Answers GET with the broker snapshot as JSON (no credentials, no env values)."""

    isLeaf = True

    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        super().__init__()
        self.snapshot = snapshot

    def render_GET(self, request: Request) -> bytes:
        """The snapshot as JSON."""
        snapshot = self.snapshot()
        identity = getattr(request, IDENTITY_ATTR, None)
        if identity is not None and not identity.admin:
            snapshot = own_view(snapshot, identity.user)
        body = json.dumps(snapshot, indent=1, sort_keys=False).encode() + b"\n"
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return body

    render_HEAD = render_GET
