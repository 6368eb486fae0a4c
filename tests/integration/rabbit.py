"""A real RabbitMQ for the autoscaler's tests: an account of our own, the consumer image,
an ``[[autoscale]]`` config, and publishing and reading through the management HTTP API
(stdlib only: the test process needs no AMQP client).

RabbitMQ is Debian's ``rabbitmq-server`` with the management plugin, started by
``.ci/run``; each test makes its own vhost and user (``guest`` works on loopback only,
and the workers connect from containers, through the Docker bridge's gateway).

- :func:`require_rabbit` -- in ``setUp``: skips with the reason when RabbitMQ (or
  ``rabbitmqctl``) is missing; with ``DOCKERSPACES_REQUIRE_RABBIT=1`` (CI) it fails.
- :func:`rabbit_account` -- a fresh vhost and user; :class:`Account` publishes, takes
  records and reads counts, and ``cleanup()`` deletes both.
- :func:`ensure_consumer_image` -- :data:`CONSUMER`, built once (content-hash label).
- :func:`write_autoscale_config` -- a ``--config`` file with one ``[[autoscale]]`` entry.

The consumer (``AMQP_URL``, ``AMQP_QUEUE``, ``WORK_SECONDS``; the first two are what
the autoscaler passes) takes one message at a time (prefetch 1), works
``WORK_SECONDS``, publishes a record ``{"id": message_id or body, "redelivered": bool,
"worker": hostname}`` to ``AMQP_QUEUE + ".done"`` and then acks.  On SIGTERM it takes no
new delivery -- it cancels its consumer at once when idle, and before acking the
message in hand when busy (with prefetch 1 nothing else can reach it while it holds
one) -- then closes the connection and exits 0.  It logs to stdout (``consuming Q``
once subscribed, ``stopped cleanly`` at the end).
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from attrs import field, frozen
from twisted.trial.unittest import SkipTest

from .dockerutil import docker_client

MANAGEMENT = os.environ.get("DOCKERSPACES_TEST_RABBIT_MANAGEMENT", "http://127.0.0.1:15672")
AMQP_PORT = 5672
CONSUMER = "dockerspaces-test/consumer:1"
_HASH_LABEL = "dockerspaces.test.hash"
_LOCK = os.path.join(tempfile.gettempdir(), "dockerspaces-test-consumer.lock")

_CONSUMER = r'''"""consumer: prefetch 1, WORK_SECONDS per message, a record to QUEUE.done, the ack;
SIGTERM: no new delivery, the message in hand finished and acked, exit 0."""
import json, os, signal, socket, sys, time
import pika

url, queue = os.environ["AMQP_URL"], os.environ["AMQP_QUEUE"]
work = float(os.environ.get("WORK_SECONDS") or "0.1")
state = {"stopping": False, "tag": None}


def term(signum, frame):
    # only a flag: pika is not re-entrant. Idle, the loop below cancels within 0.1 s;
    # busy, handle() cancels before its ack, and with prefetch 1 nothing else can be
    # delivered to us while we hold the message.
    state["stopping"] = True


signal.signal(signal.SIGTERM, term)
for attempt in range(100):
    try:
        conn = pika.BlockingConnection(pika.URLParameters(url))
        break
    except pika.exceptions.AMQPConnectionError as e:
        if state["stopping"]:
            sys.exit(0)
        print("connect failed:", e, flush=True)
        time.sleep(0.2)
else:
    sys.exit(1)
ch = conn.channel()
ch.queue_declare(queue=queue, durable=True)
ch.queue_declare(queue=queue + ".done", durable=True)
ch.basic_qos(prefetch_count=1)


def cancel():
    if state["tag"] is not None:
        tag, state["tag"] = state["tag"], None
        ch.basic_cancel(tag)
        print("consumer cancelled", flush=True)


def handle(ch, method, props, body):
    time.sleep(work)
    record = {"id": props.message_id or body.decode(), "redelivered": method.redelivered,
              "worker": socket.gethostname()}
    ch.basic_publish("", queue + ".done", json.dumps(record),
                     pika.BasicProperties(delivery_mode=2))
    if state["stopping"]:
        cancel()  # before the ack: once acked, the broker would send the next one
    ch.basic_ack(method.delivery_tag)


state["tag"] = ch.basic_consume(queue, handle)
print("consuming", queue, flush=True)
while not state["stopping"]:
    conn.process_data_events(time_limit=0.1)
print("got SIGTERM", flush=True)
conn.process_data_events(time_limit=0)  # a delivery already received is handled
cancel()
conn.close()
print("stopped cleanly", flush=True)
'''

_DOCKERFILE = """FROM {base}
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends python3-pika \\
    && rm -rf /var/lib/apt/lists/*
COPY consumer.py /consumer.py
LABEL dockerspaces.test.image="1"
CMD ["python3", "-u", "/consumer.py"]
"""


def rabbit_unavailable() -> str | None:
    """None when ``rabbitmqctl`` is here and the management API answers, else why not."""
    if shutil.which("rabbitmqctl") is None:
        return "rabbitmqctl missing: apt-get install -y rabbitmq-server"
    try:
        urllib.request.urlopen(MANAGEMENT + "/api/overview", timeout=5).close()
    except urllib.error.HTTPError as e:
        if e.code != 401:  # 401: it answers, and wants a user
            return f"RabbitMQ management API at {MANAGEMENT}: HTTP {e.code}"
    except OSError as e:
        return (
            f"no RabbitMQ management API at {MANAGEMENT} ({e}); start rabbitmq-server "
            "with rabbitmq_management enabled (.ci/run does)"
        )
    return None


def require_rabbit() -> None:
    """Skip the calling test when RabbitMQ is not reachable; with
    ``DOCKERSPACES_REQUIRE_RABBIT=1`` fail instead (CI must run these tests)."""
    why = rabbit_unavailable()
    if why is None:
        return
    if os.environ.get("DOCKERSPACES_REQUIRE_RABBIT") == "1":
        raise AssertionError(f"DOCKERSPACES_REQUIRE_RABBIT=1 but {why}")
    raise SkipTest(why)


def skip_reason() -> str | None:
    """For a class's ``skip``: why RabbitMQ tests cannot run (None: they can). With
    ``DOCKERSPACES_REQUIRE_RABBIT=1`` it is always None, so that :func:`require_rabbit`
    in ``setUp`` fails with the reason instead of skipping."""
    if os.environ.get("DOCKERSPACES_REQUIRE_RABBIT") == "1":
        return None
    return rabbit_unavailable()


def bridge_gateway() -> str:
    """The Docker bridge's gateway: where containers reach services of this machine."""
    c = docker_client()
    try:
        net = c.inspect_network("bridge")
    finally:
        c.close()
    conf = (net.get("IPAM") or {}).get("Config") or [{}]
    if conf[0].get("Gateway"):
        return str(conf[0]["Gateway"])
    # some engines leave it out: the bridge takes the subnet's first address
    return str(next(ipaddress.ip_network(conf[0]["Subnet"]).hosts()))


def _ctl(*args: str) -> None:
    p = subprocess.run(["rabbitmqctl", "-q", *args], check=False, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"rabbitmqctl {args[0]} failed: {p.stderr.strip()[-500:]}")


@frozen
class Account:
    """A vhost and a user of our own (full rights on that vhost only, ``management``
    tag so that it reads its queues and channels through the API)."""

    user: str
    password: str = field(repr=False)
    vhost: str
    management: str
    amqp: str  # as containers reach the broker, without credentials (the config's amqp)

    def amqp_url(self, host: str | None = None) -> str:
        """The AMQP URL without credentials (the config's ``amqp``), on ``host`` when
        given, else on :attr:`amqp`'s host (the bridge gateway)."""
        return f"amqp://{host}:{AMQP_PORT}/" if host else self.amqp

    @property
    def worker_url(self) -> str:
        """The AMQP URL a container uses, with the credentials and the vhost."""
        q = urllib.parse.quote
        return (
            f"amqp://{q(self.user, safe='')}:{q(self.password, safe='')}@"
            f"{urllib.parse.urlsplit(self.amqp).netloc}/{q(self.vhost, safe='')}"
        )

    def credentials_file(self, directory: str) -> str:
        """Write ``user:password`` to a file (mode 600) in ``directory``; its path."""
        path = os.path.join(directory, "rabbit.cred")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{self.user}:{self.password}\n")
        return path

    # ------------------------------------------------------------ management API

    def api(self, method: str, path: str, body: object = None) -> Any:
        """One management API call as this user; the decoded JSON (None when empty)."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.management + path, data=data, method=method)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", "Basic " + token)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=30) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def _vhost(self) -> str:
        return urllib.parse.quote(self.vhost, safe="")

    def _queue(self, queue: str) -> str:
        return f"/api/queues/{self._vhost()}/{urllib.parse.quote(queue, safe='')}"

    def declare(self, *queues: str) -> None:
        """Durable queues (idempotent; the consumer declares them the same way)."""
        for queue in queues:
            self.api("PUT", self._queue(queue), {"durable": True, "auto_delete": False})

    def publish(self, queue: str, ids: list[str]) -> None:
        """One persistent message per id (as body and ``message_id``), through the
        default exchange; each must be routed."""
        url = f"/api/exchanges/{self._vhost()}/amq.default/publish"
        for i in ids:
            answer = self.api(
                "POST",
                url,
                {
                    "routing_key": queue,
                    "payload": i,
                    "payload_encoding": "string",
                    "properties": {"message_id": i, "delivery_mode": 2},
                },
            )
            if not (answer and answer.get("routed")):
                raise AssertionError(f"message {i} not routed to {queue!r}: {answer}")

    def take(self, queue: str, count: int = 1000) -> list[dict[str, Any]]:
        """Take (remove) up to ``count`` messages from ``queue``: their JSON payloads
        (the consumer's records, on ``QUEUE.done``)."""
        got = self.api(
            "POST",
            self._queue(queue) + "/get",
            {"count": count, "ackmode": "ack_requeue_false", "encoding": "auto"},
        )
        return [json.loads(m["payload"]) for m in got or []]

    def counts(self, queue: str) -> tuple[int, int, int]:
        """(ready, unacked, consumers) as the management API says now; the message
        counts lag by its statistics interval (5 s by default), consumers do not."""
        q = self.api("GET", self._queue(queue))
        return (
            int(q.get("messages_ready") or 0),
            int(q.get("messages_unacknowledged") or 0),
            int(q.get("consumers") or 0),
        )

    def cleanup(self) -> None:
        """Delete the vhost (and its queues, closing its connections) and the user."""
        for args in (("delete_vhost", self.vhost), ("delete_user", self.user)):
            subprocess.run(["rabbitmqctl", "-q", *args], check=False, capture_output=True, timeout=60)


def rabbit_account(tag: str = "t", host: str | None = None) -> Account:
    """A fresh vhost and user (random password) with full rights on that vhost; its
    ``amqp`` names ``host`` (default: the Docker bridge's gateway). Call ``cleanup()``."""
    suffix = secrets.token_hex(4)
    name = f"dstest-{tag}-{suffix}"
    acct = Account(
        user=name,
        password="p" + secrets.token_hex(16),  # never a leading "-": rabbitmqctl would read an option
        vhost=name,
        management=MANAGEMENT,
        amqp=f"amqp://{host or bridge_gateway()}:{AMQP_PORT}/",
    )
    try:
        _ctl("add_vhost", acct.vhost)
        _ctl("add_user", acct.user, acct.password)
        _ctl("set_permissions", "-p", acct.vhost, acct.user, ".*", ".*", ".*")
        _ctl("set_user_tags", acct.user, "management")
    except BaseException:
        acct.cleanup()
        raise
    return acct


def write_autoscale_config(
    acct: Account,
    directory: str,
    queue: str = "work",
    *,
    name: str = "consumers",
    max_workers: int = 3,
    work_seconds: float = 0.05,
    cooldown: float = 10,
    stabilization: float = 5,
) -> str:
    """A dockerspaces ``--config`` file in ``directory`` with one ``[[autoscale]]``
    entry of :data:`CONSUMER` workers on ``acct``'s ``queue``; its path."""
    cred = acct.credentials_file(directory)
    image, _, tag = CONSUMER.partition(":")
    path = os.path.join(directory, "dockerspaces.toml")
    with open(path, "w") as f:
        f.write(f"""[[autoscale]]
name = "{name}"
image = "{image}"
tag = "{tag}"
env = {{ WORK_SECONDS = "{work_seconds}" }}
management = "{acct.management}"
amqp = "{acct.amqp}"
credentials = "{cred}"
vhost = "{acct.vhost}"
queue = "{queue}"
target = 20
activation = 1
min = 0
max = {max_workers}
interval = 1
cooldown = {cooldown}
stabilization = {stabilization}
lag = 5
""")
    return path


def ensure_consumer_image() -> str:
    """Build :data:`CONSUMER` from the Debian python base (``ensure_pybase``: made by
    debootstrap once, or the test skips) with Debian's python3-pika, unless an image
    with the same content is there already (blocking; about a minute the first time)."""
    from .test_dockerfile import ensure_pybase  # lazily: that module builds the base

    base = ensure_pybase()
    c = docker_client(timeout=900)
    try:
        base_id = c.inspect_image(base)["Id"]
        dockerfile = _DOCKERFILE.format(base=base)
        digest = hashlib.sha256((base_id + dockerfile + _CONSUMER).encode()).hexdigest()[:16]
        with open(_LOCK, "a") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            try:
                try:
                    labels = c.inspect_image(CONSUMER)["Config"].get("Labels") or {}
                except Exception:  # noqa: BLE001 - not there yet: build it
                    labels = {}
                if labels.get(_HASH_LABEL) == digest:
                    return CONSUMER
                _build(c, dockerfile + f'LABEL {_HASH_LABEL}="{digest}"\n')
            finally:
                fcntl.flock(lockf, fcntl.LOCK_UN)
        return CONSUMER
    finally:
        c.close()


def _build(client: Any, dockerfile: str) -> None:
    ctx = tempfile.mkdtemp(prefix="ds-consumer-")
    try:
        with open(os.path.join(ctx, "consumer.py"), "w") as f:
            f.write(_CONSUMER)
        with open(os.path.join(ctx, "Dockerfile"), "w") as f:
            f.write(dockerfile)
        log: list[str] = []
        for chunk in client.build(path=ctx, tag=CONSUMER, rm=True, forcerm=True, decode=True, pull=False):
            if "error" in chunk:
                raise RuntimeError(f"building {CONSUMER} failed: {chunk['error']}\n" + "".join(log[-40:]))
            log.append(str(chunk.get("stream", "")))
    finally:
        shutil.rmtree(ctx, ignore_errors=True)
