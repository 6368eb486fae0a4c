"""Unit tests for :mod:`dockerspaces.web.dockerapi` (no sockets: DummyRequest + a fake proxy)."""

from __future__ import annotations

import ipaddress
import os
from typing import Any

from attrs import define, field
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from dockerspaces.config import Config, ConfigError, HostConfig
from dockerspaces.web.backend import Backend
from dockerspaces.web.dockerapi import (
    TOKEN_HEADER,
    DockerApiResource,
    caller_ip,
    check_config,
    engine_target,
    load_token,
    parse_networks,
    peer_headers,
    read_token,
    redact_api_path,
)
from dockerspaces.web.errors import ErrorResource
from dockerspaces.web.proxy import Proxy
from dockerspaces.web.root import Root
from dockerspaces.web.site import make_site

TOKEN = "s3cr3t-T0ken"
SOCK = Backend.unix("/var/run/docker.sock")


@define
class FakeProxy:
    """Records every forward call instead of connecting anywhere."""

    calls: list[dict[str, Any]] = field(factory=list)

    def forward(
        self,
        request: Any,
        backend: Backend,
        path: bytes,
        *,
        prefix: bytes,
        host_header: bytes | None,
        on_end: Any = None,
        cors: bool = True,
    ) -> Any:
        self.calls.append(
            {
                "request": request,
                "backend": backend,
                "path": path,
                "prefix": prefix,
                "host_header": host_header,
                "on_end": on_end,
                "cors": cors,
                "headers": dict(request.requestHeaders.getAllRawHeaders()),
            }
        )
        return NOT_DONE_YET


def make_request(
    uri: bytes, method: bytes = b"GET", client: Any = None, headers: dict[str, str] | None = None
) -> DummyRequest:
    req = DummyRequest([])
    req.client = client or IPv4Address("TCP", "127.0.0.1", 40000)
    req.uri = uri
    req.method = method
    for k, v in (headers or {}).items():
        req.requestHeaders.addRawHeader(k.encode(), v.encode())
    return req


def body_of(req: DummyRequest, result: Any) -> str:
    assert isinstance(result, bytes)
    return result.decode("utf-8")


