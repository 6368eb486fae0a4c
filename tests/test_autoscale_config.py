"""``[[autoscale]]`` entries (dockerspaces.autoscale.config): defaults, the worker
spec, credentials kept out of reprs and errors, every bad value a ConfigError."""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.autoscale.config import (
    Entry,
    amqp_url_with_credentials,
    load_entries,
    parse_entries,
    parse_entry,
    read_credentials,
)
from dockerspaces.autoscale.policy import Limits
from dockerspaces.config import ConfigError

PASSWORD = "pa:ss@w/rd"


def creds(path: str) -> tuple[str, str]:
    if path.endswith("missing"):
        raise FileNotFoundError(2, "No such file or directory")
    return "scaler", PASSWORD


def table(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "thumbs",
        "image": "team/thumbnailer",
        "amqp": "amqp://rabbit:5672/",
        "credentials": "rabbit.cred",
        "queue": "thumbs",
        "max": 4,
    }
    base.update(kw)
    return {k.replace("_", "-"): v for k, v in base.items() if v is not None}


def parse(**kw: Any) -> Entry:
    return parse_entry(table(**kw), 0, "/etc/ds", creds)


class EntryTests(SynchronousTestCase):
    """A good entry, its defaults and the worker spec built from it."""

    def test_defaults(self) -> None:
        e = parse()
        self.assertEqual(
            (e.tag, e.management, e.vhost, e.amqp_env, e.queue_env),
            ("latest", "http://127.0.0.1:15672", "/", "AMQP_URL", "AMQP_QUEUE"),
        )
        self.assertEqual(e.limits, Limits(10, 1, 0, 4, 300.0, 60.0))
        self.assertEqual((e.interval, e.lag, e.connect_grace), (5.0, 5.0, 30.0))
        self.assertEqual((e.user, e.password), ("scaler", PASSWORD))
        self.assertEqual(e.queue_ref.queue_url, "http://127.0.0.1:15672/api/queues/%2F/thumbs")

    def test_credentials_relative_to_the_config(self) -> None:
        seen: list[str] = []

        def record(path: str) -> tuple[str, str]:
            seen.append(path)
            return "u", "p"

        parse_entry(table(), 0, "/etc/ds", record)
        parse_entry(table(credentials="/abs/c"), 0, "/etc/ds", record)
        self.assertEqual(seen, ["/etc/ds/rabbit.cred", "/abs/c"])

    def test_worker_spec(self) -> None:
        """x:IMAGE:TAG:3 with the entry's env, the AMQP URL (credentials inserted,
        percent-encoded, vhost as path) and the queue; the display shows no value."""
        e = parse(tag="3", env={"SIZE": "256"}, vhost="/", amqp_env="BROKER_URL")
        spec = e.spec
        self.assertTrue(spec.worker)
        self.assertEqual((spec.image, spec.tag, spec.port), ("team/thumbnailer", "3", 3))
        self.assertEqual(
            spec.env_dict,
            {
                "SIZE": "256",
                "BROKER_URL": "amqp://scaler:pa%3Ass%40w%2Frd@rabbit:5672/%2F",
                "AMQP_QUEUE": "thumbs",
            },
        )
        self.assertNotIn("rd@", spec.display)
        self.assertIn("BROKER_URL", spec.display)
        self.assertEqual(
            parse(image="registry.example:5000/team/w").spec.image, "registry.example:5000/team/w"
        )

    def test_amqp_url(self) -> None:
        self.assertEqual(amqp_url_with_credentials("amqp://h", "u", "p", "v"), "amqp://u:p@h/v")
        self.assertEqual(
            amqp_url_with_credentials("amqps://h:5671/own?heartbeat=30", "u", "p", "/"),
            "amqps://u:p@h:5671/own?heartbeat=30",
        )

    def test_password_never_shown(self) -> None:
        e = parse()
        self.assertNotIn(PASSWORD, repr(e))
        self.assertNotIn("pa%3Ass", repr(e))
        self.assertNotIn(PASSWORD, repr(e.queue_ref))

    def test_several_and_none(self) -> None:
        got = parse_entries([table(), table(name="other", queue="q2")], ".", creds)
        self.assertEqual([e.name for e in got], ["thumbs", "other"])
        self.assertEqual(parse_entries(None), ())

    def test_load_file(self) -> None:
        d = self.mktemp()
        os.makedirs(d)
        with open(os.path.join(d, "rabbit.cred"), "w") as f:
            f.write("scaler:secret\n")
        path = os.path.join(d, "ds.toml")
        with open(path, "w") as f:
            f.write(
                'slots = 4\n[[autoscale]]\nname = "a"\nimage = "w"\n'
                'amqp = "amqp://r/"\ncredentials = "rabbit.cred"\nqueue = "q"\nmax = 2\n'
            )
        (e,) = load_entries(path)
        self.assertEqual((e.name, e.user, e.password, e.max), ("a", "scaler", "secret", 2))
        with open(path, "w") as f:
            f.write("slots = 4\n")
        self.assertEqual(load_entries(path), ())
        with open(path, "w") as f:
            f.write("[[autoscale\n")
        self.assertRaises(ConfigError, load_entries, path)
        self.assertRaises(ConfigError, load_entries, os.path.join(d, "nope.toml"))

    def test_read_credentials(self) -> None:
        path = self.mktemp()
        for text, want in (("u:p:q\n", ("u", "p:q")), ("u:\n", ("u", ""))):
            with open(path, "w") as f:
                f.write(text)
            self.assertEqual(read_credentials(path), want)
        for text in ("no colon\n", ":p\n", "u:p\nmore:lines\n"):
            with open(path, "w") as f:
                f.write(text)
            self.assertRaises(ValueError, read_credentials, path)


