"""Every engine URL form against the real engine: tcp://, http://…/prefix, https://, ssh://.

dockerd here listens only on its unix socket, so each test puts an in-test front door
before it (a TCP or TLS forwarder, an HTTP prefix gateway, a private sshd).
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from dockerspaces.config import HostConfig
from dockerspaces.engine.engine import Engine, EngineService
from dockerspaces.engine.interface import RunOptions, SlotInfo
from dockerspaces.engine.urls import EngineTLS
from dockerspaces.spec import JobSpec, parse_route

from .dockerutil import (
    DOCKER_URL,
    docker_available,
    free_port,
    http_get,
    remove_instance_containers,
    unique_instance,
)
from .fixtures.forwarders import (
    DOCKER_SOCKET,
    listen_prefix_gateway,
    listen_tcp_to_unix,
    listen_tls_to_unix,
)
from .fixtures.sshd import PrivateSSHD, sshd_skip_reason
from .fixtures.tlscerts import make_tls_material
from .images import TTS, ensure_test_images

reactor: Any = _reactor


def _socket_reason() -> str | None:
    reason = docker_available()
    if reason:
        return reason
    if not DOCKER_URL.startswith("unix://") or not os.path.exists(DOCKER_SOCKET):
        return f"these tests forward to the local socket {DOCKER_SOCKET}"
    return None


class EngineURLTests(TestCase):
    """Each URL form runs a container end to end (ping, pull-if-missing, start, ready, stop)."""

    skip = _socket_reason()
    timeout = 60

    def setUp(self) -> None:
        ensure_test_images(TTS)
        self.instance = unique_instance("url")
        self.addCleanup(remove_instance_containers, self.instance)

    def engine(self, url: str, **kw: Any) -> Engine:
        host = HostConfig(name="remote", url=url, start_port=free_port(), slots=1)
        engine = Engine(reactor, host, self.instance, "missing", **kw)
        svc = EngineService(engine)
        svc.startService()
        self.addCleanup(svc.stopService)
        return engine

    async def round_trip(self, engine: Engine) -> None:
        self.assertTrue(await engine.ping())
        spec = parse_route("x:selmaproject:tts:777:5002:VIA=" + engine.host.url.split(":")[0])
        assert isinstance(spec, JobSpec)
        slot = SlotInfo(engine.name, engine.host.start_port)
        await engine.ensure_image(spec.ref)
        h = await engine.create(spec, slot, RunOptions())
        await engine.start(h)
        await engine.wait_ready(h, reactor.seconds() + 10, RunOptions())
        status, body = await deferToThread(http_get, engine.host.address, slot.port, "/")
        self.assertEqual(status, 200)
        self.assertIn(f"VIA={engine.host.url.split(':')[0]}".encode(), body)
        own = await engine.list_own()
        self.assertEqual([o.id for o in own], [h.id])
        await engine.stop(h, 0)
        self.assertEqual(await engine.list_own(), [])

    def test_tcp(self) -> Deferred[None]:
        port = listen_tcp_to_unix(reactor)
        self.addCleanup(port.stopListening)
        return ensureDeferred(self.round_trip(self.engine(f"tcp://127.0.0.1:{port.getHost().port}")))

    def test_http_with_path_prefix_and_token_header(self) -> Deferred[None]:
        fwd = listen_tcp_to_unix(reactor)
        self.addCleanup(fwd.stopListening)
        gw = listen_prefix_gateway(reactor, fwd.getHost().port, b"docker:local", b"x-ds-token", b"tok123")
        self.addCleanup(gw.close)
        seen = gw.seen
        url = f"http://127.0.0.1:{gw.port.getHost().port}/docker:local"

        async def go() -> None:
            await self.round_trip(self.engine(url, extra_headers={"X-DS-Token": "tok123"}))
            self.assertTrue(seen)
            self.assertTrue(all(uri.startswith(b"/docker:local/") for uri, _ in seen), seen[:3])
            self.assertEqual({tok for _, tok in seen}, {b"tok123"})
            bad = self.engine(url, extra_headers={"X-DS-Token": "wrong"})
            self.assertFalse(await bad.ping())

        return ensureDeferred(go())

    def test_https_with_client_certificate(self) -> Deferred[None]:
        tmp = tempfile.mkdtemp(prefix="ds-tls-")
        tls = make_tls_material(tmp)
        port = listen_tls_to_unix(reactor, tls)
        self.addCleanup(port.stopListening)
        url = f"https://127.0.0.1:{port.getHost().port}"

        async def go() -> None:
            good = EngineTLS(ca_cert=tls.ca_file, client_cert=tls.cert_file, client_key=tls.key_file)
            await self.round_trip(self.engine(url, tls=good))
            self.assertEqual(EngineTLS.from_cert_path(tmp), good)
            # Without a client certificate the TLS front door refuses us.
            nocert = self.engine(url, tls=EngineTLS(ca_cert=tls.ca_file))
            self.assertFalse(await nocert.ping())

        return ensureDeferred(go())


class SSHEngineTests(TestCase):
    """``ssh://root@127.0.0.1:PORT`` through a private sshd and paramiko."""

    skip = _socket_reason() or sshd_skip_reason()
    timeout = 60

    def setUp(self) -> None:
        ensure_test_images(TTS)
        self.instance = unique_instance("ssh")
        self.addCleanup(remove_instance_containers, self.instance)
        self.sshd = PrivateSSHD()
        self.sshd.start()
        self.addCleanup(self.sshd.stop)
        # paramiko (inside docker-py) reads keys and known_hosts from $HOME/.ssh.
        old_home = os.environ.get("HOME")
        os.environ["HOME"] = self.sshd.home
        self.addCleanup(self._restore_home, old_home)

    @staticmethod
    def _restore_home(old: str | None) -> None:
        if old is None:
            os.environ.pop("HOME", None)
        else:
            os.environ["HOME"] = old

    def test_ssh(self) -> Deferred[None]:
        host = HostConfig(name="ssh", url=self.sshd.url, start_port=free_port(), slots=1)
        engine = Engine(reactor, host, self.instance, "missing")
        svc = EngineService(engine)
        svc.startService()
        self.addCleanup(svc.stopService)
        return ensureDeferred(EngineURLTests.round_trip(self, engine))  # type: ignore[arg-type]
