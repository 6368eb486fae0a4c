"""dockerspaces-admin: every command family in text and --json, errors, and passwords
only from a prompt or standard input."""

from __future__ import annotations

import argparse
import io
import json
import os
import sqlite3
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from dockerspaces import admin
from dockerspaces.accounts import store as store_module
from dockerspaces.accounts.model import parse_token
from dockerspaces.accounts.passwords import hash_password, verify_password
from dockerspaces.accounts.store import SCHEMA_VERSION, Store

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Stdin(io.StringIO):
    """Standard input with a say on whether it is a terminal."""

    def __init__(self, text: str, tty: bool):
        super().__init__(text)
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


class AdminCase(SynchronousTestCase):
    """``main`` on a state file of the test's own, its output captured."""

    def setUp(self) -> None:
        directory = self.mktemp()
        os.makedirs(directory)
        self.path = os.path.join(directory, "state.sqlite")
        self.patch(store_module, "hash_password", lambda pw: hash_password(pw, n=2**4))
        self.prompts: list[str] = []
        self.answers: list[str] = []
        self.patch(admin.getpass, "getpass", self.getpass)

    def getpass(self, prompt: str = "Password: ") -> str:
        self.prompts.append(prompt)
        return self.answers.pop(0)

    def run_admin(self, *argv: str, stdin: str = "", tty: bool = False) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        saved, sys.stdin = sys.stdin, Stdin(stdin, tty)
        try:
            with redirect_stdout(out), redirect_stderr(err):
                code = admin.main(["--state", self.path, *argv], clock=lambda: NOW)
        finally:
            sys.stdin = saved
        return code, out.getvalue(), err.getvalue()

    def json(self, *argv: str, stdin: str = "") -> Any:
        """The --json output of a command that must work."""
        code, out, err = self.run_admin("--json", *argv, stdin=stdin)
        self.assertEqual((code, err), (0, ""))
        return json.loads(out)

    def fails(self, message: str, *argv: str, stdin: str = "") -> None:
        """The command exits 1 with ``message``: on stderr, and as --json's error."""
        code, out, err = self.run_admin(*argv, stdin=stdin)
        self.assertEqual((code, out), (1, ""))
        self.assertIn(message, err)
        code, out, err = self.run_admin("--json", *argv, stdin=stdin)
        self.assertEqual(code, 1)
        self.assertIn(message, json.loads(out)["error"])
        self.assertIn(message, err)

    def misused(self, *argv: str) -> str:
        """The command is a usage error (exit 2); argparse's message."""
        code, out, err = self.run_admin(*argv)
        self.assertEqual((code, out), (2, ""))
        self.assertIn("usage: dockerspaces-admin", err)
        return err

    def store(self) -> Store:
        store = Store(self.path)
        self.addCleanup(store.close)
        return store


