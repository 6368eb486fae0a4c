"""``--auth accounts``: who may start what, checked before a request is routed.

:class:`AuthGate` sits in the root's dispatch. It finds the request's credentials
(``Authorization: Bearer TOKEN``; ``Authorization: Basic`` with a user and a token or
password; the ``dssession`` cookie of a browser login), checks them through the
``twisted.cred`` portal (:mod:`dockerspaces.accounts.identity`), and lets the request
on only if the user's groups allow the route and the image. Checked credentials are
remembered per snapshot generation, so a warm request with a known token costs one
dictionary lookup; a password is checked with the KDF once per ``PASSWORD_CACHE``.

Answers: no credentials -> a browser is sent to ``/auth:login`` and back, an API
client gets ``401`` with ``WWW-Authenticate``; bad credentials -> the same (and
counted: repeated failures per user and per client address get ``429`` with
``Retry-After``); a route or image the groups do not allow -> ``403`` naming it.
No password, token or session id is ever logged or echoed.

The login page (``/auth:login``) is a plain form protected by a double-submit CSRF
cookie and an ``Origin`` check; it sets the session cookie (HttpOnly, SameSite=Lax,
Secure on TLS listeners, with an expiry; sessions live in SQLite and survive a
restart). ``/auth:logout`` ends the session. ``/`` shows who is logged in and their
running applications.

Apps on hosts of their own (``--app-domain``) never show a sign-in form: a browser
without a session there is sent to ``/auth:handoff`` on the main host (``--public-url``),
which (signed in, after the login if need be) sends it back with a one-time ticket
(:data:`TICKET_LIFETIME` seconds, for that app host only) to ``/auth:ticket`` on the app
host; that sets a session cookie of the app host's own and goes on to the page. The
password never meets an app's origin, and no cookie is shared between hosts.
"""

from __future__ import annotations

import base64
import hmac
import html
import json
import math
import secrets
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, urlsplit

from attrs import define, field
from twisted.cred.credentials import UsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from ..accounts.identity import (
    Identity,
    IIdentity,
    SessionCredentials,
    TokenCredentials,
)
from ..accounts.service import AccountsService
from ..spec import JobSpec
from .accesslog import APP_HOST_ATTR, IDENTITY_ATTR
from .errors import ErrorResource, write_error
from .headers import OWN_AUTH_ATTR
from .pages import wants_html
from .site import done_or_gone

log = Logger()

SESSION_COOKIE = b"dssession"
CSRF_COOKIE = b"dscsrf"
#: credentials remembered at once (a full table is simply emptied)
CACHE_SIZE = 10_000
_CHALLENGE = [b'Basic realm="dockerspaces", charset="UTF-8"', b'Bearer realm="dockerspaces"']
_LOGIN_BODY_MAX = 16 * 1024
#: seconds a sign-in ticket for an app host may wait to be used (once)
TICKET_LIFETIME = 60.0


def identity_of(request: Request) -> Identity | None:
    """The identity the gate checked for ``request`` (None with ``--auth none``)."""
    return getattr(request, IDENTITY_ATTR, None)


def route_name(kind: str) -> str | None:
    """The group route a root route kind needs (None: any signed-in user)."""
    return {
        "x": "x",
        "y": "y",
        "worker": "worker",
        "host": "host",
        "shost": "host",
        "root": "host",
        "docker": "docker-api",
        "monitor": "monitor",
    }.get(kind)


@define
class Throttle:
    """Failed sign-ins per user and per client address: ``limit`` failures within
    ``window`` seconds block that key until the oldest of them is ``window`` old."""

    clock: Any
    limit: int = 5
    window: float = 60.0
    _fails: dict[str, list[float]] = field(factory=dict)

    def retry_after(self, *keys: str) -> int | None:
        """Seconds until ``keys`` may try again, or None when none is blocked."""
        now = self.clock.seconds()
        wait = 0.0
        for k in keys:
            times = [t for t in self._fails.get(k, ()) if t > now - self.window]
            if times:
                self._fails[k] = times
            else:
                self._fails.pop(k, None)
            if len(times) >= self.limit:
                wait = max(wait, times[-self.limit] + self.window - now)
        return max(1, math.ceil(wait)) if wait > 0 else None

    def failed(self, *keys: str) -> None:
        """One more failure for each key."""
        if len(self._fails) > CACHE_SIZE:
            self._fails.clear()
        now = self.clock.seconds()
        for k in keys:
            self._fails.setdefault(k, []).append(now)

    def succeeded(self, key: str) -> None:
        """A good sign-in clears the user's count (not the address's)."""
        self._fails.pop(key, None)


