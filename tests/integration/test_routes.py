"""The whole app as a process: host: routing, fallbacks, CORS, limits, logs and metrics."""

from __future__ import annotations

import http.client
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar

import docker.errors  # type: ignore[import-untyped]
from docker.types import IPAMConfig, IPAMPool  # type: ignore[import-untyped]
from twisted.trial.unittest import TestCase

from .dockerutil import TEST_LABEL, docker_available, docker_client, unique_instance
from .images import TTS, WEB, ensure_test_images
from .procs import Server
from .wait import eventually


class Backend(BaseHTTPRequestHandler):
    """A local HTTP server that echoes what it got (and sets CORS headers of its own)."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[dict[str, Any]]] = []

    def do_GET(self) -> None:
        self.seen.append({"path": self.path, "headers": dict(self.headers)})
        if self.path.startswith("/redirect"):
            body = b""
            self.send_response(302)
            self.send_header("Location", f"http://{self.headers['Host']}/landed")
        else:
            body = f"path={self.path}\nhost={self.headers['Host']}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if self.path.endswith(".html") else "text/plain")
            self.send_header("Access-Control-Allow-Origin", "*")
            self.send_header("Set-Cookie", "a=1")
            self.send_header("Set-Cookie", "b=2")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


class RoutesTestCase(TestCase):
    """A dockerspaces process plus a plain local backend."""

    skip = docker_available()
    timeout = 120
    extra: tuple[str, ...] = ()
    workers = 1  # the *Workers2 variants: --workers 2

    def server_args(self) -> tuple[str, ...]:
        """dockerspaces' options (the backend's port ``self.bport`` is known)."""
        return self.extra

    def setUp(self) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Backend)
        self.bport = self.httpd.server_address[1]
        t = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        t.start()
        self.addCleanup(self.httpd.server_close)
        self.addCleanup(self.httpd.shutdown)
        Backend.seen.clear()
        self.srv = Server(*self.server_args(), slots=1, workers=self.workers)
        self.addCleanup(self.srv.cleanup)
        self.srv.start()


class HostRoute(RoutesTestCase):
    """host: to a real local server; refusals; fallbacks."""

    extra = ("--allow-host", "127.0.0.1", "--max-body", "1000", "--cors")

    def test_host_route_forwards(self) -> None:
        status, _, body = self.srv.get(
            f"/host:127.0.0.1:{self.bport}/a/b%2F?q=1", headers={"Host": "front.example"}
        )
        self.assertEqual(status, 200)
        self.assertIn(b"path=/a/b%2F?q=1", body)
        self.assertIn(f"host=127.0.0.1:{self.bport}".encode(), body)
        got = Backend.seen[-1]["headers"]
        self.assertEqual(got["X-Forwarded-Host"], "front.example")
        self.assertEqual(got["X-Forwarded-Prefix"], f"/host:127.0.0.1:{self.bport}")
        self.assertEqual(got["X-Forwarded-For"], "127.0.0.1")

    def test_repeated_headers_kept(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.srv.port, timeout=10)
        conn.request("GET", f"/host:127.0.0.1:{self.bport}/x")
        r = conn.getresponse()
        r.read()
        self.assertEqual(r.msg.get_all("Set-Cookie"), ["a=1", "b=2"])
        conn.close()

    def test_location_rewritten(self) -> None:
        status, headers, _ = self.srv.get(f"/host:127.0.0.1:{self.bport}/redirect")
        self.assertEqual(status, 302)
        self.assertEqual(headers["location"], f"/host:127.0.0.1:{self.bport}/landed")

    def test_referer_and_cookie_fallbacks(self) -> None:
        prefix = f"/host:127.0.0.1:{self.bport}"
        status, headers, _ = self.srv.get(prefix + "/index.html")
        self.assertEqual(status, 200)
        cookie = headers.get("set-cookie", "").split(";")[0]
        self.assertTrue(cookie.startswith("dsroute="), cookie)
        self.assertNotIn("127.0.0.1", cookie)  # an opaque reference, not the segment
        here = f"http://127.0.0.1:{self.srv.port}"
        status, _, body = self.srv.get("/static/app.js", headers={"Referer": f"{here}{prefix}/index.html"})
        self.assertEqual((status, body.splitlines()[0]), (200, b"path=/static/app.js"))
        status, _, _ = self.srv.get("/static/app.js", headers={"Referer": f"http://other{prefix}/i.html"})
        self.assertEqual(status, 404)  # a Referer from another host does not route
        status, _, body = self.srv.get(
            "/ws",
            headers={
                "Cookie": "x=1; " + cookie,
                "Authorization": "Bearer ds-only",
                "X-Dockerspaces-Token": "t0ken",
            },
        )
        self.assertEqual((status, body.splitlines()[0]), (200, b"path=/ws"))
        got = {k.lower(): v for k, v in Backend.seen[-1]["headers"].items()}
        # our cookie, our token and (for a host: target) the client's credentials
        # stay here; the backend's own cookies go on
        self.assertEqual(got.get("cookie"), "x=1")
        self.assertNotIn("authorization", got)
        self.assertNotIn("x-dockerspaces-token", got)
        status, _, body = self.srv.get("/nowhere")
        self.assertEqual(status, 404)
        self.assertIn(b"no route", body)

    def test_own_port_refused(self) -> None:
        status, _, body = self.srv.get(f"/host:127.0.0.1:{self.srv.port}/monitor:broker/")
        self.assertEqual(status, 403)
        self.assertIn(b"port", body)

    def test_cors(self) -> None:
        status, headers, _ = self.srv.request(
            "OPTIONS",
            f"/host:127.0.0.1:{self.bport}/x",
            headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"},
        )
        self.assertIn(status, (200, 204))
        self.assertEqual(headers["access-control-allow-origin"], "https://app.example")
        self.assertEqual(headers["access-control-allow-credentials"], "true")
        status, headers, _ = self.srv.get(
            f"/host:127.0.0.1:{self.bport}/x", headers={"Origin": "https://app.example"}
        )
        self.assertEqual(headers["access-control-allow-origin"], "https://app.example")
        self.assertIn("Origin", headers["vary"])
        status, headers, _ = self.srv.get("/x:A:1:80/", headers={"Origin": "https://app.example"})
        self.assertEqual(status, 400)
        self.assertEqual(headers["access-control-allow-origin"], "https://app.example")

    def test_body_too_large(self) -> None:
        status, _, body = self.srv.request("POST", f"/host:127.0.0.1:{self.bport}/up", body=b"x" * 5000)
        self.assertEqual(status, 413)
        self.assertIn(b"--max-body", body)

    def test_slowloris_cut(self) -> None:
        s = socket.create_connection(("127.0.0.1", self.srv.port))
        s.sendall(b"GET /monitor:broker/ HTTP/1.1\r\n")
        s.settimeout(60)
        t = time.monotonic()
        try:
            self.assertEqual(s.recv(100), b"")  # closed by the head deadline
        except ConnectionResetError:
            pass  # aborted: just as closed
        self.assertLess(time.monotonic() - t, 45)
        s.close()


class LoopbackRefused(RoutesTestCase):
    """Without --allow-host, host: may not reach loopback."""

    def test_loopback_refused(self) -> None:
        status, _, body = self.srv.get(f"/host:127.0.0.1:{self.bport}/")
        self.assertEqual(status, 403)
        self.assertIn(b"loopback", body.lower())
        status, _, body = self.srv.get(f"/host:localhost:{self.bport}/")
        self.assertEqual(status, 403)


class LogsAndMetrics(RoutesTestCase):
    """A known sequence of requests shows up in the log lines and in /monitor:metrics."""

    def test_sequence(self) -> None:
        ensure_test_images(TTS)
        for _ in range(3):
            self.assertEqual(self.srv.get("/x:selmaproject:tts:777:5002:TOKEN=s3cr3t/")[0], 200)
        self.assertEqual(self.srv.get("/x:A:1:80/")[0], 400)
        status, _, text = self.srv.get("/monitor:metrics")
        self.assertEqual(status, 200)
        from prometheus_client.parser import text_string_to_metric_families

        samples = {}
        for fam in text_string_to_metric_families(text.decode()):
            for s in fam.samples:
                samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
        req = {k: v for k, v in samples.items() if k[0].endswith("requests_total")}
        x200 = [
            v
            for (n, labels), v in req.items()
            if dict(labels).get("kind") == "x" and dict(labels).get("status") == "200"
        ]
        self.assertEqual(x200, [3.0])
        starts = [v for (n, _), v in samples.items() if n.endswith("container_starts_total")]
        self.assertEqual(sum(starts), 1.0)
        out = self.srv.output()
        lines = [ln for ln in out.splitlines() if "x:selmaproject/tts:777:5002" in ln and "-> 200" in ln]
        self.assertEqual(len(lines), 3, out[-3000:])
        self.assertTrue(
            re.search(r"container ready x:selmaproject/tts:777:5002 env\[TOKEN\]#\w+ on local", out),
            out[-3000:],
        )
        self.assertNotIn("s3cr3t", out)
        self.assertNotIn("s3cr3t", text.decode())


class DockerNetworkRefused(TestCase):
    """A network the engine has (custom bridge name, so no local route name gives it
    away) is refused once the engine has been asked: its gateway (an address of this
    machine) and a container on it -- which answers when --allow-host names the
    network, so the refusal is what keeps it out."""

    skip = docker_available()
    timeout = 120
    workers = 1

    def setUp(self) -> None:
        ensure_test_images(WEB)
        self.client = docker_client()
        self.addCleanup(self.client.close)
        name = unique_instance("net")
        self.net = None
        for third in range(200, 250):
            subnet = f"10.213.{third}.0/24"
            try:
                self.net = self.client.create_network(
                    name,
                    driver="bridge",
                    labels={TEST_LABEL: "1"},
                    options={"com.docker.network.bridge.name": "ds" + name[-8:]},
                    ipam=IPAMConfig(pool_configs=[IPAMPool(subnet=subnet)]),
                )
                break
            except docker.errors.APIError:  # that subnet is taken: try the next
                continue
        assert self.net is not None, "no free 10.213.x.0/24 subnet"
        self.addCleanup(self.client.remove_network, self.net["Id"])
        self.gateway, self.ip = f"10.213.{third}.1", f"10.213.{third}.9"
        self.subnet = subnet
        host_config = self.client.create_host_config()
        c = self.client.create_container(
            WEB,
            labels={TEST_LABEL: "1"},
            host_config=host_config,
            networking_config=self.client.create_networking_config(
                {name: self.client.create_endpoint_config(ipv4_address=self.ip)}
            ),
        )
        self.addCleanup(self.client.remove_container, c["Id"], force=True)
        self.client.start(c["Id"])

    def server(self, *args: str) -> Server:
        srv = Server(*args, slots=1, workers=self.workers)
        self.addCleanup(srv.cleanup)
        return srv.start()

    def wait_status(self, srv: Server, path: str, want: int) -> bytes:
        last: list[tuple[int, bytes]] = []

        def answered() -> tuple[bytes] | None:  # a tuple: true even for an empty body
            status, _, body = srv.get(path, timeout=10)
            last[:] = [(status, body)]
            return (body,) if status == want else None

        try:
            return eventually(answered, 20, f"{want} for {path}", interval=0.2)[0]
        except AssertionError:
            self.assertEqual(last[0][0], want, last[0][1])
            raise

    def test_refused_then_allowed(self) -> None:
        srv = self.server()
        body = self.wait_status(srv, f"/host:{self.ip}:8080/", 403)
        self.assertIn(b"Docker network", body)
        body = self.wait_status(srv, f"/host:{self.gateway}:{srv.port}/", 403)
        body = self.wait_status(srv, f"/host:{self.gateway}:8080/", 403)
        self.assertIn(b"address of this machine", body)
        srv.cleanup()
        allowed = self.server("--allow-host", self.subnet)
        self.wait_status(allowed, f"/host:{self.ip}:8080/", 200)


class InputRefusals(RoutesTestCase):
    """Over a real socket: over-long heads get 414/431 (not a bare close), bad host
    names and image names a 400 (nothing started); all of them logged and counted."""

    def raw(self, data: bytes) -> bytes:
        s = socket.create_connection(("127.0.0.1", self.srv.port), timeout=10)
        try:
            s.sendall(data)
            out = b""
            while True:
                b = s.recv(65536)
                if not b:
                    return out
                out += b
        finally:
            s.close()

    def test_refusals(self) -> None:
        self.assertTrue(
            self.raw(b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 414 ")
        )
        self.assertTrue(
            self.raw(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 100_000 + b"\r\n\r\n").startswith(
                b"HTTP/1.1 431 "
            )
        )
        self.assertTrue(
            self.raw(b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 16_400 + b"\r\n\r\n").startswith(
                b"HTTP/1.1 431 "
            )
        )
        for path, words in {
            "/host:" + "a" * 64 + ".example/": b"63 characters",
            "/shost:xn--a.example/": b"IDNA",
            "/host:[1::2::3]/": b"IPv6",
            "/x:" + "a" * 10_000 + ":1:80/": b"too long",
            "/x:" + ":".join(["a"] * 3_000) + ":1:80/": b"too long",
            "/x:foo_bar.example:app:1:80/": b"bad registry",
        }.items():
            status, _, body = self.srv.get(path, timeout=10)
            self.assertEqual(status, 400, (path[:40], body))
            self.assertIn(words, body)
        self.assertEqual(self.srv.containers(all=True), [])  # nothing pulled or started
        _, _, text = self.srv.get("/monitor:metrics")
        for status in (b"414", b"431", b"400"):
            self.assertIn(b'dockerspaces_requests_total{kind="bad",status="' + status + b'"}', text)
        out = self.srv.output()
        self.assertIn("(uri-too-long)", out)
        self.assertIn("(head-too-large)", out)
        self.assertNotIn("Unhandled error", out)


class NoHostRoute(RoutesTestCase):
    """--no-host-route: host:/shost: answer 404; --root still forwards."""

    def server_args(self) -> tuple[str, ...]:
        return ("--no-host-route", "--allow-host", "127.0.0.1", "--root", f"127.0.0.1:{self.bport}")

    def test_off_but_root_works(self) -> None:
        status, _, body = self.srv.get(f"/host:127.0.0.1:{self.bport}/a")
        self.assertEqual(status, 404)
        self.assertIn(b"--no-host-route", body)
        status, _, body = self.srv.get("/somewhere")
        self.assertEqual(status, 200)
        self.assertIn(b"path=/somewhere", body)


# -- the same with --workers 2: the HTTP side in two children, the broker in the parent --


class HostRouteWorkers2(HostRoute):
    """HostRoute with --workers 2."""

    workers = 2


class LoopbackRefusedWorkers2(LoopbackRefused):
    """LoopbackRefused with --workers 2."""

    workers = 2


class LogsAndMetricsWorkers2(LogsAndMetrics):
    """LogsAndMetrics with --workers 2."""

    workers = 2


class DockerNetworkRefusedWorkers2(DockerNetworkRefused):
    """DockerNetworkRefused with --workers 2."""

    workers = 2


class InputRefusalsWorkers2(InputRefusals):
    """InputRefusals with --workers 2."""

    workers = 2


class NoHostRouteWorkers2(NoHostRoute):
    """NoHostRoute with --workers 2."""

    workers = 2
