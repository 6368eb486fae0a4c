"""The whole service tree (build_service) on in-memory transports: a host: request is
proxied, logged once and counted once, whether it finishes or its client leaves."""

from __future__ import annotations

import io
import ipaddress
import json
from typing import Any

from twisted.application.service import IServiceCollection
from twisted.internet.address import IPv4Address
from twisted.internet.defer import succeed
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.app import ProxyService, build_service
from dockerspaces.hostguard import (
    host_policy,
    own_ports,
)
from dockerspaces.metrics import Metrics
from dockerspaces.options import build_config
from dockerspaces.web.routing import Forbidden

CLIENT = IPv4Address("TCP", "10.9.8.7", 4000)
GET = b"GET /host:10.0.0.7:8080/page?q=secret HTTP/1.1\r\nHost: front\r\n\r\n"


class _Endpoint:
    def __init__(self, backends: list[Any]):
        self.backends = backends

    def connect(self, factory: Any) -> Any:
        p = factory.buildProtocol(None)
        t = StringTransport()
        p.makeConnection(t)
        self.backends.append((p, t))
        return succeed(p)


class AppRequestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.running = True  # the log writer batches per reactor iteration
        self.out = io.StringIO()
        config = build_config({"target": "0", "instance": "t", "port": ["tcp:0"]})
        top = build_service(config, self.reactor, self.out)
        # twistd makes the application's observer the log observer; here: add it
        globalLogPublisher.addObserver(top.observer)  # type: ignore[attr-defined]
        self.addCleanup(globalLogPublisher.removeObserver, top.observer)  # type: ignore[attr-defined]
        services = list(IServiceCollection(top))
        self.backends: list[Any] = []
        proxy = next(s.proxy for s in services if isinstance(s, ProxyService))
        proxy._endpoint_factory = lambda backend: _Endpoint(self.backends)  # type: ignore[assignment,return-value]
        self.site = next(s for s in services if hasattr(s, "factory")).factory
        self.metrics: Metrics = self.site.resource.recorder.metrics

    def client(self) -> tuple[Any, StringTransport]:
        ch = self.site.buildProtocol(CLIENT)
        t = StringTransport(peerAddress=CLIENT)
        t.protocol = ch  # type: ignore[attr-defined]
        ch.makeConnection(t)
        ch.dataReceived(GET)
        return ch, t

    def lines(self) -> list[str]:
        self.reactor.advance(0)
        return [x for x in self.out.getvalue().splitlines() if "dockerspaces.request" in x]

    def test_finished_request(self) -> None:
        _, t = self.client()
        p, bt = self.backends[0]
        self.assertTrue(bt.value().startswith(b"GET /page?q=secret HTTP/1.1\r\n"))
        p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(t.value().endswith(b"\r\n\r\nok"))
        (line,) = self.lines()
        self.assertIn("host 10.0.0.7:8080 GET /host:10.0.0.7:8080/page?q=… -> 200 2B", line)
        self.assertEqual(self.metrics.requests.get("host", "200"), 1)
        self.assertEqual(self.metrics.in_flight.get("host"), 0)

    def test_client_gone_is_logged_once_as_499(self) -> None:
        ch, _ = self.client()
        _, bt = self.backends[0]
        ch.connectionLost(Failure(ConnectionLost()))
        self.assertTrue(bt.disconnecting)  # the backend request is abandoned
        (line,) = self.lines()
        self.assertIn("-> 499 0B", line)
        self.assertIn("(client-gone)", line)
        self.assertEqual(self.metrics.requests.get("host", "499"), 1)
        self.assertEqual(self.metrics.in_flight.get("host"), 0)

    def test_repeated_requests_take_the_cached_route(self) -> None:
        """The second request on a route takes the root's and the host route's cached
        plans: proxied, logged and counted the same."""
        for _ in range(3):
            _, t = self.client()
            p, bt = self.backends[-1]
            self.assertTrue(bt.value().startswith(b"GET /page?q=secret HTTP/1.1\r\n"))
            bt.clear()
            p.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            self.assertTrue(t.value().endswith(b"\r\n\r\nok"))
        self.assertEqual(len(self.backends), 1)  # one pooled backend connection
        self.assertEqual(len(self.lines()), 3)
        self.assertEqual(self.metrics.requests.get("host", "200"), 3)
        self.assertEqual(self.metrics.request_seconds.count("host"), 3)

    def test_request_lines_bypass_the_publisher_only_for_our_text_log(self) -> None:
        """Text log written by us: request lines go straight to it (no event); JSON: an
        event each, as every other observer sees it."""
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        _, t = self.client()
        self.backends[0][0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(t.value().endswith(b"\r\n\r\nok"))
        self.assertEqual(len(self.lines()), 1)
        self.assertEqual([e for e in events if e.get("ds_event") == "request"], [])

        out = io.StringIO()
        config = build_config({"target": "0", "instance": "t", "port": ["tcp:0"], "log-format": "json"})
        top = build_service(config, self.reactor, out)
        globalLogPublisher.addObserver(top.observer)  # type: ignore[attr-defined]
        self.addCleanup(globalLogPublisher.removeObserver, top.observer)  # type: ignore[attr-defined]
        services = list(IServiceCollection(top))
        proxy = next(s.proxy for s in services if isinstance(s, ProxyService))
        proxy._endpoint_factory = lambda backend: _Endpoint(self.backends)  # type: ignore[assignment,return-value]
        self.site = next(s for s in services if hasattr(s, "factory")).factory
        _, t = self.client()
        self.backends[-1][0].dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.assertTrue(t.value().endswith(b"\r\n\r\nok"))
        self.reactor.advance(0)
        (event,) = [e for e in events if e.get("ds_event") == "request"]
        self.assertEqual(
            (event["ds_kind"], event["ds_status"], event["ds_client"]), ("host", 200, "10.9.8.7")
        )
        record = json.loads(out.getvalue().splitlines()[-1])
        self.assertEqual((record["path"], record["status"]), ("/host:10.0.0.7:8080/page?q=…", 200))


class _Harness(SynchronousTestCase):
    """build_service with options; raw requests in, answers and log lines out."""

    def make(self, **options: Any) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.running = True
        self.out = io.StringIO()
        config = build_config({"target": "0", "instance": "t", "port": ["tcp:0"], **options})
        top = self.top = build_service(config, self.reactor, self.out)
        globalLogPublisher.addObserver(top.observer)  # type: ignore[attr-defined]
        self.addCleanup(globalLogPublisher.removeObserver, top.observer)  # type: ignore[attr-defined]
        services = list(IServiceCollection(top))
        self.site = next(s for s in services if hasattr(s, "factory")).factory
        self.metrics: Metrics = self.site.resource.recorder.metrics

    def get(self, raw: bytes) -> bytes:
        ch = self.site.buildProtocol(CLIENT)
        t = StringTransport(peerAddress=CLIENT)
        t.protocol = ch  # type: ignore[attr-defined]
        ch.makeConnection(t)
        ch.dataReceived(raw)
        self.reactor.advance(0)
        return bytes(t.value())

    def lines(self) -> list[str]:
        return [x for x in self.out.getvalue().splitlines() if "dockerspaces.request" in x]


class AnswersOfTheRootTests(_Harness):
    """400, 404 and 308 from the root itself are logged and counted like any other;
    --no-host-route turns host:/shost: off."""

    def test_400_404_308_logged_and_counted(self) -> None:
        self.make()
        self.assertTrue(self.get(b"GET /x:Bad%00:1 HTTP/1.1\r\nHost: f\r\n\r\n").startswith(b"HTTP/1.1 400"))
        self.assertTrue(self.get(b"GET /nowhere HTTP/1.1\r\nHost: f\r\n\r\n").startswith(b"HTTP/1.1 404"))
        self.assertTrue(
            self.get(b"GET /host:example.org:80 HTTP/1.1\r\nHost: f\r\n\r\n").startswith(b"HTTP/1.1 308")
        )
        statuses = [line.split("-> ")[1].split(" ")[0] for line in self.lines()]
        self.assertEqual(statuses, ["400", "404", "308"])
        self.assertEqual(self.metrics.requests.get("bad", "400"), 1)
        self.assertEqual(self.metrics.requests.get("none", "404"), 1)
        self.assertEqual(self.metrics.requests.get("host", "308"), 1)

    def test_no_host_route(self) -> None:
        self.make(**{"no-host-route": True})
        answer = self.get(b"GET /host:10.0.0.7:8080/ HTTP/1.1\r\nHost: f\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 404"), answer[:80])
        self.assertIn(b"--no-host-route", answer)

    def test_monitor_other_methods_are_405(self) -> None:
        """Not twisted.web's 501 "Huh?": a 405 naming the methods allowed."""
        self.make()
        answer = self.get(b"PUT /monitor:metrics HTTP/1.1\r\nHost: f\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 405"), answer[:80])
        self.assertIn(b"Allow: GET, HEAD", answer)


