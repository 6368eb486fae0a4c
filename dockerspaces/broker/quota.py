"""Per-user rules of the broker: what each user holds and waits for (:class:`Quotas`),
and the order in which one key's waiters are served (:class:`Line`).

See ``docs/broker.md``, "Quotas and fair share".  Both are bookkeeping only: the
:class:`~dockerspaces.broker.broker.Broker`'s parts decide, and call them in one place per
change (a hold taken when a container starts for a user or a lease is handed out,
dropped when the start ends, the lease ends or the container goes away).
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from attrs import define, field, frozen

from .errors import OverQuota


@frozen
class Owner:
    """Who a request is for, and that user's limits (None = unlimited)."""

    user: str
    containers: int | None = None  # containers held at once
    gpus: int | None = None  # GPUs held at once
    queued: int | None = None  # requests waiting at once
    group: str | None = None  # for metrics labels (never the user)


class Held(Protocol):
    """What the quota table reads of a container (a
    :class:`~dockerspaces.broker.model.Container`): its GPUs, and its key (compared by
    identity only)."""

    @property
    def gpus(self) -> int:
        """GPUs attached."""

    @property
    def key(self) -> object:
        """The key it belongs to."""


class Queued(Protocol):
    """What a :class:`Line` reads of a waiter (a
    :class:`~dockerspaces.broker.model.Waiter`)."""

    @property
    def owner(self) -> Owner | None:
        """Who it is for (None: accounts off)."""

    @property
    def progress(self) -> object:
        """Its progress callback (None: nobody watches its place)."""

    @property
    def seq(self) -> int:
        """Its arrival stamp."""


W = TypeVar("W", bound=Queued)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


_QUOTA_WORDS = {"containers": "container", "gpus": "GPU", "queued": "queued request"}


def over_quota(owner: Owner, what: str, retry_after: int) -> OverQuota:
    """The :class:`OverQuota` for ``owner`` reaching its ``what`` quota
    (``"containers"``, ``"gpus"`` or ``"queued"``)."""
    limit = {"containers": owner.containers, "gpus": owner.gpus, "queued": owner.queued}[what] or 0
    return OverQuota(
        f"{owner.user}: quota of {_plural(limit, _QUOTA_WORDS[what])} at once reached (group quota)",
        retry_after,
        user=owner.user,
        quota=what,
    )


@define
class Usage:
    """One user's current use: the containers held (each with the number of reasons
    it is held: its start, each lease, the worker launch), their GPUs, the requests
    not yet served, and whether one of those was passed over for the quota."""

    held: dict[Held, int] = field(factory=dict)
    gpus: int = 0
    queued: int = 0
    blocked: bool = False

    @property
    def containers(self) -> int:
        """Containers held."""
        return len(self.held)


