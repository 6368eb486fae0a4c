"""What ``host:`` must never reach, read off this machine and the configuration.

- :func:`local_addresses` -- every address of every local interface (IPv4 from
  ``/proc/net/fib_trie``, IPv6 from ``/proc/net/if_inet6``, plus what the host name
  resolves to), not just what ``gethostname()`` gives;
- :func:`docker_networks` -- the ranges of Docker's bridge networks (routes on
  ``docker0``, ``br-*``, ``docker_gwbridge``; ``172.17.0.0/16`` always), where slot
  containers have their own addresses;
- :func:`listening_ports` -- the TCP ports of ``--port`` strports descriptions, in
  every form (``tcp:8888``, ``tcp:port=8888:interface=…``, ``ssl:port=…``, ``tcp6:…``);
- :func:`engine_targets` -- each engine's and peer's address and port (and the slot
  ports of remote engines): ``host:`` to one of them is root on that host.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from .config import HostConfig

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Docker's default bridge, refused even when no route names it
DEFAULT_BRIDGE = ipaddress.ip_network("172.17.0.0/16")

_BRIDGE_PREFIXES = ("docker", "br-")


def _read(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def parse_fib_trie(text: str) -> set[str]:
    """IPv4 addresses marked ``/32 host LOCAL`` in ``/proc/net/fib_trie``."""
    out: set[str] = set()
    last: str | None = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith(("|--", "+--")):
            last = s[3:].strip().split(" ")[0]
        elif "host LOCAL" in s and last is not None:
            out.add(last)
    return out


def parse_if_inet6(text: str) -> set[str]:
    """IPv6 addresses of ``/proc/net/if_inet6``."""
    out: set[str] = set()
    for line in text.splitlines():
        parts = line.split()
        if parts and len(parts[0]) == 32:
            raw = parts[0]
            out.add(str(ipaddress.IPv6Address(":".join(raw[i : i + 4] for i in range(0, 32, 4)))))
    return out


def parse_route_table(text: str, prefixes: tuple[str, ...] = _BRIDGE_PREFIXES) -> set[IPNetwork]:
    """Networks routed on interfaces whose name starts with one of ``prefixes``
    (``/proc/net/route``: little-endian hex destination and mask)."""
    out: set[IPNetwork] = set()
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 8 or not parts[0].startswith(prefixes):
            continue
        try:
            dest = socket.inet_ntoa(int(parts[1], 16).to_bytes(4, "little"))
            mask = socket.inet_ntoa(int(parts[7], 16).to_bytes(4, "little"))
            net = ipaddress.ip_network(f"{dest}/{mask}", strict=False)
        except (ValueError, OverflowError):
            continue
        if net.prefixlen > 0:
            out.add(net)
    return out


def interface_addresses(proc: str = "/proc") -> frozenset[str]:
    """Every address of this machine's interfaces, read off ``/proc`` alone (no host
    name lookup, which could block on DNS): safe to call again while running."""
    return frozenset(
        parse_fib_trie(_read(f"{proc}/net/fib_trie")) | parse_if_inet6(_read(f"{proc}/net/if_inet6"))
    )


def local_addresses(proc: str = "/proc") -> frozenset[str]:
    """Every address of this machine's interfaces and what its host name resolves
    to (blocking: at start-up only)."""
    out = set(interface_addresses(proc))
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            out.add(str(info[4][0]).split("%")[0])
    except OSError:
        pass
    return frozenset(out)


def docker_networks(proc: str = "/proc") -> frozenset[IPNetwork]:
    """Docker bridge network ranges on this machine (always the default bridge)."""
    return frozenset(parse_route_table(_read(f"{proc}/net/route")) | {DEFAULT_BRIDGE})


def strports_words(description: str) -> tuple[list[str], dict[str, str]]:
    """A strports description's positional and ``key=value`` parameters, read as
    Twisted's endpoint parser reads them (``:`` separates, ``=`` assigns once, a
    backslash escapes the next character); ValueError for a dangling backslash.

    Twisted's own reader is private (``_parse`` in ``twisted.internet.endpoints``), hence
    this one (compared with it in tests/test_netlocal.py)."""
    args: list[str] = []
    kw: dict[str, str] = {}
    words: list[str] = []
    current: list[str] = []
    assigned = False  # after a ``=``, only ``:`` separates
    chars = iter(description)
    for c in chars:
        if c == ":" or (c == "=" and not assigned):
            words.append("".join(current))
            current = []
            if c == "=":
                assigned = True
                continue
            if len(words) == 1:
                args.append(words[0])
            else:
                kw[words[0]] = words[1]
            words, assigned = [], False
        elif c == "\\":
            escaped = next(chars, None)
            if escaped is None:
                raise ValueError(f"strports description ends in a backslash: {description!r}")
            current.append(escaped)
        else:
            current.append(c)
    words.append("".join(current))
    if len(words) == 1:
        args.append(words[0])
    else:
        kw[words[0]] = words[1]
    return args, kw


def listening_ports(descriptions: Iterable[str]) -> set[int]:
    """TCP ports of strports descriptions, whatever their form (``unix:`` has none)."""
    ports: set[int] = set()
    for desc in descriptions:
        try:
            args, kw = strports_words(desc)
        except (ValueError, IndexError):
            continue
        if not args or args[0].lower() not in ("tcp", "tcp6", "ssl", "tls", "systemd"):
            # other plugins (le:, txtorcon…) put the port in their own place
            candidates = [a for a in args[1:] if a.isdigit()]
        else:
            candidates = [kw["port"]] if "port" in kw else list(args[1:2])
        for c in candidates:
            if str(c).isdigit() and 0 < int(c) < 65536:
                ports.add(int(c))
    return ports


def _url_target(url: str) -> tuple[str, int] | None:
    parts = urlsplit(url)
    if parts.scheme in ("unix", "npipe", "") or not parts.hostname:
        return None
    default = {"ssh": 22, "https": 443, "http": 80, "tcp": 2375}.get(parts.scheme, 2375)
    try:
        port = parts.port or default
    except ValueError:
        port = default
    return parts.hostname.lower(), port


def engine_targets(hosts: Iterable[HostConfig], docker_url: str | None = None) -> frozenset[tuple[str, int]]:
    """(host, port) of every engine and peer (``/docker:local``) and of every remote
    engine's slot ports: ``host:`` must reach none of them."""
    out: set[tuple[str, int]] = set()
    urls = [h.url for h in hosts] + ([docker_url] if docker_url else [])
    for url in urls:
        t = _url_target(url)
        if t is not None:
            out.add(t)
    for h in hosts:
        t = _url_target(h.url)
        if t is None:
            continue
        for i in range(h.slots):
            out.add((t[0], h.start_port + i))
    return frozenset(out)
