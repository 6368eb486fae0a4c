"""Running it for real: the Dockerfile, the systemd unit and the example config.

- :class:`ConfFilesTests` (no Docker needed): ``conf/dockerspaces.toml`` loads through
  ``build_config`` with every option named, each commented-out example line is valid
  when uncommented, and ``conf/dockerspaces.service`` passes ``systemd-analyze verify``
  (or, without systemd, has the settings operations rely on).
- :class:`DockerfileTests`: builds ``Dockerfile`` here and runs the image with the
  Docker socket mounted -- the SPEC's ``docker run -p …:8888 -v /var/run/docker.sock:…
  IMAGE --user U --password P`` -- then drives a ``y:`` request through it to a sibling
  container.  Docker Hub is unreachable here, so the base image is made locally with
  ``debootstrap --variant=minbase bookworm`` (python3, venv, pip; cached as
  :data:`PYBASE`, ~60 s once) and the dependencies are installed from wheels built
  outside the image (``pip wheel``, cached per ``setup.cfg`` hash) through the
  Dockerfile's optional ``wheels/`` directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from twisted.trial import unittest

from dockerspaces.options import OPTIONS, build_config

from .dockerutil import (
    TEST_LABEL,
    docker_available,
    docker_client,
    free_port,
    remove_containers,
    remove_instance_containers,
    unique_instance,
    wait_http_status,
)
from .images import WEB, ensure_test_images

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONF = os.path.join(ROOT, "conf")
PYBASE = os.environ.get("DOCKERSPACES_TEST_PYBASE", "dockerspaces-test/pybase:bookworm")
IMAGE = "dockerspaces-test/dockerspaces:latest"
_LOCK = os.path.join(tempfile.gettempdir(), "dockerspaces-test-pybase.lock")
# what `pip install .` needs; the Dockerfile's .dockerignore keeps the rest out anyway
_CONTEXT_ITEMS = (
    "Dockerfile",
    ".dockerignore",
    "setup.cfg",
    "pyproject.toml",
    "README.md",
    "dockerspaces",
    "twisted",
)


class ConfFilesTests(unittest.TestCase):
    """The shipped example config and systemd unit stay valid."""

    toml = os.path.join(CONF, "dockerspaces.toml")
    unit = os.path.join(CONF, "dockerspaces.service")

    def test_example_config_loads(self) -> None:
        config = build_config({"config": self.toml})
        self.assertEqual(len(config.profiles), 2)
        self.assertEqual(config.profiles[0].pattern, "selmaproject/tts:*")
        self.assertEqual(config.max_body, 8 * 1024**3)
        self.assertEqual(config.log_format, "text")

    def test_every_option_is_shown(self) -> None:
        with open(self.toml, encoding="utf-8") as f:
            text = f.read()
        shown = set(re.findall(r"^#?\s*([a-z][a-z-]*)\s*=", text, re.MULTILINE))
        missing = [o.name for o in OPTIONS if o.name != "config" and o.name not in shown]
        self.assertEqual(missing, [], "options missing from conf/dockerspaces.toml")

    def test_each_commented_example_is_valid(self) -> None:
        with open(self.toml, encoding="utf-8") as f:
            lines = f.read().splitlines()
        first_table = next(i for i, line in enumerate(lines) if line.startswith("[["))
        checked = 0
        for i, line in enumerate(lines[:first_table]):
            m = re.match(r"#\s?([a-z][a-z-]*\s*=.*)$", line)
            if not m:
                continue
            block = [m.group(1)]
            if m.group(1).rstrip().endswith("["):  # a multi-line array
                for follow in lines[i + 1 : first_table]:
                    block.append(follow.lstrip("#"))
                    if follow.lstrip("# ").startswith("]"):
                        break
            key = m.group(1).split("=", 1)[0].strip()
            body = (
                "\n".join(
                    x for j, x in enumerate(lines[:first_table]) if not re.match(rf"{re.escape(key)}\s*=", x)
                )
                + "\n"
                + "\n".join(block)
            )
            if key in ("password", "password-file"):
                body += '\nuser = "u"\n'
            path = self.mktemp()
            with open(path, "w", encoding="utf-8") as f:
                f.write(body + "\n")
            try:
                build_config({"config": path})
            except Exception as e:  # noqa: BLE001 - report which line
                self.fail(f"line {i + 1} of dockerspaces.toml, uncommented, is invalid: {e}")
            checked += 1
        self.assertGreater(checked, 10)

    def test_unit_settings(self) -> None:
        with open(self.unit, encoding="utf-8") as f:
            text = f.read()
        settings: dict[str, list[str]] = {}
        for line in text.splitlines():
            if "=" in line and not line.startswith(("#", "[")):
                k, _, v = line.partition("=")
                settings.setdefault(k.strip(), []).append(v.strip())
        self.assertEqual(settings["Type"], ["simple"])
        self.assertEqual(settings["Restart"], ["always"])
        self.assertEqual(settings["User"], ["dockerspaces"])
        self.assertIn("docker", settings["SupplementaryGroups"][0].split())
        exec_start = settings["ExecStart"][0].split()
        self.assertEqual(
            exec_start[:4], ["/usr/local/bin/twistd", "--nodaemon", "--pidfile=", "dockerspaces"]
        )
        self.assertIn("--config", exec_start)
        self.assertIn("${CREDENTIALS_DIRECTORY}/registry-password", exec_start)
        self.assertTrue(settings["LoadCredential"][0].startswith("registry-password:"))
        for hard in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
            self.assertEqual(settings[hard], ["yes"], hard)
        self.assertEqual(settings["ProtectSystem"], ["strict"])
        # the plugin options after `dockerspaces` parse (file path aside)
        from dockerspaces.tap import Options

        opts = Options()
        args = exec_start[exec_start.index("dockerspaces") + 1 :]
        args = [self.toml if a.endswith("dockerspaces.toml") else a for a in args]
        pw = self.mktemp()
        with open(pw, "w") as f:
            f.write("secret\n")
        args = [pw if "CREDENTIALS_DIRECTORY" in a else a for a in args]
        opts.parseOptions(args)
        assert opts.config is not None
        self.assertEqual(opts.config.read_password(), "secret")

    def test_systemd_analyze_verify(self) -> None:
        tool = shutil.which("systemd-analyze")
        if tool is None:
            raise unittest.SkipTest("systemd-analyze is not installed")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        with open(self.unit, encoding="utf-8") as f:
            text = f.read().replace("/usr/local/bin/twistd", twistd)
        d = self.mktemp()
        os.makedirs(d)
        path = os.path.join(d, "dockerspaces.service")
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
        p = subprocess.run([tool, "verify", path], check=False, capture_output=True, text=True, timeout=60)
        lines = [
            x
            for x in (p.stdout + p.stderr).splitlines()
            if "dockerspaces.service" in x and "docker.service" not in x.split(":", 1)[-1]
        ]
        self.assertEqual((p.returncode, lines), (0, []), p.stdout + p.stderr)


# --- building the image ------------------------------------------------------------------


def _have_image(client: Any, tag: str) -> bool:
    try:
        client.inspect_image(tag)
        return True
    except Exception:  # noqa: BLE001 - not there, or no engine: build it
        return False


def ensure_pybase() -> str:
    """The local Debian + python3 base image (built by debootstrap once, then cached)."""
    client = docker_client(timeout=600)
    try:
        with open(_LOCK, "a") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            if _have_image(client, PYBASE):
                return PYBASE
            if shutil.which("debootstrap") is None or os.geteuid() != 0:
                raise unittest.SkipTest(
                    f"no {PYBASE} image and no way to make it (needs root and `apt-get install debootstrap`)"
                )
            work = tempfile.mkdtemp(prefix="ds-pybase-")
            try:
                target = os.path.join(work, "root")
                p = subprocess.run(
                    [
                        "debootstrap",
                        "--variant=minbase",
                        "--include=python3,python3-venv,python3-pip,ca-certificates",
                        "bookworm",
                        target,
                        "http://deb.debian.org/debian",
                    ],
                    check=False,
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
                if p.returncode != 0:
                    raise unittest.SkipTest(f"debootstrap failed: {p.stdout[-2000:]}{p.stderr[-2000:]}")
                tar = subprocess.Popen(["tar", "-C", target, "-c", "."], stdout=subprocess.PIPE)
                imp = subprocess.run(
                    ["docker", "import", "-c", "ENV LANG=C.UTF-8", "-c", 'CMD ["/bin/bash"]', "-", PYBASE],
                    stdin=tar.stdout,
                    check=False,
                    capture_output=True,
                    text=True,
                    timeout=600,
                )
                tar.wait()
                if imp.returncode != 0:
                    raise RuntimeError(f"docker import failed: {imp.stderr}")
            finally:
                shutil.rmtree(work, ignore_errors=True)
            return PYBASE
    finally:
        client.close()


def ensure_wheels() -> str:
    """A directory of wheels for every dependency (and the build backend), cached."""
    h = hashlib.sha256()
    for name in ("setup.cfg", "pyproject.toml"):
        with open(os.path.join(ROOT, name), "rb") as f:
            h.update(f.read())
    out = os.path.join(tempfile.gettempdir(), f"dockerspaces-test-wheels-{h.hexdigest()[:12]}")
    if os.path.exists(os.path.join(out, ".complete")):
        return out
    tmp = out + f".{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    p = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "-w", tmp, ROOT, "setuptools>=61", "wheel"],
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if p.returncode != 0:
        raise unittest.SkipTest(f"cannot build dependency wheels (no package index?): {p.stderr[-1500:]}")
    for name in os.listdir(tmp):
        if name.startswith("dockerspaces-"):
            os.remove(os.path.join(tmp, name))  # the image builds dockerspaces from source
    open(os.path.join(tmp, ".complete"), "w").close()
    if os.path.exists(out):
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        os.rename(tmp, out)
    return out


def build_image(tag: str = IMAGE) -> tuple[str, float]:
    """Build the repository's Dockerfile on the local base with local wheels: (tag, seconds)."""
    base = ensure_pybase()
    wheels = ensure_wheels()
    ctx = tempfile.mkdtemp(prefix="ds-image-ctx-")
    try:
        for item in _CONTEXT_ITEMS:
            src = os.path.join(ROOT, item)
            if os.path.isdir(src):
                shutil.copytree(
                    src,
                    os.path.join(ctx, item),
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache"),
                )
            else:
                shutil.copy2(src, os.path.join(ctx, item))
        shutil.copytree(wheels, os.path.join(ctx, "wheels"))
        client = docker_client(timeout=900)
        t0 = time.monotonic()
        log: list[str] = []
        try:
            for chunk in client.build(
                path=ctx,
                tag=tag,
                buildargs={"BASE": base},
                rm=True,
                forcerm=True,
                decode=True,
                pull=False,
                labels={TEST_LABEL + ".image": "1"},
            ):
                if "error" in chunk:
                    raise RuntimeError(f"docker build failed: {chunk['error']}\n" + "".join(log[-60:]))
                if "stream" in chunk:
                    log.append(chunk["stream"])
        finally:
            client.close()
        return tag, time.monotonic() - t0
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


