"""``dockerspaces-admin``: users, groups, tokens and usage in the state file.

Works beside the running server (the file is in WAL mode; the server sees a change
within a second). Every command takes ``--json`` for machine-readable output; an error
exits 1 with its message on standard error (and ``{"error": ...}`` on standard output
with ``--json``); a usage error exits 2. Passwords come from a prompt or, with
``--password-stdin``, one line of standard input -- never from the command line, where
other users of the machine could read them.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import closing
from datetime import UTC, datetime
from typing import TypeAlias

from attrs import frozen

from .accounts.model import ROUTES, AccountsError, Group, Quota, Token, User
from .accounts.store import UNSET, QuotaChange, Store, check_name

#: the state file when neither --state nor $DOCKERSPACES_STATE names one
DEFAULT_STATE = "dockerspaces.sqlite"
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@frozen
class When:
    """A ``--expires``/``--since``/``--until`` value: a duration (from now) or a moment."""

    value: float  # seconds of a duration, or Unix seconds of a moment
    relative: bool

    def ahead(self, now: float) -> float:
        """The moment, a duration counted forward from ``now``."""
        return now + self.value if self.relative else self.value

    def ago(self, now: float) -> float:
        """The moment, a duration counted back from ``now``."""
        return now - self.value if self.relative else self.value


def parse_when(text: str) -> When:
    """``30m``, ``12h``, ``90d``, ``2w`` (also ``s``), or an ISO 8601 date or date/time
    (UTC unless it names a zone); argparse's ``type``."""
    m = _DURATION.fullmatch(text.strip())
    if m:
        return When(float(m.group(1)) * _UNITS[m.group(2)], relative=True)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30m, 12h, 90d) nor an ISO date"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return When(moment.timestamp(), relative=False)


#: what --json prints: ``json.dumps`` of it (dicts, lists, strings, numbers, None)
JSON = object
#: one record for --json
JSONObject = dict[str, object]
#: ``parser.add_subparsers()``: where each noun's parser goes
Nouns: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


@frozen
class Output:
    """What a command prints: ``data`` with --json, else ``text``; ``note`` goes to
    standard error (so that ``$(dockerspaces-admin token create …)`` is the token)."""

    data: JSON
    text: str
    note: str = ""


# -- formatting ------------------------------------------------------------------------


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _table(header: list[str], rows: list[list[str]], empty: str) -> str:
    """Left-aligned columns under ``header``, or ``empty`` when there are no rows."""
    if not rows:
        return empty
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows]
    )


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


def user_json(u: User) -> JSONObject:
    """A user for --json (whether there is a password, never its hash)."""
    return {
        "name": u.name,
        "enabled": u.enabled,
        "groups": list(u.groups),
        "password": u.password_hash is not None,
    }


def group_json(g: Group) -> JSONObject:
    """A group for --json (a quota of null: unlimited)."""
    return {
        "name": g.name,
        "images": list(g.images),
        "routes": sorted(g.routes),
        "containers": g.quota.containers,
        "gpus": g.quota.gpus,
        "queued": g.quota.queued,
        "admin": g.admin,
    }


def token_json(t: Token) -> JSONObject:
    """A token for --json (never the digest; times in ISO 8601, UTC)."""
    return {
        "id": t.id,
        "user": t.user,
        "scopes": None if t.scopes is None else sorted(t.scopes),
        "expires": _iso(t.expires),
        "created": _iso(t.created),
        "last_used": _iso(t.last_used),
        "description": t.description,
    }


# -- passwords ---------------------------------------------------------------------------


def read_password(args: argparse.Namespace, *, required: bool) -> str | None:
    """The password: one line of standard input with ``--password-stdin``, else asked
    twice at the terminal. Without a terminal it is an error when ``required``, else
    None (a user without a password); at the prompt an empty answer means the same."""
    if args.password_stdin:
        line = sys.stdin.readline().rstrip("\r\n")
        if not line:
            raise AccountsError("no password on standard input")
        return line
    if not sys.stdin.isatty():
        if required:
            raise AccountsError("no terminal to ask for the password: use --password-stdin")
        return None
    prompt = "Password: " if required else "Password (empty: none, tokens only): "
    try:
        first = getpass.getpass(prompt)
        if not first:
            if required:
                raise AccountsError("an empty password is not a password")
            return None
        if first != getpass.getpass("Again: "):
            raise AccountsError("the two passwords differ")
    except EOFError:
        raise AccountsError("no password entered") from None
    return first


