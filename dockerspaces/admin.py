"""``dockerspaces-admin``: users, groups, tokens and usage in the state file.

Works beside the running server (the file is in WAL mode; the server sees changes
within a second). Every command takes ``--json`` for machine-readable output; errors
exit 1 with a message (``{"error": ...}`` with ``--json``). Passwords come from a
prompt or, with ``--password-stdin``, one line of standard input -- never from the
command line, where other users of the machine could read them.
"""

from __future__ import annotations

import argparse
import getpass
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import IO, Any

from .accounts.model import ROUTES, AccountsError, Group, Quota, Token, User
from .accounts.store import UNSET, Store

_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class UsageError(Exception):
    """A bad argument value (exit 2)."""


def parse_when(text: str, now: float, *, future: bool) -> float:
    """A duration (``90d``, ``12h``; from now into the future or the past) or an ISO
    8601 date/time (UTC when no zone is given), as Unix seconds."""
    m = _DURATION.fullmatch(text.strip())
    if m:
        seconds = float(m.group(1)) * _UNITS[m.group(2)]
        return now + seconds if future else now - seconds
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(f"{text!r} is neither a duration (30m, 12h, 90d) nor an ISO date") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(
        timespec="seconds")


def _user(u: User) -> dict[str, Any]:
    return {"name": u.name, "enabled": u.enabled, "groups": list(u.groups),
            "password": u.password_hash is not None}


def _group(g: Group) -> dict[str, Any]:
    return {"name": g.name, "images": list(g.images), "routes": sorted(g.routes),
            "containers": g.quota.containers, "gpus": g.quota.gpus, "queued": g.quota.queued,
            "admin": g.admin}


def _token(t: Token) -> dict[str, Any]:
    return {"id": t.id, "user": t.user,
            "scopes": None if t.scopes is None else sorted(t.scopes),
            "expires": _iso(t.expires), "created": _iso(t.created),
            "last_used": _iso(t.last_used), "description": t.description}


def _password(args: argparse.Namespace, stdin: IO[str], required: bool) -> str | None:
    if args.password_stdin:
        line = stdin.readline().rstrip("\r\n")
        if not line:
            raise AccountsError("no password on standard input")
        return line
    if not stdin.isatty():
        if required:
            raise AccountsError("no terminal to ask for the password: use --password-stdin")
        return None
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Again: "):
        raise AccountsError("the two passwords differ")
    if not first:
        raise AccountsError("an empty password is not a password")
    return first


def _table(rows: list[list[str]], out: IO[str]) -> None:
    if not rows:
        return
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        out.write("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n")


def _limit(value: int | None) -> str:
    return "-" if value is None else str(value)


# -- commands -------------------------------------------------------------------------------


def cmd_user(store: Store, args: argparse.Namespace, stdin: IO[str]) -> tuple[Any, str]:
    """The ``user`` commands: (JSON value, text)."""
    name: str = getattr(args, "name", "")
    if args.verb == "add":
        pw = _password(args, stdin, required=False)
        u = store.add_user(name, pw)
        note = "" if pw is not None else " (no password: tokens only)"
        return _user(u), f"user {name} added{note}"
    if args.verb == "passwd":
        store.user(name)
        store.set_password(name, _password(args, stdin, required=True) or "")
        return {"name": name, "password": True}, f"password of {name} set"
    if args.verb in ("disable", "enable"):
        store.set_enabled(name, args.verb == "enable")
        return _user(store.user(name)), f"user {name} {args.verb}d"
    if args.verb == "remove":
        store.remove_user(name)
        return {"removed": name}, f"user {name} removed"
    users = store.users()
    rows = [["USER", "ENABLED", "PASSWORD", "GROUPS"]] + [
        [u.name, "yes" if u.enabled else "no", "yes" if u.password_hash else "no",
         ",".join(u.groups) or "-"] for u in users]
    return [_user(u) for u in users], _text(rows)


