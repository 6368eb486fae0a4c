"""Read-only views of the broker's state: the original's ``/monitor:broker/`` JSON
(:func:`monitor_view`) and the containers it knows (:func:`container_views`).

Both are computed from the state when asked; the scheduler keeps nothing for them.
The JSON keeps SPEC's shape (``SourceSlots``, ``TargetSlots``, ``Queues`` ...) plus our
fields (``Hosts``, ``Pulls``, ``Admission``, ``Estimates``, per-slot ``Users``,
``QueueUsers``); see ``docs/broker.md``, "/monitor:broker/".
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from attrs import frozen

from ..engine.interface import PullProgress
from ..spec import JobSpec
from .model import BUSY, IDLE, STARTING, STOPPING, WORKER, Waiter
from .state import BrokerState

_SLOT_STATE = {STARTING: "Starting", IDLE: "Wait", BUSY: "Run", WORKER: "Run", STOPPING: "Stopping"}


@frozen
class WorkerView:
    """A running worker container of one spec (the autoscaler's view)."""

    id: str
    host: str  # the engine's host name (``--host`` / cluster name)
    since: float  # when it was created (adopted ones: when the broker found them)


@frozen
class ContainerView:
    """A read-only view of one container the broker knows (tests, dashboards)."""

    id: str
    host: str
    port: int
    key: str
    display: str
    state: str
    inflight: int
    spec: JobSpec | None = None
    users: tuple[str, ...] = ()  # who holds it (accounts)
    owner: str | None = None  # the user it was started for (accounts)


def container_views(st: BrokerState) -> list[ContainerView]:
    """Every container in a slot once created (a stopping one before the one starting
    behind it), in slot order."""
    out = []
    for s in st.slots:
        for c in (s.evicting, s.container):
            if c is not None and c.handle is not None:
                out.append(
                    ContainerView(
                        c.id,
                        s.host.name,
                        s.info.port,
                        c.key.key,
                        c.key.spec.display,
                        c.state,
                        c.inflight,
                        c.key.spec,
                        tuple(st.quotas.users_of(c)),
                        c.owner,
                    )
                )
    return out


def _source_slots(st: BrokerState, admitted: Iterable[Waiter]) -> list[dict[str, Any]]:
    """Exactly ``--source`` entries: the admitted requests in admission order (``Run``
    once served, ``Wait`` before), then ``Free`` ones."""
    n = st.settings.source
    out: list[dict[str, Any]] = []
    for w in admitted:
        if len(out) >= n:
            break
        served = w.assigned is not None and not w.spec.worker
        out.append(
            {
                "State": "Run" if served else "Wait",
                "Since": int(w.assigned if served and w.assigned is not None else w.arrived),
                "SlotType": w.spec.slot_type,
                "RunInfo": {},
                "RefInfo": w.endpoint if served else "",
                "Key": w.spec.display,
            }
        )
    while len(out) < n:
        out.append({"State": "Free", "Since": None, "SlotType": "", "RunInfo": {}, "RefInfo": "", "Key": ""})
    return out


def _target_slots(st: BrokerState) -> list[dict[str, Any]]:
    """Every configured slot; a slot being evicted shows the container stopping."""
    now = st.clock.seconds()
    out = []
    for s in st.slots:
        c = s.evicting or s.container
        state = (
            "Free"
            if c is None
            else ("Stopping" if s.evicting is not None else _SLOT_STATE.get(c.state, "Free"))
        )
        out.append(
            {
                "State": state,
                "Since": int(s.since),
                "SlotType": c.key.spec.slot_type if c is not None else "",
                "RunInfo": {},
                "RefInfo": s.ref_info,
                "Host": s.host.name,
                "Port": s.info.port,
                "Gpu": s.info.gpu,
                "Container": (c.id or None) if c is not None else None,
                "Key": c.key.spec.display if c is not None else None,
                "InFlight": c.inflight if c is not None else 0,
                "LastError": s.last_error,
                "HostUp": s.host.up,
                "ProtectedFor": (
                    max(0, math.ceil(c.protected_until - now))
                    if c is not None and c.state == WORKER
                    else None
                ),
                "Users": st.quotas.users_of(c) if c is not None else [],
            }
        )
    return out


def _queues(st: BrokerState, lone: Iterable[Waiter]) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Waiting requests per key display, and per display and user (the owned ones):
    the keys' lines, plus ``lone`` waiters (admission queue, launches wanting a slot)."""
    queues: dict[str, int] = {}
    queue_users: dict[str, dict[str, int]] = {}

    def by_user(display: str, user: str, n: int) -> None:
        per = queue_users.setdefault(display, {})
        per[user] = per.get(user, 0) + n

    for k in st.keys.values():
        if k.waiters:
            queues[k.spec.display] = queues.get(k.spec.display, 0) + len(k.waiters)
            if not k.waiters.anonymous:
                for user, n in k.waiters.users().items():
                    by_user(k.spec.display, user, n)
    for w in lone:
        queues[w.spec.display] = queues.get(w.spec.display, 0) + 1
        if w.owner is not None:
            by_user(w.spec.display, w.owner.user, 1)
    return queues, queue_users


def monitor_view(
    st: BrokerState,
    admitted: Iterable[Waiter],
    queued: Iterable[Waiter],
    lone: Iterable[Waiter],
    pulls: Mapping[tuple[str, str], PullProgress],
) -> dict[str, Any]:
    """The ``/monitor:broker/`` JSON: ``admitted`` (in admission order) and ``queued``
    (the admission FIFO) requests, ``lone`` waiters outside any key's line (the
    admission FIFO and launches wanting a slot), ``pulls`` in progress per (host, ref)."""
    queued = list(queued)
    admitted = list(admitted)
    queues, queue_users = _queues(st, lone)
    settings = st.settings
    return {
        "SourceName": "TCP",
        "TargetName": "Docker",
        "LoopSleep": 0,
        "ReleaseTimeout": settings.release,
        "SourceSlots": _source_slots(st, admitted),
        "TargetSlots": _target_slots(st),
        "Queues": queues,
        "QueueUsers": queue_users,
        "Hosts": [
            {
                "Name": h.name,
                "Up": h.up,
                "Since": int(h.since),
                "Slots": len(h.slots),
                "Free": sum(1 for s in h.slots if s.container is None and s.evicting is None),
                "LastError": h.last_error,
            }
            for h in st.hosts
        ],
        "Pulls": [
            {"Host": host, "Ref": ref, "Status": p.status, "Current": p.current, "Total": p.total}
            for (host, ref), p in pulls.items()
        ],
        "Admission": {
            "Admitted": len(admitted),
            "Source": settings.source,
            "Queued": len(queued),
            "Queue": settings.queue,
        },
        "Estimates": {
            k.spec.display: {"Service": k.service.value, "ColdStart": k.cold.value}
            for k in st.keys.values()
            if k.service.value is not None or k.cold.value is not None
        },
        "Draining": st.draining,
    }