class ErrorTests(SynchronousTestCase):
    """Every bad value names ``[[autoscale]] NAME: key``; none shows the password."""

    def bad(self, key: str, raw: Any = None, **kw: Any) -> str:
        t = raw if raw is not None else table(**kw)
        with self.assertRaises(ConfigError) as cm:
            parse_entries([t] if not isinstance(t, list) else t, "/etc/ds", creds)
        msg = str(cm.exception)
        self.assertNotIn(PASSWORD, msg)
        self.assertIn(key, msg)
        return msg

    def test_name(self) -> None:
        self.bad("#1: name", table(name=None))
        self.bad("#1: name", table(name="bad name"))
        self.bad("[[autoscale]] thumbs: name: given twice", [table(), table(queue="other")])

    def test_unknown_and_required(self) -> None:
        self.bad("[[autoscale]] thumbs: colour: unknown key", colour="red")
        for key in ("image", "amqp", "credentials", "queue", "max"):
            t = table()
            del t[key]
            self.bad(f"[[autoscale]] thumbs: {key}: is required", t)

    def test_numbers(self) -> None:
        self.bad("thumbs: max: must be >= 1", max=0)
        self.bad("thumbs: max: must be >= 3", min=3, max=2)
        self.bad("thumbs: min: must be >= 0", min=-1)
        self.bad("thumbs: target: must be >= 1", target=0)
        self.bad("thumbs: target: must be a whole number", target=2.5)
        self.bad("thumbs: max: must be a whole number", max=True)
        self.bad("thumbs: activation: must be >= 1", activation=0)
        self.bad("thumbs: interval: must be a finite number > 0", interval=0)
        self.bad("thumbs: cooldown: must be a finite number >= 0", cooldown=-1)
        self.bad("thumbs: stabilization: must be a number of seconds", stabilization="1m")
        self.bad("thumbs: lag: must be a finite number", lag=float("inf"))

    def test_urls(self) -> None:
        self.bad("thumbs: management: must be a http/https URL", management="ftp://x")
        self.bad("thumbs: amqp: must be a amqp/amqps URL", amqp="http://rabbit/")
        self.bad("thumbs: amqp: must not hold credentials", amqp="amqp://u:p@rabbit/")
        self.bad("thumbs: management: bad URL", management="http://rabbit:99999999")

    def test_env_and_spec(self) -> None:
        self.bad("thumbs: env: must be a table", env=["A=1"])
        self.bad("thumbs: env: N: must be a string", env={"N": 1})
        self.bad("thumbs: amqp-env: AMQP_URL is also set in env", env={"AMQP_URL": "x"})
        self.bad("thumbs: queue-env: must differ", queue_env="AMQP_URL")
        self.bad("thumbs: amqp-env: 'no-dash' is not an env var name", amqp_env="no-dash")
        self.bad("thumbs: image/env: ", image="Team/Upper")
        self.bad("thumbs: image/env: ", env={"NVIDIA_VISIBLE_DEVICES": "all"})
        self.bad("thumbs: tag: must be a non-empty string", tag="")

    def test_credentials(self) -> None:
        self.bad("thumbs: credentials: cannot read 'missing'", credentials="missing")

        def no_colon(path: str) -> tuple[str, str]:
            raise ValueError("must hold one line user:password")

        with self.assertRaises(ConfigError) as cm:
            parse_entry(table(), 0, ".", no_colon)
        self.assertIn("thumbs: credentials: 'rabbit.cred' must hold one line", str(cm.exception))

    def test_same_worker_twice(self) -> None:
        self.bad("[[autoscale]] b: the same worker", [table(name="a"), table(name="b")])

    def test_not_a_list(self) -> None:
        with self.assertRaises(ConfigError):
            parse_entries({"name": "x"})
        with self.assertRaises(ConfigError):
            parse_entries(["x"])