# -- commands ----------------------------------------------------------------------------


def user_add(store: Store, args: argparse.Namespace) -> Output:
    """``user add NAME [--password-stdin]``."""
    check_name("user", args.name)
    try:  # before asking for a password
        store.user(args.name)
    except AccountsError:
        pass
    else:
        raise AccountsError(f"user {args.name!r} exists already")
    password = read_password(args, required=False)
    u = store.add_user(args.name, password)
    how = "" if password is not None else " without a password (tokens only)"
    return Output(user_json(u), f"user {u.name} added{how}")


def user_passwd(store: Store, args: argparse.Namespace) -> Output:
    """``user passwd NAME [--password-stdin]``."""
    store.user(args.name)  # before asking for a password
    store.set_password(args.name, read_password(args, required=True) or "")
    return Output(user_json(store.user(args.name)), f"password of {args.name} set")


def user_enable(store: Store, args: argparse.Namespace) -> Output:
    """``user enable NAME`` and ``user disable NAME``."""
    store.set_enabled(args.name, args.enabled)
    verb = "enabled" if args.enabled else "disabled"
    return Output(user_json(store.user(args.name)), f"user {args.name} {verb}")


def user_remove(store: Store, args: argparse.Namespace) -> Output:
    """``user remove NAME``."""
    store.remove_user(args.name)
    return Output({"removed": args.name}, f"user {args.name} removed")


def user_list(store: Store, args: argparse.Namespace) -> Output:
    """``user list``."""
    users = store.users()
    rows = [
        [u.name, _yes(u.enabled), _yes(u.password_hash is not None), ",".join(u.groups) or "-"] for u in users
    ]
    return Output(
        [user_json(u) for u in users], _table(["USER", "ENABLED", "PASSWORD", "GROUPS"], rows, "no users")
    )


def _quota_change(value: int | None, unlimited: bool) -> QuotaChange:
    return None if unlimited else (UNSET if value is None else value)


def group_add(store: Store, args: argparse.Namespace) -> Output:
    """``group add NAME [options]``."""
    g = store.add_group(
        args.name,
        images=args.image or (),
        routes=args.route or (),
        quota=Quota(args.containers, args.gpus, args.queued),
        admin=args.admin,
    )
    return Output(group_json(g), f"group {g.name} added")


def group_set(store: Store, args: argparse.Namespace) -> Output:
    """``group set NAME [options]``: the options given, nothing else."""
    g = store.update_group(
        args.name,
        images=args.image,
        routes=args.route,
        containers=_quota_change(args.containers, args.unlimited_containers),
        gpus=_quota_change(args.gpus, args.unlimited_gpus),
        queued=_quota_change(args.queued, args.unlimited_queued),
        admin=True if args.admin else (False if args.no_admin else None),
    )
    return Output(group_json(g), f"group {g.name} changed")


def group_remove(store: Store, args: argparse.Namespace) -> Output:
    """``group remove NAME``."""
    store.remove_group(args.name)
    return Output({"removed": args.name}, f"group {args.name} removed")


def group_list(store: Store, args: argparse.Namespace) -> Output:
    """``group list``."""
    groups = store.groups()
    rows = [
        [
            g.name,
            ",".join(sorted(g.routes)) or "-",
            ",".join(g.images) or "-",
            _limit(g.quota.containers),
            _limit(g.quota.gpus),
            _limit(g.quota.queued),
            _yes(g.admin),
        ]
        for g in groups
    ]
    header = ["GROUP", "ROUTES", "IMAGES", "CONTAINERS", "GPUS", "QUEUED", "ADMIN"]
    return Output([group_json(g) for g in groups], _table(header, rows, "no groups"))


def group_members(store: Store, args: argparse.Namespace) -> Output:
    """``group members NAME``."""
    members = store.members(args.name)
    return Output(members, "\n".join(members) or f"group {args.name} has no members")


def group_add_member(store: Store, args: argparse.Namespace) -> Output:
    """``group add-member GROUP USER``."""
    store.add_member(args.group, args.user)
    return Output({"group": args.group, "user": args.user}, f"{args.user} added to {args.group}")


def group_remove_member(store: Store, args: argparse.Namespace) -> Output:
    """``group remove-member GROUP USER``."""
    store.remove_member(args.group, args.user)
    return Output({"group": args.group, "user": args.user}, f"{args.user} removed from {args.group}")


