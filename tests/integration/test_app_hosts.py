"""Apps on their own hosts and apps told their prefix, against real containers (the
busybox web image: its ``/cgi-bin/env`` shows the request URI and the container's env).
The real-browser test with two Jupyter servers is ``test_apps``."""

from __future__ import annotations

import os
import re
import tempfile

from twisted.trial.unittest import TestCase

from dockerspaces.spec import JobSpec, parse_route
from dockerspaces.web.apphosts import app_label

from .dockerutil import docker_available
from .images import WEB, ensure_test_images
from .procs import Server

SEG_A = "y:dockerspaces-test:web:1:8080:APP=a"
SEG_B = "y:dockerspaces-test:web:1:8080:APP=b"
HTML = {"Accept": "text/html,*/*;q=0.8"}


def label(segment: str) -> str:
    """The app host label of a route segment."""
    spec = parse_route(segment)
    assert isinstance(spec, JobSpec)
    return app_label(spec)


def env_of(body: bytes) -> dict[str, str]:
    """``NAME=VALUE`` lines of a ``/cgi-bin/env`` answer."""
    out = {}
    for line in body.decode(errors="replace").splitlines():
        k, sep, v = line.partition("=")
        if sep:
            out[k] = v
    return out


class AppDomain(TestCase):
    """``--app-domain apps.localhost``: each key on its own host, the path untouched."""

    skip = docker_available()
    timeout = 180

    def setUp(self) -> None:
        ensure_test_images(WEB)
        self.srv = Server("--app-domain", "apps.localhost", slots=2)
        self.addCleanup(self.srv.cleanup)
        self.srv.start()

    def test_browser_sent_to_the_app_host_which_serves_it(self) -> None:
        port = self.srv.port
        # a browser on the main host: 307 to the app's own host, path and query kept
        status, headers, _ = self.srv.get(f"/{SEG_A}/cgi-bin/env?x=1", headers=HTML)
        self.assertEqual(status, 307)
        host_a = f"{label(SEG_A)}.apps.localhost:{port}"
        self.assertEqual(headers["location"], f"http://{host_a}/cgi-bin/env?x=1")
        self.assertNotIn("APP=a", headers["location"])
        # the app host: the path as sent, the container told where it lives
        status, _, body = self.srv.get("/cgi-bin/env?x=1", headers={"Host": host_a})
        self.assertEqual(status, 200, body)
        env = env_of(body)
        self.assertEqual(env["REQUEST_URI"], "/cgi-bin/env?x=1")
        self.assertEqual(env["APP"], "a")
        self.assertEqual(env["DOCKERSPACES_PUBLIC_PATH"], "/")
        self.assertEqual(env["DOCKERSPACES_PUBLIC_URL"], f"http://{host_a}/")
        # a second key: its own host, its own container
        host_b = f"{label(SEG_B)}.apps.localhost:{port}"
        self.srv.get(f"/{SEG_B}/", headers=HTML)  # hands the label out
        status, _, body_b = self.srv.get("/cgi-bin/env", headers={"Host": host_b, "Cookie": "dsroute=x; k=v"})
        self.assertEqual(status, 200, body_b)
        env_b = env_of(body_b)
        self.assertEqual(env_b["APP"], "b")
        self.assertNotEqual(env_b["hostname"], env["hostname"])
        self.assertEqual(env_b.get("HTTP_COOKIE"), "k=v")  # ours never forwarded
        # an API client on the main host is served in place (prefix stripped)
        status, _, body = self.srv.get(f"/{SEG_A}/cgi-bin/env", headers={"Accept": "application/json"})
        self.assertEqual(status, 200)
        self.assertEqual(env_of(body)["hostname"], env["hostname"])
        # the monitor names each app's host
        hosts = {a["Host"] for a in self.srv.snapshot()["Apps"]}
        self.assertEqual(hosts, {host_a.partition(":")[0], host_b.partition(":")[0]})

    def test_unknown_app_host(self) -> None:
        status, _, body = self.srv.get(
            "/", headers={"Host": f"nothing-0000000000.apps.localhost:{self.srv.port}"}
        )
        self.assertEqual(status, 404)
        self.assertIn(b"open the app from its /x:", body)


class KeepPrefix(TestCase):
    """``prefix = "keep"``: the container gets the whole path, in the key's one spelling."""

    skip = docker_available()
    timeout = 180

    def setUp(self) -> None:
        ensure_test_images(WEB)
        d = tempfile.mkdtemp(prefix="ds-keep-")
        self.config = os.path.join(d, "dockerspaces.toml")
        with open(self.config, "w") as f:
            f.write(
                '[[profile]]\nimage = "dockerspaces-test/web:*"\nprefix = "keep"\n'
                'env = { TOLD = "path={public_path} url={public_url}" }\n'
            )
        self.srv = Server("--config", self.config, slots=1)
        self.addCleanup(self.srv.cleanup)
        self.srv.start()

    def test_whole_path_and_public_env(self) -> None:
        seg = "y:dockerspaces-test:web:1:8080:Z=1;A=2"  # not the canonical order
        canonical = "/y:dockerspaces-test:web:1:8080:A=2;Z=1/"
        # busybox httpd serves its CGIs at the root, not under the prefix: its 404 and
        # the log line of the path it read show what it was sent
        status, _, body = self.srv.get(f"/{seg}/cgi-bin/env")
        self.assertEqual(status, 404, body)  # the container saw /y:…/cgi-bin/env
        logs = self.container_log()
        self.assertIn(f"url:{canonical}cgi-bin/env", logs)
        self.assertNotIn("url:/cgi-bin/env", logs)
        env = self.container_env()
        self.assertEqual(env["DOCKERSPACES_PUBLIC_PATH"], canonical)
        self.assertEqual(env["DOCKERSPACES_PUBLIC_URL"], f"http://127.0.0.1:{self.srv.port}{canonical}")
        self.assertEqual(env["TOLD"], f"path={canonical} url=http://127.0.0.1:{self.srv.port}{canonical}")

    def container_log(self) -> str:
        from .dockerutil import docker_client

        c = docker_client()
        try:
            (x,) = self.srv.containers()
            return c.logs(x["Id"]).decode(errors="replace")  # type: ignore[no-any-return]
        finally:
            c.close()

    def container_env(self) -> dict[str, str]:
        from .dockerutil import docker_client

        c = docker_client()
        try:
            (x,) = self.srv.containers()
            env = c.inspect_container(x["Id"])["Config"]["Env"]
            return dict(re.match(r"([^=]*)=(.*)", e, re.S).groups() for e in env)  # type: ignore[union-attr,misc]
        finally:
            c.close()
