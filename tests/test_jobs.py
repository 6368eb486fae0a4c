"""JobResource / HostResource with a fake broker and a fake proxy (no sockets)."""

from __future__ import annotations

from typing import Any

from attrs import define, field
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import NOT_DONE_YET
from twisted.web.test.requesthelper import DummyRequest

from dockerspaces.broker.errors import Overloaded, QueueTimeout
from dockerspaces.spec import HostTarget, JobSpec, parse_route
from dockerspaces.web.jobs import HostResource, HostRoute, JobResource, image_allowed
from dockerspaces.web.proxy import ExchangeEnd
from dockerspaces.web.routing import HostPolicy


@define
class FakeLease:
    endpoint: str = "tcp:127.0.0.1:9100"
    queued_for: float = 0.0
    released: int = 0
    failures: int = 0
    retries: list[Deferred[Any]] = field(factory=list)
    retried_failed: list[bool] = field(factory=list)
    confirms: list[Deferred[bool]] = field(factory=list)
    graces: list[float] = field(factory=list)

    def confirm(self, grace: float) -> Deferred[bool]:
        self.graces.append(grace)
        self.confirms.append(Deferred())
        return self.confirms[-1]

    def died_before(self, when: float, grace: float) -> Deferred[bool]:
        self.graces.append(grace)
        self.confirms.append(Deferred())
        return self.confirms[-1]

    def release(self) -> None:
        self.released += 1

    def failed(self) -> None:
        self.failures += 1

    def retry(self, failed: bool = True) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.retries.append(d)
        self.retried_failed.append(failed)
        return d


@define
class FakeBroker:
    result: Any = None
    acquired: list[JobSpec] = field(factory=list)
    workers: list[JobSpec] = field(factory=list)
    pending: list[Deferred[Any]] = field(factory=list)
    cancelled: int = 0

    def acquire(self, spec: JobSpec, progress: Any = None) -> Deferred[Any]:
        self.acquired.append(spec)
        return self._result()

    def launch_worker(self, spec: JobSpec, progress: Any = None) -> Deferred[Any]:
        self.workers.append(spec)
        return self._result()

    def _result(self) -> Deferred[Any]:
        if self.result is None:
            d: Deferred[Any] = Deferred(lambda _: setattr(self, "cancelled", self.cancelled + 1))
            self.pending.append(d)
            return d
        if isinstance(self.result, Exception):
            return fail(self.result)
        return succeed(self.result)


@define
class FakeProxy:
    calls: list[dict[str, Any]] = field(factory=list)

    def forward(self, request: Any, backend: Any, path: bytes, **kw: Any) -> Any:
        self.calls.append(dict(kw, backend=backend, path=path))
        return NOT_DONE_YET


def job(segment: str, broker: FakeBroker, proxy: FakeProxy, allow: tuple[str, ...] = ()) -> JobResource:
    spec = parse_route(segment)
    assert isinstance(spec, JobSpec)
    return JobResource(
        spec, b"/" + segment.encode(), b"/rest?q", broker=broker, proxy=proxy, allow_image=allow
    )  # type: ignore[arg-type]