@define
class _Creds:
    credentials: Any
    key: bytes  # the cache key: the raw header or cookie
    user: str | None  # the user named (Basic), for throttling
    from_header: bool


def _credentials(request: Request) -> _Creds | None:
    auth = request.requestHeaders.getRawHeaders(b"authorization")
    if auth:
        scheme, _, value = auth[0].strip().partition(b" ")
        scheme = scheme.lower()
        value = value.strip()
        if scheme == b"bearer" and value:
            return _Creds(TokenCredentials(value.decode("latin-1")), b"B" + value, None, True)
        if scheme == b"basic" and value:
            try:
                decoded = base64.b64decode(value, validate=True)
            except ValueError:
                return _Creds(None, b"", None, True)
            user, sep, password = decoded.partition(b":")
            if not sep:
                return _Creds(None, b"", None, True)
            name = user.decode("utf-8", "replace")
            return _Creds(UsernamePassword(user, password), b"P" + value, name, True)
        return _Creds(None, b"", None, True)
    cookie = request.getCookie(SESSION_COOKIE)
    if cookie:
        return _Creds(SessionCredentials(cookie.decode("latin-1")), b"S" + cookie, None, False)
    return None


class AuthGate:
    """Checks every routed request (see the module docstring)."""

    def __init__(
        self,
        service: AccountsService,
        portal: Portal,
        clock: Any,
        *,
        session_lifetime: float = 86400.0,
        throttle: Throttle | None = None,
        containers: Callable[[str], list[tuple[str, str, str | None]]] | None = None,
        public_url: str | None = None,
        app_origin: Callable[[str], str | None] | None = None,
        app_domain: str | None = None,
    ):
        self.service = service
        self.portal = portal
        self.clock = clock
        self.session_lifetime = session_lifetime
        self.throttle = throttle or Throttle(clock)
        # the user's running applications for the home page: (key, state, link)
        self.containers = containers or (lambda user: [])
        self._cache: dict[bytes, tuple[int, Identity, float]] = {}
        # --app-domain: the main host's URL (sign-in lives there), an app host's
        # origin by its label (None: no such app), the tickets handed out
        self.public_url = public_url
        self.app_origin = app_origin or (lambda label: None)
        # where a sign-in form's answer may lead (CSP form-action covers redirects):
        # here, and with app hosts on to theirs (the hand-off after a sign-in)
        self.form_action = b"'self'" + (b" *." + app_domain.encode("ascii") + b":*" if app_domain else b"")
        self._tickets: dict[str, tuple[str, str, float]] = {}
        #: --workers: the other processes (a ticket is redeemed in whichever child the
        #: browser reaches; a sign-out ends the session's cached credential in all)
        self.shared: SharedFacts | None = None

    # -- the gate --------------------------------------------------------------------
    def guard(
        self, request: Request, kind: str, spec: JobSpec | None, go: Callable[[], Resource]
    ) -> Resource:
        """``go()``'s resource if the request may pass, else the answer that refuses it
        (a resource that waits, when a password or session must be checked first)."""
        if kind == "monitor-public":
            return go()
        creds = _credentials(request)
        if creds is None:
            return self._unauthenticated(
                request,
                "sign in first: no credentials (Authorization: Bearer TOKEN, or log in at /auth:login)",
            )
        if creds.credentials is None:
            return self._unauthenticated(request, "malformed Authorization header")
        hit = self._cache.get(creds.key)
        if hit is not None and hit[0] == self.service.generation and hit[2] > self.clock.seconds():
            return self._authorized(request, hit[1], creds, kind, spec, go)
        addr = _client(request)
        keys = ["a:" + addr] + (["u:" + creds.user] if creds.user else [])
        wait = self.throttle.retry_after(*keys)
        if wait is not None:
            return ErrorResource(429, "too many failed sign-ins; try again later", wait)
        d: Deferred[Any] = self.portal.login(creds.credentials, None, IIdentity)
        now: list[Any] = []
        later: list[bool] = []

        def decided(result: Any) -> Resource | None:
            if later:
                return self._logged_in(request, result, creds, keys, kind, spec, go)
            now.append(result)
            return None

        d.addBoth(decided)
        if now:  # a token: checked against memory, at once
            return self._logged_in(request, now[0], creds, keys, kind, spec, go)
        later.append(True)  # a password or session: checked in the accounts threads
        return _Later(d)

    def _logged_in(
        self,
        request: Request,
        result: Any,
        creds: _Creds,
        keys: list[str],
        kind: str,
        spec: JobSpec | None,
        go: Callable[[], Resource],
    ) -> Resource:
        if isinstance(result, Failure):
            if not result.check(UnauthorizedLogin):
                log.failure("checking credentials failed", result)
                return ErrorResource(500, "checking credentials failed")
            self.throttle.failed(*keys)
            if not creds.from_header:  # an expired or ended session: sign in again
                return self._unauthenticated(
                    request, "the session has ended; sign in again", clear_session=True
                )
            return self._unauthenticated(request, "wrong user, password or token")
        identity: Identity = result[1]
        if creds.user:
            self.throttle.succeeded("u:" + creds.user)
        until = self.clock.seconds() + 60.0
        if identity.token_id is not None:
            token = self.service.snapshot.tokens.get(identity.token_id)
            if token is not None and token.expires is not None:
                until = min(until, token.expires)
        if len(self._cache) >= CACHE_SIZE:
            self._cache.clear()
        self._cache[creds.key] = (self.service.generation, identity, until)
        return self._authorized(request, identity, creds, kind, spec, go)

    def _authorized(
        self,
        request: Request,
        identity: Identity,
        creds: _Creds,
        kind: str,
        spec: JobSpec | None,
        go: Callable[[], Resource],
    ) -> Resource:
        if identity.token_id is not None:
            self.service.token_used(identity.token_id)
        needed = route_name(kind)
        if kind == "docker" and identity.via != "token":
            return ErrorResource(
                403,
                "/docker:local takes API tokens with the docker-api "
                "scope only (not passwords or browser sessions)",
            )
        if needed is not None and not identity.may_use(needed):
            if identity.scopes is not None and needed not in identity.scopes:
                why = f"not in the token's scopes: {', '.join(sorted(identity.scopes)) or 'none'}"
            else:
                why = f"not allowed by the groups: {', '.join(identity.groups) or 'none'}"
            return ErrorResource(403, f"{identity.user} may not use the {needed!r} route ({why})")
        if spec is not None and not identity.may_run(spec.ref, spec.image):
            return ErrorResource(
                403,
                f"{identity.user} may not run image {spec.ref} (no "
                f"image pattern of the groups {', '.join(identity.groups) or 'none'} "
                "matches)",
            )
        setattr(request, IDENTITY_ATTR, identity)
        if creds.from_header:
            setattr(request, OWN_AUTH_ATTR, True)
        return go()

    def _unauthenticated(self, request: Request, message: str, clear_session: bool = False) -> Resource:
        if clear_session:
            _set_cookie(request, SESSION_COOKIE, b"", 0, secure=request.isSecure())
        if wants_html(request):
            label = getattr(request, APP_HOST_ATTR, None)
            if label is not None and self.public_url is not None:
                # an app host: sign in (or find the session) on the main host
                to = quote(label, safe="")
                path = quote(request.uri.decode("latin-1"), safe="")
                return _SeeOther(f"{self.public_url}/auth:handoff?to={to}&path={path}".encode())
            return _SeeOther(b"/auth:login?next=" + quote(request.uri.decode("latin-1"), safe="").encode())
        return _Challenge(message)

    # -- pages -----------------------------------------------------------------------
    def page(self, request: Request, name: str) -> Resource:
        """``/auth:login``, ``/auth:logout``, ``/auth:handoff`` (signed in: a ticket
        for an app host)."""
        if name == "login":
            return _Login(self)
        if name == "logout":
            return _Logout(self)
        if name == "handoff":
            return self.guard(request, "home", None, lambda: _Handoff(self))
        return ErrorResource(404, f"/auth:{name} does not exist (login, logout)")

    def ticket(self, user: str, label: str) -> str:
        """A one-time ticket signing ``user`` in on app host ``label``."""
        now = self.clock.seconds()
        if len(self._tickets) >= CACHE_SIZE:
            self._tickets = {k: v for k, v in self._tickets.items() if v[2] > now}
            if len(self._tickets) >= CACHE_SIZE:
                self._tickets.clear()
        ticket = secrets.token_urlsafe(32)
        self._tickets[ticket] = (user, label, now + TICKET_LIFETIME)
        if self.shared is not None:
            self.shared.note("ticket", ticket, json.dumps([user, label, now + TICKET_LIFETIME]))
        return ticket

    def redeem(self, ticket: str, label: str) -> str | None:
        """The user of a live ``ticket`` for ``label`` (used up either way)."""
        found = self._tickets.pop(ticket, None)
        if found is None:
            return None
        user, for_label, until = found
        if for_label != label or until < self.clock.seconds():
            return None
        return user

    def redeem_anywhere(self, ticket: str, label: str) -> Deferred[str | None]:
        """:meth:`redeem`, and with ``--workers`` a ticket handed out by another
        process: taken from the broker's process, which holds every ticket once."""
        shared = self.shared
        if shared is None:
            return succeed(self.redeem(ticket, label))
        self._tickets.pop(ticket, None)

        def check(value: str | None) -> str | None:
            if value is None:
                return None
            user, for_label, until = json.loads(value)
            if for_label != label or until < self.clock.seconds():
                return None
            return str(user)

        return shared.take("ticket", ticket).addCallback(check)

    def app_page(self, request: Request, label: str, name: str) -> Resource:
        """``/auth:ticket`` on app host ``label`` (the only ``auth:`` page there)."""
        if name == "ticket":
            return _Ticket(self, label)
        return ErrorResource(404, f"/auth:{name} is on the main host, not on an app's own host")

    def home(self, request: Request) -> Resource:
        """``/``: who is signed in, their applications."""
        return self.guard(request, "home", None, lambda: _Home(self))

    def forget(self, key: bytes, tell: bool = True) -> None:
        """Drop a cached credential (a logged-out session), in every process."""
        self._cache.pop(key, None)
        if tell and self.shared is not None:
            self.shared.note("forget", key.decode("latin-1"), "")


