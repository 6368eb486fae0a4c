"""Options: every option, its default, bad values; compat flags map to the same Config."""

from __future__ import annotations

import os
import tempfile
from typing import ClassVar

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces import compat
from dockerspaces.config import Config, HostConfig
from dockerspaces.options import OPTIONS
from dockerspaces.spec import HostTarget
from dockerspaces.tap import Options


def parse(*argv: str) -> Config:
    o = Options()
    o.parseOptions(list(argv))
    assert o.config is not None
    return o.config


def parse_compat(*argv: str) -> Config:
    return parse(*compat.translate(list(argv)))


class Defaults(SynchronousTestCase):
    """The defaults of SPEC's options table."""

    def test_defaults(self) -> None:
        c = parse()
        expected = {
            "ports": ("tcp:8888",),
            "docker": "unix:///var/run/docker.sock",
            "target": 5,
            "start_port": 9100,
            "cluster": (),
            "gpu": 0,
            "source": 15,
            "queue": 1000,
            "queue_timeout": 300.0,
            "start_timeout": 600.0,
            "worker_timeout": 1800.0,
            "release": 1800.0,
            "stop": 0.0,
            "pull": "missing",
            "registry": None,
            "user": None,
            "password": None,
            "password_file": None,
            "email": None,
            "auths": None,
            "allow_image": (),
            "publish_ip": None,
            "instance": None,
            "keep_containers": False,
            "cors": False,
            "root": None,
            "allow_host": (),
            "docker_api": False,
            "docker_api_allow": ("127.0.0.0/8",),
            "docker_api_token_file": None,
            "config": None,
            "log_format": "text",
            "max_body": 8 * 1024**3,
            "worker_post_only": False,
            "worker_release_max": 0,
            "worker_slots": -1,
            "no_host_route": False,
        }
        for field, value in expected.items():
            self.assertEqual(getattr(c, field), value, field)
        self.assertEqual(c, Config())

    def test_every_option_in_table_exists(self) -> None:
        names = {o.name for o in OPTIONS}
        spec_names = {
            "port",
            "docker",
            "target",
            "start-port",
            "cluster",
            "gpu",
            "source",
            "queue",
            "queue-timeout",
            "start-timeout",
            "worker-timeout",
            "release",
            "stop",
            "pull",
            "registry",
            "user",
            "password",
            "password-file",
            "email",
            "auths",
            "allow-image",
            "publish-ip",
            "instance",
            "keep-containers",
            "cors",
            "root",
            "allow-host",
            "docker-api",
            "docker-api-allow",
            "docker-api-token-file",
            "config",
            "log-format",
            "max-body",
            # issue 12: worker limits and the host: switch
            "worker-post-only",
            "worker-release-max",
            "worker-slots",
            "no-host-route",
            # issue 13: accounts
            "auth",
            "state",
            "session-lifetime",
            # issue 14: apps on their own hosts, the public URL
            "app-domain",
            "public-url",
            # issue 17: a swarm's nodes as hosts
            "swarm",
            # issue 18: the HTTP side in N processes
            "workers",
        }
        self.assertEqual(names, spec_names)

    def test_single_host(self) -> None:
        (h,) = parse("--target", "2", "--start-port", "9200").hosts()
        self.assertEqual(h, HostConfig("local", "unix:///var/run/docker.sock", 9200, 2, 0, "127.0.0.1"))