class JobResourceTests(SynchronousTestCase):
    """Acquire, forward, release; errors as answers."""

    def test_forward_and_release_once(self) -> None:
        lease, proxy = FakeLease(), FakeProxy()
        res = job("x:team:app:1:8080", FakeBroker(result=lease), proxy)
        request = DummyRequest([b""])
        self.assertEqual(res.render(request), NOT_DONE_YET)
        (call,) = proxy.calls
        self.assertEqual(call["backend"].description, "tcp:127.0.0.1:9100")
        self.assertEqual(call["path"], b"/rest?q")
        self.assertEqual(call["prefix"], b"/x:team:app:1:8080")
        self.assertIsNone(call["host_header"])
        call["on_end"](ExchangeEnd("finished", 200, 10))
        self.assertEqual((lease.released, lease.failures), (1, 0))

    def test_unforwarded_goes_to_another_container(self) -> None:
        """A request that never reached its container is handed back to the broker
        (``Lease.retry``) and forwarded again on the new lease; the first forward may
        also resend a bodiless GET the backend closed, later ones only what was
        provably not forwarded."""
        lease, proxy = FakeLease(), FakeProxy()
        request = DummyRequest([b""])
        job("x:team:app:1:8080", FakeBroker(result=lease), proxy).render(request)
        self.assertEqual(proxy.calls[0]["retry_unforwarded"], 2)
        proxy.calls[0]["on_end"](ExchangeEnd("unforwarded", None, 0))
        (d,) = lease.retries
        self.assertEqual((lease.released, lease.failures), (0, 0))  # retry() consumed it
        second = FakeLease(endpoint="tcp:127.0.0.1:9101")
        d.callback(second)
        self.assertEqual(proxy.calls[1]["backend"].description, "tcp:127.0.0.1:9101")
        self.assertEqual(proxy.calls[1]["retry_unforwarded"], 1)
        proxy.calls[1]["on_end"](ExchangeEnd("finished", 200, 3))
        self.assertEqual((second.released, lease.released), (1, 0))

    def test_close_delimited_answers_are_confirmed_by_the_broker(self) -> None:
        """The proxy asks the lease (``Lease.confirm``) before completing a
        close-delimited answer, with the grace for Docker's die event."""
        from dockerspaces.web.jobs import CLOSE_GRACE

        lease, proxy = FakeLease(), FakeProxy()
        job("x:team:app:1:8080", FakeBroker(result=lease), proxy).render(DummyRequest([b""]))
        self.assertIsInstance(proxy.calls[0]["confirm_close"](), Deferred)
        self.assertEqual(lease.graces, [CLOSE_GRACE])

    def test_the_proxy_may_ask_whether_the_container_died_before_a_send(self) -> None:
        """``died_before`` goes to ``Lease.died_before`` with the grace for Docker's die
        event and an inspect; its "unforwarded" end hands the request back failed."""
        from dockerspaces.web.jobs import EXIT_GRACE

        lease, proxy = FakeLease(), FakeProxy()
        job("x:team:app:1:8080", FakeBroker(result=lease), proxy).render(DummyRequest([b""]))
        self.assertIs(proxy.calls[0]["died_before"](12.5), lease.confirms[0])
        self.assertEqual(lease.graces, [EXIT_GRACE])
        proxy.calls[0]["on_end"](ExchangeEnd("unforwarded", None, 0))
        self.assertEqual(lease.retried_failed, [True])

    def test_unanswered_get_is_sent_again_failing_only_a_dead_container(self) -> None:
        """A bodiless GET without an answer goes again (once: the next forward allows
        only unforwarded hand-backs); the container is failed only when the broker
        confirms it died."""
        for alive in (True, False):
            lease, proxy = FakeLease(), FakeProxy()
            job("x:team:app:1:8080", FakeBroker(result=lease), proxy).render(DummyRequest([b""]))
            proxy.calls[0]["on_end"](ExchangeEnd("unanswered", None, 0))
            self.assertEqual(lease.retries, [])  # waits for the broker's word
            lease.confirms[0].callback(alive)
            self.assertEqual(lease.retried_failed, [not alive])
            lease.retries[0].callback(FakeLease(endpoint="tcp:127.0.0.1:9101"))
            self.assertEqual(proxy.calls[1]["retry_unforwarded"], 1)

    def test_retry_refused_by_the_broker_is_an_answer(self) -> None:
        lease, proxy = FakeLease(), FakeProxy()
        request = DummyRequest([b""])
        job("x:team:app:1:8080", FakeBroker(result=lease), proxy).render(request)
        proxy.calls[0]["on_end"](ExchangeEnd("unforwarded", None, 0))
        lease.retries[0].errback(QueueTimeout("waited too long"))
        self.assertEqual(request.responseCode, 503)
        self.assertEqual(request.finished, 1)

    def test_unforwarded_after_the_client_left_fails_the_container(self) -> None:
        lease, proxy = FakeLease(), FakeProxy()
        request = DummyRequest([b""])
        job("x:team:app:1:8080", FakeBroker(result=lease), proxy).render(request)
        request.processingFailed(Failure(ConnectionDone("gone")))
        request.channel = None  # type: ignore[attr-defined]  # as a real Request's connectionLost does
        proxy.calls[0]["on_end"](ExchangeEnd("unforwarded", None, 0))
        self.assertEqual((lease.failures, lease.retries), (1, []))

    def test_cut_response_does_not_fail_the_container(self) -> None:
        lease, proxy = FakeLease(), FakeProxy()
        job("y:team:app:1:8080", FakeBroker(result=lease), proxy).render(DummyRequest([b""]))
        proxy.calls[0]["on_end"](ExchangeEnd("backend-error", 200, 5))
        self.assertEqual((lease.released, lease.failures), (1, 0))

    def test_broker_errors_are_answers(self) -> None:
        for err, status, retry in [
            (QueueTimeout("waited too long"), 503, b"10"),
            (Overloaded("queue full"), 503, b"5"),
        ]:
            request = DummyRequest([b""])
            job("x:team:app:1:8080", FakeBroker(result=err), FakeProxy()).render(request)
            self.assertEqual(request.responseCode, status)
            self.assertEqual(request.responseHeaders.getRawHeaders(b"retry-after"), [retry])
            self.assertIn(str(err).encode(), b"".join(request.written))
            self.assertEqual(request.finished, 1)

    def test_client_gone_while_waiting_cancels(self) -> None:
        broker = FakeBroker()
        request = DummyRequest([b""])
        job("x:team:app:1:8080", broker, FakeProxy()).render(request)
        self.assertEqual(len(broker.pending), 1)
        request.processingFailed(Failure(ConnectionDone("gone")))
        self.assertEqual(broker.cancelled, 1)  # cancelled: the broker takes it off the queue
        self.assertEqual(request.finished, 0)

    def test_worker_post_only(self) -> None:
        """With --worker-post-only a GET cannot pin a slot: 405, nothing launched."""
        spec = parse_route("x:team:worker:1:3")
        assert isinstance(spec, JobSpec)
        broker = FakeBroker(result=object())
        res = JobResource(
            spec,
            b"/x:team:worker:1:3",
            b"/",
            broker=broker,
            proxy=FakeProxy(),
            allow_image=(),
            worker_post_only=True,
        )  # type: ignore[arg-type]
        request = DummyRequest([b""])
        res.render(request)
        self.assertEqual((request.responseCode, broker.workers), (405, []))
        self.assertEqual(request.responseHeaders.getRawHeaders(b"allow"), [b"POST"])
        request = DummyRequest([b""])
        request.method = b"POST"
        res.render(request)
        self.assertEqual((request.responseCode, broker.workers), (200, [spec]))

    def test_allow_image(self) -> None:
        broker = FakeBroker(result=FakeLease())
        request = DummyRequest([b""])
        body = job("x:evil:miner:1:80", broker, FakeProxy(), allow=("team/*",)).render(request)
        self.assertEqual(request.responseCode, 403)
        self.assertIn(b"--allow-image", body)
        self.assertEqual(broker.acquired, [])
        spec = parse_route("x:team:app:1:80")
        assert isinstance(spec, JobSpec)
        self.assertTrue(image_allowed(("team/*",), spec))
        self.assertTrue(image_allowed(("team/app:1",), spec))
        self.assertFalse(image_allowed(("team/app:2",), spec))
        self.assertTrue(image_allowed((), spec))

    def test_worker_launch_answers_empty_200(self) -> None:
        broker = FakeBroker(result=object())
        request = DummyRequest([b""])
        job("x:team:worker:1:3:Q=amqp%3A%2F%2Fmq", broker, FakeProxy()).render(request)
        self.assertEqual(len(broker.workers), 1)
        self.assertEqual(request.responseCode, 200)
        self.assertEqual(b"".join(request.written), b"")
        self.assertEqual(request.finished, 1)