class SharedFacts(Protocol):
    """The broker's process, to a ``--workers`` child (``procs.childside.ChildBox``)."""

    def note(self, table: str, key: str, value: str) -> None:
        """Tell every process (``forget``) or the broker's process (``ticket``)."""

    def take(self, table: str, key: str) -> Deferred[str | None]:
        """A fact, taken (a ticket is used once, in whichever process)."""


def _client(request: Request) -> str:
    return str(getattr(request.getClientAddress(), "host", "-"))


def _set_cookie(
    request: Request, name: bytes, value: bytes, max_age: int, *, secure: bool, same_site: bytes = b"Lax"
) -> None:
    parts = [name + b"=" + value, b"Path=/", b"HttpOnly", b"SameSite=" + same_site, b"Max-Age=%d" % max_age]
    if secure:
        parts.append(b"Secure")
    request.responseHeaders.addRawHeader(b"set-cookie", b"; ".join(parts))


def _session_and_go(request: Request, session: str, lifetime: float, location: str) -> None:
    """Finish a sign-in: the session cookie, then 303 to ``location`` (a path here)."""
    if done_or_gone(request):
        return
    _set_cookie(request, SESSION_COOKIE, session.encode(), int(lifetime), secure=request.isSecure())
    request.setResponseCode(303)
    request.setHeader(b"location", location.encode())
    request.setHeader(b"cache-control", b"no-store")
    request.finish()


