"""Pulling through Engine.ensure_image from private registries with credentials."""

from __future__ import annotations

import atexit
import base64
import time
from typing import Any

from twisted.internet import reactor as _reactor
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from dockerspaces.config import HostConfig
from dockerspaces.engine.auth import RegistryAuth
from dockerspaces.engine.engine import Engine, EngineService
from dockerspaces.engine.interface import ImageNotFound, PullProgress, Unauthorized

from .dockerutil import DOCKER_URL, docker_available, docker_client, unique_instance
from .fixtures.registry import (
    PrivateRegistry,
    RegistryUnavailable,
    push_test_image,
    registry_skip_reason,
    remove_local_image,
)
from .images import TTS, ensure_test_images

reactor: Any = _reactor
_shared: tuple[PrivateRegistry, str] | None = None


class RecordingRegistry(Resource):
    """A fake registry that challenges for Basic auth and records Authorization headers."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[tuple[bytes, bytes | None]] = []

    def render(self, request: Request) -> bytes:
        self.requests.append((request.uri, request.getHeader(b"authorization")))
        request.setResponseCode(401)
        request.setHeader(b"docker-distribution-api-version", b"registry/2.0")
        request.setHeader(b"www-authenticate", b'Basic realm="recorder"')
        request.setHeader(b"content-type", b"application/json")
        return b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}'


class PlainHTTPSite(Site):
    """A Site that drops TLS handshakes at once (dockerd tries https:// before http://)."""

    def buildProtocol(self, addr: Any) -> Any:
        proto = super().buildProtocol(addr)
        original = proto.dataReceived
        first = [True]

        def data_received(data: bytes) -> None:
            if first[0]:
                first[0] = False
                if data[:1] == b"\x16":  # TLS ClientHello
                    getattr(proto, "_channel", proto).transport.abortConnection()
                    return
            original(data)

        proto.dataReceived = data_received
        return proto


class RegistryPullTests(TestCase):
    """A real registry with htpasswd auth, plus a recording one."""

    skip = docker_available() or registry_skip_reason()
    timeout = 90
    USER, PASSWORD = "alice", "s3cret-pw"

    registry: PrivateRegistry | None = None
    ref = ""

    def setUp(self) -> None:
        # trial has no setUpClass: one registry per test process, stopped at exit.
        global _shared
        if _shared is None:
            ensure_test_images(TTS)
            reg = PrivateRegistry(self.USER, self.PASSWORD)
            try:
                reg.start()
            except RegistryUnavailable as e:
                reg.stop()
                raise self.failureException(f"private registry did not start: {e}") from None
            atexit.register(reg.stop)
            _shared = (reg, push_test_image(reg, TTS, f"dstest/tts-{unique_instance()}", "1"))
        self.registry, self.ref = _shared
        remove_local_image(self.ref)
        self.addCleanup(remove_local_image, self.ref)

    def engine(self, auth: RegistryAuth) -> Engine:
        host = HostConfig(name="local", url=DOCKER_URL, start_port=1, slots=1)
        engine = Engine(reactor, host, unique_instance("reg"), "always", auth)
        svc = EngineService(engine)
        svc.startService()
        self.addCleanup(svc.stopService)
        return engine

    def image_present(self, ref: str) -> bool:
        c = docker_client()
        try:
            c.inspect_image(ref)
            return True
        except Exception:  # noqa: BLE001 - any error means not present (docker-py raises several)
            return False
        finally:
            c.close()

    def test_right_credentials(self) -> Deferred[None]:
        assert self.registry is not None
        auth = RegistryAuth.from_options(
            registry=f"http://{self.registry.host}", user=self.USER, password=self.PASSWORD
        )

        async def go() -> None:
            progress: list[PullProgress] = []
            await self.engine(auth).ensure_image(self.ref, progress.append)
            self.assertTrue(self.image_present(self.ref))
            self.assertTrue(progress)
            self.assertEqual(progress[0].status, f"pulling {self.ref} from {self.registry.host}")  # type: ignore[union-attr]

        return ensureDeferred(go())

    def test_wrong_credentials_quickly(self) -> Deferred[None]:
        assert self.registry is not None
        auth = RegistryAuth.from_options(registry=self.registry.host, user=self.USER, password="WRONG-pw-123")

        async def go() -> None:
            t0 = time.monotonic()
            with self.assertRaises(Unauthorized) as cm:
                await self.engine(auth).ensure_image(self.ref)
            self.assertLess(time.monotonic() - t0, 10)
            self.assertIn(self.registry.host, str(cm.exception))  # type: ignore[union-attr]
            self.assertNotIn("WRONG-pw-123", str(cm.exception))
            self.assertFalse(self.image_present(self.ref))

        return ensureDeferred(go())

    def test_no_credentials(self) -> Deferred[None]:
        async def go() -> None:
            with self.assertRaises(Unauthorized) as cm:
                await self.engine(RegistryAuth()).ensure_image(self.ref)
            self.assertIn("without credentials", str(cm.exception))

        return ensureDeferred(go())

    def test_missing_tag(self) -> Deferred[None]:
        assert self.registry is not None
        auth = RegistryAuth.from_options(registry=self.registry.host, user=self.USER, password=self.PASSWORD)

        async def go() -> None:
            with self.assertRaises(ImageNotFound):
                await self.engine(auth).ensure_image(self.ref.rsplit(":", 1)[0] + ":nosuchtag")

        return ensureDeferred(go())

    def test_credentials_not_sent_to_another_registry(self) -> Deferred[None]:
        assert self.registry is not None
        recorder = RecordingRegistry()
        port = reactor.listenTCP(0, PlainHTTPSite(recorder), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        other = f"localhost:{port.getHost().port}"
        other_ref = f"{other}/team/app:1"

        async def go() -> None:
            # Credentials for the real registry only: the recorder must see none.
            auth = RegistryAuth.from_options(
                registry=self.registry.host,
                user=self.USER,
                password=self.PASSWORD,  # type: ignore[union-attr]
            )
            with self.assertRaises(Unauthorized):
                await self.engine(auth).ensure_image(other_ref)
            self.assertTrue(recorder.requests, "the engine never contacted the recorder")
            self.assertEqual([a for _, a in recorder.requests if a], [])
            # Control: with credentials for the recorder, it does see them.
            recorder.requests.clear()
            auth2 = RegistryAuth.from_options(registry=other, user="bob", password="bobpw")
            with self.assertRaises(Unauthorized):
                await self.engine(auth2).ensure_image(other_ref)
            sent = {a for _, a in recorder.requests if a}
            self.assertEqual(sent, {b"Basic " + base64.b64encode(b"bob:bobpw")})

        return ensureDeferred(go())
