"""The fault-injection scenario (issue 12), shared by ``test_faults`` and
``bench/faults.py``: real dockerspaces process, real containers, real kills.

N requests over 3 images on 2 slots from C concurrent clients (raw sockets, HTTP/1.1,
``Connection: close``) while a killer ``docker kill``s a busy container every few
seconds, a tenth of the clients hang up mid-request (half of them after sending, half
after the first bytes of the answer), and once a container is ``docker rm -f``-ed
while it starts.

Every request is accounted for. Its id is in its path (``/cgi-bin/work/ID_S_N``) and
the test images' httpd logs each request it reads (``url:PATH``): the container logs,
followed from every container's start until it is gone, prove which requests reached an
app ("forwarded"). Outcomes:

``ok``            200, complete (Content-Length met or terminating chunk seen), its
                  body ends with ``done ID`` (and holds the POST body) -- the only
                  way to be ``ok``
``truncated``     an answer that *looked* complete (length met, terminating chunk, or
                  a close-delimited body ended by a clean FIN) but lacks ``done ID``
                  -- must be 0
``aborted``       cut: closed or reset before the head or inside the body (no
                  terminating chunk, length not met) -- only if forwarded
``502``/``5xx``   an error answer with its status (502 only if forwarded)
``lost``          no answer, or an answer that stalled, within the client timeout --
                  must be 0
``gone``          our own client hung up (10 %; not judged)

The bars (:meth:`Report.violations`): no 502 and no cut answer for a request no app
ever read; no ``truncated``; no ``lost``; the 502s and cut answers together no more
than the requests in flight on the containers when they were killed (the killer reads
``InFlight`` of the slot from ``/monitor:broker/`` just before each kill -- a check
that does not rely on the logs); every container of the instance in a slot and
running, every slot's container running, every slot free or idle, no queue, once the
load is over; every crash counted once: each killed container logged as a ``crash``
exactly once -- unless dockerspaces was stopping it already (its ``evict``/``stop``
line came first: the killer read the slot busy, then the request ended and the
container was evicted before the kill landed) -- no crash logged for a container
nobody killed (the one removed while starting counts as killed), and
``dockerspaces_container_crashes_total`` equal to the crash lines.
"""

from __future__ import annotations

import random
import re
import socket
import threading
import time
from collections import Counter
from typing import Any

import attrs
import docker.errors

from .dockerutil import docker_client
from .procs import Server
from .wait import eventually

ROUTES = (
    "/x:selmaproject:tts:777:5002",
    "/x:dockerspaces-test:web:1:8080:DELAY=1",  # a slower start: time to rm -f it
    "/x:dockerspaces-test:slowhttp:1:8080",
)


@attrs.define
class Outcome:
    """One request's fate."""

    id: int
    kind: str
    sent: float
    ended: float = 0.0
    status: int | None = None
    klass: str = "lost"
    detail: str = ""