class UserTests(AdminCase):
    def test_add_with_password_stdin(self) -> None:
        u = self.json("user", "add", "alice", "--password-stdin", stdin="s3cret\nnext line\n")
        self.assertEqual(u, {"name": "alice", "enabled": True, "groups": [], "password": True})
        self.assertTrue(verify_password("s3cret", self.store().user("alice").password_hash or ""))

    def test_add_without_a_terminal_makes_a_tokens_only_user(self) -> None:
        code, out, _ = self.run_admin("user", "add", "bob")
        self.assertEqual((code, out), (0, "user bob added without a password (tokens only)\n"))
        self.assertIsNone(self.store().user("bob").password_hash)
        self.assertEqual(self.prompts, [])

    def test_passwd(self) -> None:
        self.json("user", "add", "bob")
        self.assertTrue(self.json("user", "passwd", "bob", "--password-stdin", stdin="other\r\n")["password"])
        self.assertTrue(verify_password("other", self.store().user("bob").password_hash or ""))
        self.fails("no terminal to ask for the password: use --password-stdin", "user", "passwd", "bob")
        self.fails("no password on standard input", "user", "passwd", "bob", "--password-stdin")
        self.fails("no user 'carol'", "user", "passwd", "carol", "--password-stdin", stdin="x\n")

    def test_prompt(self) -> None:
        self.answers = ["pw1", "pw1"]
        code, out, _ = self.run_admin("user", "add", "alice", tty=True)
        self.assertEqual((code, out), (0, "user alice added\n"))
        self.assertEqual(self.prompts, ["Password (empty: none, tokens only): ", "Again: "])
        self.assertTrue(verify_password("pw1", self.store().user("alice").password_hash or ""))
        self.answers = ["pw2", "pw3"]
        code, _, err = self.run_admin("user", "passwd", "alice", tty=True)
        self.assertEqual(code, 1)
        self.assertIn("the two passwords differ", err)
        self.assertTrue(verify_password("pw1", self.store().user("alice").password_hash or ""))
        self.answers = [""]
        code, _, err = self.run_admin("user", "passwd", "alice", tty=True)
        self.assertEqual((code, err), (1, "dockerspaces-admin: an empty password is not a password\n"))
        self.answers = [""]  # user add: an empty answer is no password
        self.assertFalse(self.json("user", "add", "bob")["password"])

    def test_end_of_input_at_the_prompt(self) -> None:
        self.json("user", "add", "alice")

        def eof(prompt: str) -> str:
            raise EOFError

        self.patch(admin.getpass, "getpass", eof)
        code, _, err = self.run_admin("user", "passwd", "alice", tty=True)
        self.assertEqual((code, err), (1, "dockerspaces-admin: no password entered\n"))

    def test_a_locked_state_file(self) -> None:
        self.json("user", "add", "alice")

        def locked(store: Store) -> list[object]:
            raise sqlite3.OperationalError("database is locked")

        self.patch(Store, "users", locked)
        self.fails(f"the state file {self.path!r}: database is locked", "user", "list")

    def test_a_mismatch_adds_no_user(self) -> None:
        self.answers = ["a", "b"]
        code, _, _ = self.run_admin("user", "add", "alice", tty=True)
        self.assertEqual(code, 1)
        self.assertEqual(self.json("user", "list"), [])

    def test_an_existing_user_is_refused_before_the_prompt(self) -> None:
        self.json("user", "add", "alice")
        self.fails("user 'alice' exists already", "user", "add", "alice")
        code, _, _ = self.run_admin("user", "add", "alice", tty=True)
        self.assertEqual((code, self.prompts), (1, []))

    def test_no_password_on_the_command_line(self) -> None:
        self.misused("user", "add", "carol", "--password", "x")
        self.misused("user", "add", "carol", "x")
        self.misused("user", "passwd", "carol", "--password=x")
        self.assertEqual(self.json("user", "list"), [])
        options = set()  # every option of every command (argparse has no public walk)
        parsers = [admin.parser()]
        while parsers:
            p = parsers.pop()
            for action in p._actions:
                options.update(action.option_strings)
                if isinstance(action, argparse._SubParsersAction):
                    parsers.extend(action.choices.values())
        self.assertEqual({o for o in options if "pass" in o}, {"--password-stdin"})

    def test_enable_disable_remove_list(self) -> None:
        self.json("user", "add", "bob")
        self.json("user", "add", "alice", "--password-stdin", stdin="pw\n")
        self.assertFalse(self.json("user", "disable", "bob")["enabled"])
        _, out, _ = self.run_admin("user", "list")
        self.assertEqual(
            out,
            "USER   ENABLED  PASSWORD  GROUPS\nalice  yes      yes       -\nbob    no       no        -\n",
        )
        self.assertTrue(self.json("user", "enable", "bob")["enabled"])
        self.assertEqual([u["name"] for u in self.json("user", "list")], ["alice", "bob"])
        self.assertEqual(self.json("user", "remove", "bob"), {"removed": "bob"})
        self.assertEqual(self.run_admin("user", "remove", "alice")[1], "user alice removed\n")
        self.assertEqual(self.run_admin("user", "list")[1], "no users\n")
        for verb in ("enable", "disable", "remove"):
            self.fails("no user 'bob'", "user", verb, "bob")
        self.fails("user name 'a b'", "user", "add", "a b")


