"""``docker-spaces``: the original's flags translate to the same Config as the twistd
options (:mod:`dockerspaces.compat`)."""

from __future__ import annotations

import os
import tempfile

from twisted.trial.unittest import SynchronousTestCase

from dockerspaces import compat
from dockerspaces.config import Config
from dockerspaces.tap import Options


def parse(*argv: str) -> Config:
    o = Options()
    o.parseOptions(list(argv))
    assert o.config is not None
    return o.config


def parse_compat(*argv: str) -> Config:
    return parse(*compat.translate(list(argv)))


class Compat(SynchronousTestCase):
    """The original's flags give the same Config as the twistd options."""

    def test_seed_cluster(self) -> None:
        self.assertEqual(
            parse_compat("-p", "8888", "-source", "10", "-cluster", "19100:5:unix:///var/run/docker.sock"),
            parse("--port", "tcp:8888", "--source", "10", "--cluster", "19100:5:unix:///var/run/docker.sock"),
        )

    def test_registry_user_password(self) -> None:
        a = parse_compat(
            "-p",
            "8888",
            "-registry",
            "https://registry.example",
            "--user",
            "dev",
            "--password",
            "PASSWORD",
            "-source",
            "10",
        )
        b = parse(
            "--port",
            "tcp:8888",
            "--registry",
            "https://registry.example",
            "--user",
            "dev",
            "--password",
            "PASSWORD",
            "--source",
            "10",
        )
        self.assertEqual(a, b)

    def test_double_dash_equals_and_port_alias(self) -> None:
        self.assertEqual(
            parse_compat("--port=9000", "-target=4"), parse("--port", "tcp:9000", "--target", "4")
        )

    def test_gpu_forms(self) -> None:
        for argv, gpu in [
            (["-gpu", "-target", "2"], -1),
            (["-gpu=true", "-target", "2"], -1),
            (["--gpu", "true", "-target", "2"], -1),
            (["-gpu", "2", "-target", "4"], 2),
            (["-gpu=false"], 0),
        ]:
            with self.subTest(argv=argv):
                self.assertEqual(parse_compat(*argv).gpu, gpu)

    def test_tls(self) -> None:
        tmp = self.mktemp()
        os.makedirs(tmp)
        self.addCleanup(os.chdir, os.getcwd())
        os.chdir(tmp)
        with open("cert.pem", "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
        args = compat.translate(
            [
                "-p",
                "1100",
                "-tls",
                "-cors",
                "-cert",
                "cert.pem",
                "-key",
                "privkey.pem",
                "--user",
                "U",
                "--password",
                "P",
                "-gpu",
                "2",
                "-target",
                "4",
            ]
        )
        c = parse(*args)
        self.assertEqual(c.ports, ("ssl:1100:privateKey=privkey.pem:certKey=cert.pem",))
        self.assertTrue(c.cors)
        self.assertEqual((c.gpu, c.target, c.user), (2, 4, "U"))
        self.assertEqual(compat.translate(["-s", "-p", "1", "-cert", "cert.pem", "-key", "k"])[1][:4], "ssl:")

    def test_full_chain_cert_keeps_chain(self) -> None:
        fd, path = tempfile.mkstemp(suffix=".pem")
        block = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        with os.fdopen(fd, "w") as f:
            f.write(block.replace("AAAA", "LEAF") + block.replace("AAAA", "MID"))
        self.addCleanup(os.unlink, path)
        (desc,) = compat.translate(["-tls", "-cert", path, "-key", "k.pem"])[1:]
        self.assertIn("extraCertChain=", desc)
        chain = desc.split("extraCertChain=")[1].replace("\\:", ":")
        self.addCleanup(os.unlink, chain)
        with open(chain) as f:
            text = f.read()
        self.assertIn("MID", text)
        self.assertNotIn("LEAF", text)

    def test_tls_needs_cert(self) -> None:
        self.assertRaises(compat.CompatError, compat.translate, ["-tls", "-p", "1"])

    def test_unknown_and_missing(self) -> None:
        self.assertRaises(compat.CompatError, compat.translate, ["-frobnicate", "1"])
        self.assertRaises(compat.CompatError, compat.translate, ["-source"])
        self.assertRaises(compat.CompatError, compat.translate, ["stray"])

    def test_long_options_pass_through(self) -> None:
        self.assertEqual(parse_compat("--queue", "50", "--keep-containers", "-cors").queue, 50)

    def test_help_lists_flags(self) -> None:
        for flag in (
            "-p",
            "-docker",
            "-registry",
            "-user",
            "-password",
            "-email",
            "-source",
            "-target",
            "-cluster",
            "-gpu",
            "-stop",
            "-release",
            "-tls",
            "-cert",
            "-key",
            "-cors",
            "-start-port",
            "-root",
        ):
            self.assertIn(flag, compat.USAGE)