@attrs.define
class Report:
    """What a run found; :meth:`table` prints it, :meth:`violations` lists the bars missed."""

    outcomes: list[Outcome]
    forwarded: set[int]
    kills: list[tuple[float, str]]
    removed_while_starting: str | None
    start_retried: bool
    crashes: float | None
    leaked: list[str]
    seconds: float
    in_flight_at_kills: int = 0
    server_log: str = ""

    def counts(self) -> Counter[str]:
        return Counter(o.klass for o in self.outcomes)

    def never_forwarded_failed(self) -> list[Outcome]:
        """502s and cut answers of requests no app ever read."""
        return [o for o in self.outcomes if o.klass in ("502", "aborted") and o.id not in self.forwarded]

    def failed(self) -> list[Outcome]:
        """502s and cut answers, forwarded or not."""
        return [o for o in self.outcomes if o.klass in ("502", "aborted")]

    def crash_lines(self) -> Counter[str]:
        """Crash log lines per (12-digit) container id."""
        return Counter(re.findall(r"container crash .*?\[([0-9a-f]{12})\]", self.server_log))

    def stopped_by_us(self) -> set[str]:
        """Killed containers dockerspaces was stopping already (evict/stop logged
        before their crash, if any): their death is its own stop's."""
        stops = {
            m.group(1): m.start()
            for m in re.finditer(r"container (?:evict|stop) .*?\[([0-9a-f]{12})\]", self.server_log)
        }
        crashes = {
            m.group(1): m.start()
            for m in re.finditer(r"container crash .*?\[([0-9a-f]{12})\]", self.server_log)
        }
        return {
            cid[:12]
            for _, cid in self.kills
            if cid[:12] in stops and stops[cid[:12]] < crashes.get(cid[:12], 1 << 62)
        }

    def crash_accounting(self) -> list[str]:
        """The "every crash counted once" bar's misses."""
        lines = self.crash_lines()
        killed = {cid[:12] for _, cid in self.kills}
        if self.removed_while_starting:
            killed.add(self.removed_while_starting[:12])
        out = [f"container {cid} counted {n} times as a crash" for cid, n in sorted(lines.items()) if n > 1]
        out += [
            f"kill of {cid} not counted as a crash"
            for cid in sorted({c[:12] for _, c in self.kills} - set(lines) - self.stopped_by_us())
        ]
        out += [f"crash of {cid}, which nobody killed" for cid in sorted(set(lines) - killed)]
        if self.crashes is None:
            out.append("dockerspaces_container_crashes_total is not in /monitor:metrics")
        elif self.crashes != sum(lines.values()):
            out.append(
                f"crash counter {self.crashes:g} != {sum(lines.values())} crash lines "
                f"({len(self.kills)} kills)"
            )
        return out

    def violations(self) -> list[str]:
        c = self.counts()
        out = []
        bad = self.never_forwarded_failed()
        if bad:
            out.append(
                f"{len(bad)} never-forwarded request(s) got a 502 or a cut answer: "
                + ", ".join(f"#{o.id} {o.kind} {o.klass}" for o in bad[:10])
            )
        if c["truncated"]:
            out.append(f"{c['truncated']} truncated answer(s) looked complete")
        if c["lost"]:
            lost = [o for o in self.outcomes if o.klass == "lost"]
            out.append(f"{c['lost']} request(s) lost: " + ", ".join(f"#{o.id} {o.detail}" for o in lost[:10]))
        if len(self.failed()) > self.in_flight_at_kills:
            out.append(
                f"{len(self.failed())} 502s and cut answers, more than the "
                f"{self.in_flight_at_kills} request(s) in flight at the kills"
            )
        if self.leaked:
            out.append("leaked: " + "; ".join(self.leaked))
        out += self.crash_accounting()
        return out

    def table(self, title: str = "fault injection") -> str:
        c = self.counts()
        n = len(self.outcomes)
        rows = [
            ("requests", n),
            ("ok (complete, correct)", c["ok"]),
            ("502, forwarded", sum(1 for o in self.outcomes if o.klass == "502" and o.id in self.forwarded)),
            (
                "502, never forwarded  [bar 0]",
                sum(1 for o in self.outcomes if o.klass == "502" and o.id not in self.forwarded),
            ),
            (
                "cut answer, forwarded",
                sum(1 for o in self.outcomes if o.klass == "aborted" and o.id in self.forwarded),
            ),
            (
                "cut answer, never forwarded  [bar 0]",
                sum(1 for o in self.outcomes if o.klass == "aborted" and o.id not in self.forwarded),
            ),
            ("other 5xx", sum(v for k, v in c.items() if k.startswith("5") and k != "502")),
            ("truncated, looked complete  [bar 0]", c["truncated"]),
            ("lost, no answer  [bar 0]", c["lost"]),
            ("client hung up (ours)", c["gone"]),
            ("containers killed", len(self.kills)),
            ("in flight at the kills  [bar >= 502s + cut]", self.in_flight_at_kills),
            ("removed while starting", 1 if self.removed_while_starting else 0),
            ("  ... start tried again", "yes" if self.start_retried else "no"),
            ("  ... already being stopped by us", len(self.stopped_by_us())),
            (
                "crashes counted  [bar = kills not being stopped]",
                "n/a" if self.crashes is None else f"{self.crashes:g}",
            ),
            ("containers/slots leaked  [bar 0]", len(self.leaked)),
            ("seconds", f"{self.seconds:.0f}"),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [title, "-" * (width + 10)]
        lines += [f"{name:<{width}}  {value}" for name, value in rows]
        others = sorted(k for k in c if k.startswith("5") and k != "502")
        if others:
            lines.append("other 5xx: " + ", ".join(f"{k}×{c[k]}" for k in others))
        missed = self.violations()
        lines.append("bars missed:" if missed else "every bar met")
        lines += ["  - " + v for v in missed]
        return "\n".join(lines)


# -- the HTTP client --------------------------------------------------------------------


def _read_answer(sock: socket.socket, deadline: float) -> tuple[int | None, bool, bytes, str]:
    """(status, complete, body, why-incomplete) of one HTTP/1.1 answer."""
    buf = b""
    status = None
    try:
        while b"\r\n\r\n" not in buf:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                return None, False, b"", "closed before a head"
            buf += data
        head, _, rest = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            headers[k.strip().lower()] = v.strip()
        if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            body = b""
            while True:
                while b"\r\n" not in rest:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    data = sock.recv(65536)
                    if not data:
                        return status, False, body, "closed inside a chunked body"
                    rest += data
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                while len(rest) < size + 2:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    data = sock.recv(65536)
                    if not data:
                        return status, False, body + rest[:size], "closed inside a chunk"
                    rest += data
                if size == 0:
                    return status, True, body, ""
                body += rest[:size]
                rest = rest[size + 2 :]
        if b"content-length" in headers:
            n = int(headers[b"content-length"])
            while len(rest) < n:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                data = sock.recv(65536)
                if not data:
                    return status, False, rest, "closed before the length"
                rest += data
            return status, True, rest[:n], ""
        while True:  # close-delimited: complete only by what it says
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            data = sock.recv(65536)
            if not data:
                return status, True, rest, ""
            rest += data
    except (ConnectionResetError, BrokenPipeError):
        return status, False, b"", "reset"
    except TimeoutError:
        return status, False, b"", "timeout" if status is None else "stalled"


def _one(port: int, o: Outcome, route: str, hang_up: float | None, timeout: float) -> None:
    """Send ``o``'s request and classify the answer; ``hang_up``: close that many
    seconds after sending (positive) or after the first byte of the answer (negative)."""
    spec = {"short": "0.05_1", "stream": "0.5_4", "post": "0.05_1"}[o.kind]
    path = f"{route}/cgi-bin/work/{o.id}_{spec}"
    body = f"payload-{o.id}".encode() if o.kind == "post" else b""
    method = "POST" if o.kind == "post" else "GET"
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: ds\r\nConnection: close\r\n"
        + (f"Content-Length: {len(body)}\r\n" if body else "")
        + "\r\n"
    ).encode()
    o.sent = time.monotonic()
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError as e:
        o.klass, o.detail, o.ended = "lost", f"connect: {e}", time.monotonic()
        return
    try:
        sock.sendall(head + body)
        if hang_up is not None:
            if hang_up > 0:
                time.sleep(hang_up)  # pacing, not synchronisation: hang up after this long
            else:
                sock.settimeout(timeout)
                try:
                    sock.recv(1)
                except OSError:
                    pass
            o.klass, o.ended = "gone", time.monotonic()
            return
        status, complete, got, why = _read_answer(sock, time.monotonic() + timeout)
    finally:
        sock.close()
    o.ended, o.status = time.monotonic(), status
    if why in ("timeout", "stalled"):
        o.klass, o.detail = "lost", why
    elif status is None or not complete:
        o.klass, o.detail = "aborted", why
    elif status == 200:
        ok = f"done {o.id}".encode() in got and (o.kind != "post" or body in got)
        o.klass = "ok" if ok else "truncated"
        o.detail = "" if ok else got[-80:].decode(errors="replace")
    else:
        o.klass, o.detail = str(status), got[:120].decode(errors="replace")