def _safe_next(target: str) -> str:
    """Only a path on this site (no scheme, no host, no ``//``)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return target


class _Later(Resource):
    """Renders the resource a Deferred fires with (a password or session check)."""

    isLeaf = True

    def __init__(self, d: Deferred[Resource]):
        super().__init__()
        self.d = d

    def render(self, request: Request) -> Any:
        """Wait for the check; then render what it decided."""

        def go(child: Resource) -> None:
            if done_or_gone(request):
                return
            request.render(child)

        def failed(f: Failure) -> None:
            log.failure("the accounts check failed", f)
            go(ErrorResource(500, "checking credentials failed"))

        self.d.addCallbacks(go, failed)
        return NOT_DONE_YET


class _Challenge(Resource):
    """401 with ``WWW-Authenticate`` for Basic and Bearer."""

    isLeaf = True

    def __init__(self, message: str):
        super().__init__()
        self.message = message

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        """The 401."""
        request.responseHeaders.setRawHeaders(b"www-authenticate", _CHALLENGE)
        return write_error(request, 401, self.message)


class _SeeOther(Resource):
    isLeaf = True

    def __init__(self, location: bytes):
        super().__init__()
        self.location = location

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        """303 to ``location``."""
        request.setResponseCode(303)
        request.setHeader(b"location", self.location)
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        return b"See " + self.location + b"\n"


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:32rem;margin:4rem auto;"
    "padding:0 1rem;color:#222}input{display:block;width:100%;margin:.3rem 0 1rem;"
    "padding:.4rem;font-size:1rem}button{padding:.5rem 1.2rem;font-size:1rem}"
    ".err{color:#b00}table{border-collapse:collapse}td{padding:.2rem .8rem .2rem 0}"
)


def _page(
    request: Request, title: str, body: str, status: int = 200, form_action: bytes = b"'self'"
) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(
        b"content-security-policy",
        b"default-src 'none'; style-src 'unsafe-inline'; form-action " + form_action,
    )
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}"
        f"</title><style>{_STYLE}</style></head><body>{body}</body></html>"
    ).encode()


def _csrf(request: Request) -> str:
    """The request's CSRF token (set as a cookie when it has none)."""
    have = request.getCookie(CSRF_COOKIE)
    if have and len(have) >= 20:
        return have.decode("latin-1")
    token = secrets.token_urlsafe(24)
    _set_cookie(request, CSRF_COOKIE, token.encode(), 3600, secure=request.isSecure(), same_site=b"Strict")
    return token


