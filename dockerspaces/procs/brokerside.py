"""The broker's end of ``--workers``: one :class:`BrokerBox` per child, one :class:`Hub`.

A box answers its child's commands with the one broker; it keeps the leases it handed
to that child and the asks still waiting. When the child's connection is lost (the
child died, or was stopped), every waiting ask is cancelled (it leaves its line) and
every lease is released at once: the child's in-flight requests are lost with it,
nothing else is. Every rule (exclusivity, FIFO per key, quotas, fair share, eviction,
never stopping a container with work in flight) stays in the broker.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from attrs import define, field
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..broker.broker import Broker
from ..broker.model import Lease, Progress
from ..engine.interface import IEngine, NetworkInfo
from ..metrics import Metrics
from ..web.apphosts import AppHosts
from ..web.pages import ProgressBoard
from . import commands as c

log = Logger()

#: how long a missed fact is waited for (see :meth:`Hub.lookup_soon`)
NOTE_GRACE = 0.05
#: facts kept per table (least recently noted go first)
MAX_FACTS = 4096
#: tables a child may note into: ``route`` references and ``app`` labels, and
#: ``forget`` (a signed-out session) go to every child; ``origin`` (a key's public URL)
#: and ``ticket`` (an app host's sign-in, taken once by whichever child) stay here
TABLES = ("route", "app", "origin", "ticket", "forget")
KEPT_HERE = ("origin", "ticket")


@define(eq=False)
class Hub:
    """What every box shares: the broker, the waiting pages' board, the facts the
    children noted, the engines (for their networks) and the boxes themselves."""

    broker: Broker
    board: ProgressBoard
    clock: IReactorTime
    apps: AppHosts = field(factory=AppHosts)
    engines: Mapping[str, IEngine] = field(factory=dict)
    metrics: Metrics = field(factory=Metrics)
    boxes: list[BrokerBox] = field(factory=list)
    tables: dict[str, OrderedDict[str, str]] = field(factory=lambda: {t: OrderedDict() for t in TABLES})
    _push: Any = None  # the pending Containers push (one per reactor turn)
    _revoking: bool = False
    #: leases handed out and asks answered, for tests and the benchmark's message count
    messages: int = 0

    def box(self, index: int = 0) -> BrokerBox:
        """A new box for child ``index`` (registered once connected)."""
        return BrokerBox(self, index)

    def note(self, sender: BrokerBox | None, table: str, key: str, value: str) -> None:
        """Keep a fact and tell every other child."""
        if table not in TABLES:
            return
        t = self.tables[table]
        t[key] = value
        t.move_to_end(key)
        while len(t) > MAX_FACTS:
            t.popitem(last=False)
        if table == "origin":
            try:
                secure, host = json.loads(value)
                self.apps.set_origin(key, bool(secure), None if host is None else str(host).encode("latin-1"))
            except (ValueError, TypeError):
                log.warn("a child noted a bad origin for a key")  # noqa: G010 - twisted.logger
        if table in KEPT_HERE:
            return
        for b in self.boxes:
            if b is not sender and b.connected:
                b.callRemote(c.Fact, table=table, key=key, value=value)

    def lookup(self, table: str, key: str) -> str | None:
        """A fact (``app``: also a label of one of the broker's containers;
        ``ticket``: taken)."""
        t = self.tables.get(table)
        if table == "ticket" and t is not None:
            return t.pop(key, None)  # used once, whichever child asks
        value = t.get(key) if t is not None else None
        if value is None and table == "app":
            spec = self.apps.lookup(key)
            if spec is not None:
                value = spec.segment()
        return value

    def lookup_soon(self, table: str, key: str) -> Deferred[str | None]:
        """:meth:`lookup`; a miss is asked again :data:`NOTE_GRACE` s later, once: the
        child that made the fact may have sent its note just as the browser reached
        another child (the two sockets are read in either order)."""
        value = self.lookup(table, key)
        if value is not None or table not in ("route", "app", "ticket"):
            return succeed(value)
        return deferLater(self.clock, NOTE_GRACE, self.lookup, table, key)

    def revoke_key(self, key: str, asker: BrokerBox) -> Deferred[None] | None:
        """Other children's leases of ``key`` asked back (the parked ones come back);
        None when no other child holds one."""
        ds = [
            b.revoke(lease_id)
            for b in self.boxes
            if b is not asker
            for lease_id, k in list(b.keys.items())
            if k == key
        ]
        if not ds:
            return None
        return DeferredList(ds, consumeErrors=True).addCallback(lambda _: None)

    def revoke_idle(self) -> None:
        """A request waits: every child gives back what it keeps unused (one round at
        a time)."""
        if self._revoking:
            return
        ds = [b.revoke(lease_id) for b in self.boxes for lease_id in list(b.leases)]
        if ds:
            self._revoking = True
            DeferredList(ds, consumeErrors=True).addBoth(self._revoked)

    def _revoked(self, _: object) -> None:
        self._revoking = False

    def containers_changed(self) -> None:
        """The broker's containers changed: tell every child once this turn ends."""
        if self._push is None or not self._push.active():
            self._push = self.clock.callLater(0, self.push_containers)

    def views(self) -> bytes:
        """The broker's containers as :class:`~.commands.Containers` JSON."""
        return json.dumps(
            [
                [v.id, v.spec.segment(), v.display, v.state, v.owner, list(v.users)]
                for v in self.broker.containers()
                if v.spec is not None
            ]
        ).encode("utf-8")

    def push_containers(self, only: BrokerBox | None = None) -> None:
        """Send the containers to every child (or to ``only``)."""
        views = self.views()
        for b in [only] if only is not None else self.boxes:
            if b.connected:
                b.callRemote(c.Containers, views=views)

    def gather_metrics(self) -> Deferred[Metrics]:
        """These metrics plus every child's (a child that does not answer is left out)."""
        ds = [
            b.callRemote(c.ReadMetrics).addCallback(lambda r: json.loads(r["metrics"]))
            for b in self.boxes
            if b.connected
        ]

        def merge(results: list[tuple[bool, Any]]) -> Metrics:
            return self.metrics.merged(r for ok, r in results if ok)

        return DeferredList(ds, consumeErrors=True).addCallback(merge)

    @property
    def leases(self) -> int:
        """Leases held by children now."""
        return sum(len(b.leases) for b in self.boxes)