class Quotas:
    """Who holds which container and how many requests each user has waiting.

    Every count has one increment and one decrement; a user whose counts drop to zero
    is removed, so the table is bounded by the users with something in flight."""

    def __init__(self) -> None:
        self._users: dict[str, Usage] = {}
        self._holders: dict[Held, dict[str, int]] = {}

    # -- changes ----------------------------------------------------------------------

    def hold(self, user: str, c: Held) -> None:
        """``user`` holds ``c`` for one more reason (its start, a lease, a worker)."""
        u = self._users.get(user)
        if u is None:
            u = self._users[user] = Usage()
        n = u.held.get(c, 0)
        u.held[c] = n + 1
        if n == 0:
            u.gpus += c.gpus
            self._holders.setdefault(c, {})[user] = 1
        else:
            self._holders[c][user] = n + 1

    def unhold(self, user: str, c: Held) -> bool:
        """One reason for ``user`` to hold ``c`` ended; True when ``user`` no longer
        holds it (its waiters may now fit). Unknown pairs are ignored."""
        u = self._users.get(user)
        n = u.held.get(c, 0) if u is not None else 0
        if u is None or n == 0:
            return False
        if n > 1:
            u.held[c] = n - 1
            self._holders[c][user] = n - 1
            return False
        del u.held[c]
        u.gpus -= c.gpus
        holders = self._holders[c]
        del holders[user]
        if not holders:
            del self._holders[c]
        self._prune(user, u)
        return True

    def clear(self, c: Held) -> list[str]:
        """``c`` is going away: nobody holds it any more. Returns who did."""
        holders = self._holders.pop(c, None)
        if not holders:
            return []
        for user in holders:
            u = self._users[user]
            del u.held[c]
            u.gpus -= c.gpus
            self._prune(user, u)
        return list(holders)

    def wait(self, user: str) -> None:
        """One more request of ``user`` is not yet served."""
        u = self._users.get(user)
        if u is None:
            u = self._users[user] = Usage()
        u.queued += 1

    def unwait(self, user: str) -> None:
        """A request of ``user`` was served or ended."""
        u = self._users[user]
        u.queued -= 1
        self._prune(user, u)

    def block(self, user: str) -> None:
        """A request of ``user`` was passed over (or not started for) for the quota."""
        u = self._users.get(user)
        if u is not None:
            u.blocked = True

    def unblock(self, user: str) -> bool:
        """True (once) when a request of ``user`` was passed over since the last call:
        now that the user holds less, their waiters are worth another look."""
        u = self._users.get(user)
        if u is None or not u.blocked:
            return False
        u.blocked = False
        return u.queued > 0

    def _prune(self, user: str, u: Usage) -> None:
        """A user who holds nothing and waits for nothing leaves the table."""
        if not u.held and not u.queued:
            del self._users[user]

    # -- questions --------------------------------------------------------------------

    def queued(self, user: str) -> int:
        """Requests of ``user`` not yet served."""
        u = self._users.get(user)
        return u.queued if u is not None else 0

    def containers(self, user: str) -> int:
        """Containers ``user`` holds."""
        u = self._users.get(user)
        return u.containers if u is not None else 0

    def holds(self, user: str, c: Held) -> bool:
        """True when ``user`` holds ``c``."""
        u = self._users.get(user)
        return u is not None and c in u.held

    def held_of_key(self, user: str, k: object) -> int:
        """Containers of key ``k`` that ``user`` holds (starting ones included)."""
        u = self._users.get(user)
        return sum(1 for c in u.held if c.key is k) if u is not None else 0

    def users_of(self, c: Held) -> list[str]:
        """The users holding ``c``, sorted."""
        return sorted(self._holders.get(c, ()))

    def may_add(self, owner: Owner, gpus: int) -> bool:
        """True when ``owner`` may hold one more container with ``gpus`` GPUs."""
        u = self._users.get(owner.user)
        held, used = (u.containers, u.gpus) if u is not None else (0, 0)
        return (owner.containers is None or held < owner.containers) and (
            owner.gpus is None or used + gpus <= owner.gpus
        )

    def may_hold(self, owner: Owner, c: Held) -> bool:
        """True when ``owner`` may be given ``c``: it holds it already (a shared y:
        container counts once), or may hold one more container with its GPUs."""
        return self.holds(owner.user, c) or self.may_add(owner, c.gpus)

    def room(self, owner: Owner, gpus: int) -> int | None:
        """How many more containers of ``gpus`` GPUs each ``owner`` may hold (None:
        no limit)."""
        u = self._users.get(owner.user)
        held, used = (u.containers, u.gpus) if u is not None else (0, 0)
        rooms = []
        if owner.containers is not None:
            rooms.append(owner.containers - held)
        if owner.gpus is not None and gpus > 0:
            rooms.append((owner.gpus - used) // gpus)
        return max(0, min(rooms)) if rooms else None

    def refusal(self, owner: Owner) -> str:
        """Which quota stops ``owner`` adding a container: ``"containers"`` when
        reached, else ``"gpus"``."""
        held = self.containers(owner.user)
        return "containers" if owner.containers is not None and held >= owner.containers else "gpus"

    def table(self) -> dict[str, tuple[int, int, int]]:
        """``{user: (containers, gpus, queued)}`` of every user with something in
        flight (empty when nothing is)."""
        return {user: (u.containers, u.gpus, u.queued) for user, u in self._users.items()}


class Line(OrderedDict[W, None]):
    """One key's waiting requests, and the order in which they are served.

    Requests handed back unforwarded (``Lease.retry``) come first, the latest first.
    Then the users take turns: next is the waiting user served least recently, where a
    user's turn is the later of their last service on this key and the arrival of
    their oldest waiting request (so a user who starts waiting joins the back of the
    round); within one user, first come first served.  Arrivals and services are
    stamped from one counter (``Waiter.seq`` and the tick passed to :meth:`leave`),
    so turns never tie.

    The mapping itself holds every waiter in arrival order, handed-back ones at the
    head: with no owner in the line (accounts off) that is the service order, plain
    FIFO, at the cost of a dict.  Change it only through :meth:`add`,
    :meth:`put_back` and :meth:`leave`.
    """

    def __init__(self) -> None:
        super().__init__()
        self.owned = 0  # waiters with an owner; 0: the mapping's order is the service order
        self.watchers = 0  # waiters with a progress callback (0: no positions to publish)
        self._back: OrderedDict[W, None] = OrderedDict()  # handed back, latest first
        self._fifo: dict[str | None, OrderedDict[W, None]] = {}  # per user, arrival order
        self._served: dict[str | None, int] = {}  # last service, of users still waiting

    @staticmethod
    def user_of(w: Queued) -> str | None:
        """The user of a waiter (None without accounts)."""
        return w.owner.user if w.owner is not None else None

    @property
    def anonymous(self) -> bool:
        """True when no waiter has an owner (plain FIFO, no quota to check)."""
        return self.owned == 0

    def add(self, w: W) -> None:
        """A request starts waiting: the back of its user's line."""
        self[w] = None
        self._fifo.setdefault(self.user_of(w), OrderedDict())[w] = None
        if w.owner is not None:
            self.owned += 1
        if w.progress is not None:
            self.watchers += 1

    def put_back(self, w: W) -> None:
        """A request handed back unforwarded: the head of the line."""
        self[w] = None
        self.move_to_end(w, last=False)
        self._back[w] = None
        self._back.move_to_end(w, last=False)
        if w.owner is not None:
            self.owned += 1
        if w.progress is not None:
            self.watchers += 1

    def leave(self, w: W, served: int | None = None) -> bool:
        """``w`` leaves the line: served at tick ``served`` (its user's turn moves
        there, unless ``w`` was handed back), or given up (None). False when it was
        not here."""
        if self.pop(w, 0) is not None:
            return False
        if w.owner is not None:
            self.owned -= 1
        if w.progress is not None:
            self.watchers -= 1
        if self._back.pop(w, 0) is None:
            return True
        user = self.user_of(w)
        q = self._fifo[user]
        del q[w]
        if not q:
            del self._fifo[user]
            self._served.pop(user, None)
        elif served is not None:
            self._served[user] = served
        return True

    def _turn(self, user: str | None) -> int:
        """A user's turn: the later of their last service and their oldest arrival."""
        return max(self._served.get(user, -1), next(iter(self._fifo[user])).seq)

    def first(self, pred: Callable[[W], bool] | None = None) -> W | None:
        """The next waiter to serve among those ``pred`` accepts: handed-back ones
        first, then the head of the user whose turn is earliest (a user whose head
        ``pred`` refuses is passed over, their later requests too)."""
        if pred is None and len(self._fifo) <= 1:
            return next(iter(self), None)
        for w in self._back:
            if pred is None or pred(w):
                return w
        best: tuple[int, W] | None = None
        for user, q in self._fifo.items():
            head = next(iter(q))
            if pred is None or pred(head):
                turn = self._turn(user)
                if best is None or turn < best[0]:
                    best = (turn, head)
        return best[1] if best is not None else None

    def groups(self) -> list[tuple[str | None, int, W]]:
        """``(user, waiting, next request)`` per waiting user, the users in turn order
        (those with a handed-back request first)."""
        count: dict[str | None, int] = {}
        head: dict[str | None, W] = {}
        for w in self._back:
            user = self.user_of(w)
            count[user] = count.get(user, 0) + 1
            head.setdefault(user, w)
        for user in sorted(self._fifo, key=self._turn):
            q = self._fifo[user]
            count[user] = count.get(user, 0) + len(q)
            head.setdefault(user, next(iter(q)))
        return [(user, n, head[user]) for user, n in count.items()]

    def users(self) -> dict[str, int]:
        """``{user: waiting}`` of the waiters with an owner."""
        out: dict[str, int] = {}
        for w in self._back:
            if w.owner is not None:
                out[w.owner.user] = out.get(w.owner.user, 0) + 1
        for user, q in self._fifo.items():
            if user is not None:
                out[user] = out.get(user, 0) + len(q)
        return out

    def has_user(self, user: str) -> bool:
        """True when ``user`` has a request in this line."""
        return user in self._fifo or any(self.user_of(w) == user for w in self._back)

    def in_order(self) -> Iterator[W]:
        """Every waiter in the order they would be served if nothing changed (do not
        change the line while walking it)."""
        if len(self._fifo) <= 1:
            yield from self
            return
        yield from self._back
        later = 0  # turns given during the walk come after every real one
        heap: list[tuple[tuple[int, int], int, Iterator[W]]] = [
            ((0, self._turn(user)), i, iter(q)) for i, (user, q) in enumerate(self._fifo.items())
        ]
        heapq.heapify(heap)
        while heap:
            _, i, it = heap[0]
            w = next(it, None)
            if w is None:
                heapq.heappop(heap)
                continue
            yield w
            later += 1
            heapq.heapreplace(heap, ((1, later), i, it))