class GroupTests(AdminCase):
    def test_add_set_list(self) -> None:
        g = self.json(
            "group",
            "add",
            "ml",
            "--image",
            "team/*",
            "--image",
            "redis:7",
            "--route",
            "x",
            "--route",
            "y",
            "--containers",
            "2",
            "--gpus",
            "1",
            "--queued",
            "10",
        )
        self.assertEqual(
            g,
            {
                "name": "ml",
                "images": ["team/*", "redis:7"],
                "routes": ["x", "y"],
                "containers": 2,
                "gpus": 1,
                "queued": 10,
                "admin": False,
            },
        )
        g = self.json("group", "set", "ml", "--unlimited-containers", "--admin", "--queued", "3")
        self.assertEqual(
            g,
            {
                "name": "ml",
                "images": ["team/*", "redis:7"],
                "routes": ["x", "y"],
                "containers": None,
                "gpus": 1,
                "queued": 3,
                "admin": True,
            },
        )
        g = self.json("group", "set", "ml", "--no-admin", "--image", "other", "--route", "monitor")
        self.assertEqual(
            (g["images"], g["routes"], g["admin"], g["gpus"]), (["other"], ["monitor"], False, 1)
        )
        self.json("group", "add", "admins", "--admin")
        self.assertEqual([x["name"] for x in self.json("group", "list")], ["admins", "ml"])
        _, out, _ = self.run_admin("group", "list")
        self.assertEqual(
            out,
            "GROUP   ROUTES   IMAGES  CONTAINERS  GPUS  QUEUED  ADMIN\n"
            "admins  -        -       -           -     -       yes\n"
            "ml      monitor  other   -           1     3       no\n",
        )

    def test_members(self) -> None:
        self.json("user", "add", "alice")
        self.json("group", "add", "ml")
        self.assertEqual(self.json("group", "add-member", "ml", "alice"), {"group": "ml", "user": "alice"})
        self.assertEqual(self.json("group", "members", "ml"), ["alice"])
        self.assertEqual(self.run_admin("group", "members", "ml")[1], "alice\n")
        self.assertEqual(self.json("user", "list")[0]["groups"], ["ml"])
        self.assertEqual(
            self.run_admin("group", "remove-member", "ml", "alice")[1], "alice removed from ml\n"
        )
        self.assertEqual(self.json("group", "members", "ml"), [])
        self.assertEqual(self.run_admin("group", "members", "ml")[1], "group ml has no members\n")
        self.fails("user 'alice' is not in group 'ml'", "group", "remove-member", "ml", "alice")
        self.fails("no user 'bob'", "group", "add-member", "ml", "bob")

    def test_remove_and_errors(self) -> None:
        self.json("group", "add", "ml")
        self.fails("group 'ml' exists already", "group", "add", "ml")
        self.assertEqual(self.json("group", "remove", "ml"), {"removed": "ml"})
        self.assertEqual(self.json("group", "list"), [])
        self.assertEqual(self.run_admin("group", "list")[1], "no groups\n")
        for argv in (("remove", "ml"), ("members", "ml"), ("set", "ml", "--admin")):
            self.fails("no group 'ml'", "group", *argv)
        self.fails("image pattern ''", "group", "add", "g", "--image", "")

    def test_usage_errors(self) -> None:
        self.assertIn("invalid choice: 'ssh'", self.misused("group", "add", "g", "--route", "ssh"))
        self.assertIn("a quota is a number >= 0", self.misused("group", "add", "g", "--gpus", "-1"))
        self.assertIn("'many' is not a whole number", self.misused("group", "add", "g", "--gpus", "many"))
        self.misused("group", "set", "g", "--containers", "1", "--unlimited-containers")
        self.misused("group", "set", "g", "--admin", "--no-admin")
        self.misused("group", "add", "g", "--no-admin")
        self.misused("group", "add-member", "g")
        self.assertEqual(self.json("group", "list"), [])


