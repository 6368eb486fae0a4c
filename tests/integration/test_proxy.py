"""The proxy data path against real servers on loopback (no Docker needed).

Backends are Twisted servers started in the test on port 0 (or, for WebSockets, a
``websockets`` server in a thread); the proxy runs in the test's reactor, except for
the memory tests, where it runs in a subprocess so its RSS can be read from /proc.
Blocking clients (``websockets``, raw sockets) run in threads.
"""

from __future__ import annotations

import datetime
import os
import socket
import ssl
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from typing import Any

from twisted.internet import defer, reactor, threads
from twisted.internet.endpoints import serverFromString
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, PrivateCertificate
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.resource import Resource
from twisted.web.server import Site

from dockerspaces.web.backend import Backend
from dockerspaces.web.proxy import ExchangeEnd, Proxy
from dockerspaces.web.site import make_site

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- certificates ---------------------------------------------------------------------


def make_certs(directory: str) -> dict[str, str]:
    """A test CA and a leaf for ``localhost``/127.0.0.1 signed by it; PEM file paths."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("dockerspaces test CA"))
        .issuer_name(name("dockerspaces test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    files = {
        "ca": ca.public_bytes(pem),
        "cert": leaf.public_bytes(pem),
        "key": key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    }
    out = {}
    for k, data in files.items():
        path = os.path.join(directory, k + ".pem")
        with open(path, "wb") as f:
            f.write(data)
        out[k] = path
    return out


def read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# -- backends -------------------------------------------------------------------------


class CountingSite(Site):
    """A Site that counts the connections it accepted."""

    accepted = 0

    def buildProtocol(self, addr: Any) -> Any:
        self.accepted += 1
        return super().buildProtocol(addr)


class Pages(Resource):
    """Backend pages: ``/hello``, ``/redirect``, ``/echo-host``."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        if request.path == b"/redirect":
            host = request.getHeader(b"host")
            request.setResponseCode(302)
            request.setHeader(b"location", b"http://" + host + b"/landed?x=1")
            return b""
        if request.path == b"/root-redirect":
            request.setResponseCode(301)
            request.setHeader(b"location", b"/elsewhere")
            return b""
        return b"hello " + request.uri + b" host=" + (request.getHeader(b"host") or b"")


class Endless(Protocol):
    """A raw HTTP backend that streams an endless body; records its own end."""

    def __init__(self, lost: defer.Deferred[None]):
        self.lost = lost
        self.buf = b""
        self.paused = False
        self.sending = False

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" in self.buf and not self.sending:
            self.sending = True
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
            self.transport.registerProducer(self, True)
            self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        chunk = b"x" * 65536
        for _ in range(16):
            if self.paused or not self.connected:
                return
            self.transport.write(chunk)
        reactor.callLater(0, self.resumeProducing)  # keep going

    def stopProducing(self) -> None:
        self.paused = True

    def connectionLost(self, reason: Any) -> None:
        self.connected = False
        if not self.lost.called:
            self.lost.callback(None)


class Front(Resource):
    """The proxy's front resource: forwards every request to ``self.backend``."""

    isLeaf = True

    def __init__(self, proxy: Proxy):
        super().__init__()
        self.proxy = proxy
        self.backend: Backend | None = None
        self.prefix = b""
        self.host_header: bytes | None = None
        self.ends: list[ExchangeEnd] = []
        self.ended: defer.Deferred[ExchangeEnd] | None = None

    def _end(self, end: ExchangeEnd) -> None:
        self.ends.append(end)
        d, self.ended = self.ended, None
        if d is not None:
            d.callback(end)

    def render(self, request: Any) -> Any:
        assert self.backend is not None
        path = request.uri
        if self.prefix and path.startswith(self.prefix):
            path = path[len(self.prefix) :] or b"/"
        return self.proxy.forward(
            request,
            self.backend,
            path,
            prefix=self.prefix,
            host_header=self.host_header,
            on_end=self._end,
        )


