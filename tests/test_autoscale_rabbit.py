"""Reading a queue through the RabbitMQ management API (dockerspaces.autoscale.rabbit),
against treq.testing.StubTreq and a fake management resource."""

from __future__ import annotations

import json
from typing import cast

from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from dockerspaces.autoscale.policy import Occupancy, Reading
from dockerspaces.autoscale.rabbit import QueueReading, QueueRef, RabbitUnreachable, read_queue

PASSWORD = "s3cret-Pa55"
REF = QueueRef("http://rabbit:15672/", "/", "jobs", "scaler", PASSWORD)

QUEUE = {
    "name": "jobs",
    "messages_ready": 12,
    "messages_unacknowledged": 2,
    "consumers": 3,
    "consumer_details": [
        {"channel_details": {"name": "172.17.0.5:40000 -> 172.17.0.1:5672 (1)", "peer_host": "172.17.0.5"}},
        {"channel_details": {"name": "172.17.0.6:41000 -> 172.17.0.1:5672 (1)", "peer_host": "172.17.0.6"}},
        {"channel_details": {"name": "172.17.0.6:41000 -> 172.17.0.1:5672 (2)", "peer_host": "172.17.0.6"}},
        {"channel_details": []},  # what RabbitMQ sends for a consumer being set up
    ],
}
CHANNELS = [
    {
        "name": "172.17.0.5:40000 -> 172.17.0.1:5672 (1)",
        "messages_unacknowledged": 1,
        "connection_details": {"peer_host": "172.17.0.5"},
    },
    {
        "name": "172.17.0.6:41000 -> 172.17.0.1:5672 (1)",
        "messages_unacknowledged": 0,
        "connection_details": {"peer_host": "172.17.0.6"},
    },
    # no connection_details: placed through the consumer's channel name
    {"name": "172.17.0.6:41000 -> 172.17.0.1:5672 (2)", "messages_unacknowledged": 1},
    {"name": "elsewhere (1)", "messages_unacknowledged": 4},
]