class GateTests(TestCase):
    """Allow-list and token checks."""

    def setUp(self) -> None:
        self.proxy = FakeProxy()
        self.events: list[dict[str, Any]] = []

    def gate(
        self, token: str | None = None, allow: tuple[str, ...] = ("127.0.0.0/8",), engine_path: bytes = b""
    ) -> DockerApiResource:
        res = DockerApiResource(
            Config(docker_api=True), self.proxy, SOCK, token, parse_networks(allow), engine_path=engine_path
        )
        res.log = Logger(observer=self.events.append)
        return res

    def test_loopback_allowed_prefix_stripped(self) -> None:
        """An allowed caller is forwarded to the engine, the /docker:local prefix removed."""
        req = make_request(b"/docker:local/v1.41/containers/json?all=1")
        result = self.gate().render(req)
        self.assertIs(result, NOT_DONE_YET)
        [call] = self.proxy.calls
        self.assertEqual(call["path"], b"/v1.41/containers/json?all=1")
        self.assertEqual(call["backend"], SOCK)
        self.assertEqual(call["prefix"], b"/docker:local")
        self.assertIsNone(req.responseCode)

    def test_ping_and_bare_prefix(self) -> None:
        """``/docker:local/_ping`` becomes ``/_ping``; a bare ``/docker:local`` becomes ``/``."""
        gate = self.gate()
        gate.render(make_request(b"/docker:local/_ping", method=b"HEAD"))
        gate.render(make_request(b"/docker:local"))
        self.assertEqual([c["path"] for c in self.proxy.calls], [b"/_ping", b"/"])

    def test_never_cors(self) -> None:
        """The Docker API is forwarded with CORS refused (no headers, even with --cors)."""
        self.gate().render(make_request(b"/docker:local/_ping"))
        self.assertIs(self.proxy.calls[0]["cors"], False)

    def test_engine_path_prepended(self) -> None:
        """An http:// engine URL with a path keeps that path in front."""
        self.gate(engine_path=b"/docker:local/").render(make_request(b"/docker:local/_ping"))
        self.assertEqual(self.proxy.calls[0]["path"], b"/docker:local/_ping")

    def test_outside_allow_list(self) -> None:
        """A caller outside --docker-api-allow gets 403 naming its address; nothing forwarded."""
        req = make_request(b"/docker:local/_ping", client=IPv4Address("TCP", "10.1.2.3", 5))
        body = body_of(req, self.gate().render(req))
        self.assertEqual(req.responseCode, 403)
        self.assertIn("10.1.2.3", body)
        self.assertIn("--docker-api-allow", body)
        self.assertIn("127.0.0.0/8", body)
        self.assertEqual(self.proxy.calls, [])

    def test_custom_allow_list(self) -> None:
        """A configured network admits its callers and no longer admits loopback."""
        gate = self.gate(allow=("10.0.0.0/8", "fd00::/8"))
        gate.render(make_request(b"/docker:local/_ping", client=IPv4Address("TCP", "10.9.9.9", 1)))
        gate.render(make_request(b"/docker:local/_ping", client=IPv6Address("TCP", "fd00::5", 1)))
        self.assertEqual(len(self.proxy.calls), 2)
        req = make_request(b"/docker:local/_ping")
        gate.render(req)
        self.assertEqual(req.responseCode, 403)
        self.assertEqual(len(self.proxy.calls), 2)

    def test_ipv4_mapped(self) -> None:
        """``::ffff:127.0.0.1`` (a dual-stack listener) counts as 127.0.0.1."""
        req = make_request(b"/docker:local/_ping", client=IPv6Address("TCP", "::ffff:127.0.0.1", 1))
        self.gate().render(req)
        self.assertEqual(len(self.proxy.calls), 1)
        self.assertEqual(str(caller_ip(req)), "127.0.0.1")

    def test_ipv6_loopback_not_in_default(self) -> None:
        """``::1`` is not inside the default 127.0.0.0/8."""
        req = make_request(b"/docker:local/_ping", client=IPv6Address("TCP", "::1", 1))
        self.gate().render(req)
        self.assertEqual(req.responseCode, 403)

    def test_unix_caller_refused(self) -> None:
        """A caller on a UNIX socket has no address to check: 403."""
        req = make_request(b"/docker:local/_ping", client=UNIXAddress(b"/tmp/ds.sock"))
        body = body_of(req, self.gate().render(req))
        self.assertEqual(req.responseCode, 403)
        self.assertIn("IP address", body)
        self.assertEqual(self.proxy.calls, [])

    def test_forwarded_for_ignored(self) -> None:
        """X-Forwarded-For does not make a remote caller local."""
        req = make_request(
            b"/docker:local/_ping",
            client=IPv4Address("TCP", "192.0.2.7", 1),
            headers={"X-Forwarded-For": "127.0.0.1"},
        )
        self.gate().render(req)
        self.assertEqual(req.responseCode, 403)

    def test_token_missing(self) -> None:
        """With a token configured, a request without the header gets 403 naming the header."""
        req = make_request(b"/docker:local/_ping")
        body = body_of(req, self.gate(token=TOKEN).render(req))
        self.assertEqual(req.responseCode, 403)
        self.assertIn(TOKEN_HEADER, body)
        self.assertIn("HttpHeaders", body)
        self.assertNotIn(TOKEN, body)
        self.assertEqual(self.proxy.calls, [])

    def test_token_wrong(self) -> None:
        """A wrong token: 403 "wrong", the real token never shown."""
        for bad in ("nope", TOKEN + "x", TOKEN[:-1], ""):
            req = make_request(b"/docker:local/_ping", headers={TOKEN_HEADER: bad})
            body = body_of(req, self.gate(token=TOKEN).render(req))
            self.assertEqual(req.responseCode, 403, bad)
            self.assertIn("wrong", body)
            self.assertNotIn(TOKEN, body)
        self.assertEqual(self.proxy.calls, [])
        self.assertFalse(any(TOKEN in formatEvent(e) for e in self.events))

    def test_token_twice(self) -> None:
        """Two token headers (even one right) are refused."""
        req = make_request(b"/docker:local/_ping")
        req.requestHeaders.setRawHeaders(TOKEN_HEADER, [b"nope", TOKEN.encode()])
        self.gate(token=TOKEN).render(req)
        self.assertEqual(req.responseCode, 403)

    def test_token_right_is_forwarded_and_stripped(self) -> None:
        """The right token is accepted; the header does not travel on to the engine."""
        req = make_request(b"/docker:local/v1.41/info", headers={TOKEN_HEADER: TOKEN})
        self.assertIs(self.gate(token=TOKEN).render(req), NOT_DONE_YET)
        [call] = self.proxy.calls
        self.assertEqual(call["path"], b"/v1.41/info")
        self.assertNotIn(TOKEN_HEADER.lower().encode(), {k.lower() for k in call["headers"]})

    def test_token_does_not_bypass_allow_list(self) -> None:
        """The right token from outside the allow-list is still refused."""
        req = make_request(
            b"/docker:local/_ping", client=IPv4Address("TCP", "10.1.1.1", 1), headers={TOKEN_HEADER: TOKEN}
        )
        self.gate(token=TOKEN).render(req)
        self.assertEqual(req.responseCode, 403)

    def test_head_denied_has_no_body(self) -> None:
        """A refused HEAD (the CLI's first ping) gets 403 with an empty body."""
        req = make_request(b"/docker:local/_ping", method=b"HEAD")
        self.assertEqual(self.gate(token=TOKEN).render(req), b"")
        self.assertEqual(req.responseCode, 403)


