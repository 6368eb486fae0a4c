"""``/docker:local`` end to end: a real dockerspaces process and the real docker CLI.

The CLI talks to the route with ``DOCKER_HOST=tcp://127.0.0.1:PORT/docker:local`` (it
keeps the path in its requests: ``/docker:local/_ping``, ``/docker:local/v1.41/…``) and
an isolated ``DOCKER_CONFIG`` directory (``HttpHeaders`` carries the token). Both CLIs
on this machine are used where present: ``/usr/bin/docker`` (20.10) and
``/usr/local/bin/docker`` (28.x, negotiates the engine's API version down).

Every container a test creates carries :data:`TEST_LABEL` and a per-test run label and
is removed in cleanup.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import uuid
from typing import Any

from twisted.trial.unittest import TestCase

from .dockerutil import TEST_LABEL, docker_available, docker_client, remove_containers
from .images import BASE, TTS, ensure_test_images
from .procs import Server

CLIS = [p for p in ("/usr/bin/docker", "/usr/local/bin/docker") if os.access(p, os.X_OK)]
TOKEN = "tok-" + uuid.uuid4().hex


def _skip() -> str | None:
    reason = docker_available()
    if reason:
        return reason
    if not CLIS:
        return "no docker CLI at /usr/bin/docker or /usr/local/bin/docker"
    return None


SKIP = _skip()


class CliTestCase(TestCase):
    """Shared helpers: a server with cleanup, the CLI pointed at its /docker:local."""

    skip = SKIP
    timeout = 180
    workers = 1  # the *Workers2 variants: --workers 2

    def setUp(self) -> None:
        ensure_test_images(BASE)
        self.run_label = f"dockerspaces.test.run={uuid.uuid4().hex[:12]}"
        self.addCleanup(remove_containers, {"label": self.run_label})

    def server(self, *args: str, **kw: Any) -> Server:
        s = Server(*args, slots=0, workers=self.workers, **kw)
        self.addCleanup(s.cleanup)
        return s.start()

    def docker_config(self, headers: dict[str, str] | None) -> str:
        """A fresh DOCKER_CONFIG directory (with HttpHeaders when given)."""
        d = self.mktemp()
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump({"HttpHeaders": headers} if headers else {}, f)
        return d

    def env(self, srv: Server, config_dir: str | None = None, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        env.update(
            DOCKER_HOST=f"tcp://127.0.0.1:{srv.port}/docker:local",
            DOCKER_CONFIG=config_dir or self.docker_config(None),
            DOCKER_CLI_HINTS="false",
            **extra,
        )
        return env

    def docker(
        self, cli: str, env: dict[str, str], *args: str, stdin: bytes | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            [cli, *args], check=False, env=env, input=stdin, capture_output=True, timeout=timeout
        )

    def run_args(self, *more: str) -> list[str]:
        """``docker run`` arguments with the test labels."""
        return ["run", "--label", TEST_LABEL + "=1", "--label", self.run_label, *more]


class OpenRoute(CliTestCase):
    """``--docker-api`` without a token: loopback callers use the engine like a socket."""

    def setUp(self) -> None:
        super().setUp()
        self.srv = self.server("--docker-api")

    def test_ping_and_versions(self) -> None:
        """The CLI's HEAD/GET /_ping and versioned calls reach the real engine."""
        c = docker_client()
        try:
            real = c.version()["Version"]
        finally:
            c.close()
        for cli in CLIS:
            r = self.docker(cli, self.env(self.srv), "version", "--format", "{{.Server.Version}}")
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertEqual(r.stdout.decode().strip(), real)
            r = self.docker(cli, self.env(self.srv), "ps", "-a", "--filter", "label=" + self.run_label)
            self.assertEqual(r.returncode, 0, r.stderr)
            self.assertIn(b"CONTAINER ID", r.stdout)
        # a bare HTTP request: the route strips its prefix
        status, _, body = self.srv.get("/docker:local/_ping")
        self.assertEqual((status, body), (200, b"OK"))

    def test_run_attached(self) -> None:
        """``docker run`` attaches (hijacked Upgrade: tcp), streams both ways, half-closes."""
        for cli in CLIS:
            env = self.env(self.srv)
            r = self.docker(cli, env, *self.run_args("--rm", BASE, "echo", "hi"))
            self.assertEqual((r.returncode, r.stdout), (0, b"hi\n"), (cli, r.stderr))
            r = self.docker(
                cli, env, *self.run_args("--rm", BASE, "sh", "-c", "echo out; echo err >&2; exit 3")
            )
            self.assertEqual(r.returncode, 3, (cli, r.stderr))
            self.assertEqual(r.stdout, b"out\n")
            self.assertIn(b"err", r.stderr)
            # stdin: cat ends only when our end of the tunnel is half-closed
            data = b"".join(b"line %d\n" % i for i in range(2000))
            r = self.docker(cli, env, *self.run_args("--rm", "-i", BASE, "cat"), stdin=data)
            self.assertEqual(r.returncode, 0, (cli, r.stderr))
            self.assertEqual(r.stdout, data)
        self.assertIn("docker-api: POST /v1.", self.srv.output())
        self.assertRegex(
            self.srv.output(), r"docker-api: POST /v1\.\d+/containers/create.* from 127\.0\.0\.1"
        )
        self.assertNotRegex(self.srv.output(), r"docker-api: (GET|HEAD) ")

    def test_exec(self) -> None:
        """``docker exec``: output, stdin and exit codes through the hijacked connection."""
        r = self.docker(CLIS[0], self.env(self.srv), *self.run_args("-d", BASE, "sleep", "120"))
        self.assertEqual(r.returncode, 0, r.stderr)
        cid = r.stdout.decode().strip()
        for cli in CLIS:
            env = self.env(self.srv)
            r = self.docker(cli, env, "exec", cid, "echo", "exec-hi")
            self.assertEqual((r.returncode, r.stdout), (0, b"exec-hi\n"), (cli, r.stderr))
            r = self.docker(cli, env, "exec", "-i", cid, "cat", stdin=b"piped\n")
            self.assertEqual((r.returncode, r.stdout), (0, b"piped\n"), (cli, r.stderr))
            r = self.docker(cli, env, "exec", cid, "sh", "-c", "exit 7")
            self.assertEqual(r.returncode, 7, (cli, r.stderr))

    def test_logs_follow_streams(self) -> None:
        """``docker logs -f`` shows lines as they come and ends when the container does."""
        for cli in CLIS:
            env = self.env(self.srv)
            r = self.docker(
                cli, env, *self.run_args("-d", BASE, "sh", "-c", "echo first; sleep 4; echo second")
            )
            self.assertEqual(r.returncode, 0, r.stderr)
            cid = r.stdout.decode().strip()
            p = subprocess.Popen(
                [cli, "logs", "-f", cid], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            try:
                first = _readline(p, 10)
                self.assertEqual(first, b"first\n")
                # the first line came while the container still runs: it was streamed
                c = docker_client()
                try:
                    self.assertTrue(c.inspect_container(cid)["State"]["Running"])
                finally:
                    c.close()
                rest, err = p.communicate(timeout=30)
            finally:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
            self.assertEqual(p.returncode, 0, err)
            self.assertEqual(rest, b"second\n")

    def test_events_stream(self) -> None:
        """``docker events`` streams: a quiet stream gets its head at once, events as they come."""
        label = f"dockerspaces.test.ev={uuid.uuid4().hex[:8]}"
        since = str(int(time.time()) - 1)
        for cli in CLIS:
            env = self.env(self.srv)
            p = subprocess.Popen(
                [
                    cli,
                    "events",
                    "--filter",
                    "label=" + label,
                    "--filter",
                    "event=create",
                    "--format",
                    "{{.Action}} {{.Actor.ID}}",
                ],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                time.sleep(1.0)  # the point of the test, not synchronisation: a quiet stream stays open
                self.assertIsNone(p.poll(), "docker events ended early")
                c = docker_client()
                try:
                    cid = c.create_container(
                        BASE,
                        "true",
                        labels={
                            TEST_LABEL: "1",
                            label.split("=", maxsplit=1)[0]: label.split("=")[1],
                            self.run_label.split("=")[0]: self.run_label.split("=")[1],
                        },
                    )["Id"]
                finally:
                    c.close()
                line = _readline(p, 15)
                self.assertEqual(line.decode().split(), ["create", cid])
            finally:
                p.kill()
                p.communicate()
            # --since replays the past: read one line, then stop
            p = subprocess.Popen(
                [cli, "events", "--since", since, "--filter", "label=" + label, "--format", "{{.Action}}"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            try:
                self.assertEqual(_readline(p, 15), b"create\n")
            finally:
                p.kill()
                p.communicate()

    def test_build_sends_the_body(self) -> None:
        """``docker build -`` uploads its context as the request body."""
        tag = f"dstest-dockerapi-build:{uuid.uuid4().hex[:8]}"
        dockerfile = f"FROM {BASE}\nRUN echo built-here > /built\nLABEL {TEST_LABEL}=1\n"
        cli = "/usr/bin/docker" if "/usr/bin/docker" in CLIS else CLIS[0]
        r = self.docker(
            cli,
            self.env(self.srv, DOCKER_BUILDKIT="0"),
            "build",
            "-q",
            "-t",
            tag,
            "-",
            stdin=dockerfile.encode(),
            timeout=120,
        )
        c = docker_client()
        self.addCleanup(_remove_image, tag)
        self.assertEqual(r.returncode, 0, r.stderr)
        try:
            self.assertTrue(c.inspect_image(tag)["Id"].startswith("sha256:"))
        finally:
            c.close()
        r = self.docker(cli, self.env(self.srv), *self.run_args("--rm", tag, "cat", "/built"))
        self.assertEqual(r.stdout, b"built-here\n", r.stderr)

    def test_host_route_cannot_reach_it(self) -> None:
        """``/host:127.0.0.1:PORT/docker:local/…`` is refused (loopback, own port)."""
        status, _, body = self.srv.get(f"/host:127.0.0.1:{self.srv.port}/docker:local/_ping")
        self.assertEqual(status, 403, body)
        status, _, body = self.srv.get(f"/host:localhost:{self.srv.port}/docker:local/v1.41/info")
        self.assertEqual(status, 403, body)


class TokenRoute(CliTestCase):
    """``--docker-api-token-file``: the CLI must send the token from HttpHeaders."""

    def setUp(self) -> None:
        super().setUp()
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(TOKEN + "\n")
        self.srv = self.server("--docker-api", "--docker-api-token-file", path)

    def test_with_token(self) -> None:
        """The right token: ps and an attached run work with both CLIs."""
        good = self.docker_config({"X-Dockerspaces-Token": TOKEN})
        for cli in CLIS:
            env = self.env(self.srv, good)
            r = self.docker(cli, env, "ps")
            self.assertEqual(r.returncode, 0, (cli, r.stderr))
            r = self.docker(cli, env, *self.run_args("--rm", BASE, "echo", "with-token"))
            self.assertEqual((r.returncode, r.stdout), (0, b"with-token\n"), (cli, r.stderr))

    def test_without_or_wrong_token(self) -> None:
        """No token or a wrong one: 403 with the reason, nothing created, the token not shown."""
        none = self.docker_config(None)
        wrong = self.docker_config({"X-Dockerspaces-Token": TOKEN + "x"})
        for cli in CLIS:
            r = self.docker(cli, self.env(self.srv, none), "ps")
            self.assertNotEqual(r.returncode, 0)
            self.assertIn(b"403", r.stderr)
            self.assertIn(b"X-Dockerspaces-Token", r.stderr)
            r = self.docker(cli, self.env(self.srv, wrong), *self.run_args("--rm", BASE, "echo", "nope"))
            self.assertNotEqual(r.returncode, 0)
            self.assertIn(b"wrong X-Dockerspaces-Token", r.stderr)
            self.assertNotIn(TOKEN.encode(), r.stderr)
        c = docker_client()
        try:
            self.assertEqual(c.containers(all=True, filters={"label": self.run_label}), [])
        finally:
            c.close()
        status, _, body = self.srv.get("/docker:local/_ping")
        self.assertEqual(status, 403, body)
        status, _, body = self.srv.get("/docker:local/_ping", headers={"X-Dockerspaces-Token": TOKEN})
        self.assertEqual((status, body), (200, b"OK"))
        self.assertNotIn(TOKEN, self.srv.output())


class ClosedRoute(CliTestCase):
    """Not enabled, or the caller outside the allow-list."""

    def test_not_enabled_is_404(self) -> None:
        """Without --docker-api the route does not exist."""
        srv = self.server()
        status, _, body = srv.get("/docker:local/_ping")
        self.assertEqual(status, 404, body)
        r = self.docker(CLIS[0], self.env(srv), "ps")
        self.assertNotEqual(r.returncode, 0)

    def test_outside_allow_list_is_403(self) -> None:
        """--docker-api-allow without loopback: the CLI on 127.0.0.1 gets 403 with the reason;
        and host: with loopback allowed still refuses this instance's own port."""
        srv = self.server("--docker-api", "--docker-api-allow", "10.0.0.0/8", "--allow-host", "127.0.0.1")
        for cli in CLIS:
            r = self.docker(cli, self.env(srv), "ps")
            self.assertNotEqual(r.returncode, 0)
            self.assertIn(b"403", r.stderr)
            self.assertIn(b"--docker-api-allow", r.stderr)
        status, _, body = srv.get(f"/host:127.0.0.1:{srv.port}/docker:local/_ping")
        self.assertEqual(status, 403, body)


class NothingOfOursReachesAContainer(TestCase):
    """Issue 12 items 7 and 8 against the real engine: a job container never sees the
    ``dsroute`` cookie (an opaque reference, no env values) or the token; with
    ``--cors`` the engine's answers through ``/docker:local`` carry no CORS headers."""

    skip = docker_available()
    timeout = 180
    workers = 1

    def setUp(self) -> None:
        ensure_test_images(TTS)
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(TOKEN + "\n")
        self.srv = Server(
            "--docker-api", "--docker-api-token-file", path, "--cors", slots=1, workers=self.workers
        )
        self.addCleanup(self.srv.cleanup)
        self.srv.start()

    def test_container_sees_no_cookie_or_token_of_ours(self) -> None:
        seg = "/x:selmaproject:tts:777:5002:SECRET=hunter22"
        status, headers, body = self.srv.get(seg + "/")
        self.assertEqual(status, 200, body)
        self.assertIn(b"SECRET=hunter22", body)  # the container has its env
        cookie = headers.get("set-cookie", "")
        self.assertTrue(cookie.startswith("dsroute="), cookie)
        for leak in ("hunter22", "SECRET", "selmaproject", "5002"):
            self.assertNotIn(leak, cookie)
        ref = cookie.split(";", 1)[0]
        status, _, body = self.srv.get(
            "/cgi-bin/env", headers={"Cookie": "theme=dark; " + ref, "X-Dockerspaces-Token": TOKEN}
        )
        self.assertEqual(status, 200, body)  # routed by the cookie to the container
        text = body.decode()
        self.assertIn("REQUEST_URI=/cgi-bin/env", text)
        self.assertIn("HTTP_COOKIE=theme=dark", text)
        self.assertNotIn("dsroute", text)
        self.assertNotIn(TOKEN, text)
        self.assertNotIn("X_DOCKERSPACES_TOKEN", text)
        # a forged reference routes nowhere (no --root: 404), the raw segment neither
        for forged in ("dsroute=AAAAAAAAAAAAAAAAAAAAAA", "dsroute=" + seg[1:]):
            status, _, _ = self.srv.get("/cgi-bin/env", headers={"Cookie": forged})
            self.assertEqual(status, 404, forged)

    def test_cors_never_on_the_engine_api(self) -> None:
        origin = {"Origin": "https://app.example", "X-Dockerspaces-Token": TOKEN}
        status, headers, body = self.srv.get("/docker:local/_ping", headers=origin)
        self.assertEqual((status, body), (200, b"OK"))
        self.assertEqual([k for k in headers if k.startswith("access-control-")], [])
        preflight = dict(origin, **{"Access-Control-Request-Method": "DELETE"})
        status, headers, _ = self.srv.request(
            "OPTIONS", "/docker:local/v1.41/containers/json", headers=preflight
        )
        self.assertNotEqual(status, 204)
        self.assertEqual([k for k in headers if k.startswith("access-control-")], [])
        # the control: a preflight elsewhere is answered here
        status, headers, _ = self.srv.request("OPTIONS", "/host:example.org/x", headers=preflight)
        self.assertEqual(status, 204)
        self.assertEqual(headers["access-control-allow-origin"], "https://app.example")


def _readline(p: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One line of ``p``'s stdout, or fail after ``timeout`` seconds."""
    assert p.stdout is not None
    out: list[bytes] = []
    t = threading.Thread(target=lambda: out.append(p.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    t.start()
    t.join(timeout)
    if not out:
        p.kill()
        err = p.communicate()[1]
        raise AssertionError(f"no line within {timeout} s; stderr: {err!r}")
    return out[0]


def _remove_image(tag: str) -> None:
    c = docker_client()
    try:
        c.remove_image(tag, force=True)
    except Exception:  # noqa: BLE001, S110 - never built is fine
        pass
    finally:
        c.close()


# -- the same with --workers 2: the HTTP side in two children, the broker in the parent --


class OpenRouteWorkers2(OpenRoute):
    """OpenRoute with --workers 2."""

    workers = 2


class TokenRouteWorkers2(TokenRoute):
    """TokenRoute with --workers 2."""

    workers = 2


class ClosedRouteWorkers2(ClosedRoute):
    """ClosedRoute with --workers 2."""

    workers = 2


class NothingOfOursReachesAContainerWorkers2(NothingOfOursReachesAContainer):
    """NothingOfOursReachesAContainer with --workers 2."""

    workers = 2
