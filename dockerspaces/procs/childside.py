"""A proxy process's end of ``--workers``: the broker, seen through AMP.

:class:`RemoteBroker` offers what the web side uses of
:class:`~dockerspaces.broker.broker.Broker` (``acquire``, ``launch_worker``,
``containers``) and hands out :class:`RemoteLease` objects with the API of
:class:`~dockerspaces.broker.model.Lease`. :class:`RemoteBoard` is the waiting pages'
board kept in the broker's process. :class:`ChildBox` answers what the broker's
process sends unasked: progress, facts other children noted, the containers, and
this process's request metrics when ``/monitor:metrics`` is read.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from ..broker.errors import BackendRefused, Draining
from ..broker.model import BUSY, IDLE
from ..broker.model import Progress as BrokerProgress
from ..broker.quota import Owner
from ..broker.snapshot import ContainerView
from ..engine.interface import NetworkInfo
from ..metrics import Metrics
from ..spec import JobSpec, SpecError, parse_route
from . import commands as c

log = Logger()

#: container states in which a y: share may still be joined
SERVING = frozenset({BUSY, IDLE})


class ChildBox(c.PromptAMP):
    """The child's end of its connection to the broker's process."""

    def __init__(self, metrics: Metrics | None = None, on_lost: Callable[[], None] | None = None):
        super().__init__()
        self.metrics = metrics if metrics is not None else Metrics()
        self.on_lost = on_lost
        self.progress: dict[int, Callable[[BrokerProgress], None]] = {}
        #: facts noted by other children, by table (see :meth:`learn`)
        self.learners: dict[str, Callable[[str, str], None]] = {}
        self.views: list[ContainerView] = []
        #: told the ids of the containers still serving after every push
        self.on_containers: Callable[[set[str]], None] | None = None
        #: asked by the broker to give a lease back (``RemoteBroker.revoke``)
        self.on_revoke: Callable[[int], bool] | None = None
        self.connected = False

    def connectionMade(self) -> None:
        """Connected to the broker's process."""
        super().connectionMade()
        self.connected = True

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """The broker's process is gone: this child has nothing left to do."""
        self.connected = False
        super().connectionLost(reason)
        if self.on_lost is not None:
            self.on_lost()

    def note(self, table: str, key: str, value: str) -> None:
        """Tell the broker's process (and so every other child) a fact, sent at once:
        the answer that hands it to a browser may leave right after."""
        if self.connected:
            self.callRemote(c.Note, table=table, key=key, value=value)  # (sent at once)

    def lookup(self, table: str, key: str) -> Deferred[str | None]:
        """A fact this child missed, asked of the broker's process (None: unknown)."""
        if not self.connected:
            return succeed(None)
        d = self.callRemote(c.Lookup, table=table, key=key)
        return d.addCallbacks(lambda r: r["value"], lambda _: None)

    def take(self, table: str, key: str) -> Deferred[str | None]:
        """A fact taken from the broker's process (a ticket: used once)."""
        return self.lookup(table, key)

    @c.Revoke.responder
    def got_revoke(self, lease: int) -> dict[str, bool]:
        """The broker wants a lease back."""
        return {"given": self.on_revoke is not None and self.on_revoke(lease)}

    @c.Progress.responder
    def got_progress(
        self,
        ask: int,
        state: str,
        position: int | None,
        detail: str | None,
        current: int | None,
        total: int | None,
    ) -> dict[str, Any]:
        """A waiting request's progress."""
        cb = self.progress.get(ask)
        if cb is not None:
            cb(BrokerProgress(state, position, detail, current, total))
        return {}

    @c.Fact.responder
    def fact(self, table: str, key: str, value: str) -> dict[str, Any]:
        """Another child's fact."""
        learn = self.learners.get(table)
        if learn is not None:
            learn(key, value)
        return {}

    @c.Containers.responder
    def containers(self, views: bytes) -> dict[str, Any]:
        """The broker's containers now."""
        out = []
        for cid, segment, display, state, owner, users in json.loads(views):
            try:
                spec = parse_route(segment)
            except SpecError:
                continue
            if isinstance(spec, JobSpec):
                out.append(ContainerView(cid, "", 0, spec.key, display, state, 0, spec, tuple(users), owner))
        self.views = out
        if self.on_containers is not None:
            self.on_containers({v.id for v in out if v.state in SERVING})
        return {}

    @c.ReadMetrics.responder
    def read_metrics(self) -> dict[str, bytes]:
        """This process's metrics."""
        return {"metrics": json.dumps(self.metrics.export()).encode("utf-8")}