def ws_echo_server(ssl_context: Any = None) -> tuple[Any, int, threading.Thread]:
    """A ``websockets`` echo server in a thread; (server, port, thread)."""
    from websockets.sync.server import serve

    def echo(conn: Any) -> None:
        for message in conn:
            conn.send(message)

    server = serve(echo, "127.0.0.1", 0, ssl=ssl_context, compression=None)
    port = server.socket.getsockname()[1]
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    return server, port, t


class ProxyTestBase(TestCase):
    """A proxy in this reactor behind a ``make_site`` on a ``tcp:`` port."""

    timeout = 60

    def setUp(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="dsproxy-")
        self.proxy = Proxy(reactor, pool_size=4, connect_timeout=2.0)
        self.front = Front(self.proxy)
        self.site = make_site(self.front, reactor, max_body=1 << 30, head_timeout=1.0)
        port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(self.proxy.close_idle)
        self.port = port.getHost().port

    def listen_backend(self, factory: Any) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port


class HTTPTests(ProxyTestBase):
    """Plain HTTP through the proxy."""

    @defer.inlineCallbacks
    def test_sequential_requests_reuse_pool(self) -> Any:
        """1,000 sequential requests ride on at most pool-size backend connections."""
        backend_site = CountingSite(Pages())
        self.front.backend = Backend.tcp("127.0.0.1", self.listen_backend(backend_site))
        pool = HTTPConnectionPool(reactor, persistent=True)
        self.addCleanup(pool.closeCachedConnections)
        agent = Agent(reactor, pool=pool)
        for i in range(1000):
            resp = yield agent.request(b"GET", b"http://127.0.0.1:%d/n/%d" % (self.port, i))
            body = yield readBody(resp)
            self.assertEqual(body, b"hello /n/%d host=127.0.0.1:%d" % (i, self.port))
        self.assertLessEqual(backend_site.accepted, 4)
        self.assertGreaterEqual(backend_site.accepted, 1)
        self.assertEqual(len(self.front.ends), 1000)
        self.assertEqual({e.reason for e in self.front.ends}, {"finished"})

    @defer.inlineCallbacks
    def test_location_rewritten(self) -> Any:
        """A redirect on the backend's own origin or root-relative lands under the prefix."""
        self.front.backend = Backend.tcp("127.0.0.1", self.listen_backend(Site(Pages())))
        self.front.prefix = b"/host:backend.example:8080"
        self.front.host_header = b"backend.example:8080"
        agent = Agent(reactor)
        base = b"http://127.0.0.1:%d/host:backend.example:8080" % self.port
        resp = yield agent.request(b"GET", base + b"/redirect")
        yield readBody(resp)
        self.assertEqual(resp.code, 302)
        self.assertEqual(
            resp.headers.getRawHeaders(b"location"),
            [b"/host:backend.example:8080/landed?x=1"],
        )
        resp = yield agent.request(b"GET", base + b"/root-redirect")
        yield readBody(resp)
        self.assertEqual(resp.headers.getRawHeaders(b"location"), [b"/host:backend.example:8080/elsewhere"])
        resp = yield agent.request(b"GET", base + b"/echo")
        body = yield readBody(resp)
        self.assertEqual(body, b"hello /echo host=backend.example:8080")

    @defer.inlineCallbacks
    def test_https_backend(self) -> Any:
        """``tls:`` backend verified against a test CA given as the trust root."""
        certs = make_certs(self.tmp)
        cert = PrivateCertificate.loadPEM(read(certs["key"]) + read(certs["cert"]))
        backend_port = reactor.listenSSL(0, Site(Pages()), cert.options(), interface="127.0.0.1")
        self.addCleanup(backend_port.stopListening)
        trust = Certificate.loadPEM(read(certs["ca"]))
        self.front.proxy = Proxy(reactor, tls_trust=trust)
        self.addCleanup(self.front.proxy.close_idle)
        self.front.backend = Backend.tls("localhost", backend_port.getHost().port, address="127.0.0.1")
        self.front.host_header = b"localhost"
        resp = yield Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/tls" % self.port)
        body = yield readBody(resp)
        self.assertEqual((resp.code, body), (200, b"hello /tls host=localhost"))
        # the same backend with the wrong name fails verification → 502
        self.front.backend = Backend.tls("wrong.example", backend_port.getHost().port, address="127.0.0.1")
        resp = yield Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/tls" % self.port)
        body = yield readBody(resp)
        self.assertEqual(resp.code, 502)
        self.assertIn(b"wrong.example", body)

    @defer.inlineCallbacks
    def test_refused_is_502(self) -> Any:
        """A backend port nobody listens on → 502 naming it; on_end says refused."""
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
        s.close()
        self.front.backend = Backend.tcp("127.0.0.1", dead)
        resp = yield Agent(reactor).request(b"GET", b"http://127.0.0.1:%d/" % self.port)
        body = yield readBody(resp)
        self.assertEqual(resp.code, 502)
        self.assertIn(b"127.0.0.1:%d" % dead, body)
        self.assertEqual(self.front.ends[-1].reason, "refused")

    @defer.inlineCallbacks
    def test_client_gone_aborts_backend(self) -> Any:
        """A client leaving mid-download ends the backend connection; on_end client-gone."""
        lost: defer.Deferred[None] = defer.Deferred()
        f = Factory.forProtocol(lambda: Endless(lost))
        self.front.backend = Backend.tcp("127.0.0.1", self.listen_backend(f))
        ended = self.front.ended = defer.Deferred()

        def client() -> int:
            with socket.create_connection(("127.0.0.1", self.port)) as s:
                s.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
                got = 0
                while got < 1 << 20:
                    got += len(s.recv(65536))
                return got

        got = yield threads.deferToThread(client)
        self.assertGreaterEqual(got, 1 << 20)
        end = yield ended
        yield lost  # the backend saw its connection end
        self.assertEqual(end.reason, "client-gone")
        self.assertEqual(self.proxy.idle_connections(), 0)

    @defer.inlineCallbacks
    def test_slowloris_disconnected(self) -> Any:
        """A client dribbling its request head is cut off at the head deadline (1 s)."""

        def client() -> float:
            start = time.monotonic()
            with socket.create_connection(("127.0.0.1", self.port)) as s:
                s.settimeout(5)
                for b in b"GET / HTTP/1.1\r\nHost: slow\r\nX-Slow: " + b"a" * 100:
                    try:
                        s.sendall(bytes([b]))
                        time.sleep(0.1)
                        s.setblocking(False)
                        try:
                            if s.recv(1) == b"":
                                break
                        except BlockingIOError:
                            pass
                        finally:
                            s.setblocking(True)
                            s.settimeout(5)
                    except OSError:
                        break
                return time.monotonic() - start

        elapsed = yield threads.deferToThread(client)
        self.assertGreater(elapsed, 0.9)
        self.assertLess(elapsed, 3.0)