def token_create(store: Store, args: argparse.Namespace) -> Output:
    """``token create USER [options]``: the token string, printed this once."""
    expires = None if args.expires is None else args.expires.ahead(store.clock())
    text, t = store.create_token(args.user, scopes=args.scope, expires=expires, description=args.description)
    return Output(
        {"token": text, **token_json(t)},
        text,
        note=f"token {t.id} of {t.user}: shown this once, store it now",
    )


def token_revoke(store: Store, args: argparse.Namespace) -> Output:
    """``token revoke ID``."""
    store.revoke_token(args.id)
    return Output({"revoked": args.id}, f"token {args.id} revoked")


def token_list(store: Store, args: argparse.Namespace) -> Output:
    """``token list [--user USER]`` (never a secret or a digest)."""
    tokens = store.tokens(args.user)
    rows = [
        [
            t.id,
            t.user,
            ",".join(sorted(t.scopes)) if t.scopes is not None else "all",
            _iso(t.expires) or "never",
            _iso(t.last_used) or "never",
            t.description,
        ]
        for t in tokens
    ]
    header = ["ID", "USER", "SCOPES", "EXPIRES", "LAST USED", "DESCRIPTION"]
    return Output([token_json(t) for t in tokens], _table(header, rows, "no tokens"))


def usage(store: Store, args: argparse.Namespace) -> Output:
    """``usage [--since WHEN] [--until WHEN]``: containers, container-hours and GPU-hours
    per user."""
    now = store.clock()
    since = args.since.ago(now)
    until = now if args.until is None else args.until.ago(now)
    rows = store.usage(since, until)
    data = {
        "since": _iso(since),
        "until": _iso(until),
        "users": [
            {
                "user": r.user,
                "containers": r.containers,
                "seconds": round(r.seconds, 3),
                "gpu_seconds": round(r.gpu_seconds, 3),
            }
            for r in rows
        ],
    }
    table = _table(
        ["USER", "CONTAINERS", "CONTAINER-HOURS", "GPU-HOURS"],
        [[r.user, str(r.containers), f"{r.seconds / 3600:.2f}", f"{r.gpu_seconds / 3600:.2f}"] for r in rows],
        "no usage",
    )
    return Output(data, f"from {_iso(since)} to {_iso(until)}\n{table}")


def schema(store: Store, args: argparse.Namespace) -> Output:
    """``schema``: the state file's schema version (after migrating it, as every command)."""
    version = store.schema_version()
    return Output({"schema": version, "state": store.path}, f"{store.path}: schema {version}")


# -- the command line --------------------------------------------------------------------


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError("a quota is a number >= 0")
    return n


def _group_options(p: argparse.ArgumentParser, *, changing: bool) -> None:
    """The options of ``group add`` and (``changing``) ``group set``."""
    p.add_argument("name")
    p.add_argument(
        "--image",
        action="append",
        metavar="PATTERN",
        help="image the members may run, as --allow-image (repeatable"
        + ("; replaces the list)" if changing else ")"),
    )
    p.add_argument(
        "--route",
        action="append",
        choices=ROUTES,
        help="route the members may use (repeatable" + ("; replaces the list)" if changing else ")"),
    )
    for quota, what in (
        ("containers", "containers held at once"),
        ("gpus", "GPUs held at once"),
        ("queued", "requests waiting at once"),
    ):
        one = p.add_mutually_exclusive_group()
        one.add_argument(f"--{quota}", type=_count, metavar="N", help=f"quota per user: {what}")
        if changing:
            one.add_argument(f"--unlimited-{quota}", action="store_true", help=f"no {quota} quota")
    admin = p.add_mutually_exclusive_group()
    admin.add_argument("--admin", action="store_true", help="members see the whole monitor")
    if changing:
        admin.add_argument("--no-admin", action="store_true", help="members are not admins")


def _user_commands(nouns: Nouns) -> None:
    user = nouns.add_parser("user", help="users").add_subparsers(dest="verb", required=True)
    for verb, run, text in (
        ("add", user_add, "add a user"),
        ("passwd", user_passwd, "set a user's password"),
    ):
        p = user.add_parser(verb, help=text)
        p.add_argument("name")
        p.add_argument(
            "--password-stdin", action="store_true", help="read the password from one line of standard input"
        )
        p.set_defaults(run=run)
    for verb, enabled in (("enable", True), ("disable", False)):
        p = user.add_parser(verb, help=f"{verb} a user")
        p.add_argument("name")
        p.set_defaults(run=user_enable, enabled=enabled)
    p = user.add_parser("remove", help="remove a user, their tokens and sessions")
    p.add_argument("name")
    p.set_defaults(run=user_remove)
    user.add_parser("list", help="list the users").set_defaults(run=user_list)