_BUILT: dict[str, Any] = {}
# not TEST_LABEL: other suites' remove_test_containers() must not stop our running proxy
OWN_LABEL = "dockerspaces.test.dockerfile"


def _gateway_of(client: Any, cid: str) -> str:
    """The default gateway of container ``cid`` (the host's bridge address)."""
    return str(client.inspect_container(cid)["NetworkSettings"]["Gateway"])


class DockerfileTests(unittest.TestCase):
    """The image builds, runs unprivileged with the socket mounted, and serves y:."""

    skip = docker_available()
    timeout = 900

    def setUp(self) -> None:
        # trial has no setUpClass: build once per process, on first use
        if "image" not in _BUILT:
            ensure_test_images(WEB)
            _BUILT["image"], _BUILT["seconds"] = build_image()
        self.image: str | None = str(_BUILT["image"])
        self.build_seconds = float(_BUILT["seconds"])
        self.client = docker_client(timeout=120)
        self.addCleanup(self.client.close)
        remove_containers({"label": [OWN_LABEL]})  # leftovers of a crashed run

    def run_image(self, args: list[str], **kw: Any) -> str:
        assert self.image is not None
        host_config = self.client.create_host_config(**kw)
        c = self.client.create_container(
            self.image,
            command=args,
            host_config=host_config,
            labels={OWN_LABEL: "1"},
            ports=list(kw.get("port_bindings", {}) or []),
        )
        cid = str(c["Id"])
        self.addCleanup(self._remove, cid)
        self.client.start(cid)
        return cid

    def _remove(self, cid: str) -> None:
        try:
            self.client.stop(cid, timeout=15)
        except Exception:  # noqa: BLE001, S110 - stopped or gone already: removed below
            pass
        try:
            self.client.remove_container(cid, force=True)
        except Exception:  # noqa: BLE001, S110 - gone already is fine
            pass

    def logs(self, cid: str) -> str:
        try:
            return bytes(self.client.logs(cid)).decode("utf-8", "replace")
        except Exception as e:  # noqa: BLE001 - gone already
            return f"(no log: {e})"

    def test_build_is_quick(self) -> None:
        """Building (base and wheels cached) takes well under two minutes."""
        self.assertLess(self.build_seconds, 120)

    def test_help(self) -> None:
        assert self.image is not None
        out = self.client.create_container(self.image, command=["--help"], labels={OWN_LABEL: "1"})
        self.addCleanup(self._remove, out["Id"])
        self.client.start(out["Id"])
        rc = self.client.wait(out["Id"], timeout=60)["StatusCode"]
        text = self.logs(out["Id"])
        self.assertEqual(rc, 0, text)
        self.assertIn("-cluster P:N:URL", text)
        self.assertIn("--queue-timeout", text)

    def test_plugin_cache_is_fresh(self) -> None:
        """The twisted plugin cache was written at build time (the runtime user cannot)."""
        assert self.image is not None
        c = self.client.create_container(
            self.image,
            entrypoint=[
                "/opt/dockerspaces/bin/python",
                "-c",
                "import glob; print(glob.glob('/opt/dockerspaces/lib/*/site-packages/twisted/plugins/dropin.cache'))",
            ],
            labels={OWN_LABEL: "1"},
        )
        self.addCleanup(self._remove, c["Id"])
        self.client.start(c["Id"])
        self.client.wait(c["Id"], timeout=60)
        self.assertIn("dropin.cache", self.logs(c["Id"]))

    def test_serves_y_through_a_sibling(self) -> None:
        """`docker run -p P:8888 -v docker.sock IMAGE --user U --password P` answers y:."""
        port, slot = free_port(), free_port()
        instance = unique_instance("image")
        self.addCleanup(remove_instance_containers, instance)
        cid = self.run_image(
            [
                "--user",
                "someone",
                "--password",
                "not-used-here",
                "-target",
                "1",
                "-start-port",
                str(slot),
                "--instance",
                instance,
            ],
            binds=["/var/run/docker.sock:/var/run/docker.sock"],
            port_bindings={8888: ("127.0.0.1", port)},
        )
        try:
            wait_http_status("127.0.0.1", port, timeout=60, path="/monitor:broker/")
        except TimeoutError:
            self.fail("dockerspaces in the container never answered:\n" + self.logs(cid))
        # unprivileged, in the socket's group
        top = self.client.top(cid, ps_args="-o pid,user,args")
        users = {row[1] for row in top["Processes"]}
        self.assertNotIn("root", users, top)
        url = f"http://127.0.0.1:{port}/y:dockerspaces-test:web:1:8080/cgi-bin/env?via=image"
        try:
            with urllib.request.urlopen(url, timeout=90) as r:
                status, body = r.status, r.read().decode()
        except Exception as e:  # noqa: BLE001 - any failure: show it with the log
            self.fail(f"y: request failed: {e}\n--- dockerspaces log ---\n{self.logs(cid)}")
        self.assertEqual(status, 200)
        self.assertIn("DS_IMAGE=dockerspaces-test/web:1", body)
        self.assertIn("QUERY_STRING=via=image", body)
        # the sibling publishes its port on the bridge gateway, not on every address
        sib = self.client.containers(filters={"label": [f"dockerspaces.instance={instance}"]})
        self.assertEqual(len(sib), 1, sib)
        bindings = [(p.get("IP"), p.get("PublicPort")) for p in sib[0]["Ports"] if p.get("PublicPort")]
        self.assertEqual(bindings, [(_gateway_of(self.client, cid), slot)])
        snap = json.loads(
            urllib.request.urlopen(f"http://127.0.0.1:{port}/monitor:broker/", timeout=10).read()
        )
        self.assertNotIn("not-used-here", json.dumps(snap))
        self.assertNotIn("not-used-here", self.logs(cid))
