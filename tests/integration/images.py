"""Small local test images, built ``FROM scratch`` with Debian's static busybox.

Docker Hub is not reachable from the test machines, so every image a test needs is
built here from ``/usr/bin/busybox`` (package ``busybox-static``).  Call
:func:`ensure_test_images` (blocking; idempotent, cached by a content hash label,
safe from many tests and from parallel ``trial -j`` workers thanks to a file lock)
in ``setUp``/``setUpClass`` before using the names below.

Every HTTP image runs ``/bin/ds-serve``: it sleeps ``$DELAY`` seconds (default 0; during
that time docker's published port accepts and then closes -- "not ready"), writes
``/www/index.html`` and then runs ``busybox httpd -f -p $PORT -h /www``.  The index page
(``text/html``, a ``<pre>``) holds lines ``hostname=<container hostname>``,
``image=<image name>`` and then the container's environment, one ``NAME=VALUE`` per
line.  CGIs (every HTTP image has them):

- ``/cgi-bin/env``      -- ``text/plain``: hostname, then the CGI env (container env
  plus ``REQUEST_METHOD``, ``REQUEST_URI``, ``QUERY_STRING``, ``HTTP_*`` headers).
- ``/cgi-bin/echo``     -- ``text/plain``: method, URI, then the request body verbatim.
- ``/cgi-bin/sleep?N``  -- sleeps N seconds (default ``$SLEEP`` or 5), then ``slept N``.
- ``/cgi-bin/stream?N`` -- N lines (default 5), one per second: ``line i``.
- ``/cgi-bin/status?C`` -- answers with HTTP status C (default 500).
- ``/cgi-bin/work/ID_S_N`` -- echoes a POST body, then N lines S seconds apart, then
  ``done ID``. httpd runs with ``-vv``: each request it reads is a ``url:PATH`` line in
  the container's log (the fault-injection test's proof that a request was forwarded).

Images (constants below):

=======================================  =================================================
:data:`TTS` ``selmaproject/tts:777``      httpd on 5002 (like the real TTS image's port)
:data:`WEB` ``dockerspaces-test/web:1``   httpd on 8080; ``DELAY`` env delays listening
:data:`SLOWHTTP` ``...slowhttp:1``        httpd on 8080, ``SLEEP`` default 5 for ``sleep``
:data:`HEALTH` ``...health:1``            httpd on 8080 at once, HEALTHCHECK (1 s) turns
                                          healthy ``HEALTH_DELAY`` s (default 2) after start
:data:`EXIT` ``dockerspaces-test/exit:1`` prints ``exit-image: starting``, ``exit-image:
                                          fatal error, exiting with 3`` and exits with 3
                                          (``EXIT_CODE`` env overrides the code)
:data:`DEAF` ``dockerspaces-test/deaf:1`` runs forever, never listens (exits on SIGTERM)
:data:`WORKER` ``...worker:1``            prints ``worker: started``, its env, then
                                          sleeps; on SIGTERM prints ``worker: got SIGTERM``
                                          and exits 0 after ``TERM_DELAY`` s (default 0);
                                          with ``IGNORE_TERM=1`` it ignores SIGTERM (only
                                          SIGKILL stops it)
=======================================  =================================================

All carry the label ``dockerspaces.test.image=1`` and a content hash label.

One image is not busybox: :data:`WSAPP` ``dockerspaces-test/wsapp:1`` (build it with
:func:`ensure_wsapp_image`) is the Debian + python3 base of the Dockerfile test
(``ensure_pybase()`` in :mod:`tests.integration.test_dockerfile`) plus a stdlib-only
script on 8080 (``DELAY`` env delays listening): ``/`` (any path) is an HTML page
(``<p id=app>image=dockerspaces-test/wsapp:1``) whose script opens a WebSocket at
``ws(s)://host`` + its own directory + ``ws`` -- under the route prefix --, sends
``hello from the page`` and writes ``echo: <answer>`` into ``<pre id=ws>``; a path
ending in ``/ws`` with ``Upgrade: websocket`` is a hand-written RFC 6455 echo (text and
binary messages, fragments, ping, close).

:data:`BUSY` ``dockerspaces-test/busy:1`` (build it with :func:`ensure_busy_image`) is
:data:`WEB` plus ``/cgi-bin/busy?S``: the backend reports overlap itself. It marks the
container busy (``mkdir /tmp/busy``, atomic), sleeps S seconds (default 0.3), clears the
mark only if it set it, and only then answers ``alone`` -- or ``overlap`` when the mark
was there already, i.e. another request was being served by this container at the same
time --, then ``hostname=<container hostname>``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

from .dockerutil import docker_client

BUSYBOX = os.environ.get("DOCKERSPACES_TEST_BUSYBOX", "/usr/bin/busybox")

BASE = "dockerspaces-test/base:1"
TTS = "selmaproject/tts:777"
WEB = "dockerspaces-test/web:1"
SLOWHTTP = "dockerspaces-test/slowhttp:1"
HEALTH = "dockerspaces-test/health:1"
EXIT = "dockerspaces-test/exit:1"
DEAF = "dockerspaces-test/deaf:1"
WORKER = "dockerspaces-test/worker:1"
WSAPP = "dockerspaces-test/wsapp:1"
JUPYTER = "dockerspaces-test/jupyter:1"
BUSY = "dockerspaces-test/busy:1"

TTS_PORT = 5002
WEB_PORT = 8080

ALL_IMAGES = (BASE, TTS, WEB, SLOWHTTP, HEALTH, EXIT, DEAF, WORKER)

_SERVE = r"""#!/bin/sh
# ds-serve: optional start delay, generated index, busybox httpd in the foreground
trap 'echo "ds-serve: got SIGTERM"; exit 0' TERM
if [ -n "$DELAY" ] && [ "$DELAY" != 0 ]; then
  echo "ds-serve: sleeping $DELAY s before listening"
  sleep "$DELAY" &
  wait $!
