"""The server's side of the accounts: :class:`AccountsService` keeps the SQLite state
(:class:`~dockerspaces.accounts.store.Store`) off the reactor thread and answers the
per-request questions from memory.

* One thread owns the database connection (every read and write goes through it);
  another runs the password KDF (scrypt takes tens of milliseconds by design, and must
  never hold up a database write or the snapshot refresh).
* Every ``refresh`` seconds the database's change counter is read; when anything
  changed -- the admin tool in another process included -- the snapshot (users,
  groups, tokens) is reloaded and every cache keyed on the old one is dropped, so an
  admin's change takes effect within a second without a restart.
* Verified passwords are remembered for ``password_cache`` seconds under an HMAC of
  the pair with a per-process key (never the password itself), sessions for as long
  as the snapshot stands: a request never pays a KDF or a query twice in a row.
* Token last-use times are gathered in memory and written with the refresh.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from collections.abc import Callable
from typing import TypeVar

from attrs import define, field
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from .model import Snapshot
from .passwords import hash_password, verify_password
from .store import Store

log = Logger()
T = TypeVar("T")

#: seconds a verified password is taken as verified again without the KDF
PASSWORD_CACHE = 300.0
#: container events that start and end a user's usage of a container
USAGE_START = frozenset({"start"})
USAGE_END = frozenset({"stop", "evict", "crash", "fail"})


@define
class _Cached:
    user: str
    until: float


class IAccountsReactor(IReactorTime, IReactorFromThreads):
    """What the service uses of the reactor: its clock, and answers from its threads."""


@define
class AccountsService(Service):
    """Owns the accounts database for the server (see the module docstring)."""

    path: str
    reactor: IAccountsReactor
    snapshot: Snapshot
    refresh: float = 0.5
    store_factory: Callable[[str], Store] = Store
    password_cache: float = PASSWORD_CACHE
    # (tests: pools that run inline)
    pool_factory: Callable[[str], ThreadPool] = lambda name: ThreadPool(minthreads=1, maxthreads=1, name=name)
    generation: int = 0  # bumps whenever the snapshot is replaced
    _db: ThreadPool | None = None  # made by pool_factory
    _kdf: ThreadPool | None = None
    _local: threading.local = field(factory=threading.local)
    _stores: list[Store] = field(factory=list)
    _loop: LoopingCall | None = None
    _last_version: int | None = None
    _token_uses: dict[str, float] = field(factory=dict)
    _passwords: dict[bytes, tuple[str, float]] = field(factory=dict)
    _sessions: dict[str, _Cached] = field(factory=dict)
    _key: bytes = field(factory=lambda: secrets.token_bytes(32))
    _dummy: str = ""
    _ticking: bool = False

    # -- service ---------------------------------------------------------------------
    def startService(self) -> None:
        """Start the database and KDF threads and the refresh loop."""
        super().startService()
        self._db = self.pool_factory("accounts-db")
        self._kdf = self.pool_factory("accounts-kdf")
        self._db.start()
        self._kdf.start()
        self._loop = LoopingCall(self.tick)
        self._loop.clock = self.reactor
        self._loop.start(self.refresh, now=True)

    def stopService(self) -> Deferred[None]:
        """Write the last token uses, close the database, stop the threads."""
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        d = self._in_db(self._flush_and_close)
        d.addErrback(lambda f: log.failure("closing the accounts database failed", f))

        def stop_pools(_: object) -> None:
            for pool in (self._db, self._kdf):
                if pool is not None:
                    pool.stop()
            self._db = self._kdf = None

        return d.addBoth(stop_pools)

    def now(self) -> float:
        """The reactor's clock (Unix seconds)."""
        return float(self.reactor.seconds())

    # -- threads ---------------------------------------------------------------------
    def _store(self) -> Store:
        store: Store | None = getattr(self._local, "store", None)
        if store is None:
            store = self._local.store = self.store_factory(self.path)
            self._stores.append(store)
        return store

    def _in_db(self, f: Callable[[Store], T]) -> Deferred[T]:
        if self._db is None:
            raise RuntimeError("the accounts service is not running")
        return deferToThreadPool(self.reactor, self._db, lambda: f(self._store()))

    def _flush_and_close(self, store: Store) -> None:
        if self._token_uses:
            store.touch_tokens(self._token_uses)
        for s in self._stores:
            s.close()
        self._stores.clear()
        self._local.store = None

    # -- the snapshot ----------------------------------------------------------------
    def tick(self) -> Deferred[None]:
        """Write gathered token uses; reload the snapshot if anything changed."""
        if self._ticking or self._db is None:
            return succeed(None)
        self._ticking = True
        uses, self._token_uses = self._token_uses, {}
        last = self._last_version

        def in_thread(store: Store) -> tuple[int, Snapshot | None]:
            if uses:
                store.touch_tokens(uses)
            version = store.data_version()
            return version, (store.snapshot() if version != last else None)

        def done(result: tuple[int, Snapshot | None]) -> None:
            version, snapshot = result
            if snapshot is not None:
                self.replace(snapshot)
            self._last_version = version

        def failed(f: Failure) -> None:
            log.failure("reading the accounts database failed", f)

        def over(_: object) -> None:
            self._ticking = False

        return self._in_db(in_thread).addCallbacks(done, failed).addBoth(over)

    def replace(self, snapshot: Snapshot) -> None:
        """A new snapshot: caches that depended on the old one are dropped."""
        if snapshot != self.snapshot:
            self.snapshot = snapshot
            self.generation += 1
            self._sessions.clear()
            self._passwords.clear()

    # -- passwords -------------------------------------------------------------------
    def verify_password(self, user: str, password: str) -> Deferred[bool]:
        """Whether ``password`` is ``user``'s. The KDF runs in its own thread, also for
        unknown users (against a dummy hash: the time does not tell who exists)."""
        u = self.snapshot.users.get(user)
        encoded = u.password_hash if u is not None and u.enabled else None
        mark = hmac.new(self._key, user.encode() + b"\0" + password.encode(), hashlib.sha256).digest()
        hit = self._passwords.get(mark)
        if encoded is not None and hit is not None and hit[0] == encoded and hit[1] > self.now():
            return succeed(True)
        if self._kdf is None:
            raise RuntimeError("the accounts service is not running")
        if encoded is None:
            if not self._dummy:
                self._dummy = hash_password(secrets.token_urlsafe(16))
            encoded_check, real = self._dummy, False
        else:
            encoded_check, real = encoded, True

        def checked(ok: bool) -> bool:
            ok = ok and real
            if ok and encoded is not None:
                self._passwords[mark] = (encoded, self.now() + self.password_cache)
            return ok

        return deferToThreadPool(
            self.reactor, self._kdf, verify_password, password, encoded_check
        ).addCallback(checked)

    # -- sessions --------------------------------------------------------------------
    def create_session(self, user: str, lifetime: float) -> Deferred[str]:
        """A new browser session for ``user``; fires with its id (shown once)."""

        def made(session: str) -> str:
            self._sessions[_digest(session)] = _Cached(user, self.now() + lifetime)
            return session

        return self._in_db(lambda s: s.create_session(user, lifetime)).addCallback(made)

    def session_user(self, session: str) -> Deferred[str | None]:
        """The user of a live session (memory first, then the database)."""
        key = _digest(session)
        hit = self._sessions.get(key)
        if hit is not None and hit.until > self.now():
            return succeed(hit.user)
        generation = self.generation

        def found(user: str | None) -> str | None:
            if user is not None and generation == self.generation:
                self._sessions[key] = _Cached(user, self.now() + self.refresh * 120)
            return user

        return self._in_db(lambda s: s.session_user(session)).addCallback(found)

    def end_session(self, session: str) -> Deferred[None]:
        """Log a session out (memory and database)."""
        self._sessions.pop(_digest(session), None)
        return self._in_db(lambda s: s.end_session(session))

    # -- tokens and usage ------------------------------------------------------------
    def token_used(self, token_id: str) -> None:
        """Remember a token's use (written with the next refresh)."""
        self._token_uses[token_id] = self.now()

    def container_event(
        self, event: str, container: str | None, display: str, owner: str | None, gpus: int
    ) -> None:
        """Usage rows: a container started for ``owner`` opens one, its end closes it."""
        if container is None or self._db is None:
            return
        at = self.now()
        if event in USAGE_START and owner is not None:
            d = self._in_db(lambda s: s.usage_start(owner, container, display, gpus, at))
        elif event in USAGE_END:
            d = self._in_db(lambda s: s.usage_stop(container, at))
        else:
            return
        d.addErrback(lambda f: log.failure("recording usage failed", f))


def _digest(session: str) -> str:
    return hashlib.sha256(session.encode()).hexdigest()


def open_snapshot(path: str, store_factory: Callable[[str], Store] = Store) -> Snapshot:
    """Open (create, migrate) the state file once at start and read its snapshot: a bad
    or newer file stops the service before it listens, with the store's message."""
    store = store_factory(path)
    try:
        return store.snapshot()
    finally:
        store.close()