def _lost(f: Failure) -> Exception:
    """What a request gets when the broker's process does not answer."""
    if f.check(c.Refused):
        return c.error_of(str(f.value))
    return Draining(f"the broker's process is gone: {f.getErrorMessage()}")


@define(eq=False)
class RemoteLease:
    """A lease held through the broker's process (the API of ``broker.model.Lease``)."""

    broker: RemoteBroker = field(repr=False)
    id: int
    endpoint: str
    display: str
    container_id: str
    queued_for: float
    released: bool = False
    #: an x: lease kept for the next request of the same key and owner (else None)
    key: tuple[str, Owner | None] | None = None
    timer: Any = field(default=None, repr=False)

    def release(self) -> None:
        """Give the container back (idempotent); an x: lease is parked first."""
        if not self.released:
            self.released = True
            if self.key is not None:
                self.broker.park(self)
            else:
                self.broker.give_back(self, False)

    def failed(self) -> None:
        """Give it back as crashed (refused or reset before answering)."""
        if not self.released:
            self.released = True
            self.broker.give_back(self, True)

    def confirm(self, grace: float) -> Deferred[bool]:
        """Is the container still alive? (a lost broker process: it is not)"""
        if self.released:
            return succeed(False)
        d = self.broker.box.callRemote(c.Confirm, lease=self.id, grace=grace)
        return d.addCallbacks(lambda r: bool(r["alive"]), lambda _: False)

    def died_before(self, when: float, grace: float) -> Deferred[bool]:
        """Did its process end before ``when`` (wall-clock seconds)?"""
        d = self.broker.box.callRemote(c.DiedBefore, lease=self.id, when=when, grace=grace)
        return d.addCallbacks(lambda r: bool(r["died"]), lambda _: False)

    def retry(self, failed: bool = True) -> Deferred[RemoteLease]:
        """Serve the request again (see ``Lease.retry``)."""
        if self.released:
            return fail(BackendRefused(f"{self.display}: the container refused the request"))
        self.released = True
        self.broker.held.discard(self.id)
        return self.broker.ask(c.Retry, lease=self.id, failed=failed)


#: seconds a child keeps a lease after its request ended (an x: lease parked, a y:
#: share unused), so that its next request for that warm container needs no round
#: trip. The broker sees the container busy meanwhile; it takes a parked lease back at
#: once (:class:`~.commands.Revoke`) when another child asks for that key or when a
#: request has to wait, so only an idle container's eviction can wait this long.
LINGER = 0.5


@define(eq=False)
class Share:
    """A y: lease this child shares between its requests for one key and owner."""

    spec: JobSpec
    owner: Owner | None
    lease: RemoteLease
    users: int = 0
    dead: bool = False  # the container failed, or the broker no longer has it
    timer: Any = None


@define(eq=False)
class SharedLease:
    """One request's part in a :class:`Share` (the API of ``broker.model.Lease``)."""

    share: Share
    broker: RemoteBroker = field(repr=False)
    queued_for: float = 0.0
    released: bool = False

    @property
    def endpoint(self) -> str:
        """The container's endpoint."""
        return self.share.lease.endpoint

    @property
    def display(self) -> str:
        """The key, displayed."""
        return self.share.lease.display

    @property
    def container_id(self) -> str:
        """The container's id."""
        return self.share.lease.container_id

    def release(self) -> None:
        """This request is done with it."""
        if not self.released:
            self.released = True
            self.broker.leave(self.share)

    def failed(self) -> None:
        """The container refused or reset the request: nobody joins the share any
        more, and the broker hears of the crash at once."""
        if not self.released:
            self.released = True
            self.broker.leave(self.share, failed=True)

    def confirm(self, grace: float) -> Deferred[bool]:
        """Is the container still alive?"""
        return self.share.lease.confirm(grace)

    def died_before(self, when: float, grace: float) -> Deferred[bool]:
        """Did its process end before ``when``?"""
        return self.share.lease.died_before(when, grace)

    def retry(self, failed: bool = True) -> Deferred[Any]:
        """Serve the request again: with the lease itself when this request is its only
        user (it keeps its place), else with a new acquire."""
        if self.released:
            return fail(BackendRefused(f"{self.display}: the container refused the request"))
        self.released = True
        share, broker = self.share, self.broker
        if share.users == 1 and not share.dead:
            share.users = 0
            broker.unshare(share)
            return share.lease.retry(failed)
        broker.leave(share, failed=failed)
        return broker.acquire(share.spec, owner=share.owner)


