"""Running inside a container: detection, the bridge gateway, and the image's entrypoint.

When dockerspaces itself runs in a container with the host's Docker socket mounted,
the slot containers it starts are *siblings*: their published ports live on the host,
not on the container's loopback.  They are reached through the default gateway of the
container's network (the host's bridge address, e.g. ``172.17.0.1``), and must be
published on that address (not ``127.0.0.1``, which only the host itself can reach).

- :func:`in_container` -- ``/.dockerenv`` or a container cgroup.
- :func:`default_gateway` -- the IPv4 default route's gateway from ``/proc/net/route``.
- :func:`local_slot_address` -- the gateway when in a container, else ``None`` (cached);
  :class:`~dockerspaces.config.HostConfig` of a local engine uses it for both the
  publish address and the address slots are reached on.
- :func:`main` -- the image's entrypoint shim (``python -m dockerspaces.inside``): when
  started as root, it adds the unprivileged user to the group owning the mounted Docker
  socket, drops to that user and executes ``docker-spaces`` with the same arguments.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import socket
import struct
import sys

_CGROUP_MARKERS = ("docker", "kubepods", "containerd", "libpod", "lxc")


def in_container(root: str = "/") -> bool:
    """True when this process runs in a container (``/.dockerenv`` or a container cgroup)."""
    if os.path.exists(os.path.join(root, ".dockerenv")) or os.path.exists(
        os.path.join(root, "run/.containerenv")
    ):
        return True
    try:
        with open(os.path.join(root, "proc/1/cgroup"), encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        return False
    return any(m in line for line in text.splitlines() for m in _CGROUP_MARKERS)


def parse_route_table(text: str) -> str | None:
    """The default gateway (dotted IPv4) in the text of ``/proc/net/route``, or None."""
    best: tuple[int, str] | None = None
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 8:
            continue
        try:
            dest, gateway, flags = int(cols[1], 16), int(cols[2], 16), int(cols[3], 16)
            metric, mask = int(cols[6]), int(cols[7], 16)
        except ValueError:
            continue
        # RTF_UP (1) and RTF_GATEWAY (2), destination and mask 0.0.0.0
        if dest != 0 or mask != 0 or flags & 3 != 3 or gateway == 0:
            continue
        ip = socket.inet_ntoa(struct.pack("<I", gateway))
        if best is None or metric < best[0]:
            best = (metric, ip)
    return best[1] if best else None


def has_docker_bridge(text: str) -> bool:
    """True when ``/proc/net/route`` text shows a Docker bridge (``docker0``, ``br-…``) in
    this network namespace: the engine runs beside us (docker-in-docker, a VM), and its
    published ports are on our own addresses."""
    for line in text.splitlines()[1:]:
        iface = line.split("\t", 1)[0].strip()
        if iface == "docker0" or iface.startswith("br-"):
            return True
    return False


def default_gateway(path: str = "/proc/net/route") -> str | None:
    """The IPv4 default gateway of this network namespace, or None."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return parse_route_table(f.read())
    except OSError:
        return None


def sibling_gateway(root: str = "/") -> str | None:
    """The gateway to reach sibling containers' published ports through, or None when
    this process is not in a container or the engine shares its network namespace."""
    if not in_container(root):
        return None
    try:
        with open(os.path.join(root, "proc/net/route"), encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    if has_docker_bridge(text):
        return None
    return parse_route_table(text)


@functools.cache
def local_slot_address() -> str | None:
    """Where a local engine's slot ports are published and reached: the gateway when in a
    container beside the engine, else ``None`` (loopback). ``DOCKERSPACES_LOCAL_ADDRESS``
    overrides (an IP address, or ``none`` for loopback)."""
    override = os.environ.get("DOCKERSPACES_LOCAL_ADDRESS")
    if override:
        return None if override.lower() == "none" else str(ipaddress.ip_address(override))
    return sibling_gateway()


# --- the image's entrypoint shim ------------------------------------------------------

RUN_AS = os.environ.get("DOCKERSPACES_USER", "dockerspaces")
PROGRAM = os.environ.get("DOCKERSPACES_PROGRAM", "docker-spaces")


def socket_path(argv: list[str]) -> str | None:
    """The unix socket named by ``--docker``/``-docker`` in ``argv`` (default socket)."""
    url = "unix:///var/run/docker.sock"
    for i, arg in enumerate(argv):
        name, eq, value = arg.lstrip("-").partition("=")
        if name == "docker":
            if eq:
                url = value
            elif i + 1 < len(argv):
                url = argv[i + 1]
    if not url.startswith("unix://"):
        return None
    return url[len("unix://") :] or None


def drop_privileges(argv: list[str], user: str = RUN_AS) -> None:
    """As root: join the Docker socket's group, become ``user``. Otherwise do nothing."""
    if os.geteuid() != 0:
        return
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        return  # no such user in this image: stay as we are
    groups = {pw.pw_gid}
    path = socket_path(argv)
    if path:
        try:
            groups.add(os.stat(path).st_gid)
        except OSError:
            pass  # no socket mounted: the engine will report it
    os.setgroups(sorted(groups))
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    os.environ["HOME"] = pw.pw_dir
    os.environ["USER"] = os.environ["LOGNAME"] = user


def main(argv: list[str] | None = None) -> None:
    """Entrypoint shim: drop privileges (see module doc), then exec ``docker-spaces``."""
    args = sys.argv[1:] if argv is None else argv
    drop_privileges(args)
    program = PROGRAM
    if os.sep not in program:
        here = os.path.join(os.path.dirname(sys.executable), program)
        program = here if os.path.exists(here) else program
    os.execvp(program, [program, *args])  # noqa: S606 - the image's entrypoint becomes it


if __name__ == "__main__":  # pragma: no cover - exercised by the image test
    main()
