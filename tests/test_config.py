"""The Config's derived values (:mod:`dockerspaces.config`)."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.config import Config


class InstanceNameTests(SynchronousTestCase):
    """The default ``--instance`` survives recreating a dockerspaces container."""

    def test_in_a_container_it_does_not_depend_on_the_hostname(self) -> None:
        c = Config(ports=("tcp:port=8888:interface=0.0.0.0",))
        self.assertEqual(c.instance_name(in_container=True), "dockerspaces-8888")

    def test_on_a_machine_hostname_and_port(self) -> None:
        name = Config(ports=("tcp:9999",)).instance_name(in_container=False)
        self.assertTrue(name.endswith("-9999"), name)
        self.assertNotEqual(name, "dockerspaces-9999")

    def test_explicit_instance_wins(self) -> None:
        self.assertEqual(Config(instance="team").instance_name(in_container=True), "team")