class HostResourceTests(SynchronousTestCase):
    """host: checks the policy before forwarding."""

    def test_forbidden(self) -> None:
        target = parse_route("host:127.0.0.1:8080")
        proxy = FakeProxy()
        res = HostResource(
            target,
            b"/host:127.0.0.1:8080",
            b"/",
            proxy=proxy,  # type: ignore[arg-type]
            policy=HostPolicy(allow=(), own_ports=set()),
            cookie=True,
        )
        request = DummyRequest([b""])
        res.render(request)
        self.assertEqual(request.responseCode, 403)
        self.assertIn(b"loopback", b"".join(request.written))
        self.assertEqual(proxy.calls, [])

    def test_allowed_forwards_with_host_header(self) -> None:
        target = parse_route("host:127.0.0.1:8080")
        proxy = FakeProxy()
        res = HostResource(
            target,
            b"/host:127.0.0.1:8080",
            b"/a",
            proxy=proxy,  # type: ignore[arg-type]
            policy=HostPolicy(allow=("127.0.0.1",), own_ports={8888}),
            cookie=True,
        )
        res.render(DummyRequest([b""]))
        (call,) = proxy.calls
        self.assertEqual(call["backend"].description, "tcp:127.0.0.1:8080")
        self.assertEqual(call["host_header"], b"127.0.0.1:8080")
        self.assertEqual(call["set_route_cookie"], "host:127.0.0.1:8080")

    def test_name_is_resolved_then_forwarded(self) -> None:
        """A host name goes the Deferred way: resolve, check every address, forward."""
        target = parse_route("host:db.internal:5432")
        proxy = FakeProxy()
        pending: Deferred[list[str]] = Deferred()
        policy = HostPolicy(allow=(), own_ports=set(), resolve=lambda name: pending)
        res = HostResource(
            target,
            b"/host:db.internal:5432",
            b"/",
            proxy=proxy,  # type: ignore[arg-type]
            policy=policy,
            cookie=False,
        )
        request = DummyRequest([b""])
        self.assertEqual(res.render(request), NOT_DONE_YET)
        self.assertEqual(proxy.calls, [])
        pending.callback(["10.0.0.5"])
        (call,) = proxy.calls
        self.assertEqual(call["backend"].description, "tcp:10.0.0.5:5432")
        self.assertEqual(call["host_header"], b"db.internal:5432")
        self.assertIsNone(call["set_route_cookie"])

    def test_name_resolving_to_loopback_refused(self) -> None:
        target = parse_route("host:sneaky.example:80")
        proxy = FakeProxy()
        policy = HostPolicy(
            allow=(), own_ports=set(), resolve=lambda name: succeed(["93.184.216.34", "127.0.0.1"])
        )
        res = HostResource(
            target,
            b"/host:sneaky.example:80",
            b"/",
            proxy=proxy,  # type: ignore[arg-type]
            policy=policy,
            cookie=True,
        )
        request = DummyRequest([b""])
        res.render(request)
        self.assertEqual(request.responseCode, 403)
        self.assertEqual(proxy.calls, [])