def cmd_group(store: Store, args: argparse.Namespace, stdin: IO[str]) -> tuple[Any, str]:
    """The ``group`` commands."""
    name: str = getattr(args, "name", "")
    if args.verb == "add":
        g = store.add_group(name, images=args.image or (), routes=args.route or (),
                            quota=Quota(args.containers, args.gpus, args.queued),
                            admin=args.admin)
        return _group(g), f"group {name} added"
    if args.verb == "set":
        def quota(value: int | None, unlimited: bool) -> Any:
            return None if unlimited else (UNSET if value is None else value)

        g = store.update_group(
            name, images=args.image, routes=args.route,
            containers=quota(args.containers, args.unlimited_containers),
            gpus=quota(args.gpus, args.unlimited_gpus),
            queued=quota(args.queued, args.unlimited_queued),
            admin=True if args.admin else (False if args.no_admin else None))
        return _group(g), f"group {name} changed"
    if args.verb == "remove":
        store.remove_group(name)
        return {"removed": name}, f"group {name} removed"
    if args.verb == "members":
        members = store.members(name)
        return members, "\n".join(members)
    if args.verb == "add-member":
        store.add_member(args.group, args.user)
        return {"group": args.group, "user": args.user}, f"{args.user} added to {args.group}"
    if args.verb == "remove-member":
        store.remove_member(args.group, args.user)
        return {"group": args.group, "user": args.user}, f"{args.user} removed from {args.group}"
    groups = store.groups()
    rows = [["GROUP", "ROUTES", "IMAGES", "CONTAINERS", "GPUS", "QUEUED", "ADMIN"]] + [
        [g.name, ",".join(sorted(g.routes)) or "-", ",".join(g.images) or "-",
         _limit(g.quota.containers), _limit(g.quota.gpus), _limit(g.quota.queued),
         "yes" if g.admin else "no"] for g in groups]
    return [_group(g) for g in groups], _text(rows)


def cmd_token(store: Store, args: argparse.Namespace, stdin: IO[str]) -> tuple[Any, str]:
    """The ``token`` commands."""
    if args.verb == "create":
        expires = None if args.expires is None else parse_when(args.expires, store.clock(),
                                                               future=True)
        text, t = store.create_token(args.user, scopes=args.scope, expires=expires,
                                     description=args.description or "")
        return ({"token": text, **_token(t)},
                f"{text}\n(token {t.id} of {t.user}: shown once, store it now)")
    if args.verb == "revoke":
        store.revoke_token(args.id)
        return {"revoked": args.id}, f"token {args.id} revoked"
    tokens = store.tokens(args.user)
    rows = [["ID", "USER", "SCOPES", "EXPIRES", "LAST USED", "DESCRIPTION"]] + [
        [t.id, t.user, ",".join(sorted(t.scopes)) if t.scopes is not None else "all",
         _iso(t.expires) or "never", _iso(t.last_used) or "never", t.description]
        for t in tokens]
    return [_token(t) for t in tokens], _text(rows)


def cmd_usage(store: Store, args: argparse.Namespace, stdin: IO[str]) -> tuple[Any, str]:
    """Containers, container-hours and GPU-hours per user within a period."""
    now = store.clock()
    since = parse_when(args.since, now, future=False)
    until = now if args.until is None else parse_when(args.until, now, future=False)
    rows = store.usage(since, until)
    data = {"since": _iso(since), "until": _iso(until),
            "users": [{"user": r.user, "containers": r.containers, "seconds": round(r.seconds, 3),
                       "gpu_seconds": round(r.gpu_seconds, 3)} for r in rows]}
    table = [["USER", "CONTAINERS", "CONTAINER-HOURS", "GPU-HOURS"]] + [
        [r.user, str(r.containers), f"{r.seconds / 3600:.2f}", f"{r.gpu_seconds / 3600:.2f}"]
        for r in rows]
    return data, f"from {_iso(since)} to {_iso(until)}\n" + _text(table)


def cmd_schema(store: Store, args: argparse.Namespace, stdin: IO[str]) -> tuple[Any, str]:
    """The state file's schema version (after migrating it)."""
    v = store.schema_version()
    return {"schema": v, "state": store.path}, f"{store.path}: schema {v}"


def _text(rows: list[list[str]]) -> str:
    import io

    out = io.StringIO()
    _table(rows, out)
    return out.getvalue().rstrip("\n")


# -- the parser --------------------------------------------------------------------------


def _quota_options(p: argparse.ArgumentParser, clearing: bool) -> None:
    p.add_argument("--image", action="append", metavar="PATTERN",
                   help="image pattern the group may run (as --allow-image; repeatable)")
    p.add_argument("--route", action="append", choices=ROUTES,
                   help="route the group may use (repeatable)")
    for q, what in (("containers", "containers held at once"), ("gpus", "GPUs held at once"),
                    ("queued", "requests waiting at once")):
        p.add_argument(f"--{q}", type=_count, metavar="N", help=f"quota per user: {what}")
        if clearing:
            p.add_argument(f"--unlimited-{q}", action="store_true", help=f"no {q} quota")
    p.add_argument("--admin", action="store_true", help="members see the whole monitor")
    if clearing:
        p.add_argument("--no-admin", action="store_true", help="members are not admins")


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if n < 0:
        raise argparse.ArgumentTypeError("a quota is >= 0")
    return n