class Values(SynchronousTestCase):
    """Each option's value lands in Config."""

    def test_values(self) -> None:
        token = self.mktemp()
        with open(token, "w") as f:
            f.write("tok\n")
        c = parse(
            "--port",
            "tcp:1234",
            "--port",
            "unix:/tmp/s",
            "--docker",
            "tcp://h:2375",
            "--target",
            "3",
            "--source",
            "7",
            "--queue",
            "9",
            "--queue-timeout",
            "1.5",
            "--start-timeout",
            "20",
            "--worker-timeout",
            "30",
            "--release",
            "40",
            "--stop",
            "5",
            "--pull",
            "never",
            "--registry",
            "https://r.example",
            "--user",
            "u",
            "--password",
            "p",
            "--email",
            "e@x",
            "--auths",
            "a.json",
            "--allow-image",
            "team/*",
            "--allow-image",
            "x:1",
            "--publish-ip",
            "0.0.0.0",
            "--instance",
            "i1",
            "--keep-containers",
            "--cors",
            "--root",
            "example.org:81",
            "--allow-host",
            "10.0.0.0/8",
            "--docker-api",
            "--docker-api-allow",
            "10.1.0.0/16",
            "--docker-api-token-file",
            token,
            "--log-format",
            "json",
            "--max-body",
            "1MiB",
            "--gpu",
            "2",
        )
        self.assertEqual(c.ports, ("tcp:1234", "unix:/tmp/s"))
        self.assertEqual((c.target, c.source, c.queue), (3, 7, 9))
        self.assertEqual(
            (c.queue_timeout, c.start_timeout, c.worker_timeout, c.release, c.stop),
            (1.5, 20.0, 30.0, 40.0, 5.0),
        )
        self.assertEqual(c.pull, "never")
        self.assertEqual(
            (c.registry, c.user, c.password, c.email, c.auths),
            ("https://r.example", "u", "p", "e@x", "a.json"),
        )
        self.assertEqual(c.allow_image, ("team/*", "x:1"))
        self.assertEqual((c.publish_ip, c.instance_name()), ("0.0.0.0", "i1"))
        self.assertTrue(c.keep_containers and c.cors and c.docker_api)
        self.assertEqual(c.root, HostTarget("example.org", 81))
        self.assertEqual(c.allow_host, ("10.0.0.0/8",))
        self.assertEqual(c.docker_api_allow, ("10.1.0.0/16",))
        self.assertEqual((c.docker_api_token_file, c.log_format, c.max_body), (token, "json", 1024**2))
        (h,) = c.hosts()
        self.assertEqual((h.url, h.slots, h.gpus, h.publish_ip), ("tcp://h:2375", 3, 2, "0.0.0.0"))
        self.assertEqual([h.gpu_for(i) for i in range(3)], [0, 1, 0])
        self.assertNotIn("p", repr(c).replace("pull", "").split("password")[0][-3:])

    def test_password_not_in_repr(self) -> None:
        self.assertNotIn("s3cret", repr(parse("--password", "s3cret")))

    def test_cluster(self) -> None:
        c = parse(
            "--cluster",
            "19100:5:http://10.0.0.2:7878/docker:local",
            "--cluster",
            "12100:5:unix:///var/run/docker.sock",
            "--target",
            "9",
        )
        hosts = c.hosts()
        self.assertEqual(
            [(h.name, h.start_port, h.slots) for h in hosts],
            [("10.0.0.2:7878", 19100, 5), ("local", 12100, 5)],
        )
        self.assertEqual([h.publish_ip for h in hosts], ["0.0.0.0", "127.0.0.1"])
        self.assertEqual(hosts[0].address, "10.0.0.2")

    def test_gpu_true_is_one_per_slot(self) -> None:
        c = parse("--gpu", "true", "--target", "4")
        self.assertEqual(c.hosts()[0].gpus, 4)
        self.assertEqual([c.hosts()[0].gpu_for(i) for i in range(4)], [0, 1, 2, 3])


class BadValues(SynchronousTestCase):
    """A bad value is a usage error naming the option."""

    cases: ClassVar[list[tuple[list[str], str]]] = [
        (["--target", "-1"], "--target"),
        (["--target", "x"], "--target"),
        (["--start-port", "70000"], "--start-port"),
        (["--source", "0"], "--source"),
        (["--queue-timeout", "soon"], "--queue-timeout"),
        (["--stop", "-3"], "--stop"),
        (["--pull", "sometimes"], "--pull"),
        (["--docker", "ftp://x"], "--docker"),
        (["--docker", "tcp://host"], "needs a port"),
        (["--cluster", "19100:5"], "--cluster"),
        (["--cluster", "x:5:unix:///s"], "--cluster"),
        (["--cluster", "19100:-1:unix:///s"], "SLOTS"),
        (["--cluster", "65535:5:unix:///s"], "out of"),
        (["--cluster", "1:1:http://h"], "needs a port"),
        (["--cluster", "1:1:gopher://h:1"], "scheme"),
        (["--publish-ip", "localhost"], "--publish-ip"),
        (["--docker-api-allow", "nope"], "--docker-api-allow"),
        (["--log-format", "xml"], "--log-format"),
        (["--max-body", "lots"], "--max-body"),
        (["--gpu", "many"], "--gpu"),
        (["--root", "a b"], "--root"),
        (["--password", "a", "--password-file", "f"], "--password"),
        (["--config", "/nonexistent/ds.toml"], "--config"),
    ]

    def test_bad(self) -> None:
        for argv, words in self.cases:
            with self.subTest(argv=argv):
                e = self.assertRaises(usage.UsageError, parse, *argv)
                self.assertIn(words, str(e))