# -- faults --------------------------------------------------------------------------------


class _LogFollower:
    """Follows every container of the instance from its start: request ids its httpd
    read (``url:/…/cgi-bin/work/ID_…``)."""

    pattern = re.compile(rb"url:[^ ]*/cgi-bin/work/(\d+)_")

    def __init__(self, instance: str):
        self.instance = instance
        self.seen: set[int] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.poller: threading.Thread | None = None
        self.threads: dict[str, threading.Thread] = {}

    def start(self) -> None:
        """Look for new containers every 20 ms, and follow each from its start."""
        self.poller = threading.Thread(target=self._poll, daemon=True)
        self.poller.start()

    def finish(self, timeout: float = 10.0) -> set[int]:
        """Stop looking and read every line logged so far; return the ids seen. A
        container that still exists has its whole log read at once; one that is gone
        ended its follow stream, so its follower is joined."""
        self.stop.set()
        if self.poller is not None:
            self.poller.join(timeout)
        c = docker_client()
        try:
            for cid, follower in list(self.threads.items()):
                try:
                    data = c.logs(cid, stdout=True, stderr=True)
                except docker.errors.APIError:  # gone: its follower read it all
                    follower.join(timeout)
                    continue
                self._read(data.split(b"\n"))
        finally:
            c.close()
        with self.lock:
            return set(self.seen)

    def _read(self, lines: list[bytes]) -> None:
        for line in lines:
            m = self.pattern.search(line)
            if m:
                with self.lock:
                    self.seen.add(int(m.group(1)))

    def _poll(self) -> None:
        c = docker_client()
        try:
            while not self.stop.is_set():
                for info in c.containers(filters={"label": f"dockerspaces.instance={self.instance}"}):
                    cid = info["Id"]
                    if cid not in self.threads:
                        t = threading.Thread(target=self._follow, args=(cid,), daemon=True)
                        t.start()
                        self.threads[cid] = t
                time.sleep(0.02)  # pacing of the poll for new containers
        finally:
            c.close()

    def _follow(self, cid: str) -> None:
        c = docker_client()
        try:
            buf = b""
            for chunk in c.logs(cid, stream=True, follow=True, stdout=True, stderr=True):
                buf += chunk
                *lines, buf = buf.split(b"\n")
                self._read(lines)
                if self.stop.is_set():
                    break
        except Exception:  # noqa: BLE001, S110 - the container went: its lines are in
            pass
        finally:
            c.close()