fi
mkdir -p /www
{
  echo "<html><body><pre>"
  echo "hostname=$(hostname)"
  echo "image=$DS_IMAGE"
  env | sort
  echo "</pre></body></html>"
} > /www/index.html
echo "ds-serve: listening on ${PORT:-8080}"
# -vv: one "url:PATH" line per request in the container's log, once httpd has read it
httpd -f -vv -p "${PORT:-8080}" -h /www &
wait $!
"""

_CGI_ENV = r"""#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
echo "hostname=$(hostname)"
env | sort
"""

_CGI_ECHO = r"""#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
echo "method=$REQUEST_METHOD"
echo "uri=$REQUEST_URI"
echo "length=${CONTENT_LENGTH:-0}"
echo "--"
if [ -n "$CONTENT_LENGTH" ] && [ "$CONTENT_LENGTH" -gt 0 ]; then
  head -c "$CONTENT_LENGTH"
fi
"""

_CGI_SLEEP = r"""#!/bin/sh
n="${QUERY_STRING:-${SLEEP:-5}}"
sleep "$n"
printf 'Content-Type: text/plain\r\n\r\n'
echo "slept $n"
echo "hostname=$(hostname)"
"""

_CGI_STREAM = r"""#!/bin/sh
n="${QUERY_STRING:-5}"
printf 'Content-Type: text/plain\r\n\r\n'
i=1
while [ "$i" -le "$n" ]; do
  echo "line $i"
  i=$((i + 1))
  [ "$i" -le "$n" ] && sleep 1
done
"""

_CGI_WORK = r"""#!/bin/sh
# work/ID_SECONDS_LINES: echoes a POST body, then LINES lines SECONDS apart, "done ID"
q="${PATH_INFO#/}"
id="${q%%_*}"; rest="${q#*_}"; secs="${rest%%_*}"; lines="${rest#*_}"
printf 'Content-Type: text/plain\r\n\r\n'
if [ -n "$CONTENT_LENGTH" ] && [ "$CONTENT_LENGTH" -gt 0 ]; then
  head -c "$CONTENT_LENGTH"
  echo
fi
i=1
while [ "$i" -le "${lines:-1}" ]; do
  echo "line $i"
  i=$((i + 1))
  sleep "${secs:-0}"