class BrokerBox(c.PromptAMP):
    """The broker's end of one child's connection (see module)."""

    def __init__(self, hub: Hub, index: int = 0):
        super().__init__()
        self.hub, self.index = hub, index
        self.leases: dict[int, Lease] = {}
        self.keys: dict[int, str] = {}  # each lease's key
        self.asks: dict[int, Deferred[Any]] = {}
        self._next = 0
        self.connected = False

    # -- the connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        """Registered with the hub; the child gets the containers known now."""
        super().connectionMade()
        self.connected = True
        self.hub.boxes.append(self)
        self.hub.push_containers(only=self)

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        """The child is gone: its asks leave their lines, its leases come back."""
        self.connected = False
        if self in self.hub.boxes:
            self.hub.boxes.remove(self)
        asks, self.asks = self.asks, {}
        leases, self.leases = self.leases, {}
        self.keys = {}
        for d in asks.values():
            d.cancel()
        for lease in leases.values():
            lease.release()
        if asks or leases:
            log.info(
                "child {i}: gone; {n} lease(s) reclaimed, {a} waiting request(s) withdrawn",
                i=self.index,
                n=len(leases),
                a=len(asks),
            )
        super().connectionLost(reason)

    # -- leases --------------------------------------------------------------------

    def _answer(self, ask: int, d: Deferred[Lease], key: str) -> Deferred[dict[str, Any]]:
        self.asks[ask] = d

        def got(lease: Lease) -> dict[str, Any]:
            self.asks.pop(ask, None)
            if not self.connected:  # answered as the child went: back at once
                lease.release()
                raise c.Refused(c.refusal(CancelledError("the child is gone"), 499))
            self._next += 1
            self.leases[self._next] = lease
            self.keys[self._next] = key
            self.hub.messages += 1
            return {
                "lease": self._next,
                "endpoint": lease.endpoint,
                "display": lease.display,
                "container": lease.container_id,
                "queued_for": lease.queued_for,
            }

        return d.addCallbacks(got, self._refused, errbackArgs=(ask,))

    def _refused(self, f: Failure, ask: int) -> Failure:
        self.asks.pop(ask, None)
        if f.check(c.Refused):
            return f
        if f.check(CancelledError):
            return Failure(c.Refused(c.refusal(f.value, 499)))
        if f.check(Exception) and hasattr(f.value, "status"):
            return Failure(c.Refused(c.refusal(f.value)))
        log.failure("child {i}: an ask failed", f, i=self.index)
        return Failure(c.Refused(c.refusal(f.value, 502)))

    @c.Acquire.responder
    def acquire(self, ask: int, segment: str, owner: str, board: str, progress: bool) -> Deferred[Any]:
        """``broker.acquire`` for the child."""
        cb: Callable[[Progress], None] | None = None
        if board:
            cb = self.hub.board.callback(board)
        elif progress:
            cb = self._progress(ask)
        spec, who = c.spec_of(segment), c.owner_of(owner)

        def go(_: object = None) -> Deferred[Lease]:
            d = self.hub.broker.acquire(spec, progress=cb, owner=who)
            if not d.called:  # it waits: leases parked anywhere come back
                self.hub.revoke_idle()
            return d

        # another child's parked x: lease of this key comes back first (else the broker
        # would see that container busy and start another)
        first = self.hub.revoke_key(spec.key, self) if spec.mode == "x" else None
        return self._answer(ask, maybeDeferred(go) if first is None else first.addCallback(go), spec.key)

    def _progress(self, ask: int) -> Callable[[Progress], None]:
        def push(p: Progress) -> None:
            if self.connected:
                self.callRemote(
                    c.Progress,
                    ask=ask,
                    state=p.state,
                    position=p.position,
                    detail=p.detail,
                    current=p.current,
                    total=p.total,
                )

        return push

    def revoke(self, lease_id: int) -> Deferred[None]:
        """Ask the child for ``lease_id`` back; released here when it was parked.
        Fires once answered (or at once: no such lease, or no child)."""
        done: Deferred[None] = Deferred()
        if not self.connected or lease_id not in self.leases:
            done.callback(None)
            return done

        def answered(r: dict[str, bool]) -> None:
            if r["given"]:
                held = self.leases.pop(lease_id, None)
                self.keys.pop(lease_id, None)
                if held is not None:
                    held.release()

        def finish(_: object) -> None:
            if not done.called:
                done.callback(None)

        asked = self.callRemote(c.Revoke, lease=lease_id).addCallback(answered)
        asked.addErrback(lambda f: log.debug("revoke: {e}", e=f.getErrorMessage())).addBoth(finish)
        return done

    @c.Retry.responder
    def retry(self, ask: int, lease: int, failed: bool) -> Deferred[Any]:
        """``lease.retry(failed)``."""
        held = self.leases.pop(lease, None)
        key = self.keys.pop(lease, "")
        if held is None:
            raise c.Refused(c.refusal(c.RemoteError("no such lease"), 503))
        return self._answer(ask, maybeDeferred(held.retry, failed), key)

    @c.Release.responder
    def release(self, lease: int, failed: bool) -> dict[str, Any]:
        """``lease.release()`` / ``lease.failed()``."""
        held = self.leases.pop(lease, None)
        self.keys.pop(lease, None)
        self.hub.messages += 1
        if held is not None:
            if failed:
                held.failed()
            else:
                held.release()
        return {}

    @c.Confirm.responder
    def confirm(self, lease: int, grace: float) -> Deferred[dict[str, bool]]:
        """``lease.confirm(grace)`` (a lease no longer held: not alive)."""
        held = self.leases.get(lease)
        if held is None:
            return succeed({"alive": False})
        return held.confirm(grace).addCallback(lambda alive: {"alive": bool(alive)})

    @c.DiedBefore.responder
    def died_before(self, lease: int, when: float, grace: float) -> Deferred[dict[str, bool]]:
        """``lease.died_before(when, grace)``."""
        held = self.leases.get(lease)
        if held is None:
            return succeed({"died": False})
        return held.died_before(when, grace).addCallback(lambda died: {"died": bool(died)})

    @c.LaunchWorker.responder
    def launch_worker(self, ask: int, segment: str, owner: str) -> Deferred[Any]:
        """``broker.launch_worker``: answered once started."""
        d = maybeDeferred(self.hub.broker.launch_worker, c.spec_of(segment), owner=c.owner_of(owner))
        self.asks[ask] = d

        def started(_: object) -> dict[str, Any]:
            self.asks.pop(ask, None)
            return {}

        return d.addCallbacks(started, self._refused, errbackArgs=(ask,))

    @c.Cancel.responder
    def cancel(self, ask: int) -> dict[str, Any]:
        """The child's client left while waiting."""
        d = self.asks.pop(ask, None)
        if d is not None:
            d.cancel()
        return {}

    # -- the waiting pages' board ----------------------------------------------------

    @c.BoardNew.responder
    def board_new(self, token: str, display: str, url: str) -> dict[str, Any]:
        """A child's waiting page registered."""
        self.hub.board.add(token, display, url)
        return {}

    @c.BoardFinish.responder
    def board_finish(self, token: str, state: str, detail: str | None) -> dict[str, Any]:
        """A page's final state."""
        self.hub.board.finish(token, state, detail)
        return {}

    @c.BoardDiscard.responder
    def board_discard(self, token: str) -> dict[str, Any]:
        """A page not needed after all."""
        self.hub.board.discard(token)
        return {}

    @c.BoardLastPoll.responder
    def board_last_poll(self, token: str) -> dict[str, Any]:
        """When the page last polled."""
        return {"polled": self.hub.board.last_poll(token)}

    # -- facts -----------------------------------------------------------------------

    @c.Note.responder
    def note(self, table: str, key: str, value: str) -> dict[str, Any]:
        """A fact for every child."""
        self.hub.note(self, table, key, value)
        return {}

    @c.Lookup.responder
    def lookup(self, table: str, key: str) -> Deferred[dict[str, Any]]:
        """A fact the child missed."""
        return self.hub.lookup_soon(table, key).addCallback(lambda value: {"value": value})

    @c.Networks.responder
    def networks(self, engine: str) -> Deferred[dict[str, bytes]]:
        """An engine's networks (for the child's ``host:`` policy)."""
        e = self.hub.engines.get(engine)
        if e is None or not hasattr(e, "networks"):
            raise c.Refused(c.refusal(c.RemoteError(f"no engine {engine!r}"), 404))

        def encode(nets: list[NetworkInfo]) -> dict[str, bytes]:
            rows = [[n.name, n.driver, list(n.subnets), list(n.ip_ranges)] for n in nets]
            return {"networks": json.dumps(rows).encode("utf-8")}

        def refuse(f: Failure) -> Failure:
            return Failure(c.Refused(c.refusal(c.RemoteError(f.getErrorMessage()), 502)))

        return e.networks().addCallbacks(encode, refuse)