def _form_ok(request: Request, fields: dict[str, str]) -> bool:
    """Double-submit CSRF check plus, when the browser sends one, a same-origin Origin."""
    cookie = request.getCookie(CSRF_COOKIE) or b""
    sent = fields.get("csrf", "").encode("latin-1", "replace")
    if not cookie or not hmac.compare_digest(cookie, sent):
        return False
    origin = request.getHeader(b"origin")
    if origin is not None and origin != b"null":
        host = request.getHeader(b"host") or b""
        if urlsplit(origin.decode("latin-1")).netloc.encode("latin-1") != host:
            return False
    return True


def _fields(request: Request) -> dict[str, str] | None:
    content = request.content
    if content is None:
        return {}
    content.seek(0)
    body = content.read(_LOGIN_BODY_MAX + 1)
    if len(body) > _LOGIN_BODY_MAX:
        return None
    parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in parsed.items()}


def _login_form(
    request: Request, next_url: str, error: str = "", status: int = 200, form_action: bytes = b"'self'"
) -> bytes:
    token = _csrf(request)
    err = f"<p class=err>{html.escape(error)}</p>" if error else ""
    return _page(
        request,
        "Sign in - dockerspaces",
        (
            "<h1>dockerspaces</h1><form method=post action=/auth:login>"
            f"{err}<label>User<input name=user autocomplete=username autofocus required></label>"
            "<label>Password or token<input name=password type=password "
            "autocomplete=current-password required></label>"
            f"<input type=hidden name=csrf value='{html.escape(token, quote=True)}'>"
            f"<input type=hidden name=next value='{html.escape(next_url, quote=True)}'>"
            "<button type=submit>Sign in</button></form>"
        ),
        status,
        form_action,
    )