class BoardCallback:
    """The progress callback of a waiting page whose board is the broker process's:
    the acquire names the token and progress goes straight to the board."""

    def __init__(self, token: str):
        self.token = token

    def __call__(self, progress: object) -> None:
        """Nothing here: the broker's process publishes it."""


@define(eq=False)
class RemoteBoard:
    """The waiting pages' board of ``pages.ProgressBoard``, kept in the broker's process
    (a page's polls may reach any child)."""

    box: ChildBox

    def new(self, display: str, url: str) -> str:
        """A token for a new page."""
        token = secrets.token_urlsafe(16)
        if self.box.connected:
            self.box.callRemote(c.BoardNew, token=token, display=display, url=url)
        return token

    def callback(self, token: str) -> BoardCallback:
        """The acquire's progress callback (see :class:`BoardCallback`)."""
        return BoardCallback(token)

    def finish(self, token: str, state: str, detail: str | None = None) -> None:
        """The page's final state."""
        if self.box.connected:
            self.box.callRemote(c.BoardFinish, token=token, state=state, detail=detail)

    def discard(self, token: str) -> None:
        """Forget the page."""
        if self.box.connected:
            self.box.callRemote(c.BoardDiscard, token=token)

    def last_poll(self, token: str) -> Deferred[float | None]:
        """When the page last polled (None: unknown, or no broker process)."""
        d = self.box.callRemote(c.BoardLastPoll, token=token)
        return d.addCallbacks(lambda r: r["polled"], lambda _: None)