class TokenTests(AdminCase):
    def setUp(self) -> None:
        super().setUp()
        self.json("user", "add", "alice")

    def test_create(self) -> None:
        t = self.json(
            "token",
            "create",
            "alice",
            "--scope",
            "x",
            "--scope",
            "monitor",
            "--expires",
            "90d",
            "--description",
            "ci",
        )
        parsed = parse_token(t["token"])
        assert parsed is not None
        self.assertEqual(
            t,
            {
                "token": t["token"],
                "id": parsed[0],
                "user": "alice",
                "scopes": ["monitor", "x"],
                "expires": "2027-04-15T08:00:00+00:00",
                "created": "2027-01-15T08:00:00+00:00",
                "last_used": None,
                "description": "ci",
            },
        )
        (stored,) = [x for x in self.store().tokens() if x.id == parsed[0]]
        self.assertEqual(stored.scopes, frozenset({"x", "monitor"}))
        t = self.json("token", "create", "alice", "--expires", "2030-01-01")
        self.assertEqual((t["expires"], t["scopes"]), ("2030-01-01T00:00:00+00:00", None))
        t = self.json("token", "create", "alice", "--expires", "2030-01-01T12:00:00+02:00")
        self.assertEqual(t["expires"], "2030-01-01T10:00:00+00:00")

    def test_the_text_output_is_the_token_alone(self) -> None:
        code, out, err = self.run_admin("token", "create", "alice", "--expires", "12h")
        self.assertEqual(code, 0)
        parsed = parse_token(out)
        assert parsed is not None
        self.assertEqual(out, out.strip() + "\n")
        self.assertIn(f"token {parsed[0]} of alice: shown this once", err)

    def test_create_errors(self) -> None:
        self.fails("no user 'bob'", "token", "create", "bob")
        self.fails("would expire before it is created", "token", "create", "alice", "--expires", "2020-01-01")
        self.assertIn(
            "'soon' is neither a duration (30m, 12h, 90d) nor an ISO date",
            self.misused("token", "create", "alice", "--expires", "soon"),
        )
        self.assertIn("invalid choice: 'ssh'", self.misused("token", "create", "alice", "--scope", "ssh"))

    def test_list_and_revoke(self) -> None:
        first = self.json("token", "create", "alice", "--description", "laptop")
        self.json("user", "add", "bob")
        second = self.json("token", "create", "bob")
        listed = self.json("token", "list")
        self.assertEqual([x["id"] for x in listed], [first["id"], second["id"]])
        self.assertNotIn("token", listed[0])
        digests = [t.digest for t in self.store().tokens()]
        _, out, _ = self.run_admin("token", "list")
        self.assertEqual(out.splitlines()[0], "ID            USER   SCOPES  EXPIRES  LAST USED  DESCRIPTION")
        self.assertEqual(
            out.splitlines()[1].split(), [first["id"], "alice", "all", "never", "never", "laptop"]
        )
        hidden = list(digests)
        for t in (first, second):
            parsed = parse_token(t["token"])
            assert parsed is not None
            hidden.append(parsed[1])
        for shown in (out, json.dumps(listed)):
            for secret in hidden:
                self.assertNotIn(secret, shown)
        self.assertEqual([x["id"] for x in self.json("token", "list", "--user", "bob")], [second["id"]])
        self.fails("no user 'carol'", "token", "list", "--user", "carol")
        self.assertEqual(self.json("token", "revoke", first["id"]), {"revoked": first["id"]})
        self.assertEqual(self.json("token", "list", "--user", "alice"), [])
        self.assertEqual(self.run_admin("token", "list", "--user", "alice")[1], "no tokens\n")
        self.fails(f"token '{first['id']}' is revoked already", "token", "revoke", first["id"])
        self.fails("no token 'abc'", "token", "revoke", "abc")