class _GatePage(Resource):
    """A page of the gate's own."""

    isLeaf = True

    def __init__(self, gate: AuthGate):
        super().__init__()
        self.gate = gate

    def identity(self, request: Request) -> Identity:
        """The identity the gate let through (pages behind ``guard`` only)."""
        identity = identity_of(request)
        if identity is None:  # pragma: no cover - the gate let it through
            raise AssertionError("a guarded page without an identity")
        return identity


class _Login(_GatePage):
    def render_GET(self, request: Request) -> bytes:
        """The form (``?next=`` where to go afterwards)."""
        args = parse_qs(urlsplit(request.uri.decode("latin-1")).query)
        return _login_form(request, _safe_next(args.get("next", ["/"])[0]), form_action=self.gate.form_action)

    def render_POST(self, request: Request) -> Any:
        """Check the form; on success a session cookie and a 303 to ``next``."""
        gate = self.gate
        fields = _fields(request)
        if fields is None:
            return write_error(request, 413, "the sign-in form is too large")
        next_url = _safe_next(fields.get("next", "/"))
        if not _form_ok(request, fields):
            return _login_form(
                request, next_url, "The form expired; please try again.", 403, gate.form_action
            )
        user = fields.get("user", "")
        keys = ["a:" + _client(request), "u:" + user]
        wait = gate.throttle.retry_after(*keys)
        if wait is not None:
            request.setHeader(b"retry-after", str(wait).encode())
            return _login_form(
                request, next_url, f"Too many failed sign-ins; try again in {wait} s.", 429, gate.form_action
            )
        d = gate.portal.login(
            UsernamePassword(user.encode(), fields.get("password", "").encode()), None, IIdentity
        )

        def signed_in(result: Any) -> Deferred[None]:
            identity: Identity = result[1]
            gate.throttle.succeeded("u:" + user)
            return gate.service.create_session(identity.user, gate.session_lifetime).addCallback(cookie)

        def cookie(session: str) -> None:
            _session_and_go(request, session, gate.session_lifetime, next_url)

        def refused(f: Failure) -> None:
            if done_or_gone(request):
                return
            if f.check(UnauthorizedLogin):
                gate.throttle.failed(*keys)
                body = _login_form(request, next_url, "Wrong user or password.", 401, gate.form_action)
            else:
                log.failure("signing in failed", f)
                body = _login_form(
                    request, next_url, "Signing in failed; see the log.", 500, gate.form_action
                )
            request.write(body)
            request.finish()

        d.addCallback(signed_in).addErrback(refused)
        return NOT_DONE_YET


class _Logout(_GatePage):
    def render_GET(self, request: Request) -> bytes:
        """A confirmation form (a GET never changes state)."""
        token = _csrf(request)
        return _page(
            request,
            "Sign out - dockerspaces",
            (
                "<h1>Sign out</h1><form method=post action=/auth:logout>"
                f"<input type=hidden name=csrf value='{html.escape(token, quote=True)}'>"
                "<button type=submit id=logout>Sign out</button></form>"
            ),
        )

    def render_POST(self, request: Request) -> Any:
        """End the session; back to the sign-in page."""
        fields = _fields(request) or {}
        if not _form_ok(request, fields):
            return write_error(request, 403, "the sign-out form expired; reload it")
        session = request.getCookie(SESSION_COOKIE)
        _set_cookie(request, SESSION_COOKIE, b"", 0, secure=request.isSecure())
        request.setResponseCode(303)
        request.setHeader(b"location", b"/auth:login")
        if not session:
            return b""
        self.gate.forget(b"S" + session)

        def done(_: object) -> None:
            if not done_or_gone(request):
                request.finish()

        self.gate.service.end_session(session.decode("latin-1")).addBoth(done)
        return NOT_DONE_YET