@define(eq=False)
class RemoteBroker:
    """The broker, one AMP message away (see module)."""

    box: ChildBox
    #: for parked x: leases and y: shares (None: every request asks the broker's process)
    clock: Any = None
    held: set[int] = field(factory=set)
    asks: dict[int, Deferred[Any]] = field(factory=dict)
    shares: dict[tuple[str, Owner | None], Share] = field(factory=dict)
    parked: dict[tuple[str, Owner | None], RemoteLease] = field(factory=dict)
    #: leases in use the broker asked back: given back when their request ends
    revoked: set[int] = field(factory=set)
    #: requests answered from a parked lease or a share, without a round trip
    joined: int = 0
    _next: int = 0
    _idle_waiters: list[Deferred[None]] = field(factory=list)

    def __attrs_post_init__(self) -> None:
        self.box.on_revoke = self.revoke

    def acquire(
        self,
        spec: JobSpec,
        progress: Callable[[BrokerProgress], None] | None = None,
        owner: Owner | None = None,
    ) -> Deferred[Any]:
        """A lease on a container for ``spec`` (see ``Broker.acquire``). A y: request
        joins this child's share of a warm container when it has one (no round trip)."""
        if spec.mode == "x" and not spec.worker and self.clock is not None:
            key = (spec.key, owner)
            lease = self.parked.pop(key, None)
            if lease is not None:
                if lease.timer is not None and lease.timer.active():
                    lease.timer.cancel()
                lease.timer, lease.released, lease.queued_for = None, False, 0.0
                self.joined += 1
                return succeed(lease)
            return self._acquire(spec, progress, owner).addCallback(self._parkable, key)
        if spec.mode == "y" and self.clock is not None:
            share = self.shares.get((spec.key, owner))
            if share is not None and not share.dead:
                share.users += 1
                if share.timer is not None and share.timer.active():
                    share.timer.cancel()
                share.timer = None
                self.joined += 1
                return succeed(SharedLease(share, self))
            return self._acquire(spec, progress, owner).addCallback(self._share, spec, owner)
        return self._acquire(spec, progress, owner)

    def _acquire(
        self, spec: JobSpec, progress: Callable[[BrokerProgress], None] | None, owner: Owner | None
    ) -> Deferred[Any]:
        board = progress.token if isinstance(progress, BoardCallback) else ""
        push = progress is not None and not board
        return self.ask(
            c.Acquire,
            segment=spec.segment(),
            owner=c.owner_json(owner),
            board=board,
            progress=push,
            on_progress=progress if push else None,
        )

    def launch_worker(
        self,
        spec: JobSpec,
        progress: Callable[[BrokerProgress], None] | None = None,
        owner: Owner | None = None,
    ) -> Deferred[None]:
        """Start one more worker (see ``Broker.launch_worker``); fires once started."""
        return self.ask(c.LaunchWorker, segment=spec.segment(), owner=c.owner_json(owner))

    def containers(self) -> list[ContainerView]:
        """The broker's containers as last told (spec, display, state, owner, users)."""
        return self.box.views

    # -- parked x: leases --------------------------------------------------------------

    @staticmethod
    def _parkable(lease: RemoteLease, key: tuple[str, Owner | None]) -> RemoteLease:
        lease.key = key
        return lease

    def park(self, lease: RemoteLease) -> None:
        """Keep ``lease`` :data:`LINGER` s for the next request of its key (given back
        at once when asked back, or when one is parked already)."""
        key = lease.key
        if key is None or lease.id in self.revoked or key in self.parked or not self.box.connected:
            self.revoked.discard(lease.id)
            self.give_back(lease, False)
            return
        self.parked[key] = lease
        lease.timer = self.clock.callLater(LINGER, self._unpark, lease)

    def _unpark(self, lease: RemoteLease) -> None:
        lease.timer = None
        if lease.key is not None and self.parked.get(lease.key) is lease:
            del self.parked[lease.key]
            self.give_back(lease, False)

    def revoke(self, lease_id: int) -> bool:
        """The broker wants ``lease_id`` back: True when it was parked or an unused
        share (now the broker's: no Release follows), else False (in use: it goes
        back when its request ends; unknown: already on its way)."""
        for key, lease in list(self.parked.items()):
            if lease.id == lease_id:
                del self.parked[key]
                if lease.timer is not None and lease.timer.active():
                    lease.timer.cancel()
                lease.timer = None
                self.held.discard(lease_id)
                self._maybe_idle()
                return True
        for share in list(self.shares.values()):
            if share.lease.id == lease_id:
                self.unshare(share)
                if share.users == 0:
                    share.lease.released = True
                    self.held.discard(lease_id)
                    self._maybe_idle()
                    return True
                share.dead = True  # nobody joins; given back when its requests end
                return False
        if lease_id in self.held:
            self.revoked.add(lease_id)
        return False

    # -- y: shares -------------------------------------------------------------------

    def _share(self, lease: RemoteLease, spec: JobSpec, owner: Owner | None) -> Any:
        key = (spec.key, owner)
        if key in self.shares:  # two first requests raced: this one is not shared
            return lease
        share = self.shares[key] = Share(spec, owner, lease, users=1)
        return SharedLease(share, self, lease.queued_for)

    def unshare(self, share: Share) -> None:
        """Nobody joins ``share`` any more."""
        key = (share.spec.key, share.owner)
        if self.shares.get(key) is share:
            del self.shares[key]
        if share.timer is not None and share.timer.active():
            share.timer.cancel()
        share.timer = None

    def leave(self, share: Share, failed: bool = False) -> None:
        """A request is done with ``share``; the lease goes back after
        :data:`LINGER` s without one (at once when failed or gone)."""
        share.users -= 1
        if failed:
            share.dead = True
            self.unshare(share)
            share.lease.failed()  # the broker hears at once; the others finish as they can
            return
        if share.users > 0:
            return
        if share.dead or self.clock is None:
            self.unshare(share)
            share.lease.release()
            return
        share.timer = self.clock.callLater(LINGER, self._expire, share)

    def _expire(self, share: Share) -> None:
        share.timer = None
        if share.users == 0:
            self.unshare(share)
            share.lease.release()

    def give_back_idle(self) -> None:
        """Release every parked lease and every share no request uses (a draining
        child)."""
        for lease in list(self.parked.values()):
            self._unpark(lease)
        for share in list(self.shares.values()):
            if share.users == 0:
                self.unshare(share)
                share.lease.release()

    def containers_changed(self, serving: set[str]) -> None:
        """The broker's containers now (ids of the ones still serving): a share of
        any other container is dead (nobody joins; given back once unused)."""
        for lease in list(self.parked.values()):
            if lease.container_id not in serving:
                self._unpark(lease)
        for share in list(self.shares.values()):
            if share.lease.container_id not in serving:
                share.dead = True
                self.unshare(share)
                if share.users == 0:
                    share.lease.release()

    @property
    def idle(self) -> bool:
        """No lease held and nothing asked."""
        return not self.held and not self.asks

    def when_idle(self) -> Deferred[None]:
        """Fires once :attr:`idle` (a draining child waits for this)."""
        if self.idle:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle_waiters.append(d)
        return d

    def _maybe_idle(self) -> None:
        if self.idle and self._idle_waiters:
            waiters, self._idle_waiters = self._idle_waiters, []
            for d in waiters:
                d.callback(None)

    # -- the wire ----------------------------------------------------------------------

    def ask(
        self,
        command: type[amp.Command],
        on_progress: Callable[[BrokerProgress], None] | None = None,
        **kw: Any,
    ) -> Deferred[Any]:
        """Send ``command`` under a new ask number; cancelling the result withdraws it."""
        self._next += 1
        ask = self._next
        box = self.box

        def cancel(_: Deferred[Any]) -> None:
            self.asks.pop(ask, None)
            box.progress.pop(ask, None)
            if box.connected:
                box.callRemote(c.Cancel, ask=ask)
            self._maybe_idle()

        d: Deferred[Any] = Deferred(cancel)
        if not box.connected:
            d.errback(Draining("the broker's process is gone"))
            return d
        self.asks[ask] = d
        if on_progress is not None:
            box.progress[ask] = on_progress
        box.callRemote(command, ask=ask, **kw).addCallbacks(
            self._answered, self._refused, callbackArgs=(ask, d), errbackArgs=(ask, d)
        )
        return d

    def _answered(self, answer: dict[str, Any], ask: int, d: Deferred[Any]) -> None:
        self.asks.pop(ask, None)
        self.box.progress.pop(ask, None)
        lease = None
        if "lease" in answer:
            lease = RemoteLease(
                self,
                answer["lease"],
                answer["endpoint"],
                answer["display"],
                answer["container"],
                answer["queued_for"],
            )
            self.held.add(lease.id)
        if d.called:  # withdrawn while the answer was on its way: given back
            if lease is not None:
                lease.release()
            return
        d.callback(lease)
        if lease is None:
            self._maybe_idle()

    def _refused(self, f: Failure, ask: int, d: Deferred[Any]) -> None:
        self.asks.pop(ask, None)
        self.box.progress.pop(ask, None)
        if not d.called:
            d.errback(_lost(f))
        self._maybe_idle()

    def give_back(self, lease: RemoteLease, failed: bool) -> None:
        """Release ``lease`` (``failed``: as crashed)."""
        self.held.discard(lease.id)
        self.revoked.discard(lease.id)
        if self.box.connected:
            self.box.callRemote(c.Release, lease=lease.id, failed=failed)
        self._maybe_idle()


@define(eq=False)
class RemoteNetworks:
    """An engine's ``networks()`` asked of the broker's process (the ``host:`` policy)."""

    box: ChildBox
    name: str

    def networks(self) -> Deferred[list[NetworkInfo]]:
        """The engine's networks."""

        def decode(r: dict[str, bytes]) -> list[NetworkInfo]:
            return [
                NetworkInfo(str(n), str(d), tuple(s), tuple(r_)) for n, d, s, r_ in json.loads(r["networks"])
            ]

        def refused(f: Failure) -> Failure:
            return Failure(_lost(f))

        return self.box.callRemote(c.Networks, engine=self.name).addCallbacks(decode, refused)