done
echo "done $id"
"""

_CGI_STATUS = r"""#!/bin/sh
c="${QUERY_STRING:-500}"
printf 'Status: %s Test\r\nContent-Type: text/plain\r\n\r\n' "$c"
echo "status $c"
"""

_EXIT = r"""#!/bin/sh
echo "exit-image: starting"
echo "exit-image: fatal error, exiting with ${EXIT_CODE:-3}" >&2
exit "${EXIT_CODE:-3}"
"""

_DEAF = r"""#!/bin/sh
trap 'echo "deaf: got SIGTERM"; exit 0' TERM
echo "deaf: running, never listening"
while :; do sleep 1000000 & wait $!; done
"""

_WORKER = r"""#!/bin/sh
if [ "$IGNORE_TERM" = 1 ]; then
  trap 'echo "worker: got SIGTERM, ignoring it"' TERM
else
  trap 'echo "worker: got SIGTERM"; sleep "${TERM_DELAY:-0}"; echo "worker: exiting"; exit 0' TERM
fi
echo "worker: started on $(hostname)"
env | sort
while :; do sleep 1000000 & wait $!; done
"""

_HEALTH_SERVE = r"""#!/bin/sh
trap 'echo "health: got SIGTERM"; exit 0' TERM
( sleep "${HEALTH_DELAY:-2}"; touch /tmp/healthy; echo "health: now healthy" ) &
exec /bin/ds-serve
"""

_FILES = {
    "busybox": None,  # copied from BUSYBOX
    "ds-serve": _SERVE,
    "cgi-env": _CGI_ENV,
    "cgi-echo": _CGI_ECHO,
    "cgi-sleep": _CGI_SLEEP,
    "cgi-stream": _CGI_STREAM,
    "cgi-work": _CGI_WORK,
    "cgi-status": _CGI_STATUS,
    "ds-exit": _EXIT,
    "ds-deaf": _DEAF,
    "ds-worker": _WORKER,
    "ds-health": _HEALTH_SERVE,
}

_LABELS = 'LABEL dockerspaces.test.image="1"\n'

_HTTP_COMMON = (
    "COPY ds-serve /bin/ds-serve\n"
    "COPY cgi-env /www/cgi-bin/env\n"
    "COPY cgi-echo /www/cgi-bin/echo\n"
    "COPY cgi-sleep /www/cgi-bin/sleep\n"
    "COPY cgi-stream /www/cgi-bin/stream\n"
    "COPY cgi-work /www/cgi-bin/work\n"
    "COPY cgi-status /www/cgi-bin/status\n"
    'RUN ["/bin/busybox", "chmod", "755", "/bin/ds-serve", "/www/cgi-bin/env",'
    ' "/www/cgi-bin/echo", "/www/cgi-bin/sleep", "/www/cgi-bin/stream",'
    ' "/www/cgi-bin/work", "/www/cgi-bin/status"]\n'
)

_DOCKERFILES: dict[str, str] = {
    BASE: (
        "FROM scratch\n"
        "COPY busybox /bin/busybox\n"
        'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
        'RUN ["/bin/busybox", "mkdir", "-p", "/tmp", "/www/cgi-bin", "/etc"]\n'
        "ENV PATH=/bin\n" + _LABELS + 'CMD ["/bin/sh"]\n'
    ),
    TTS: (
        f"FROM {BASE}\n"
        + _HTTP_COMMON
        + f"ENV PORT={TTS_PORT} DS_IMAGE={TTS}\nEXPOSE {TTS_PORT}\n"
        + 'CMD ["/bin/ds-serve"]\n'
    ),
    WEB: (
        f"FROM {BASE}\n"
        + _HTTP_COMMON
        + f"ENV PORT={WEB_PORT} DS_IMAGE={WEB}\nEXPOSE {WEB_PORT}\n"
        + 'CMD ["/bin/ds-serve"]\n'
    ),
    SLOWHTTP: (
        f"FROM {BASE}\n"
        + _HTTP_COMMON
        + f"ENV PORT={WEB_PORT} SLEEP=5 DS_IMAGE={SLOWHTTP}\nEXPOSE {WEB_PORT}\n"
        + 'CMD ["/bin/ds-serve"]\n'
    ),
    HEALTH: (
        f"FROM {BASE}\n"
        + _HTTP_COMMON
        + "COPY ds-health /bin/ds-health\n"
        + 'RUN ["/bin/busybox", "chmod", "755", "/bin/ds-health"]\n'
        + f"ENV PORT={WEB_PORT} DS_IMAGE={HEALTH}\nEXPOSE {WEB_PORT}\n"
        + "HEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD test -f /tmp/healthy\n"
        + 'CMD ["/bin/ds-health"]\n'
    ),
    EXIT: (
        f"FROM {BASE}\nCOPY ds-exit /bin/ds-exit\n"
        'RUN ["/bin/busybox", "chmod", "755", "/bin/ds-exit"]\n'
        'CMD ["/bin/ds-exit"]\n'
    ),
    DEAF: (
        f"FROM {BASE}\nCOPY ds-deaf /bin/ds-deaf\n"
        'RUN ["/bin/busybox", "chmod", "755", "/bin/ds-deaf"]\n'
        'CMD ["/bin/ds-deaf"]\n'
    ),
    WORKER: (
        f"FROM {BASE}\nCOPY ds-worker /bin/ds-worker\n"
        'RUN ["/bin/busybox", "chmod", "755", "/bin/ds-worker"]\n'
        'CMD ["/bin/ds-worker"]\n'
    ),
}

_WSAPP = r'''"""wsapp: an index page whose script opens a WebSocket under its own path, and the
echo behind it (RFC 6455 by hand: handshake, masked client frames, text echo)."""
import base64
import hashlib
import os
import signal
import struct
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PAGE = b"""<!doctype html><html><head><meta charset=utf-8><title>wsapp</title></head>
<body><h1>wsapp</h1><p id=app>image=dockerspaces-test/wsapp:1</p><pre id=ws>connecting</pre>
<script>
var out = document.getElementById('ws');
var url = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host
    + location.pathname.replace(/[^/]*$/, '') + 'ws';