class LoggingTests(TestCase):
    """One log line per mutating call; reads are not logged."""

    def setUp(self) -> None:
        self.proxy = FakeProxy()
        self.events: list[dict[str, Any]] = []
        self.gate = DockerApiResource(
            Config(docker_api=True), self.proxy, SOCK, None, parse_networks(["127.0.0.0/8"])
        )
        self.gate.log = Logger(observer=self.events.append)

    def test_mutating_logged(self) -> None:
        """POST/DELETE/PUT: one line each with method, path and caller."""
        self.gate.render(make_request(b"/docker:local/v1.41/containers/create?name=web", method=b"POST"))
        self.gate.render(
            make_request(
                b"/docker:local/v1.41/containers/abc?force=1",
                method=b"DELETE",
                client=IPv4Address("TCP", "127.0.0.9", 1),
            )
        )
        self.gate.render(make_request(b"/docker:local/v1.41/containers/abc/archive?path=/x", method=b"PUT"))
        lines = [formatEvent(e) for e in self.events]
        self.assertEqual(len(lines), 3)
        self.assertEqual(lines[0], "docker-api: POST /v1.41/containers/create?name=web from 127.0.0.1")
        self.assertEqual(lines[1], "docker-api: DELETE /v1.41/containers/abc?force=1 from 127.0.0.9")
        self.assertIn("PUT /v1.41/containers/abc/archive", lines[2])
        self.assertEqual(len(self.proxy.calls), 3)

    def test_reads_not_logged(self) -> None:
        """GET and HEAD are forwarded without a log line."""
        self.gate.render(make_request(b"/docker:local/v1.41/containers/json"))
        self.gate.render(make_request(b"/docker:local/_ping", method=b"HEAD"))
        self.assertEqual(self.events, [])
        self.assertEqual(len(self.proxy.calls), 2)

    def test_secret_query_redacted(self) -> None:
        """Build args and the like never reach the log."""
        self.gate.render(
            make_request(
                b"/docker:local/v1.41/build?t=app%3A1&target=prod"
                b"&buildargs=%7B%22PASSWORD%22%3A%22hunter2%22%7D",
                method=b"POST",
            )
        )
        [line] = [formatEvent(e) for e in self.events]
        self.assertNotIn("hunter2", line)
        self.assertIn("t=app:1", line)
        self.assertIn("target=prod", line)
        self.assertIn("buildargs=…", line)

    def test_refusal_logged(self) -> None:
        """A refused call is logged as refused, with the reason and no token."""
        gate = DockerApiResource(
            Config(docker_api=True), self.proxy, SOCK, TOKEN, parse_networks(["127.0.0.0/8"])
        )
        gate.log = Logger(observer=self.events.append)
        gate.render(
            make_request(
                b"/docker:local/v1.41/containers/create", method=b"POST", headers={TOKEN_HEADER: "guess"}
            )
        )
        [line] = [formatEvent(e) for e in self.events]
        self.assertIn("refused POST /v1.41/containers/create from 127.0.0.1", line)
        self.assertIn("wrong", line)
        self.assertNotIn(TOKEN, line)
        self.assertNotIn("guess", line)
        self.assertEqual(self.proxy.calls, [])