def parser() -> argparse.ArgumentParser:
    """The command line."""
    top = argparse.ArgumentParser(
        prog="dockerspaces-admin",
        description="Manage dockerspaces accounts (users, groups, tokens) and read usage.")
    top.add_argument("--state", default=os.environ.get("DOCKERSPACES_STATE") or "dockerspaces.sqlite",
                     help="the state file (default $DOCKERSPACES_STATE, else ./dockerspaces.sqlite)")
    top.add_argument("--json", action="store_true", help="machine-readable output")
    nouns = top.add_subparsers(dest="noun", required=True)

    user = nouns.add_parser("user", help="users").add_subparsers(dest="verb", required=True)
    for verb, helptext in (("add", "add a user"), ("passwd", "set a user's password")):
        p = user.add_parser(verb, help=helptext)
        p.add_argument("name")
        p.add_argument("--password-stdin", action="store_true",
                       help="read the password from one line of standard input")
    for verb in ("disable", "enable", "remove"):
        user.add_parser(verb, help=f"{verb} a user").add_argument("name")
    user.add_parser("list", help="list users")

    group = nouns.add_parser("group", help="groups").add_subparsers(dest="verb", required=True)
    p = group.add_parser("add", help="add a group")
    p.add_argument("name")
    _quota_options(p, clearing=False)
    p = group.add_parser("set", help="change a group (given options only)")
    p.add_argument("name")
    _quota_options(p, clearing=True)
    group.add_parser("remove", help="remove a group").add_argument("name")
    group.add_parser("members", help="list a group's users").add_argument("name")
    for verb in ("add-member", "remove-member"):
        p = group.add_parser(verb, help=f"{verb.replace('-', ' ')} (GROUP USER)")
        p.add_argument("group")
        p.add_argument("user")
    group.add_parser("list", help="list groups")

    token = nouns.add_parser("token", help="API tokens").add_subparsers(dest="verb", required=True)
    p = token.add_parser("create", help="create a token (printed once)")
    p.add_argument("user")
    p.add_argument("--scope", action="append", choices=ROUTES,
                   help="limit the token to these routes (repeatable; default: all the user's)")
    p.add_argument("--expires", metavar="WHEN", help="90d, 12h, 30m or an ISO date")
    p.add_argument("--description", metavar="TEXT")
    token.add_parser("revoke", help="revoke a token").add_argument("id")
    p = token.add_parser("list", help="list tokens")
    p.add_argument("--user")

    p = nouns.add_parser("usage", help="containers and GPU-hours per user")
    p.add_argument("--since", default="30d", metavar="WHEN", help="7d ago, or an ISO date (30d)")
    p.add_argument("--until", metavar="WHEN", help="default now")
    nouns.add_parser("schema", help="the state file's schema version (migrates it)")
    return top


COMMANDS: dict[str, Callable[[Store, argparse.Namespace, IO[str]], tuple[Any, str]]] = {
    "user": cmd_user, "group": cmd_group, "token": cmd_token, "usage": cmd_usage,
    "schema": cmd_schema,
}


def main(argv: Sequence[str] | None = None, *, stdin: IO[str] | None = None,
         stdout: IO[str] | None = None, stderr: IO[str] | None = None,
         clock: Callable[[], float] = time.time) -> int:
    """Run one command; the exit status (0 ok, 1 error, 2 usage)."""
    stdin = stdin or sys.stdin
    out = stdout or sys.stdout
    err = stderr or sys.stderr
    args = parser().parse_args(argv)
    try:
        store = Store(args.state, clock=clock)
        try:
            data, text = COMMANDS[args.noun](store, args, stdin)
        finally:
            store.close()
    except (AccountsError, UsageError) as e:
        if args.json:
            out.write(json.dumps({"error": str(e)}) + "\n")
        err.write(f"dockerspaces-admin: {e}\n")
        return 2 if isinstance(e, UsageError) else 1
    if args.json:
        out.write(json.dumps(data, indent=1) + "\n")
    elif text:
        out.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