var sock = new WebSocket(url);
sock.onopen = function () { out.textContent = 'open'; sock.send('hello from the page'); };
sock.onmessage = function (e) { out.textContent = 'echo: ' + e.data; sock.close(); };
sock.onerror = function () { out.textContent = 'error'; };
</script></body></html>
"""


def read_exact(f, n):
    data = f.read(n)
    if len(data) != n:
        raise EOFError
    return data


def read_frame(f):
    """(fin, opcode, payload) of one client frame (clients must mask)."""
    b0, b1 = read_exact(f, 2)
    n = b1 & 0x7F
    if n == 126:
        n = struct.unpack("!H", read_exact(f, 2))[0]
    elif n == 127:
        n = struct.unpack("!Q", read_exact(f, 8))[0]
    if not b1 & 0x80:
        raise ValueError("unmasked client frame")
    mask = read_exact(f, 4)
    data = read_exact(f, n)
    return b0 & 0x80, b0 & 0x0F, bytes(c ^ mask[i % 4] for i, c in enumerate(data))


def frame(opcode, payload):
    """One unmasked, final server frame."""
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        upgrade = self.headers.get("Upgrade", "").lower() == "websocket"
        if self.path.split("?")[0].endswith("/ws") and upgrade:
            return self.echo()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def echo(self):
        key = self.headers.get("Sec-WebSocket-Key", "").strip().encode()
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        message, first = b"", 0
        try:
            while True:
                fin, op, data = read_frame(self.rfile)
                if op == 0x8:  # close: answer it and stop
                    self.wfile.write(frame(0x8, data[:2]))
                    return
                if op == 0x9:  # ping
                    self.wfile.write(frame(0xA, data))
                elif op in (0x0, 0x1, 0x2):
                    first = first or op
                    message += data
                    if fin:
                        print(f"wsapp: echo {len(message)} bytes", flush=True)
                        self.wfile.write(frame(first, message))
                        message, first = b"", 0
                self.wfile.flush()
        except (EOFError, ConnectionError, ValueError):
            return

    def log_message(self, fmt, *args):
        sys.stdout.write("wsapp: %s\n" % (fmt % args))
        sys.stdout.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # PID 1 ignores it otherwise
    time.sleep(float(os.environ.get("DELAY") or 0))
    port = int(os.environ.get("PORT") or 8080)
    print(f"wsapp: listening on {port}", flush=True)
    ThreadingHTTPServer(("", port), Handler).serve_forever()
'''

_CGI_BUSY = r"""#!/bin/sh
# busy?S: "overlap" if another request held this container's busy mark (see BUSY)
if mkdir /tmp/busy 2>/dev/null; then seen=alone; else seen=overlap; fi
sleep "${QUERY_STRING:-0.3}"
[ "$seen" = alone ] && rmdir /tmp/busy
printf 'Content-Type: text/plain\r\n\r\n'
echo "$seen"
echo "hostname=$(hostname)"
"""

HASH_LABEL = "dockerspaces.test.hash"
_LOCK_PATH = os.path.join(tempfile.gettempdir(), "dockerspaces-test-images.lock")
_done: set[str] = set()


def _busybox_digest() -> str:
    with open(BUSYBOX, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _content_hash(tag: str, busybox_digest: str) -> str:
    h = hashlib.sha256()
    h.update(busybox_digest.encode())
    h.update(json.dumps(sorted((k, v or "") for k, v in _FILES.items())).encode())
    h.update(_DOCKERFILES[tag].encode())
    if tag != BASE:
        h.update(_DOCKERFILES[BASE].encode())
    return h.hexdigest()[:16]


def _current_hash(client: Any, tag: str) -> str | None:
    try:
        info = client.inspect_image(tag)
    except Exception:  # noqa: BLE001 - missing image
        return None
    labels = (info.get("Config") or {}).get("Labels") or {}
    return labels.get(HASH_LABEL)


def _build(client: Any, context: str, tag: str, digest: str, text: str | None = None) -> None:
    dockerfile = (text or _DOCKERFILES[tag]) + f'LABEL {HASH_LABEL}="{digest}"\n'
    name = "Dockerfile." + tag.replace("/", "_").replace(":", "_")
    with open(os.path.join(context, name), "w") as f:
        f.write(dockerfile)
    log = []
    for chunk in client.build(
        path=context, dockerfile=name, tag=tag, rm=True, forcerm=True, decode=True, pull=False
    ):
        if "error" in chunk:
            raise RuntimeError(f"building {tag} failed: {chunk['error']}\n" + "".join(log))
        if "stream" in chunk:
            log.append(chunk["stream"])
    if _current_hash(client, tag) != digest:
        raise RuntimeError(f"building {tag} did not produce the image:\n" + "".join(log))


def ensure_test_images(*tags: str) -> None:
    """Build the named test images (all when none named) unless present and current.

    Blocking; takes a few seconds the first time, milliseconds afterwards.
    """
    wanted = [t for t in (tags or ALL_IMAGES) if t not in _done]
    if not wanted:
        return
    for t in wanted:
        if t not in _DOCKERFILES:
            raise KeyError(f"unknown test image {t!r}; known: {', '.join(ALL_IMAGES)}")
    if not os.path.exists(BUSYBOX):
        raise RuntimeError(f"{BUSYBOX} missing: apt-get install busybox-static")
    digest = _busybox_digest()
    client = docker_client(timeout=300)
    try:
        with open(_LOCK_PATH, "a") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            try:
                todo = [BASE] + [t for t in wanted if t != BASE]
                stale = [t for t in todo if _current_hash(client, t) != _content_hash(t, digest)]
                if stale:
                    context = tempfile.mkdtemp(prefix="ds-test-images-")
                    try:
                        for fname, text in _FILES.items():
                            path = os.path.join(context, fname)
                            if text is None:
                                shutil.copyfile(BUSYBOX, path)
                            else:
                                with open(path, "w") as f:
                                    f.write(text)
                            os.chmod(path, 0o755)
                        for t in stale:
                            _build(client, context, t, _content_hash(t, digest))
                    finally:
                        shutil.rmtree(context, ignore_errors=True)
            finally:
                fcntl.flock(lockf, fcntl.LOCK_UN)
    finally:
        client.close()
    _done.update(wanted)
    _done.add(BASE)


def _ensure_on_pybase(tag: str, body: str, files: dict[str, str], timeout: int = 300) -> str:
    """Build ``tag`` ``FROM`` the python3 base image with Dockerfile lines ``body`` and
    the context ``files`` unless present and current (blocking; the base is made by
    ``ensure_pybase`` with debootstrap once, or the test skips)."""
    if tag in _done:
        return tag
    from .test_dockerfile import ensure_pybase  # lazily: that module imports this one

    return _ensure_from(ensure_pybase(), tag, body, files, timeout)


def _ensure_from(base: str, tag: str, body: str, files: dict[str, str], timeout: int = 300) -> str:
    """Build ``tag`` ``FROM`` the local image ``base`` with Dockerfile lines ``body`` and
    the context ``files`` unless present and current (its hash covers the base's id,
    the Dockerfile and the files; builds are serialised across processes)."""
    client = docker_client(timeout=timeout)
    try:
        base_id = client.inspect_image(base)["Id"]
        dockerfile = f"FROM {base}\n" + body + _LABELS
        content = json.dumps(sorted(files.items()))
        digest = hashlib.sha256((base_id + dockerfile + content).encode()).hexdigest()[:16]
        with open(_LOCK_PATH, "a") as lockf:
            fcntl.flock(lockf, fcntl.LOCK_EX)
            try:
                if _current_hash(client, tag) != digest:
                    context = tempfile.mkdtemp(prefix="ds-test-image-")
                    try:
                        for name, text in files.items():
                            with open(os.path.join(context, name), "w") as f:
                                f.write(text)
                        _build(client, context, tag, digest, dockerfile)
                    finally:
                        shutil.rmtree(context, ignore_errors=True)
            finally:
                fcntl.flock(lockf, fcntl.LOCK_UN)
    finally:
        client.close()
    _done.add(tag)
    return tag


def ensure_wsapp_image() -> str:
    """Build :data:`WSAPP` unless present and current (see :func:`_ensure_on_pybase`)."""
    body = f"COPY wsapp.py /wsapp.py\nENV PORT={WEB_PORT}\nEXPOSE {WEB_PORT}\n"
    return _ensure_on_pybase(WSAPP, body + 'CMD ["python3", "-u", "/wsapp.py"]\n', {"wsapp.py": _WSAPP})


#: an empty notebook (nbformat 4) the Jupyter image serves as ``t.ipynb``
_NOTEBOOK = json.dumps(
    {
        "cells": [],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
)


def ensure_jupyter_image() -> str:
    """Build :data:`JUPYTER` (Debian's ``jupyter-notebook``, notebook 6, on the python3
    base; ``/srv/nb/t.ipynb`` an empty notebook) unless present and current. The
    command comes from the test's profile. The first build installs from Debian's
    mirror (a few minutes); later runs find it cached."""
    body = (
        "RUN apt-get update && apt-get install -y --no-install-recommends jupyter-notebook "
        "python3-ipykernel && rm -rf /var/lib/apt/lists/*\n"
        "COPY t.ipynb /srv/nb/t.ipynb\nEXPOSE 8888\n"
    )
    return _ensure_on_pybase(JUPYTER, body, {"t.ipynb": _NOTEBOOK}, timeout=1200)


def ensure_busy_image() -> str:
    """Build :data:`BUSY` (``FROM`` :data:`WEB`, built first) unless present and current.

    Its own context and hash: the other images' hashes do not change."""
    if BUSY in _done:
        return BUSY
    ensure_test_images(WEB)
    body = (
        "COPY cgi-busy /www/cgi-bin/busy\n"
        'RUN ["/bin/busybox", "chmod", "755", "/www/cgi-bin/busy"]\n'
        f"ENV DS_IMAGE={BUSY}\n"
    )
    return _ensure_from(WEB, BUSY, body, {"cgi-busy": _CGI_BUSY})