class Management(Resource):
    """A fake management API: answers by path; records what it was asked."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[bytes, tuple[int, bytes]] = {
            b"/api/queues/%2F/jobs": (200, json.dumps(QUEUE).encode()),
            b"/api/vhosts/%2F/channels": (200, json.dumps(CHANNELS).encode()),
        }
        self.seen: list[tuple[bytes, bytes, bytes]] = []
        self.hang = False

    def render_GET(self, request: Request) -> bytes | int:
        path, _, query = (request.uri or b"").partition(b"?")
        self.seen.append((path, query, request.getUser() + b":" + request.getPassword()))
        if self.hang:
            return NOT_DONE_YET
        code, body = self.answers.get(path, (404, b'{"error":"Object Not Found"}'))
        request.setResponseCode(code)
        return body


class ReadQueueTests(SynchronousTestCase):
    """read_queue(): paths, auth, parsing, every failure a RabbitUnreachable."""

    def setUp(self) -> None:
        self.mgmt = Management()
        self.stub = StubTreq(self.mgmt)
        self.clock = Clock()
        self.clock.advance(1000)

    def read(self, ref: QueueRef = REF) -> Deferred[QueueReading]:
        d = read_queue(cast(HTTPClient, self.stub), ref, self.clock, timeout=7)
        self.stub.flush()
        return d

    def fails(self, ref: QueueRef = REF) -> str:
        f = self.failureResultOf(self.read(ref), RabbitUnreachable)
        msg = f.getErrorMessage()
        self.assertNotIn(PASSWORD, msg)
        return msg

    def test_reading(self) -> None:
        """Counts, consumers by address, unacked by address (connection or channel)."""
        r = self.successResultOf(self.read())
        self.assertEqual((r.ready, r.unacked, r.consumers, r.at), (12, 2, 3, 1000))
        self.assertEqual(r.reading(), Reading(12, 2, 3, 1000))
        self.assertEqual(
            r.occupancy(),
            Occupancy({"172.17.0.5": 1, "172.17.0.6": 2}, {"172.17.0.5": 1, "172.17.0.6": 1, "?": 4}),
        )

    def test_paths_vhost_quoted_and_auth(self) -> None:
        """vhost "/" is %2F, the queue name quoted too; basic auth on both requests;
        the channel list asks only for the columns it needs."""
        self.successResultOf(self.read())
        self.assertEqual(
            [s[0] for s in self.mgmt.seen], [b"/api/queues/%2F/jobs", b"/api/vhosts/%2F/channels"]
        )
        self.assertEqual(
            self.mgmt.seen[1][1], b"columns=name,messages_unacknowledged,connection_details.peer_host"
        )
        self.assertEqual({s[2] for s in self.mgmt.seen}, {b"scaler:" + PASSWORD.encode()})
        ref = QueueRef("http://rabbit:15672", "team a/b", "q/1 x", "u", "p")
        self.assertEqual(ref.queue_url, "http://rabbit:15672/api/queues/team%20a%2Fb/q%2F1%20x")
        self.assertTrue(ref.channels_url.startswith("http://rabbit:15672/api/vhosts/team%20a%2Fb/channels?"))

    def test_password_not_in_repr(self) -> None:
        self.assertNotIn(PASSWORD, repr(REF))
        self.assertIn("scaler", repr(REF))

    def test_http_errors(self) -> None:
        self.mgmt.answers[b"/api/queues/%2F/jobs"] = (401, b"{}")
        self.assertIn("refused user 'scaler' (401)", self.fails())
        del self.mgmt.answers[b"/api/queues/%2F/jobs"]
        self.assertIn("not found (404)", self.fails())
        self.mgmt.answers[b"/api/queues/%2F/jobs"] = (500, b"boom")
        self.assertIn("HTTP 500", self.fails())

    def test_bad_json(self) -> None:
        self.mgmt.answers[b"/api/queues/%2F/jobs"] = (200, b"<html>")
        self.assertIn("not JSON", self.fails())
        self.mgmt.answers[b"/api/queues/%2F/jobs"] = (200, b"[]")
        self.assertIn("not an object", self.fails())
        self.mgmt.answers[b"/api/queues/%2F/jobs"] = (200, b'{"messages_ready": 1}')
        self.assertIn("no 'messages_unacknowledged' statistics yet", self.fails())
        self.mgmt.answers[b"/api/queues/%2F/jobs"] = (
            200,
            b'{"messages_ready": -1, "messages_unacknowledged": 0, "consumers": 0}',
        )
        self.assertIn("not a count", self.fails())
        self.mgmt.answers[b"/api/queues/%2F/jobs"] = (200, json.dumps(QUEUE).encode())
        self.mgmt.answers[b"/api/vhosts/%2F/channels"] = (200, b"{}")
        self.assertIn("not a list", self.fails())

    def test_timeout(self) -> None:
        """No answer within the timeout: RabbitUnreachable saying so."""
        self.mgmt.hang = True
        d = self.read()
        self.assertNoResult(d)
        self.clock.advance(7)
        f = self.failureResultOf(d, RabbitUnreachable)
        self.assertIn("no answer within 7s", f.getErrorMessage())

    def test_connection_failure_never_shows_the_password(self) -> None:
        """Any other failure is wrapped; a password that somehow reaches a message is
        scrubbed."""
        stub = StubTreq(self.mgmt)

        def refused(*a: object, **kw: object) -> Deferred[object]:
            d: Deferred[object] = Deferred()
            d.errback(ConnectionRefusedError(f"refused for {PASSWORD}"))
            return d

        stub.get = refused  # type: ignore[attr-defined]
        f = self.failureResultOf(read_queue(cast(HTTPClient, stub), REF, self.clock), RabbitUnreachable)
        msg = f.getErrorMessage()
        self.assertNotIn(PASSWORD, msg)
        self.assertIn("ConnectionRefusedError", msg)
        self.assertIn("queue 'jobs' on vhost '/' at http://rabbit:15672", msg)