def _group_commands(nouns: Nouns) -> None:
    group = nouns.add_parser("group", help="groups").add_subparsers(dest="verb", required=True)
    p = group.add_parser("add", help="add a group")
    _group_options(p, changing=False)
    p.set_defaults(run=group_add)
    p = group.add_parser("set", help="change a group (the options given only)")
    _group_options(p, changing=True)
    p.set_defaults(run=group_set)
    for verb, run, text in (
        ("remove", group_remove, "remove a group"),
        ("members", group_members, "list a group's users"),
    ):
        p = group.add_parser(verb, help=text)
        p.add_argument("name")
        p.set_defaults(run=run)
    for verb, run, text in (
        ("add-member", group_add_member, "put a user into a group"),
        ("remove-member", group_remove_member, "take a user out of a group"),
    ):
        p = group.add_parser(verb, help=text)
        p.add_argument("group")
        p.add_argument("user")
        p.set_defaults(run=run)
    group.add_parser("list", help="list the groups").set_defaults(run=group_list)


def _token_commands(nouns: Nouns) -> None:
    token = nouns.add_parser("token", help="API tokens").add_subparsers(dest="verb", required=True)
    p = token.add_parser("create", help="create a token (printed once)")
    p.add_argument("user")
    p.add_argument(
        "--scope",
        action="append",
        choices=ROUTES,
        help="a route the token may use (repeatable; default: all the user's)",
    )
    p.add_argument(
        "--expires",
        type=parse_when,
        metavar="WHEN",
        help="90d, 12h, 30m from now, or an ISO date (default: never)",
    )
    p.add_argument("--description", default="", metavar="TEXT")
    p.set_defaults(run=token_create)
    p = token.add_parser("revoke", help="revoke a token")
    p.add_argument("id")
    p.set_defaults(run=token_revoke)
    p = token.add_parser("list", help="list the tokens")
    p.add_argument("--user")
    p.set_defaults(run=token_list)


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = argparse.ArgumentParser(
        prog="dockerspaces-admin",
        description="Manage dockerspaces accounts (users, groups, tokens) and read usage.",
    )
    top.add_argument(
        "--state",
        default=os.environ.get("DOCKERSPACES_STATE") or DEFAULT_STATE,
        metavar="PATH",
        help=f"the state file (default: $DOCKERSPACES_STATE, else ./{DEFAULT_STATE})",
    )
    top.add_argument("--json", action="store_true", help="machine-readable output")
    nouns = top.add_subparsers(dest="noun", required=True)
    _user_commands(nouns)
    _group_commands(nouns)
    _token_commands(nouns)
    p = nouns.add_parser("usage", help="containers, container-hours and GPU-hours per user")
    p.add_argument(
        "--since",
        type=parse_when,
        default=When(30 * 86400, relative=True),
        metavar="WHEN",
        help="7d (ago) or an ISO date (default: 30d)",
    )
    p.add_argument("--until", type=parse_when, metavar="WHEN", help="as --since (default: now)")
    p.set_defaults(run=usage)
    nouns.add_parser("schema", help="the state file's schema version (migrates it)").set_defaults(run=schema)
    return top


def _message(e: BaseException, state: str) -> str:
    if isinstance(e, AccountsError):
        return str(e)
    if isinstance(e, sqlite3.Error):  # locked past the busy timeout, disk full, ...
        return f"the state file {state!r}: {e}"
    return "interrupted"


def main(argv: Sequence[str] | None = None, *, clock: Callable[[], float] = time.time) -> int:
    """Run one command: 0 when it worked, 1 on an error (its message on standard error,
    and ``{"error": ...}`` on standard output with --json), 2 on a usage error."""
    try:
        args = parser().parse_args(argv)
    except SystemExit as e:  # --help (0), or argparse's usage error (2)
        return e.code if isinstance(e.code, int) else 0
    run: Callable[[Store, argparse.Namespace], Output] = args.run
    try:
        with closing(Store(args.state, clock=clock)) as store:
            out = run(store, args)
    except (AccountsError, sqlite3.Error, KeyboardInterrupt) as e:
        message = _message(e, args.state)
        if args.json:
            print(json.dumps({"error": message}))
        print(f"dockerspaces-admin: {message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out.data, indent=2))
    else:
        print(out.text)
        if out.note:
            print(out.note, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
