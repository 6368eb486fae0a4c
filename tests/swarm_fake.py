"""A fake swarm manager for the swarm engine's tests (no tests here): the docker-py
``APIClient`` methods :mod:`dockerspaces.engine.swarm` calls, keeping nodes, services
and tasks in memory in the Engine API's JSON shapes (as a Docker 20.10 manager gives
them), and recording every call."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import requests.exceptions

from .test_engine_harness import api_error

NODE_ID = "mhytj02ogroi25ptv3iu0g7uh"


def node_json(
    node_id: str = NODE_ID,
    hostname: str = "gpu1",
    addr: str = "10.0.0.7",
    state: str = "ready",
    availability: str = "active",
    role: str = "worker",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A node as ``GET /nodes`` describes it."""
    return {
        "ID": node_id,
        "Version": {"Index": 9},
        "CreatedAt": "2026-12-04T05:05:55.678930304Z",
        "UpdatedAt": "2026-12-04T05:05:56.283097146Z",
        "Spec": {"Labels": dict(labels or {}), "Role": role, "Availability": availability},
        "Description": {
            "Hostname": hostname,
            "Platform": {"Architecture": "x86_64", "OS": "linux"},
            "Resources": {"NanoCPUs": 2000000000, "MemoryBytes": 25276203008},
            "Engine": {"EngineVersion": "20.10.24"},
        },
        "Status": {"State": state, "Addr": addr},
    }


class FakeResponse:
    """A ``requests`` response: status, JSON body, ``raise_for_status``."""

    def __init__(self, status: int, body: Any) -> None:
        self.status_code = status
        self.body = body
        self.url = "http+docker://localhost/v1.41/services/create"
        self.reason = "R"
        self.text = json.dumps(body)

    def json(self) -> Any:
        return self.body

    def raise_for_status(self) -> None:
        if self.status_code >= 400:
            raise requests.exceptions.HTTPError(f"{self.status_code} Client Error", response=self)


def not_found(what: str) -> Exception:
    """The ``NotFound`` docker-py raises for a 404 (``service``, ``node`` ...)."""
    err: Exception = api_error(404, f"{what} not found")
    return err


