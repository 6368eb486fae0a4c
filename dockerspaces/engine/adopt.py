"""Adoption: the containers this instance left on an engine, read back from their labels.

After a restart the broker adopts what :func:`list_own_sync` finds: every container
(running or not) labelled with this instance and this host.  The label filter of the
engine is not trusted alone: each entry's labels are checked again.  The spec comes
from the ``dockerspaces.spec`` label (without env values, which are never written to
labels); a label that does not parse leaves ``spec`` None.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..spec import JobSpec, SpecError, parse_route
from .interface import LABEL_HOST, LABEL_INSTANCE, LABEL_SLOT, LABEL_SPEC, OwnedContainer
from .threads import DockerClient


def owned_from_docker(info: dict[str, Any], labels: dict[str, str]) -> OwnedContainer:
    """An :class:`OwnedContainer` from a ``containers()`` list entry."""
    names: Iterable[str] = info.get("Names") or []
    name = next(iter(names), "").lstrip("/")
    slot_text = labels.get(LABEL_SLOT, "")
    spec = None
    try:
        route = parse_route(labels.get(LABEL_SPEC, ""))
        spec = route if isinstance(route, JobSpec) else None
    except SpecError:
        spec = None
    return OwnedContainer(
        id=info["Id"],
        name=name,
        running=info.get("State") == "running",
        slot_port=int(slot_text) if slot_text.isdigit() else None,
        labels=labels,
        spec=spec,
    )


def list_own_sync(client: DockerClient, instance: str, host: str) -> list[OwnedContainer]:
    """``instance``'s containers on ``host`` (blocking: in a pool thread)."""
    filters = {"label": [f"{LABEL_INSTANCE}={instance}", f"{LABEL_HOST}={host}"]}
    out = []
    for info in client.containers(all=True, filters=filters):
        labels = dict(info.get("Labels") or {})
        if labels.get(LABEL_INSTANCE) != instance or labels.get(LABEL_HOST) != host:
            continue  # never trust the filter alone
        out.append(owned_from_docker(info, labels))
    return out