def _containers_in(srv: Server, state: str) -> dict[str, int]:
    """Containers of slots in ``state`` (``Run``: only with a request in flight), with
    the requests in flight on each."""
    try:
        snap = srv.snapshot()
    except (OSError, AssertionError):
        return {}
    return {
        s["Container"]: int(s.get("InFlight") or 0)
        for s in snap["TargetSlots"]
        if s["State"] == state and s.get("Container") and (state != "Run" or s.get("InFlight"))
    }


def _metric(srv: Server, name: str) -> float | None:
    """The sum of ``name``'s samples; None when the metric is not exposed at all."""
    status, _, body = srv.get("/monitor:metrics", timeout=10)
    if status != 200 or name not in body.decode():
        return None
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith((name + "{", name + " ")):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _settled(srv: Server, timeout: float) -> dict[str, Any]:
    """The broker's snapshot once no slot is busy and no queue holds a request; after
    ``timeout`` the last one anyway (the leak check then says what is still busy)."""

    def idle() -> dict[str, Any] | None:
        snap = srv.snapshot()
        busy = [
            s
            for s in snap["TargetSlots"]
            if s["State"] in ("Starting", "Stopping", "Run") or s.get("InFlight")
        ]
        return snap if not busy and not snap["Queues"] else None

    try:
        return eventually(idle, timeout, "the broker idle", interval=0.2)
    except AssertionError:
        return srv.snapshot()


