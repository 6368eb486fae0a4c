"""Container events: the engine's event stream, read in a thread of its own.

:class:`EventWatcher` keeps one ``docker events`` stream open (filtered to this
instance's and this host's containers, :data:`EVENT_KINDS` only), reconnects after any
failure with a doubling back-off and ``since`` the last event seen (replayed events are
dropped), and hands each :class:`~dockerspaces.engine.interface.ContainerEvent` to the
callbacks on the reactor thread.  On an engine on this machine a ``die`` is followed
by an ``exited`` event carrying the container's ``State.FinishedAt``
(:func:`docker_time`): the proxy compares it with its own clock.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

from twisted.logger import Logger

from ..config import HostConfig
from .errors import translate
from .interface import LABEL_HOST, LABEL_INSTANCE, ContainerEvent
from .threads import ClientThreads

log = Logger()

EVENT_KINDS = ("die", "oom", "stop", "destroy")


def event_filters(instance: str, host: str) -> dict[str, list[str]]:
    """The docker ``events`` filters: ``instance``'s containers on ``host``,
    die/oom/stop/destroy."""
    return {
        "type": ["container"],
        "event": list(EVENT_KINDS),
        "label": [f"{LABEL_INSTANCE}={instance}", f"{LABEL_HOST}={host}"],
    }


def docker_time(text: str) -> float | None:
    """Unix seconds of a Docker RFC 3339 timestamp (nanoseconds cut to micro); None for
    an empty or zero one (``0001-01-01T00:00:00Z``: not happened)."""
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", text)
    if m is None or m.group(1) < "1971":
        return None
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    stamp = datetime.fromisoformat(m.group(1) + zone).timestamp()
    return stamp + float("0." + (m.group(2) or "0"))


def event_from_docker(raw: dict[str, Any]) -> ContainerEvent | None:
    """A :class:`ContainerEvent` from one decoded docker event, or None if not ours to report."""
    if raw.get("Type", "container") != "container":
        return None
    action = str(raw.get("Action") or raw.get("status") or "")
    action = action.split(":", 1)[0].strip()
    if action not in EVENT_KINDS:
        return None
    actor = raw.get("Actor") or {}
    cid = actor.get("ID") or raw.get("id") or ""
    attrs = actor.get("Attributes") or {}
    code = attrs.get("exitCode")
    try:
        exit_code = int(code) if code is not None else None
    except ValueError:
        exit_code = None
    return ContainerEvent(kind=action, container_id=cid, exit_code=exit_code)  # type: ignore[arg-type]


class EventWatcher:
    """The event thread of one engine (see the module docstring); ``reactor`` provides
    ``IReactorFromThreads``."""

    def __init__(self, reactor: Any, host: HostConfig, threads: ClientThreads, instance: str) -> None:
        self.host = host
        self.filters = event_filters(instance, host.name)
        self.callbacks: list[Callable[[ContainerEvent], None]] = []
        self._reactor = reactor
        self._threads = threads
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the event thread (once)."""
        if self._thread is not None:
            return
        t = threading.Thread(target=self.loop, name=f"engine-{self.host.name}-events", daemon=True)
        self._thread = t
        t.start()

    def _dispatch(self, event: ContainerEvent) -> None:
        for cb in list(self.callbacks):
            try:
                cb(event)
            except Exception:  # noqa: BLE001 - one callback must not starve others
                log.failure("container event callback failed")

    def loop(self, backoff_start: float = 0.5, backoff_max: float = 10.0) -> None:
        """The event thread's body: read, deliver, reconnect, until the engine stops."""
        threads = self._threads
        stopping = threads.stopping
        backoff = backoff_start
        last_nano = 0
        while not stopping.is_set():
            client = None
            key = None
            try:
                client = threads.client_factory()
                kwargs: dict[str, Any] = {"decode": True, "filters": self.filters}
                if last_nano:
                    kwargs["since"] = f"{last_nano // 10**9}.{last_nano % 10**9:09d}"
                stream = client.events(**kwargs)
                key = threads.track(stream, client)
                if stopping.is_set():
                    break
                backoff = backoff_start
                for raw in stream:
                    if stopping.is_set():
                        break
                    nano = int(raw.get("timeNano") or 0)
                    if nano and nano <= last_nano:
                        continue  # replayed by "since" after a reconnect
                    last_nano = max(last_nano, nano)
                    event = event_from_docker(raw)
                    if event is not None:
                        self._reactor.callFromThread(self._dispatch, event)
                    if event is not None and event.kind == "die" and self.host.local:
                        # after the die itself (which must not wait for an inspect)
                        exited = self._exited_at(event.container_id)
                        if exited is not None:
                            self._reactor.callFromThread(
                                self._dispatch,
                                ContainerEvent("exited", event.container_id, event.exit_code, exited),
                            )
            except Exception as e:  # noqa: BLE001 - reconnect after any failure
                if stopping.is_set():
                    break
                msg = str(translate(e, self.host.name, self.host.url))
                self._reactor.callFromThread(
                    log.warn,
                    "event stream of {engine} failed, retrying in {s}s: {msg}",
                    engine=self.host.name,
                    s=backoff,
                    msg=msg,
                )
            finally:
                if key is not None:
                    threads.untrack(key)
                if client is not None:
                    try:
                        client.close()
                    except Exception:  # noqa: BLE001, S110 - a broken event stream: a new client next round
                        pass
            if stopping.wait(backoff):
                break
            backoff = min(backoff * 2, backoff_max)

    def _exited_at(self, container_id: str) -> float | None:
        """When ``container_id``'s process ended (its ``State.FinishedAt``), in the event
        thread; None when unknown. Only for engines on this machine: the proxy compares
        it with its own clock (a request sent after it never reached the app)."""
        try:
            state = self._threads.client().inspect_container(container_id).get("State") or {}
        except Exception:  # noqa: BLE001 - removed meanwhile, engine gone: not known
            return None
        return docker_time(str(state.get("FinishedAt") or ""))