class ConfigFile(SynchronousTestCase):
    """--config: TOML with every option; the command line wins; errors name the key."""

    def write(self, text: str) -> str:
        fd, path = tempfile.mkstemp(suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.addCleanup(os.unlink, path)
        return path

    def test_file_and_precedence(self) -> None:
        path = self.write(
            'port = ["tcp:7000"]\nsource = 3\ntarget = 2\ncors = true\nqueue_timeout = 9\n'
            'allow-image = "team/*"\n'
            '[[profile]]\nimage = "selmaproject/*"\nvolumes = ["/models:/models:ro"]\n'
            'shm-size = "1g"\nmemory = "4g"\ncpus = 1.5\nready-path = "/health"\ngpu = false\n'
        )
        c = parse("--config", path, "--source", "5")
        self.assertEqual(c.ports, ("tcp:7000",))
        self.assertEqual((c.source, c.target, c.cors, c.queue_timeout), (5, 2, True, 9.0))
        self.assertEqual(c.allow_image, ("team/*",))
        (p,) = c.profiles
        self.assertEqual(
            (p.pattern, p.volumes, p.shm_size, p.mem_limit, p.cpus, p.ready_path, p.gpu),
            ("selmaproject/*", ("/models:/models:ro",), "1g", "4g", 1.5, "/health", False),
        )

    def test_worker_limits(self) -> None:
        """--worker-release-max globally and per profile; --worker-slots; the flag."""
        path = self.write('worker-slots = 2\n[[profile]]\nimage = "team/*"\nworker-release-max = 3\n')
        c = parse("--config", path, "--worker-release-max", "1", "--worker-post-only")
        self.assertEqual((c.worker_slots, c.worker_release_max, c.worker_post_only), (2, 1, True))
        self.assertEqual(c.profiles[0].worker_release_max, 3)
        from dockerspaces.app import run_options_for
        from dockerspaces.spec import parse_route

        resolve = run_options_for(c)
        self.assertEqual(resolve(parse_route("x:team:w:1:3")).worker_release_max, 3)
        self.assertIsNone(resolve(parse_route("x:other:w:1:3")).worker_release_max)
        self.assertIsNone(parse().worker_post_only or None)
        self.assertRaises(usage.UsageError, parse, "--worker-slots", "-2")

    def test_unknown_key(self) -> None:
        e = self.assertRaises(usage.UsageError, parse, "--config", self.write("sorce = 3\n"))
        self.assertIn("sorce", str(e))

    def test_bad_value_names_key(self) -> None:
        e = self.assertRaises(usage.UsageError, parse, "--config", self.write("target = 'many'\n"))
        self.assertIn("'target'", str(e))

    def test_bad_toml(self) -> None:
        e = self.assertRaises(usage.UsageError, parse, "--config", self.write("target = = 1\n"))
        self.assertIn("TOML", str(e))

    def test_bad_profile(self) -> None:
        e = self.assertRaises(
            usage.UsageError, parse, "--config", self.write("[[profile]]\nimage='a'\nvolume=['x']\n")
        )
        self.assertIn("volume", str(e))


class AuthOptions(SynchronousTestCase):
    """--auth, --state, --session-lifetime and the config file's [auth] table."""

    def test_defaults_and_flags(self) -> None:
        c = parse()
        self.assertEqual((c.auth, c.session_lifetime), ("none", 86400.0))
        import os
        import tempfile

        from twisted.python.usage import UsageError

        state = os.path.join(tempfile.mkdtemp(), "s.sqlite")
        c = parse("--auth", "accounts", "--state", state, "--session-lifetime", "600")
        self.assertEqual((c.auth, c.state, c.session_lifetime), ("accounts", state, 600.0))
        self.assertTrue(os.path.exists(state))  # created (and migrated) at option time
        self.assertRaises(UsageError, parse, "--auth", "ldap")
        with self.assertRaises(UsageError) as e:
            parse("--auth", "accounts", "--state", "/nonexistent-dir/s.sqlite")
        self.assertIn("cannot open the state file", str(e.exception))

    def test_auth_table_in_the_config_file(self) -> None:
        import os
        import tempfile

        from dockerspaces.config import ConfigError
        from dockerspaces.options import build_config

        d = tempfile.mkdtemp()
        path = os.path.join(d, "c.toml")
        with open(path, "w") as f:
            f.write('target = 1\n[auth]\nmode = "accounts"\nstate = "/s.sqlite"\nsession-lifetime = 60\n')
        c = build_config({"config": path})
        self.assertEqual((c.auth, c.state, c.session_lifetime), ("accounts", "/s.sqlite", 60.0))
        with open(path, "w") as f:
            f.write('[auth]\nrealm = "x"\n')
        with self.assertRaises(ConfigError) as e:
            build_config({"config": path})
        self.assertIn("[auth]: unknown key 'realm'", str(e.exception))

    def test_the_example_config_parses(self) -> None:
        import os

        from dockerspaces.options import build_config

        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        c = build_config({"config": os.path.join(here, "conf", "dockerspaces.toml")})
        self.assertEqual(c.auth, "none")


class DefaultsOnce(SynchronousTestCase):
    """Defaults are declared once, on Config; the option table and the broker settings
    read them (issue 15)."""

    def test_option_and_broker_defaults_are_configs(self) -> None:
        import attrs

        from dockerspaces.broker.model import BrokerSettings

        config_defaults = {f.name: f.default for f in attrs.fields(Config)}
        for o in OPTIONS:
            self.assertEqual(o.default, config_defaults[o.field], o.name)
        for f in attrs.fields(BrokerSettings):
            if f.name in config_defaults:
                self.assertEqual(f.default, config_defaults[f.name], f.name)

    def test_broker_settings_from_config(self) -> None:
        from dockerspaces.broker.model import BrokerSettings

        c = parse("--source", "3", "--queue-timeout", "9", "--worker-slots", "2")
        s = BrokerSettings.from_config(c)
        self.assertEqual((s.source, s.queue_timeout, s.worker_slots, s.queue), (3, 9.0, 2, 1000))
