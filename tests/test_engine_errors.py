"""Error classification (dockerspaces.engine.errors): pull messages and docker-py /
transport exceptions to typed EngineErrors."""

from __future__ import annotations

from types import SimpleNamespace

import docker.errors  # type: ignore[import-untyped]
import requests.exceptions
from twisted.internet.defer import CancelledError
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.engine.errors import (
    explanation,
    is_not_found,
    pull_error,
    status_of,
    translate,
)
from dockerspaces.engine.interface import EngineError, EngineUnreachable, ImageNotFound, Unauthorized

from .test_engine_harness import api_error


class PullErrorTests(SynchronousTestCase):
    """pull_error(): the words of a failed pull to Unauthorized, ImageNotFound, EngineError."""

    def test_denied_without_credentials_is_not_found(self) -> None:
        self.assertIsInstance(
            pull_error("a/b:1", "docker.io", "pull access denied for a/b", False), ImageNotFound
        )
        self.assertIsInstance(
            pull_error("a/b:1", "docker.io", "pull access denied for a/b", True), Unauthorized
        )

    def test_port_digits_are_not_a_401(self) -> None:
        """A registry on port 51401 once made a missing tag look like refused credentials."""
        msg = (
            "manifest for localhost:51401/dstest/tts:nosuchtag not found: manifest unknown: manifest unknown"
        )
        self.assertIsInstance(
            pull_error("localhost:51401/dstest/tts:nosuchtag", "localhost:51401", msg, True), ImageNotFound
        )
        self.assertIsInstance(
            pull_error("r:5000/a:1", "r:5000", "Head https://r:5000/v2/a/manifests/1: 401", True),
            Unauthorized,
        )


class TranslateTests(SynchronousTestCase):
    """translate(): what a docker-py call raised, as the broker reads it."""

    def test_transport_failures_are_unreachable(self) -> None:
        for e in (
            requests.exceptions.ConnectionError("refused"),
            requests.exceptions.Timeout("slow"),
            ConnectionResetError("reset"),
            TimeoutError("t"),
            OSError("no route"),
            docker.errors.DockerException("Error while fetching server API version"),
        ):
            new = translate(e, "local", "unix:///s")
            self.assertIsInstance(new, EngineUnreachable, e)
            self.assertIn("local", str(new))
            self.assertIn("unix:///s", str(new))

    def test_api_error_is_an_engine_error_in_the_engines_words(self) -> None:
        new = translate(api_error(500, "driver failed"), "local", "unix:///s")
        self.assertIsInstance(new, EngineError)
        self.assertNotIsInstance(new, EngineUnreachable)
        self.assertEqual(str(new), "Docker engine local: driver failed")

    def test_others_unchanged(self) -> None:
        for e in (EngineError("x"), CancelledError(), ValueError("bug")):
            self.assertIs(translate(e, "local", "unix:///s"), e)

    def test_reading_api_errors(self) -> None:
        e = api_error(404, "No such container: c1")
        self.assertEqual(
            (explanation(e), status_of(e), is_not_found(e)), ("No such container: c1", 404, True)
        )
        conflict = api_error(409, "is not running")
        self.assertEqual((status_of(conflict), is_not_found(conflict)), (409, False))
        plain = ValueError("")
        self.assertEqual((explanation(plain), status_of(plain)), ("ValueError", None))
        resp = SimpleNamespace(status_code=404, url="http://docker/x", reason="R")
        self.assertTrue(is_not_found(docker.errors.APIError("gone", response=resp)))
