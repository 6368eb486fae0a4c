"""Registry credentials: which registry an image comes from, and who gets which secret."""

from __future__ import annotations

import base64
import json
import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.engine.auth import (
    DOCKER_HUB,
    DOCKER_HUB_SERVER,
    AuthError,
    Credentials,
    RegistryAuth,
    normalize_registry,
    parse_auths,
    registry_of,
    split_ref,
)


class RegistryOfTests(SynchronousTestCase):
    """docker's rule for the registry part of an image reference."""

    def test_hub_images(self) -> None:
        for ref in ("selmaproject/tts:777", "ubuntu", "ubuntu:22.04", "library/ubuntu", "a/b/c:1"):
            self.assertEqual(registry_of(ref), DOCKER_HUB, ref)

    def test_registry_with_port_or_dot_or_localhost(self) -> None:
        self.assertEqual(registry_of("localhost:5000/team/app:1"), "localhost:5000")
        self.assertEqual(registry_of("localhost/app"), "localhost")
        self.assertEqual(registry_of("registry.example.com/app:2"), "registry.example.com")
        self.assertEqual(registry_of("Registry.Example.com:443/app"), "registry.example.com:443")

    def test_hub_aliases(self) -> None:
        for alias in (
            "https://index.docker.io/v1/",
            "index.docker.io",
            "docker.io",
            "registry-1.docker.io",
            "",
        ):
            self.assertEqual(normalize_registry(alias), DOCKER_HUB, alias)
        self.assertEqual(registry_of("docker.io/library/ubuntu"), DOCKER_HUB)
        self.assertEqual(normalize_registry("http://localhost:5000/"), "localhost:5000")

    def test_split_ref(self) -> None:
        self.assertEqual(split_ref("localhost:5000/team/app:1"), ("localhost:5000/team/app", "1"))
        self.assertEqual(split_ref("localhost:5000/team/app"), ("localhost:5000/team/app", "latest"))
        self.assertEqual(split_ref("ubuntu@sha256:abc"), ("ubuntu", "sha256:abc"))


class RegistryAuthTests(SynchronousTestCase):
    """Credentials go only to the registry they belong to."""

    def test_registry_option_only_for_that_registry(self) -> None:
        auth = RegistryAuth.from_options(
            registry="https://localhost:5000", user="u", password="s3cret", email="e@x"
        )
        cfg = auth.for_ref("localhost:5000/team/app:1")
        assert cfg is not None
        self.assertEqual(cfg["username"], "u")
        self.assertEqual(cfg["password"], "s3cret")
        self.assertEqual(cfg["email"], "e@x")
        self.assertEqual(cfg["serveraddress"], "localhost:5000")
        self.assertIsNone(auth.for_ref("selmaproject/tts:777"))
        self.assertIsNone(auth.for_ref("localhost:5001/team/app:1"))

    def test_no_registry_means_docker_hub(self) -> None:
        auth = RegistryAuth.from_options(user="hubuser", password="hubpw")
        cfg = auth.for_ref("selmaproject/tts:777")
        assert cfg is not None
        self.assertEqual(cfg["username"], "hubuser")
        self.assertEqual(cfg["serveraddress"], DOCKER_HUB_SERVER)
        self.assertNotIn("email", cfg)
        self.assertIsNone(auth.for_ref("localhost:5000/team/app:1"))

    def test_user_without_password_is_an_error(self) -> None:
        self.assertRaises(AuthError, RegistryAuth.from_options, user="u")

    def test_no_credentials(self) -> None:
        auth = RegistryAuth.from_options()
        self.assertIsNone(auth.for_ref("selmaproject/tts:777"))
        self.assertEqual(auth.registries, [])

    def test_repr_hides_passwords(self) -> None:
        auth = RegistryAuth.from_options(registry="localhost:5000", user="u", password="TOPSECRET")
        self.assertNotIn("TOPSECRET", repr(auth))
        self.assertNotIn("TOPSECRET", str(auth))
        self.assertIn("localhost:5000", repr(auth))
        cred = auth.credentials_for("http://localhost:5000")
        assert cred is not None
        self.assertNotIn("TOPSECRET", repr(cred))
        self.assertNotIn("TOPSECRET", str(cred))


class AuthsFileTests(SynchronousTestCase):
    """``--auths`` in docker config.json form."""

    def _write(self, data: object) -> str:
        fd, path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data) if not isinstance(data, str) else data)
        self.addCleanup(os.remove, path)
        return path

    def test_both_entry_forms(self) -> None:
        path = self._write(
            {
                "auths": {
                    "localhost:5000": {"auth": base64.b64encode(b"alice:pw:with:colons").decode()},
                    "https://index.docker.io/v1/": {"username": "bob", "password": "hubpw"},
                    "helper.example.com": {},
                }
            }
        )
        auth = RegistryAuth.from_options(auths_file=path)
        self.assertEqual(auth.registries, [DOCKER_HUB, "localhost:5000"])
        local = auth.for_ref("localhost:5000/x:1")
        hub = auth.for_ref("selmaproject/tts:777")
        assert local is not None and hub is not None
        self.assertEqual((local["username"], local["password"]), ("alice", "pw:with:colons"))
        self.assertEqual((hub["username"], hub["password"]), ("bob", "hubpw"))
        self.assertIsNone(auth.for_ref("helper.example.com/x:1"))

    def test_command_line_wins_for_its_registry(self) -> None:
        path = self._write({"auths": {"localhost:5000": {"username": "file", "password": "f"}}})
        auth = RegistryAuth.from_options(registry="localhost:5000", user="cli", password="c", auths_file=path)
        self.assertEqual(auth.credentials_for("localhost:5000"), Credentials("cli", "c"))

    def test_bad_files(self) -> None:
        self.assertRaises(AuthError, RegistryAuth.from_options, auths_file="/nonexistent/auths.json")
        self.assertRaises(AuthError, RegistryAuth.from_options, auths_file=self._write("{nope"))
        self.assertRaises(AuthError, parse_auths, {"nothing": 1})
        self.assertRaises(AuthError, parse_auths, {"auths": {"r": {"auth": "!!notbase64"}}})
        self.assertRaises(
            AuthError, parse_auths, {"auths": {"r": {"auth": base64.b64encode(b"nocolon").decode()}}}
        )