class TunnelTests(ProxyTestBase):
    """WebSockets through the proxy, on tcp: and ssl: listening ports."""

    def ws_roundtrips(self, uri: str, ssl_context: Any = None) -> list[str]:
        from websockets.sync.client import connect

        out = []
        kwargs: dict[str, Any] = {"ssl": ssl_context} if ssl_context else {}
        if ssl_context:
            kwargs["server_hostname"] = "localhost"
        with connect(uri, compression=None, open_timeout=5, **kwargs) as ws:
            for i in range(20):
                ws.send(f"message {i} " + "y" * i * 100)
                out.append(ws.recv(timeout=5))
            ws.send(b"\x00" * 300000)
            out.append(str(len(ws.recv(timeout=5))))
        return out

    def expected(self) -> list[str]:
        return [f"message {i} " + "y" * i * 100 for i in range(20)] + ["300000"]

    @defer.inlineCallbacks
    def test_websocket_tcp(self) -> Any:
        server, port, t = ws_echo_server()
        self.addCleanup(t.join, 5)
        self.addCleanup(server.shutdown)
        self.front.backend = Backend.tcp("127.0.0.1", port)
        self.front.prefix = b"/x:echo:1:80"
        ended = self.front.ended = defer.Deferred()
        got = yield threads.deferToThread(self.ws_roundtrips, f"ws://127.0.0.1:{self.port}/x:echo:1:80/ws")
        self.assertEqual(got, self.expected())
        end = yield ended
        self.assertEqual((end.reason, end.status), ("tunnel-closed", 101))
        self.assertGreater(end.bytes_out, 300000)

    @defer.inlineCallbacks
    def test_websocket_ssl_listener(self) -> Any:
        certs = make_certs(self.tmp)
        ep = serverFromString(
            reactor,
            f"ssl:0:interface=127.0.0.1:privateKey={certs['key']}:certKey={certs['cert']}",
        )
        lp = yield ep.listen(self.site)
        self.addCleanup(lp.stopListening)
        server, port, t = ws_echo_server()
        self.addCleanup(t.join, 5)
        self.addCleanup(server.shutdown)
        self.front.backend = Backend.tcp("127.0.0.1", port)
        ended = self.front.ended = defer.Deferred()
        ctx = ssl.create_default_context(cafile=certs["ca"])
        got = yield threads.deferToThread(self.ws_roundtrips, f"wss://127.0.0.1:{lp.getHost().port}/ws", ctx)
        self.assertEqual(got, self.expected())
        end = yield ended
        self.assertEqual(end.reason, "tunnel-closed")

    @defer.inlineCallbacks
    def test_half_close_tcp(self) -> Any:
        """Client shuts its write side: the backend sees EOF, answers, and closes."""

        class Upgrader(Protocol):
            buf = b""
            upgraded = False

            def dataReceived(self, data: bytes) -> None:
                if self.upgraded:
                    self.transport.write(data.upper())
                    return
                self.buf += data
                if b"\r\n\r\n" in self.buf:
                    self.upgraded = True
                    rest = self.buf.split(b"\r\n\r\n", 1)[1]
                    self.transport.write(
                        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: raw\r\nConnection: Upgrade\r\n\r\n"
                    )
                    if rest:
                        self.transport.write(rest.upper())

            def readConnectionLost(self) -> None:
                self.transport.write(b"BYE")
                self.transport.loseConnection()

            def writeConnectionLost(self) -> None:
                pass

        from twisted.internet.interfaces import IHalfCloseableProtocol
        from zope.interface import classImplements

        classImplements(Upgrader, IHalfCloseableProtocol)
        self.front.backend = Backend.tcp("127.0.0.1", self.listen_backend(Factory.forProtocol(Upgrader)))
        ended = self.front.ended = defer.Deferred()

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", self.port)) as s:
                s.settimeout(5)
                s.sendall(b"GET /raw HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: raw\r\n\r\nearly")
                head = b""
                while b"\r\n\r\n" not in head:
                    head += s.recv(1)
                s.sendall(b" hello")
                s.shutdown(socket.SHUT_WR)
                rest = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    rest += chunk
                return head + rest

        got = yield threads.deferToThread(client)
        self.assertTrue(got.startswith(b"HTTP/1.1 101 "), got)
        self.assertTrue(got.endswith(b"EARLY HELLOBYE"), got)
        end = yield ended
        self.assertEqual(end.reason, "tunnel-closed")


