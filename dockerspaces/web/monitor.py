"""``/monitor:broker/``: the broker's JSON snapshot."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.web.resource import Resource
from twisted.web.server import Request


class MonitorResource(Resource):
    """Answers GET with the broker snapshot as JSON (no credentials, no env values)."""

    isLeaf = True

    def __init__(self, snapshot: Callable[[], dict[str, Any]]):
        super().__init__()
        self.snapshot = snapshot

    def render_GET(self, request: Request) -> bytes:
        """The snapshot as JSON."""
        body = json.dumps(self.snapshot(), indent=1, sort_keys=False).encode() + b"\n"
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return body

    render_HEAD = render_GET