class HelperTests(TestCase):
    """Configuration helpers."""

    def test_engine_target(self) -> None:
        """Engine URLs map to proxy backends (+ a path prefix for http:// with a path)."""
        self.assertEqual(
            engine_target("unix:///var/run/docker.sock"), (Backend("unix:/var/run/docker.sock"), b"")
        )
        self.assertEqual(
            engine_target("unix:///run/user/1000/docker.sock")[0].description,
            "unix:/run/user/1000/docker.sock",
        )
        self.assertEqual(engine_target("tcp://10.0.0.2:2375"), (Backend("tcp:10.0.0.2:2375"), b""))
        self.assertEqual(
            engine_target("http://10.0.0.2:7878/docker:local/"),
            (Backend("tcp:10.0.0.2:7878"), b"/docker:local"),
        )
        for bad in ("ssh://me@host", "https://host:2376"):
            self.assertRaises(ConfigError, engine_target, bad)

    def test_from_config(self) -> None:
        """from_config reads the engine URL, the allow-list and the token file."""
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "token")
        with open(path, "w") as f:
            f.write(f"  {TOKEN}  \nignored second line\n")
        cfg = Config(
            docker="tcp://127.0.0.1:2375",
            docker_api=True,
            docker_api_allow=("10.0.0.0/8", "192.168.1.1"),
            docker_api_token_file=path,
        )
        proxy = FakeProxy()
        res = DockerApiResource.from_config(cfg, proxy)
        self.assertEqual(res.engine_backend, Backend("tcp:127.0.0.1:2375"))
        self.assertEqual(
            res.allow_networks, (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.168.1.1/32"))
        )
        self.assertEqual(load_token(cfg), TOKEN)
        req = make_request(
            b"/docker:local/_ping", client=IPv4Address("TCP", "192.168.1.1", 1), headers={TOKEN_HEADER: TOKEN}
        )
        res.render(req)
        self.assertEqual(len(proxy.calls), 1)

    def test_read_token_errors(self) -> None:
        """Missing, empty and non-ASCII token files are configuration errors."""
        d = self.mktemp()
        os.makedirs(d)
        empty, bad = os.path.join(d, "empty"), os.path.join(d, "bad")
        with open(empty, "w") as f:
            f.write("\n")
        with open(bad, "w", encoding="utf-8") as f:
            f.write("tök en\n")
        for p in (empty, bad, os.path.join(d, "missing")):
            e = self.assertRaises(ConfigError, read_token, p)
            self.assertIn("--docker-api-token-file", str(e))
        self.assertIsNone(load_token(Config()))

    def test_check_config(self) -> None:
        """Start-up validation: a missing token file, an ssh engine with --docker-api."""
        check_config(Config())
        check_config(Config(docker="ssh://me@host"))  # not proxied without --docker-api
        e = self.assertRaises(ConfigError, check_config, Config(docker="ssh://me@host", docker_api=True))
        self.assertIn("ssh://", str(e))
        e = self.assertRaises(ConfigError, check_config, Config(docker_api_token_file=self.mktemp()))
        self.assertIn("--docker-api-token-file", str(e))

    def test_parse_networks_error(self) -> None:
        """A bad CIDR names the option."""
        e = self.assertRaises(ConfigError, parse_networks, ["10.0.0.0/99"])
        self.assertIn("--docker-api-allow", str(e))

    def test_peer_headers(self) -> None:
        """The token goes only to peers (http URLs with a path), and only when configured."""
        peer = HostConfig("p", "http://10.0.0.2:7878/docker:local", 19100, 5)
        local = HostConfig("local", "unix:///var/run/docker.sock", 12100, 5)
        plain = HostConfig("e", "tcp://10.0.0.3:2375", 13100, 5)
        self.assertEqual(peer_headers(peer, TOKEN), {TOKEN_HEADER: TOKEN})
        self.assertIsNone(peer_headers(local, TOKEN))
        self.assertIsNone(peer_headers(plain, TOKEN))
        self.assertIsNone(peer_headers(peer, None))

    def test_redact_api_path(self) -> None:
        """Paths without a query stay as they are; secret-looking values are hidden."""
        self.assertEqual(redact_api_path(b"/v1.41/containers/abc/start"), "/v1.41/containers/abc/start")
        self.assertEqual(
            redact_api_path(b"/v1.41/images/create?fromImage=busybox&tag=1"),
            "/v1.41/images/create?fromImage=busybox&tag=1",
        )
        self.assertEqual(redact_api_path(b"/x?registryAuth=abc&X-Token=q"), "/x?registryAuth=…&X-Token=…")


# -- --cors never reaches /docker:local (issue 12 item 8) ------------------------------


class _Leaf(Resource):
    isLeaf = True

    def render(self, request: Any) -> bytes:
        return b"ok"


@define
class _Routes:
    """Root's route builders: /docker:local is the gate (or disabled), the rest a leaf."""

    gate: Resource

    def job(self, spec: Any, prefix: bytes, path: bytes) -> Resource:
        return _Leaf()

    def host(self, target: Any, prefix: bytes, path: bytes, cookie: bool) -> Resource:
        return _Leaf()

    def host_route(self, target: Any, prefix: bytes) -> Resource:
        return _Leaf()

    def monitor(self, route: Any) -> Resource:
        return _Leaf()

    def docker_api(self, path: bytes) -> Resource:
        return self.gate


ORIGIN = b"Origin: https://app.example\r\n"
PREFLIGHT = ORIGIN + b"Access-Control-Request-Method: DELETE\r\n"


class CorsThroughTheRootTests(SynchronousTestCase):
    """With ``--cors`` the whole path (root, gate, proxy) keeps CORS off the engine API:
    neither our headers nor the engine's own, and a preflight is not answered for it."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.pending: list[tuple[Any, Deferred[Any]]] = []

        class Endpoint:
            def connect(_, factory: Any) -> Deferred[Any]:
                d: Deferred[Any] = Deferred()
                self.pending.append((factory, d))
                return d

        endpoint: Any = Endpoint()
        self.proxy = Proxy(self.clock, endpoint_factory=lambda b: endpoint, cors=True)
        config = Config(cors=True, docker_api=True)
        self.gate = DockerApiResource(config, self.proxy, SOCK, None, parse_networks(("127.0.0.0/8",)))
        self.routes = _Routes(self.gate)
        self.site = make_site(Root(config, self.routes), self.clock, max_body=1 << 20)

    def send(self, head: bytes, client: str = "127.0.0.1") -> StringTransport:
        addr = IPv4Address("TCP", client, 40000)
        channel = self.site.buildProtocol(addr)
        t = StringTransport(peerAddress=addr)
        channel.makeConnection(t)
        channel.dataReceived(head + b"\r\n")
        return t

    def engine_answers(self, response: bytes) -> bytes:
        """The pending engine connection is made and answers ``response``; returns
        what the engine was sent."""
        factory, d = self.pending.pop(0)
        p = factory.buildProtocol(None)
        bt = StringTransport()
        p.makeConnection(bt)
        d.callback(p)
        sent = bt.value()
        p.dataReceived(response)
        return sent

    def answer(self, t: StringTransport) -> tuple[int, dict[bytes, list[bytes]]]:
        head = t.value().split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        headers: dict[bytes, list[bytes]] = {}
        for line in head[1:]:
            k, _, v = line.partition(b":")
            headers.setdefault(k.strip().lower(), []).append(v.strip())
        return int(head[0].split(b" ")[1]), headers

    def cors_of(self, headers: dict[bytes, list[bytes]]) -> list[bytes]:
        return [k for k in headers if k.startswith(b"access-control-")]

    def test_engine_answers_carry_no_cors(self) -> None:
        t = self.send(b"GET /docker:local/_ping HTTP/1.1\r\nHost: f\r\n" + ORIGIN)
        self.engine_answers(
            b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: *\r\n"
            b"Access-Control-Allow-Credentials: true\r\nVary: Accept\r\n"
            b"Content-Length: 2\r\n\r\nOK"
        )
        status, headers = self.answer(t)
        self.assertEqual(status, 200)
        self.assertEqual(self.cors_of(headers), [])
        self.assertEqual(headers[b"vary"], [b"Accept"])
        self.assertTrue(t.value().endswith(b"\r\n\r\nOK"))

    def test_preflight_is_not_answered_for_the_engine(self) -> None:
        """A preflight goes through the gate like any request (here: to the engine,
        whose own allow headers are removed); it never gets our 204 with allow headers."""
        t = self.send(b"OPTIONS /docker:local/v1.41/containers/x HTTP/1.1\r\nHost: f\r\n" + PREFLIGHT)
        sent = self.engine_answers(
            b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: https://app.example\r\n"
            b"Access-Control-Allow-Methods: DELETE\r\nContent-Length: 0\r\n\r\n"
        )
        self.assertTrue(sent.startswith(b"OPTIONS /v1.41/containers/x HTTP/1.1\r\n"))
        status, headers = self.answer(t)
        self.assertEqual(status, 200)
        self.assertEqual(self.cors_of(headers), [])

    def test_refused_and_disabled_answers_carry_no_cors(self) -> None:
        t = self.send(b"OPTIONS /docker:local/_ping HTTP/1.1\r\nHost: f\r\n" + PREFLIGHT, client="10.1.2.3")
        status, headers = self.answer(t)
        self.assertEqual((status, self.cors_of(headers)), (403, []))
        self.routes.gate = ErrorResource(404, "/docker:local is disabled")
        for method in (b"GET", b"OPTIONS"):
            t = self.send(method + b" /docker:local/_ping HTTP/1.1\r\nHost: f\r\n" + PREFLIGHT)
            status, headers = self.answer(t)
            self.assertEqual((status, self.cors_of(headers)), (404, []))
        self.assertEqual(self.pending, [])

    def test_other_routes_do_get_cors(self) -> None:
        """The control: the same requests elsewhere are CORS answers."""
        t = self.send(b"OPTIONS /host:example.org:80/x HTTP/1.1\r\nHost: f\r\n" + PREFLIGHT)
        status, headers = self.answer(t)
        self.assertEqual(status, 204)
        self.assertEqual(headers[b"access-control-allow-origin"], [b"https://app.example"])
        self.assertEqual(headers[b"access-control-allow-methods"], [b"DELETE"])
        t = self.send(b"GET /host:example.org:80/x HTTP/1.1\r\nHost: f\r\n" + ORIGIN)
        status, headers = self.answer(t)
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"access-control-allow-credentials"], [b"true"])
