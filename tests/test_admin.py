"""dockerspaces-admin: every command family in text and --json, errors, passwords only
from a prompt or standard input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from dockerspaces import admin
from dockerspaces.accounts.model import parse_token
from dockerspaces.accounts.passwords import verify_password
from dockerspaces.accounts.store import Store

NOW = 1_800_000_000.0
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class AdminTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.path = os.path.join(tempfile.mkdtemp(prefix="ds-admin-"), "state.sqlite")

    def run_admin(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = admin.main(["--state", self.path, *argv], stdin=io.StringIO(stdin), stdout=out,
                          stderr=err, clock=lambda: NOW)
        return code, out.getvalue(), err.getvalue()

    def json(self, *argv: str, stdin: str = "") -> Any:
        code, out, err = self.run_admin("--json", *argv, stdin=stdin)
        self.assertEqual(code, 0, err)
        return json.loads(out)

    def test_users(self) -> None:
        u = self.json("user", "add", "alice", "--password-stdin", stdin="s3cret\n")
        self.assertEqual(u, {"name": "alice", "enabled": True, "groups": [], "password": True})
        code, out, _ = self.run_admin("user", "add", "bob")  # no tty, no --password-stdin
        self.assertEqual(code, 0)
        self.assertIn("no password: tokens only", out)
        self.json("user", "passwd", "bob", "--password-stdin", stdin="other\n")
        s = Store(self.path)
        self.assertTrue(verify_password("other", s.user("bob").password_hash or ""))
        s.close()
        self.assertFalse(self.json("user", "disable", "bob")["enabled"])
        self.assertTrue(self.json("user", "enable", "bob")["enabled"])
        self.assertEqual([u["name"] for u in self.json("user", "list")], ["alice", "bob"])
        code, out, _ = self.run_admin("user", "list")
        self.assertIn("alice  yes      yes", out)
        self.assertEqual(self.json("user", "remove", "bob"), {"removed": "bob"})
        # a password never comes from argv: there is no option for it
        code, _, _ = _quiet(lambda: self.run_admin("user", "add", "carol", "--password", "x"))
        self.assertEqual(code, 2)
        code, _, err = self.run_admin("user", "passwd", "alice")  # no tty: refused
        self.assertEqual(code, 1)
        self.assertIn("use --password-stdin", err)

    def test_groups(self) -> None:
        self.json("user", "add", "alice")
        g = self.json("group", "add", "ml", "--image", "team/*", "--route", "x", "--route", "y",
                      "--containers", "2", "--gpus", "1", "--queued", "10")
        self.assertEqual(g, {"name": "ml", "images": ["team/*"], "routes": ["x", "y"],
                             "containers": 2, "gpus": 1, "queued": 10, "admin": False})
        g = self.json("group", "set", "ml", "--unlimited-containers", "--admin", "--queued", "3")
        self.assertEqual((g["containers"], g["gpus"], g["queued"], g["admin"]), (None, 1, 3, True))
        self.json("group", "add-member", "ml", "alice")
        self.assertEqual(self.json("group", "members", "ml"), ["alice"])
        self.assertEqual(self.json("group", "list")[0]["name"], "ml")
        self.json("group", "remove-member", "ml", "alice")
        self.assertEqual(self.json("group", "members", "ml"), [])
        self.json("group", "remove", "ml")
        self.assertEqual(self.json("group", "list"), [])
        code, _, _ = _quiet(lambda: self.run_admin("group", "add", "x", "--route", "ssh"))
        self.assertEqual(code, 2)  # argparse: not one of the routes

    def test_tokens(self) -> None:
        self.json("user", "add", "alice")
        t = self.json("token", "create", "alice", "--scope", "x", "--expires", "90d",
                      "--description", "ci")
        parsed = parse_token(t["token"])
        assert parsed is not None
        self.assertEqual((t["id"], t["scopes"], t["description"]), (parsed[0], ["x"], "ci"))
        self.assertEqual(t["expires"], "2027-04-15T08:00:00+00:00")
        listed = self.json("token", "list")
        self.assertEqual([x["id"] for x in listed], [t["id"]])
        self.assertNotIn("token", listed[0])
        self.assertNotIn(parsed[1], json.dumps(listed))
        code, out, _ = self.run_admin("token", "create", "alice")
        self.assertEqual(code, 0)
        self.assertIn("shown once", out)
        self.json("token", "revoke", t["id"])
        self.assertEqual(len(self.json("token", "list", "--user", "alice")), 1)
        code, out, err = self.run_admin("--json", "token", "revoke", t["id"])
        self.assertEqual(code, 1)
        self.assertEqual(json.loads(out), {"error": f"no token '{t['id']}'"})
        self.assertIn("no token", err)
        code, _, err = self.run_admin("token", "create", "alice", "--expires", "soon")
        self.assertEqual(code, 2)
        self.assertIn("neither a duration", err)

    def test_usage(self) -> None:
        s = Store(self.path)
        s.usage_start("alice", "c1", "x:a", 1, NOW - 7200)
        s.usage_stop("c1", NOW - 3600)
        s.close()
        u = self.json("usage", "--since", "1d")
        self.assertEqual(u["users"], [{"user": "alice", "containers": 1, "seconds": 3600.0,
                                       "gpu_seconds": 3600.0}])
        _, out, _ = self.run_admin("usage")
        self.assertIn("alice  1           1.00             1.00", out)
        self.assertEqual(self.json("usage", "--since", "2020-01-01", "--until",
                                   "2020-02-01")["users"], [])

    def test_schema_and_bad_state(self) -> None:
        self.assertEqual(self.json("schema")["schema"], 1)
        with open(self.path, "w") as f:
            f.write("garbage" * 1000)
        code, _, err = self.run_admin("schema")
        self.assertEqual(code, 1)
        self.assertIn("is not a dockerspaces database", err)

    def test_python_m(self) -> None:
        p = subprocess.run([sys.executable, "-m", "dockerspaces.admin", "--help"], cwd=REPO,
                           capture_output=True, text=True, check=False, timeout=60)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("usage: dockerspaces-admin", p.stdout)


def _quiet(f: Any) -> Any:
    """argparse errors print to sys.stderr and exit: the status, silenced."""
    saved = sys.stderr
    sys.stderr = io.StringIO()
    try:
        return f()
    except SystemExit as e:
        return e.code, "", ""
    finally:
        sys.stderr = saved
