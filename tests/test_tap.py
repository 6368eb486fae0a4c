"""dockerspaces.tap: the twistd plugin's Options (what was given, validation into a
Config, usage errors without tracebacks) and makeService (the service tree)."""

from __future__ import annotations

import os
import tempfile

from twisted.application.service import IServiceCollection, MultiService
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.app import BrokerService, ProxyService
from dockerspaces.tap import Options, makeService


class OptionsTests(SynchronousTestCase):
    def test_given_holds_only_what_was_given(self) -> None:
        """Flags, parameters and repeatable options given land in ``given`` by name;
        the rest come from the defaults in ``config``."""
        o = Options()
        o.parseOptions(["--port", "tcp:0", "--port", "tcp:1", "--keep-containers", "--stop", "7"])
        self.assertEqual(o.given, {"port": ["tcp:0", "tcp:1"], "keep-containers": True, "stop": "7"})
        assert o.config is not None
        self.assertEqual(o.config.ports, ("tcp:0", "tcp:1"))
        self.assertEqual(o.config.stop, 7)
        self.assertTrue(o.config.keep_containers)

    def test_bad_values_are_usage_errors(self) -> None:
        """A bad value names the option, as a usage error (twistd prints it, no
        traceback)."""
        with self.assertRaises(usage.UsageError) as cm:
            Options().parseOptions(["--stop", "soon"])
        self.assertIn("stop", str(cm.exception))

    def test_unreadable_state_with_accounts(self) -> None:
        """--auth accounts opens (creates, migrates) the state file at parse time: a
        state in a missing directory is a usage error naming --state."""
        missing = os.path.join(tempfile.mkdtemp(), "no", "such", "dir", "state.sqlite")
        with self.assertRaises(usage.UsageError) as cm:
            Options().parseOptions(["--auth", "accounts", "--state", missing])
        self.assertIn("--state", str(cm.exception))


class MakeServiceTests(SynchronousTestCase):
    def test_builds_the_service_tree(self) -> None:
        """makeService returns the top MultiService holding the broker and the proxy
        services and one listener per --port (nothing listens before it starts)."""
        o = Options()
        o.parseOptions(["--port", "tcp:0:interface=127.0.0.1", "--target", "0", "--instance", "tap-test"])
        top = makeService(o)
        self.assertIsInstance(top, MultiService)
        self.assertFalse(top.running)
        services = list(IServiceCollection(top))
        self.assertEqual(sum(isinstance(s, BrokerService) for s in services), 1)
        self.assertEqual(sum(isinstance(s, ProxyService) for s in services), 1)
        self.assertEqual(sum(hasattr(s, "endpoint") for s in services), 1)

    def test_without_parsed_options(self) -> None:
        """makeService of Options never parsed is a usage error, not an AttributeError."""
        self.assertRaises(usage.UsageError, makeService, Options())