class FakeSwarmClient:
    """Nodes, services and tasks in memory; ``calls`` records what was asked."""

    base_url = "http+docker://localhost"
    api_version = "1.41"
    timeout = 60

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.node_list: list[dict[str, Any]] = [node_json()]
        self.services_by_id: dict[str, dict[str, Any]] = {}
        self.tasks_by_id: dict[str, dict[str, Any]] = {}
        self.posted: list[tuple[str, dict[str, Any], dict[str, str]]] = []
        self.create_error: tuple[int, str] | None = None
        self.unreachable = False
        self.logs: dict[str, list[bytes]] = {}
        self.network_list: list[dict[str, Any]] = []
        self.removal_polls = 0  # tasks() calls that still see a removed service's task running
        self._removed: dict[str, int] = {}
        self._labels: dict[str, dict[str, str]] = {}  # a service's, kept until its tasks go
        self._next = 0
        self.closed = False

    # ---------------------------------------------------------------- helpers

    def _id(self, prefix: str) -> str:
        self._next += 1
        return f"{prefix}{self._next:024d}"

    def _check(self, name: str, arg: Any) -> None:
        self.calls.append((name, arg))
        if self.unreachable:
            raise requests.exceptions.ConnectionError("connection refused")

    def names(self) -> list[str]:
        """The names of the calls, in order."""
        return [c[0] for c in self.calls]

    def add_service(
        self, name: str, labels: dict[str, str], state: str = "running", node_id: str = NODE_ID
    ) -> str:
        """A service (and its task in ``state``) made by someone else, e.g. an
        earlier run of the instance; its id."""
        sid = self._id("s")
        self.services_by_id[sid] = {
            "ID": sid,
            "Version": {"Index": 12},
            "Spec": {"Name": name, "Labels": dict(labels), "TaskTemplate": {}, "Mode": {}},
        }
        self._labels[sid] = dict(labels)
        self._add_task(sid, node_id, state)
        return sid

    def _add_task(self, sid: str, node_id: str, state: str) -> str:
        tid = self._id("t")
        self.tasks_by_id[tid] = {
            "ID": tid,
            "Version": {"Index": 20},
            "Labels": {},
            "ServiceID": sid,
            "Slot": 1,
            "NodeID": node_id,
            "Status": {
                "Timestamp": "2026-12-04T05:05:57.196805032Z",
                "State": state,
                "Message": state,
                "ContainerStatus": {"ContainerID": "", "PID": 0, "ExitCode": 0},
                "PortStatus": {},
            },
            "DesiredState": "running",
        }
        return tid

    def task_of(self, sid: str) -> dict[str, Any]:
        """The (one) task of service ``sid``."""
        return next(t for t in self.tasks_by_id.values() if t["ServiceID"] == sid)

    def set_task(
        self,
        sid: str,
        state: str,
        exit_code: int | None = None,
        err: str = "",
        timestamp: str = "2026-12-04T05:06:00.5Z",
        addresses: list[str] | None = None,
    ) -> None:
        """Move service ``sid``'s task to ``state``; ``exit_code``: it had a container
        that ended so."""
        t = self.task_of(sid)
        t["Version"]["Index"] += 1
        status = t["Status"]
        status.update(State=state, Message=state, Timestamp=timestamp)
        if err:
            status["Err"] = err
        if exit_code is not None:
            status["ContainerStatus"] = {"ContainerID": "c" * 64, "PID": 0, "ExitCode": exit_code}
        if state in ("failed", "rejected", "complete"):
            t["DesiredState"] = "shutdown"
        if addresses is not None:
            t["NetworksAttachments"] = [{"Network": {"ID": "n1"}, "Addresses": addresses}]

    def _labels_match(self, sid: str, filters: dict[str, Any] | None) -> bool:
        labels = self._labels.get(sid) or {}
        wanted = (filters or {}).get("label") or []
        if isinstance(wanted, str):
            wanted = [wanted]
        for w in wanted:
            k, _, v = w.partition("=")
            if labels.get(k) != v:
                return False
        return True

    # ------------------------------------------------------- the APIClient part

    def close(self) -> None:
        self.closed = True

    def ping(self) -> bool:
        self._check("ping", None)
        return True

    def post(self, url: str, **kw: Any) -> FakeResponse:
        body = json.loads(kw["data"])
        self._check("post", url)
        self.posted.append((url, body, dict(kw["headers"])))
        if self.create_error is not None:
            status, message = self.create_error
            return FakeResponse(status, {"message": message})
        sid = self._id("s")
        self.services_by_id[sid] = {"ID": sid, "Version": {"Index": 12}, "Spec": body}
        self._labels[sid] = dict(body["Labels"])
        constraint = body["TaskTemplate"]["Placement"]["Constraints"][0]
        self._add_task(sid, constraint.split("==", 1)[1], "pending")
        return FakeResponse(201, {"ID": sid})

    def nodes(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        self._check("nodes", filters)
        return self.node_list

    def inspect_node(self, node_id: str) -> dict[str, Any]:
        self._check("inspect_node", node_id)
        for n in self.node_list:
            if n["ID"] == node_id:
                return n
        raise not_found(f"node {node_id}")

    def services(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        self._check("services", filters)
        return [s for sid, s in self.services_by_id.items() if self._labels_match(sid, filters)]

    def tasks(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        self._check("tasks", filters)
        for sid, polls in list(self._removed.items()):
            if polls <= 0:
                for tid in [i for i, t in self.tasks_by_id.items() if t["ServiceID"] == sid]:
                    del self.tasks_by_id[tid]
                del self._removed[sid]
            else:
                self._removed[sid] = polls - 1
        wanted = (filters or {}).get("service")
        if wanted is not None:
            for sid in wanted:
                if sid not in self.services_by_id:
                    raise not_found(f"service {sid}")
            return [t for t in self.tasks_by_id.values() if t["ServiceID"] in wanted]
        return [t for t in self.tasks_by_id.values() if self._labels_match(t["ServiceID"], filters)]

    def remove_service(self, service: str) -> bool:
        """Remove ``service``: its task stays (running, desired ``remove``) for
        ``removal_polls`` more tasks() calls, then it is gone."""
        self._check("remove_service", service)
        if service not in self.services_by_id:
            raise not_found(f"service {service}")
        del self.services_by_id[service]
        for t in self.tasks_by_id.values():
            if t["ServiceID"] == service:
                t["DesiredState"] = "remove"
        self._removed[service] = self.removal_polls
        return True

    def service_logs(self, service: str, **kw: Any) -> Iterator[bytes]:
        self._check("service_logs", (service, kw))
        yield from self.logs.get(service, [])

    def networks(self) -> list[dict[str, Any]]:
        self._check("networks", None)
        return self.network_list
