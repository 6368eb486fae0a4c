"""ensure_image (dockerspaces.engine.pull): policies, credentials routing, progress,
errors in the stream, shared pulls."""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.python.failure import Failure

from dockerspaces.engine.auth import RegistryAuth
from dockerspaces.engine.engine import Engine
from dockerspaces.engine.interface import EngineError, ImageNotFound, PullProgress, Unauthorized

from .test_engine_harness import HOST, EngineTestCase, Reactor


class PullTests(EngineTestCase):
    """ensure_image: policies, credentials routing, progress, errors in the stream."""

    def sent_auth(self, ref: str) -> dict[str, str] | None:
        for r, headers in self.client.pull_headers:
            if r == ref:
                if "X-Registry-Auth" not in headers:
                    return None
                raw = headers["X-Registry-Auth"]
                raw = raw.decode() if isinstance(raw, bytes) else raw
                return json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        raise AssertionError(f"{ref} was not pulled")

    def test_credentials_only_to_their_registry(self) -> None:
        auth = RegistryAuth.from_options(registry="localhost:5000", user="u", password="pw")
        eng = self.make(pull="always", auth=auth)
        self.successResultOf(eng.ensure_image("localhost:5000/team/app:1"))
        self.successResultOf(eng.ensure_image("selmaproject/tts:777"))
        self.assertEqual(self.sent_auth("localhost:5000/team/app:1")["username"], "u")  # type: ignore[index]
        self.assertEqual(self.sent_auth("localhost:5000/team/app:1")["password"], "pw")  # type: ignore[index]
        self.assertIsNone(self.sent_auth("selmaproject/tts:777"))

    def test_hub_credentials_not_sent_to_private_registry(self) -> None:
        auth = RegistryAuth.from_options(user="hub", password="hubpw")
        eng = self.make(pull="always", auth=auth)
        self.successResultOf(eng.ensure_image("localhost:5000/team/app:1"))
        self.successResultOf(eng.ensure_image("selmaproject/tts:777"))
        self.assertIsNone(self.sent_auth("localhost:5000/team/app:1"))
        self.assertEqual(self.sent_auth("selmaproject/tts:777")["username"], "hub")  # type: ignore[index]

    def test_missing_present_does_not_pull(self) -> None:
        eng = self.make(pull="missing")
        self.client.images.add("selmaproject/tts:777")
        self.successResultOf(eng.ensure_image("selmaproject/tts:777"))
        self.assertEqual(self.client.names(), ["inspect_image"])

    def test_missing_absent_pulls(self) -> None:
        eng = self.make(pull="missing")
        self.successResultOf(eng.ensure_image("selmaproject/tts:777"))
        self.assertEqual(self.client.names(), ["inspect_image", "pull", "inspect_image"])

    def test_always_pulls_even_if_present(self) -> None:
        eng = self.make(pull="always")
        self.client.images.add("selmaproject/tts:777")
        self.successResultOf(eng.ensure_image("selmaproject/tts:777"))
        self.assertIn("pull", self.client.names())

    def test_never_fails_when_absent(self) -> None:
        eng = self.make(pull="never")
        f = self.failureResultOf(eng.ensure_image("selmaproject/tts:777"), ImageNotFound)
        self.assertIn("--pull is never", str(f.value))
        self.assertNotIn("pull", self.client.names())

    def test_bad_policy(self) -> None:
        self.assertRaises(ValueError, Engine, Reactor(), HOST, "i", "sometimes")

    def test_progress_on_the_reactor(self) -> None:
        eng = self.make(pull="always")
        self.client.pull_chunks["a/b:1"] = [
            {"status": "Pulling fs layer", "id": "l1"},
            {"status": "Downloading", "id": "l1", "progressDetail": {"current": 5, "total": 10}},
            {"status": "Pull complete", "id": "l1"},
            {"status": "Status: Downloaded newer image for a/b:1"},
        ]
        self.client.images.add("a/b:1")
        seen: list[PullProgress] = []
        self.successResultOf(eng.ensure_image("a/b:1", seen.append))
        statuses = [p.status for p in seen]
        self.assertEqual(statuses[0], "pulling a/b:1 from docker.io")
        self.assertIn("l1: Pulling fs layer", statuses)
        self.assertIn("l1: Pull complete", statuses)
        self.assertIn("Status: Downloaded newer image for a/b:1", statuses)
        self.assertTrue(all(p.ref == "a/b:1" for p in seen))

    def _pull_fails(self, message: str, auth: RegistryAuth | None = None) -> Failure:
        eng = self.make(pull="always", auth=auth)
        self.client.pull_chunks["localhost:5000/a:1"] = [
            {"status": "Pulling from a"},
            {"errorDetail": {"message": message}, "error": message},
        ]
        return self.failureResultOf(eng.ensure_image("localhost:5000/a:1"))

    def test_unauthorized_in_stream(self) -> None:
        auth = RegistryAuth.from_options(registry="localhost:5000", user="u", password="SECRETPW")
        f = self._pull_fails(
            "Head http://localhost:5000/v2/a/manifests/1: unauthorized: authentication required",
            auth,
        )
        f.trap(Unauthorized)
        self.assertIn("localhost:5000", str(f.value))
        self.assertIn("configured credentials", str(f.value))
        self.assertNotIn("SECRETPW", str(f.value))

    def test_not_found_in_stream(self) -> None:
        f = self._pull_fails("manifest for localhost:5000/a:1 not found: manifest unknown")
        f.trap(ImageNotFound)
        self.assertIn("localhost:5000/a:1", str(f.value))

    def test_other_error_in_stream(self) -> None:
        f = self._pull_fails("write /var/lib/docker/tmp/x: no space left on device")
        f.trap(EngineError)
        self.assertNotIsInstance(f.value, (Unauthorized, ImageNotFound))
        self.assertIn("no space left", str(f.value))

    def test_concurrent_callers_share_one_pull(self) -> None:
        eng = self.make(pull="always")
        started: list[Any] = []
        # Hold the pool: queue the work instead of running it inline.
        self.pool.callInThreadWithCallback = lambda cb, f, *a: started.append((cb, f, a))  # type: ignore[method-assign]
        p1: list[PullProgress] = []
        p2: list[PullProgress] = []
        d1 = eng.ensure_image("a/b:1", p1.append)
        d2 = eng.ensure_image("a/b:1", p2.append)
        self.assertEqual(len(started), 1)
        cb, f, a = started[0]
        cb(True, f(*a))
        self.successResultOf(d1)
        self.successResultOf(d2)
        self.assertEqual(self.client.names().count("pull"), 1)
        self.assertTrue(p1)
        self.assertEqual([p.status for p in p1], [p.status for p in p2])

    def test_cancelled_waiter_does_not_break_others(self) -> None:
        eng = self.make(pull="always")
        started: list[Any] = []
        self.pool.callInThreadWithCallback = lambda cb, f, *a: started.append((cb, f, a))  # type: ignore[method-assign]
        d1 = eng.ensure_image("a/b:1")
        d2 = eng.ensure_image("a/b:1")
        d1.cancel()
        self.failureResultOf(d1)
        cb, f, a = started[0]
        cb(True, f(*a))
        self.successResultOf(d2)