class _Handoff(_GatePage):
    """``/auth:handoff?to=LABEL&path=PATH`` on the main host, signed in: 303 to the app
    host's ``/auth:ticket`` with a one-time ticket."""

    def render_GET(self, request: Request) -> bytes:
        """The redirect, or 404 for an app host nobody knows."""
        identity = self.identity(request)
        args = parse_qs(urlsplit(request.uri.decode("latin-1")).query)
        label = args.get("to", [""])[0]
        origin = self.gate.app_origin(label)
        if origin is None:
            return write_error(request, 404, "no such app host; open the app from its /x:… or /y:… address")
        path = quote(_safe_next(args.get("path", ["/"])[0]), safe="")
        ticket = self.gate.ticket(identity.user, label)
        request.setResponseCode(303)
        request.setHeader(b"location", f"{origin}/auth:ticket?t={ticket}&path={path}".encode())
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"referrer-policy", b"no-referrer")
        return b""


class _Ticket(Resource):
    """``/auth:ticket?t=TICKET&path=PATH`` on an app host: the app host's own session
    cookie, then 303 to ``PATH``."""

    isLeaf = True

    def __init__(self, gate: AuthGate, label: str):
        super().__init__()
        self.gate, self.label = gate, label

    def render_GET(self, request: Request) -> Any:
        """Redeem the ticket."""
        gate = self.gate
        args = parse_qs(urlsplit(request.uri.decode("latin-1")).query)
        path = _safe_next(args.get("path", ["/"])[0])
        d = gate.redeem_anywhere(args.get("t", [""])[0], self.label)
        d.addCallback(self._redeemed, request, path)
        return NOT_DONE_YET

    def _redeemed(self, user: str | None, request: Request, path: str) -> None:
        gate = self.gate
        if done_or_gone(request):
            return
        if user is None:
            request.write(
                write_error(request, 403, "this sign-in link was used or has expired; open the app again")
            )
            request.finish()
            return

        def cookie(session: str) -> None:
            # (no Referer from the next page: this URL held the ticket)
            request.setHeader(b"referrer-policy", b"no-referrer")
            _session_and_go(request, session, gate.session_lifetime, path)

        def failed(f: Failure) -> None:
            log.failure("signing in on an app host failed", f)
            if not done_or_gone(request):
                request.write(write_error(request, 500, "signing in failed; see the log"))
                request.finish()

        gate.service.create_session(user, gate.session_lifetime).addCallbacks(cookie, failed)


class _Home(_GatePage):
    def render_GET(self, request: Request) -> bytes:
        """The signed-in user's page."""
        identity = self.identity(request)
        rows = "".join(
            "<tr><td>"
            + (
                f"<a href='{html.escape(link, quote=True)}'>{html.escape(key)}</a>"
                if link
                else html.escape(key)
            )
            + f"</td><td>{html.escape(state)}</td></tr>"
            for key, state, link in self.gate.containers(identity.user)
        )
        apps = f"<table>{rows}</table>" if rows else "<p>No running applications.</p>"
        links = ""
        if identity.admin or identity.may_use("monitor"):
            links = "<p><a href='/monitor:broker/'>Dashboard</a></p>"
        token = _csrf(request)
        return _page(
            request,
            "dockerspaces",
            (
                f"<h1>dockerspaces</h1><p>Signed in as <b id=user>{html.escape(identity.user)}</b>"
                f" ({html.escape(', '.join(identity.groups) or 'no group')}"
                f"{', admin' if identity.admin else ''}).</p><h2>Your applications</h2>{apps}"
                f"{links}<form method=post action=/auth:logout><input type=hidden name=csrf "
                f"value='{html.escape(token, quote=True)}'><button type=submit>Sign out</button>"
                "</form>"
            ),
        )