class RefusedAndBadAnswersTests(_Harness):
    """What the channel refuses before routing (400, 413, 414, 431) is logged and
    counted too; a bad route's log line shows no env value."""

    def test_refused_heads_logged_and_counted(self) -> None:
        self.make(**{"max-body": "100"})
        answers = [
            self.get(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: f\r\n\r\n"),
            self.get(b"GET /p?k=v HTTP/1.1\r\nHost: f\r\nX: " + b"a" * 16_500 + b"\r\n\r\n"),
            self.get(b"GET  /p HTTP/1.1\r\nHost: f\r\n\r\n"),
            self.get(b"POST /x:a:1:80:T=s3cr3t/ HTTP/1.1\r\nHost: f\r\nContent-Length: 101\r\n\r\n"),
        ]
        self.assertEqual([a[9:12] for a in answers], [b"414", b"431", b"400", b"413"])
        lines = self.lines()
        self.assertEqual(len(lines), 4, lines)
        self.assertIn("bad - GET /" + "a" * 195 + " -> 414 0B", lines[0])
        self.assertIn("(uri-too-long)", lines[0])
        self.assertIn("bad - GET /p?k=… -> 431 0B", lines[1])
        self.assertIn("-> 400 0B", lines[2])
        self.assertIn("(bad-request)", lines[2])
        self.assertIn("-> 413 0B", lines[3])
        self.assertNotIn("s3cr3t", "\n".join(lines))
        for status in ("414", "431", "400", "413"):
            self.assertEqual(self.metrics.requests.get("bad", status), 1, status)
        self.assertEqual(self.metrics.in_flight.get("bad"), 0)

    def test_bad_route_logged_without_env_values(self) -> None:
        self.make()
        answer = self.get(b"GET /x:A:1:80:TOKEN=s3cr3t/ HTTP/1.1\r\nHost: f\r\n\r\n")
        self.assertTrue(answer.startswith(b"HTTP/1.1 400"), answer[:60])
        (line,) = self.lines()
        self.assertIn("bad x:A:1:80:TOKEN=… GET", line)
        self.assertNotIn("s3cr3t", line)
        self.assertEqual(self.metrics.requests.get("bad", "400"), 1)

    def test_no_host_route_keeps_root(self) -> None:
        """--no-host-route turns host:/shost: off, also through a Referer; --root (the
        operator's own target) still answers."""
        self.make(**{"no-host-route": True, "root": "10.0.0.7:8080"})
        backends: list[Any] = []
        proxy = next(s.proxy for s in IServiceCollection(self.top) if isinstance(s, ProxyService))
        proxy._endpoint_factory = lambda backend: _Endpoint(backends)  # type: ignore[assignment,return-value]
        for raw in (
            b"GET /shost:example.org/ HTTP/1.1\r\nHost: f\r\n\r\n",
            b"GET /a.js HTTP/1.1\r\nHost: f\r\nReferer: /host:10.0.0.8:80/\r\n\r\n",
        ):
            answer = self.get(raw)
            self.assertTrue(answer.startswith(b"HTTP/1.1 404"), answer[:60])
            self.assertIn(b"--no-host-route", answer)
        self.assertEqual(backends, [])
        self.get(b"GET /page HTTP/1.1\r\nHost: f\r\n\r\n")
        ((_, bt),) = backends
        self.assertTrue(bt.value().startswith(b"GET /page HTTP/1.1\r\n"))
        self.assertIn(b"Host: 10.0.0.7:8080\r\n", bt.value())


class HostPolicyWiringTests(_Harness):
    """The host: policy as build_service wires it: engines and peers refused on every
    port, Docker networks learnt from the engines while running (a host: segment's
    cached verdict follows), own ports in every strports form."""

    def test_engines_and_peers_refused_on_every_port(self) -> None:
        config = build_config(
            {
                "instance": "t",
                "port": ["tcp:0"],
                "cluster": [
                    "9100:1:tcp://10.1.2.3:2375",
                    "9200:1:http://10.1.2.4:7878/docker:local",
                    "9300:1:ssh://ops@10.1.2.5",
                ],
            }
        )
        policy = host_policy(config, config.hosts(), MemoryReactorClock())
        for ip in ("10.1.2.3", "10.1.2.4", "10.1.2.5"):
            for port in (22, 2375, 7878, 8080, 9100):
                with self.assertRaises(Forbidden) as e:
                    policy.check_literal(ip, port)
                self.assertIn("Docker engine or peer", e.exception.reason)
        self.assertEqual(policy.check_literal("10.1.2.6", 2375), "10.1.2.6")
        allowed = host_policy(
            build_config(
                {
                    "instance": "t",
                    "port": ["tcp:0"],
                    "allow-host": ["10.1.2.3"],
                    "cluster": ["9100:1:tcp://10.1.2.3:2375"],
                }
            ),
            config.hosts()[:1],
            MemoryReactorClock(),
        )
        self.assertEqual(allowed.check_literal("10.1.2.3", 8080), "10.1.2.3")

    def test_own_ports_every_strports_form(self) -> None:
        config = build_config(
            {
                "instance": "t",
                "port": [
                    "tcp:8888",
                    "tcp:port=8889:interface=127.0.0.1",
                    "ssl:port=8443:privateKey=k.pem",
                    "ssl:8444:privateKey=k.pem",
                    "tcp6:port=9000:interface=\\:\\:1",
                    "unix:/tmp/ds.sock",
                ],
            }
        )
        self.assertEqual(own_ports(config), {8888, 8889, 8443, 8444, 9000})
        policy = host_policy(config, config.hosts(), MemoryReactorClock())
        for port in (8888, 8889, 8443, 8444, 9000):
            with self.assertRaises(Forbidden) as e:
                policy.check_literal("127.0.0.1", port)
            self.assertIn("own port", e.exception.reason)

    def test_host_route_follows_policy_updates(self) -> None:
        """A host: segment's shared resource caches its literal's verdict; when an
        engine's networks arrive later, the next request is refused."""
        self.make()
        backends: list[Any] = []
        proxy = next(s.proxy for s in IServiceCollection(self.top) if isinstance(s, ProxyService))
        proxy._endpoint_factory = lambda backend: _Endpoint(backends)  # type: ignore[assignment,return-value]
        raw = b"GET /host:10.77.0.5:8080/ HTTP/1.1\r\nHost: f\r\n\r\n"
        self.get(raw)
        self.assertEqual(len(backends), 1)
        policy = self.site.resource.routes.policy
        policy.update("engine:local", networks=[ipaddress.ip_network("10.77.0.0/24")])
        answer = self.get(raw)
        self.assertTrue(answer.startswith(b"HTTP/1.1 403"), answer[:60])
        self.assertIn(b"Docker network", answer)
        self.assertEqual(len(backends), 1)

    def test_root_refused_is_warned_at_start(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        self.make(root="127.0.0.1:8080")
        warned = [e for e in events if "--root" in str(e.get("log_format", ""))]
        self.assertEqual(len(warned), 1)
        self.assertIn("loopback", warned[0]["why"])
