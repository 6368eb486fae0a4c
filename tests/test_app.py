"""The wiring's own pieces (:mod:`dockerspaces.app`): the exposure warning, the
container-event hook, a user's applications for the home page. Whole requests through
the built service are in ``test_app_requests``."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import SynchronousTestCase


class Exposure(SynchronousTestCase):
    """--auth none warns at start when a port is reachable beyond loopback."""

    def test_exposed_ports(self) -> None:
        from dockerspaces.app import exposed_ports

        ports = (
            "tcp:8888",
            "tcp:8889:interface=127.0.0.1",
            "unix:/run/ds.sock",
            "ssl:443:privateKey=k.pem:certKey=c.pem",
            "tcp6:8890:interface=\\:\\:1",
            "tcp:8891:interface=10.0.0.5",
            "tcp:8892:interface=localhost",
        )
        self.assertEqual(
            exposed_ports(ports),
            ["tcp:8888", "ssl:443:privateKey=k.pem:certKey=c.pem", "tcp:8891:interface=10.0.0.5"],
        )

    def test_warning_names_the_ports_not_the_key_files(self) -> None:
        from twisted.logger import globalLogPublisher

        from dockerspaces.app import warn_if_exposed

        seen: list[dict[str, object]] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        warn_if_exposed(("tcp:8888:interface=127.0.0.1",))
        self.assertEqual([e for e in seen if "--auth none" in str(e.get("log_format"))], [])
        warn_if_exposed(("ssl:443:privateKey=/etc/k.pem:certKey=c.pem",))
        (event,) = [e for e in seen if "--auth none" in str(e.get("log_format"))]
        self.assertEqual(event["ports"], "ssl:443")


class HookTests(SynchronousTestCase):
    def test_container_hook_feeds_usage(self) -> None:
        from dockerspaces.app import container_hook
        from dockerspaces.metrics import Metrics

        seen: list[tuple[Any, ...]] = []

        class Accounts:
            def container_event(self, *args: Any) -> None:
                seen.append(args)

        hook = container_hook(Metrics(), Accounts())  # type: ignore[arg-type]
        hook("start", "x:a", "local", 9100, container="c1", owner="alice", gpus=1)
        hook("evict", "x:a", "local", 9100, container="c1", owner="alice", gpus=1)
        self.assertEqual(seen, [("start", "c1", "x:a", "alice", 1), ("evict", "c1", "x:a", "alice", 1)])


class HomeListTests(SynchronousTestCase):
    def test_held_and_started_for_the_user_links_only_without_env(self) -> None:
        from dockerspaces.app import user_containers
        from dockerspaces.broker.broker import ContainerView
        from dockerspaces.spec import parse_route

        plain, secret = parse_route("x:team:a:1:80"), parse_route("y:team:b:1:80:K=v")
        views = [
            ContainerView("c1", "h", 1, "k1", "A", "idle", 0, plain, (), "alice"),  # type: ignore[arg-type]
            ContainerView("c2", "h", 2, "k2", "B", "busy", 1, secret, ("alice",), "bob"),  # type: ignore[arg-type]
            ContainerView("c3", "h", 3, "k3", "C", "busy", 1, plain, ("bob",), "bob"),
        ]  # type: ignore[arg-type]

        class Broker:
            def containers(self) -> list[ContainerView]:
                return views

        self.assertEqual(
            user_containers(Broker(), "alice"),  # type: ignore[arg-type]
            [("A", "idle", "/x:team:a:1:80/"), ("B", "busy", None)],
        )