class UsageTests(AdminCase):
    def setUp(self) -> None:
        super().setUp()
        store = Store(self.path)
        store.usage_start("alice", "c1", "x:a", 1, NOW - 7200)
        store.usage_stop("c1", NOW - 3600)
        store.usage_start("bob", "c2", "x:b", 2, NOW - 1800)  # running
        store.usage_start("carol", "c3", "x:c", 0, NOW - 40 * 86400)
        store.usage_stop("c3", NOW - 39 * 86400)
        store.close()

    def test_json(self) -> None:
        u = self.json("usage", "--since", "1d")
        self.assertEqual(
            u,
            {
                "since": "2027-01-14T08:00:00+00:00",
                "until": "2027-01-15T08:00:00+00:00",
                "users": [
                    {"user": "alice", "containers": 1, "seconds": 3600.0, "gpu_seconds": 3600.0},
                    {"user": "bob", "containers": 1, "seconds": 1800.0, "gpu_seconds": 3600.0},
                ],
            },
        )
        u = self.json("usage", "--since", "2h", "--until", "90m")
        self.assertEqual([(r["user"], r["seconds"]) for r in u["users"]], [("alice", 1800.0)])
        self.assertEqual(self.json("usage", "--since", "2020-01-01", "--until", "2020-02-01")["users"], [])

    def test_the_default_period_is_the_last_30_days(self) -> None:
        _, out, _ = self.run_admin("usage")
        self.assertEqual(
            out,
            "from 2026-12-16T08:00:00+00:00 to 2027-01-15T08:00:00+00:00\n"
            "USER   CONTAINERS  CONTAINER-HOURS  GPU-HOURS\n"
            "alice  1           1.00             1.00\n"
            "bob    1           0.50             1.00\n",
        )
        self.assertEqual(
            [r["user"] for r in self.json("usage", "--since", "41d")["users"]], ["alice", "bob", "carol"]
        )

    def test_errors(self) -> None:
        self.fails("the usage period ends before it begins", "usage", "--since", "1d", "--until", "2d")
        self.assertIn("'yesterday' is neither a duration", self.misused("usage", "--since", "yesterday"))
        _, out, _ = self.run_admin("usage", "--since", "2020-01-01", "--until", "2020-01-02")
        self.assertEqual(out.splitlines()[1], "no usage")


class StateTests(AdminCase):
    def test_schema(self) -> None:
        self.assertEqual(self.json("schema"), {"schema": SCHEMA_VERSION, "state": self.path})
        self.assertEqual(self.run_admin("schema")[1], f"{self.path}: schema {SCHEMA_VERSION}\n")

    def test_a_bad_state_file(self) -> None:
        with open(self.path, "w") as f:
            f.write("garbage" * 1000)
        self.fails("is not a dockerspaces database", "schema")

    def test_a_newer_state_file(self) -> None:
        db = sqlite3.connect(self.path)
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        db.close()
        self.fails(
            f"was written by a newer dockerspaces (schema {SCHEMA_VERSION + 1}, this one "
            f"knows {SCHEMA_VERSION})",
            "user",
            "list",
        )

    def test_the_default_state_file(self) -> None:
        self.patch(os, "environ", {"DOCKERSPACES_STATE": "/srv/ds/state.sqlite"})
        self.assertEqual(admin.parser().parse_args(["schema"]).state, "/srv/ds/state.sqlite")
        self.patch(os, "environ", {})
        self.assertEqual(admin.parser().parse_args(["schema"]).state, "dockerspaces.sqlite")
        self.assertEqual(admin.parser().parse_args(["--state", "x", "schema"]).state, "x")

    def test_usage_errors_and_help(self) -> None:
        self.misused()
        self.misused("user")
        self.misused("frobnicate")
        code, out, _ = self.run_admin("--help")
        self.assertEqual(code, 0)
        self.assertIn("usage: dockerspaces-admin", out)

    def test_python_m(self) -> None:
        p = subprocess.run(
            [sys.executable, "-m", "dockerspaces.admin", "--help"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("usage: dockerspaces-admin", p.stdout)
        for noun in ("user", "group", "token", "usage", "schema"):
            self.assertIn(noun, p.stdout)