# -- memory: the proxy in a subprocess --------------------------------------------------

PROXY_SCRIPT = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from dockerspaces.web.backend import Backend
    from dockerspaces.web.proxy import Proxy
    from dockerspaces.web.site import make_site

    backend = Backend.tcp("127.0.0.1", int(sys.argv[1]))
    proxy = Proxy(reactor)

    class Front(Resource):
        isLeaf = True
        def render(self, request):
            return proxy.forward(request, backend, request.uri, prefix=b"", host_header=None)

    port = reactor.listenTCP(0, make_site(Front(), reactor, max_body=1 << 40),
                             interface="127.0.0.1")
    print(port.getHost().port, flush=True)
    reactor.run()
    """
)


class Generator(Protocol):
    """Raw HTTP backend: ``GET /N`` streams N bytes from memory; a body is counted."""

    def connectionMade(self) -> None:
        self.buf = b""
        self.left = 0
        self.body_left: int | None = None
        self.paused = False
        self.chunk = b"z" * 262144

    def dataReceived(self, data: bytes) -> None:
        if self.body_left is not None:
            self.body_left -= len(data)
            self.received += len(data)
            if self.body_left <= 0:
                body = b"%d" % self.received
                self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                self.body_left = None
            return
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        head, rest = self.buf.split(b"\r\n\r\n", 1)
        self.buf = b""
        lines = head.split(b"\r\n")
        method, path = lines[0].split(b" ")[:2]
        length = 0
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        if method == b"POST":
            self.body_left, self.received = length, 0
            if rest:
                self.dataReceived(rest)
            return
        self.left = int(path.strip(b"/"))
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.left)
        self.transport.registerProducer(self, True)
        self.resumeProducing()

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False
        while not self.paused and self.left > 0:
            n = min(self.left, len(self.chunk))
            self.left -= n
            self.transport.write(self.chunk if n == len(self.chunk) else self.chunk[:n])
        if self.left == 0:
            self.transport.unregisterProducer()

    def stopProducing(self) -> None:
        self.paused = True


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


class MemoryTests(TestCase):
    """Big bodies through a proxy subprocess; its RSS must stay bounded."""

    timeout = 60
    BOUND_KB = 100 * 1024  # at most 100 MB growth for a 1 GB / 500 MB body

    def setUp(self) -> None:
        port = reactor.listenTCP(0, Factory.forProtocol(Generator), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", PROXY_SCRIPT, str(port.getHost().port)],
            stdout=subprocess.PIPE,
            env=env,
        )
        self.addCleanup(self._stop)
        assert self.proc.stdout is not None
        self.port = int(self.proc.stdout.readline())
        self.base = rss_kb(self.proc.pid)

    def _stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)

    @defer.inlineCallbacks
    def test_slow_1gb_download(self) -> Any:
        size = 1 << 30

        def client() -> tuple[int, int]:
            peak = 0
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            s.connect(("127.0.0.1", self.port))
            with s:
                s.sendall(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % size)
                head = b""
                while b"\r\n\r\n" not in head:
                    head += s.recv(4096)
                got = len(head.split(b"\r\n\r\n", 1)[1])
                buf = bytearray(65536)
                n = 0
                while got < size:
                    got += s.recv_into(buf)
                    n += 1
                    if n % 64 == 0:
                        time.sleep(0.003)  # ~ <1 GB/s: slower than the backend writes
                    if n % 512 == 0:
                        peak = max(peak, rss_kb(self.proc.pid))
                return got, peak

        got, peak = yield threads.deferToThread(client)
        self.assertEqual(got, size)
        print(f"RSS growth {(peak - self.base) // 1024} MB (base {self.base // 1024} MB)")
        self.assertLess(peak - self.base, self.BOUND_KB)

    @defer.inlineCallbacks
    def test_500mb_upload(self) -> Any:
        size = 500 * 1024 * 1024

        def client() -> tuple[bytes, int]:
            peak = 0
            with socket.create_connection(("127.0.0.1", self.port)) as s:
                s.sendall(b"POST /up HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
                chunk = b"u" * (1 << 20)
                for i in range(size // len(chunk)):
                    s.sendall(chunk)
                    if i % 16 == 0:
                        peak = max(peak, rss_kb(self.proc.pid))
                s.settimeout(30)
                resp = b""
                while not resp.endswith(b"%d" % size):
                    data = s.recv(4096)
                    if not data:
                        break
                    resp += data
                    peak = max(peak, rss_kb(self.proc.pid))
                return resp, peak

        resp, peak = yield threads.deferToThread(client)
        self.assertTrue(resp.startswith(b"HTTP/1.1 200"), resp[:100])
        self.assertTrue(resp.endswith(b"\r\n\r\n%d" % size), resp[-100:])
        print(f"RSS growth {(peak - self.base) // 1024} MB (base {self.base // 1024} MB)")
        self.assertLess(peak - self.base, self.BOUND_KB)
