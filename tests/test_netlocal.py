"""What host: must never reach, read off /proc and the configuration."""

from __future__ import annotations

import ipaddress
import os

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import endpoints
from twisted.trial.unittest import SynchronousTestCase

from dockerspaces.config import Config, HostConfig
from dockerspaces.hostguard import own_ports
from dockerspaces.netlocal import (
    DEFAULT_BRIDGE,
    docker_networks,
    engine_targets,
    interface_addresses,
    listening_ports,
    local_addresses,
    parse_fib_trie,
    parse_if_inet6,
    parse_route_table,
    strports_words,
)

FIB = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.0.0.0/24 2 0 2
        |-- 10.0.0.7
           /32 host LOCAL
        |-- 10.0.0.255
           /32 link BROADCAST
     |-- 172.17.0.1
        /32 host LOCAL
"""
ROUTE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
docker0\t000011AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
br-1a2b\t000012AC\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
"""
INET6 = """fd000000000000000000000000000002 04 40 00 82     eth0
00000000000000000000000000000001 01 80 10 80       lo
"""


class ProcTests(SynchronousTestCase):
    def test_fib_trie_local_addresses(self) -> None:
        self.assertEqual(parse_fib_trie(FIB), {"10.0.0.7", "172.17.0.1"})

    def test_if_inet6(self) -> None:
        self.assertEqual(parse_if_inet6(INET6), {"fd00::2", "::1"})

    def test_docker_bridges_only(self) -> None:
        self.assertEqual(
            parse_route_table(ROUTE),
            {ipaddress.ip_network("172.17.0.0/16"), ipaddress.ip_network("172.18.0.0/16")},
        )

    def test_this_machine(self) -> None:
        """On the test machine itself: loopback is among its addresses, the default
        bridge always refused."""
        self.assertIn("127.0.0.1", local_addresses())
        self.assertIn(DEFAULT_BRIDGE, docker_networks())


class PortsTests(SynchronousTestCase):
    def test_every_strports_form(self) -> None:
        self.assertEqual(
            listening_ports(
                [
                    "tcp:8888",
                    "tcp:port=8889:interface=127.0.0.1",
                    "ssl:port=8443:privateKey=k.pem",
                    "ssl:8444:privateKey=a\\\\:b",
                    "tcp6:port=9000:interface=\\\\:\\\\:1",
                    "unix:/tmp/s",
                    "le:/certs:tcp:443",
                ]
            ),
            {8888, 8889, 8443, 8444, 9000, 443},
        )

    def test_own_ports_of_config(self) -> None:
        c = Config(ports=("tcp:port=7000:interface=0.0.0.0", "ssl:port=7443:privateKey=x"))
        self.assertEqual(own_ports(c), {7000, 7443})

    def test_engine_targets(self) -> None:
        hosts = [
            HostConfig("local", "unix:///var/run/docker.sock", 9100, 2),
            HostConfig("gpu1", "tcp://gpu1.example:2375", 9200, 2),
            HostConfig("peer", "http://peer.example:8888/docker:local", 9300, 1),
            HostConfig("ssh", "ssh://ops@10.1.1.1", 9400, 0),
        ]
        self.assertEqual(
            engine_targets(hosts),
            {
                ("gpu1.example", 2375),
                ("gpu1.example", 9200),
                ("gpu1.example", 9201),
                ("peer.example", 8888),
                ("peer.example", 9300),
                ("10.1.1.1", 22),
            },
        )


#: Twisted's own reader of strports descriptions (private: compared with, never used)
_TWISTED_PARSE = getattr(endpoints, "_parse", None)


class StrportsWordsTests(SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(
            strports_words("tcp:port=8889:interface=127.0.0.1"),
            (["tcp"], {"port": "8889", "interface": "127.0.0.1"}),
        )
        self.assertEqual(
            strports_words("ssl:8444:privateKey=a\\:b"), (["ssl", "8444"], {"privateKey": "a:b"})
        )
        self.assertEqual(strports_words("a=b=c"), ([], {"a": "b=c"}))
        self.assertRaises(ValueError, strports_words, "tcp:8888\\")
        self.assertEqual(listening_ports(["tcp:8888\\", "tcp:8889"]), {8889})

    @settings(max_examples=2000, deadline=None)
    @given(st.text(alphabet=":=\\ab1", max_size=12))
    def test_same_as_twisted(self, description: str) -> None:
        """Read as Twisted's endpoint parser reads it (which fails with a
        RuntimeError on a dangling backslash, where ours raises ValueError)."""
        assert _TWISTED_PARSE is not None
        try:
            theirs: object = _TWISTED_PARSE(description)
        except RuntimeError:
            theirs = ValueError
        try:
            ours: object = strports_words(description)
        except ValueError:
            ours = ValueError
        self.assertEqual(ours, theirs)

    if _TWISTED_PARSE is None:
        test_same_as_twisted.skip = "this Twisted has no endpoints._parse"  # type: ignore[attr-defined]


class InterfaceAddressesTests(SynchronousTestCase):
    """This machine's addresses, re-read while running."""

    def test_interface_addresses_from_proc(self) -> None:
        """Re-read while running from /proc alone (no host-name lookup)."""
        proc = self.mktemp()
        os.makedirs(os.path.join(proc, "net"))
        with open(os.path.join(proc, "net", "fib_trie"), "w") as f:
            f.write("Main:\n  +-- 10.0.0.0/24 2 0 2\n     |-- 10.0.0.7\n        /32 host LOCAL\n")
        with open(os.path.join(proc, "net", "if_inet6"), "w") as f:
            f.write("fd000000000000000000000000000002 04 40 00 82     eth0\n")
        self.assertEqual(interface_addresses(proc), {"10.0.0.7", "fd00::2"})
        self.assertEqual(interface_addresses(os.path.join(proc, "nowhere")), frozenset())
        self.assertIn("127.0.0.1", interface_addresses())
