"""``--version`` (:mod:`dockerspaces.about`): the plugin's and the console script's."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.tap import Options


class VersionTests(SynchronousTestCase):
    """--version prints dockerspaces' version, with Twisted's and docker-py's."""

    def check(self, run: Any) -> None:
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            e = self.assertRaises(SystemExit, run)
        self.assertEqual(e.code, 0)
        import twisted
        from dockerspaces import __version__

        text = out.getvalue()
        self.assertTrue(text.startswith(f"dockerspaces {__version__} "), text)
        self.assertIn(f"Twisted {twisted.__version__}", text)
        self.assertIn("docker-py ", text)

    def test_plugin(self) -> None:
        self.check(lambda: Options().parseOptions(["--version"]))

    def test_console_script(self) -> None:
        from dockerspaces.compat import main

        self.check(lambda: main(["--version"]))
        self.check(lambda: main(["-version"]))