class HostRouteTests(SynchronousTestCase):
    """The shared resource of a host: segment forwards each request's own rest of URI."""

    def route(self, segment: str, policy: HostPolicy, proxy: FakeProxy) -> HostRoute:
        target = parse_route(segment)
        assert isinstance(target, HostTarget)
        return HostRoute(
            target,
            b"/" + segment.encode(),
            proxy=proxy,  # type: ignore[arg-type]
            policy=policy,
        )

    def request(self, uri: bytes) -> DummyRequest:
        r = DummyRequest([b""])
        r.uri = uri
        return r

    def test_each_request_its_own_path(self) -> None:
        proxy = FakeProxy()
        res = self.route("host:10.0.0.7:8080", HostPolicy(allow=(), own_ports=set()), proxy)
        for uri in (b"/host:10.0.0.7:8080/a/b?x=1", b"/host:10.0.0.7:8080/", b"/host:10.0.0.7:8080/c"):
            self.assertEqual(res.render(self.request(uri)), NOT_DONE_YET)
        self.assertEqual([c["path"] for c in proxy.calls], [b"/a/b?x=1", b"/", b"/c"])
        self.assertEqual({c["backend"].description for c in proxy.calls}, {"tcp:10.0.0.7:8080"})
        self.assertEqual({c["set_route_cookie"] for c in proxy.calls}, {"host:10.0.0.7:8080"})
        self.assertEqual({c["prefix"] for c in proxy.calls}, {b"/host:10.0.0.7:8080"})

    def test_forbidden(self) -> None:
        proxy = FakeProxy()
        res = self.route("host:127.0.0.1:8080", HostPolicy(allow=(), own_ports=set()), proxy)
        request = self.request(b"/host:127.0.0.1:8080/")
        res.render(request)
        self.assertEqual(request.responseCode, 403)
        self.assertEqual(proxy.calls, [])

    def test_name_goes_the_resolving_way(self) -> None:
        proxy = FakeProxy()
        pending: Deferred[list[str]] = Deferred()
        policy = HostPolicy(allow=(), own_ports=set(), resolve=lambda name: pending)
        res = self.route("host:db.internal:5432", policy, proxy)
        res.render(self.request(b"/host:db.internal:5432/q"))
        self.assertEqual(proxy.calls, [])
        pending.callback(["10.0.0.5"])
        (call,) = proxy.calls
        self.assertEqual((call["backend"].description, call["path"]), ("tcp:10.0.0.5:5432", b"/q"))