def run(
    srv: Server,
    *,
    requests: int = 300,
    clients: int = 20,
    kill_every: float = 3.0,
    hang_up: float = 0.1,
    seed: int = 12,
    client_timeout: float = 90.0,
    log: Any = print,
) -> Report:
    """Drive the scenario against a started server (``--target 2``) and account."""
    rng = random.Random(seed)
    follower = _LogFollower(srv.instance)
    follower.start()
    kinds = ["short"] * 6 + ["stream"] * 2 + ["post"] * 2
    outcomes = [Outcome(i, rng.choice(kinds), 0.0) for i in range(requests)]
    plan = [
        (
            o,
            ROUTES[rng.randrange(len(ROUTES))],
            (rng.uniform(0.05, 1.0) * rng.choice([1, -1])) if rng.random() < hang_up else None,
        )
        for o in outcomes
    ]
    kills: list[tuple[float, str]] = []
    in_flight: list[int] = []
    removed: list[str] = []
    done = threading.Event()
    start = time.monotonic()

    def killer() -> None:
        c = docker_client()
        try:
            next_kill = start + kill_every
            while not done.is_set():
                now = time.monotonic()
                if not removed and now - start > 5:
                    starting = list(_containers_in(srv, "Starting"))
                    cid = starting[0] if starting else None
                    if cid is not None:
                        try:
                            c.remove_container(cid, force=True)
                            removed.append(cid)
                            log(f"faults: removed {cid[:12]} while it was starting")
                        except Exception as e:  # noqa: BLE001 - it got away
                            log(f"faults: rm -f {cid[:12]} failed: {e}")
                if now >= next_kill:
                    running = _containers_in(srv, "Run")
                    busy = sorted(c for c in running if c not in removed)
                    cid = rng.choice(busy) if busy else None
                    if cid is not None:
                        try:
                            c.kill(cid)
                            kills.append((time.monotonic() - start, cid))
                            in_flight.append(running[cid])
                            next_kill = now + kill_every * rng.uniform(0.7, 1.3)
                        except Exception as e:  # noqa: BLE001 - stopped meanwhile
                            log(f"faults: kill {cid[:12]} failed: {e}")
                time.sleep(0.05)  # pacing: the killer's tick
        finally:
            c.close()

    k = threading.Thread(target=killer, daemon=True)
    k.start()
    lock = threading.Lock()
    queue = list(plan)

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                o, route, hang = queue.pop(0)
            try:
                _one(srv.port, o, route, hang, client_timeout)
            except Exception as e:  # noqa: BLE001 - a garbled answer: counted, not hidden
                o.klass, o.detail, o.ended = "lost", f"client: {e!r}", time.monotonic()

    workers = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done.set()
    k.join()
    seconds = time.monotonic() - start
    snap = _settled(srv, 60)
    seen = follower.finish()
    crashes = _metric(srv, "dockerspaces_container_crashes_total")
    # leaks: every container of the instance is one the broker holds in a slot, and
    # every container a slot holds is running
    held = {s["Container"][:12] for s in snap["TargetSlots"] if s.get("Container")}
    leaked = []
    c = docker_client()
    try:
        running = set()
        for info in c.containers(all=True, filters={"label": f"dockerspaces.instance={srv.instance}"}):
            if info["State"] == "running":
                running.add(info["Id"][:12])
            if info["Id"][:12] not in held:
                leaked.append(f"container {info['Id'][:12]} ({info['State']}) not in a slot")
            elif info["State"] != "running":
                leaked.append(f"container {info['Id'][:12]} is {info['State']}")
        for cid in sorted(held - running):
            leaked.append(f"a slot holds container {cid}, which is not running")
    finally:
        c.close()
    for s in snap["TargetSlots"]:
        if s["State"] not in ("Free", "Wait") or s.get("InFlight"):
            leaked.append(f"slot {s['Port']} is {s['State']} with {s.get('InFlight')} in flight")
    if snap["Queues"]:
        leaked.append(f"queues not empty: {snap['Queues']}")
    return Report(
        outcomes,
        seen,
        kills,
        removed[0] if removed else None,
        "starting it again" in srv.output(),
        crashes,
        leaked,
        seconds,
        sum(in_flight),
        srv.output(),
    )
