"""``docker-spaces``: the original's command line, running the same twistd service.

The original (Go) took single- or double-dash flags (``-p 8888``, ``-gpu``,
``-gpu=true``, ``--gpu 2``, ``-tls -cert F -key F``).  :func:`translate` maps them
onto ``twistd dockerspaces`` options; :func:`main` runs twistd in the foreground,
logging to stdout, with no pid file.  Every long option of the twistd plugin is
accepted too (``--queue 50``, ``--config FILE``, …).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

from .options import OPTIONS

# the original's flag → our option name (None: handled specially)
_ALIASES = {
    "p": "port",
    "port": "port",
    "s": "tls",
    "tls": "tls",
    "cert": "cert",
    "key": "key",
}
_TAKES_VALUE = {o.name for o in OPTIONS if not o.flag} | {"cert", "key"}
_FLAGS = {o.name for o in OPTIONS if o.flag} | {"tls"}
_GPU_VALUE = re.compile(r"(?:true|false|yes|no|on|off|\d+)\Z", re.IGNORECASE)

USAGE = """Usage: docker-spaces [flags]

The original docker-spaces flags (single or double dash):
  -p, -port N           listen on port N (default 8888)
  -tls, -s              serve HTTPS on that port (needs -cert and -key)
  -cert FILE            certificate (a full chain is kept)
  -key FILE             private key
  -docker URL           Docker engine (unix:///var/run/docker.sock, ssh://, tcp://, http://)
  -registry URL         registry the credentials belong to (default Docker Hub)
  -user U  -password P  -email E   registry credentials
  -source N             x: requests admitted at once (15)
  -target N             container slots on the engine (5)
  -start-port N         first slot port (9100)
  -cluster P:N:URL      one engine with N slots from port P (repeatable)
  -gpu [N|true]         GPUs per host; bare -gpu / true = one GPU per slot
  -stop S               SIGTERM→SIGKILL grace (0)
  -release S            worker protection after start (1800)
  -cors                 CORS for browser callers
  -root HOST[:PORT]     default host for unmatched paths

Every option of `twistd dockerspaces` is accepted as well:
""" + "\n".join(f"  --{o.name}{'' if o.flag else ' VALUE'}  {o.help}" for o in OPTIONS)


class CompatError(ValueError):
    """A command line the original's grammar cannot parse."""


def _split_chain(cert_path: str) -> tuple[str, str | None]:
    """Leaf certificate file and, for a full chain, a file with the rest of the chain."""
    try:
        with open(cert_path, encoding="ascii", errors="replace") as f:
            pem = f.read()
    except OSError as e:
        raise CompatError(f"-cert: cannot read {cert_path!r}: {e.strerror}") from None
    certs = re.findall(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", pem, re.DOTALL)
    if len(certs) <= 1:
        return cert_path, None
    fd, chain = tempfile.mkstemp(prefix="dockerspaces-chain-", suffix=".pem")
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(certs[1:]) + "\n")
    return cert_path, chain


def _escape(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def translate(argv: list[str]) -> list[str]:
    """Map the original's flags to ``twistd dockerspaces`` arguments."""
    out: list[str] = []
    ports: list[str] = []
    tls = False
    cert = key = None
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("-") or arg in ("-", "--"):
            raise CompatError(f"unexpected argument {arg!r}")
        name, eq, value = arg.lstrip("-").partition("=")
        name = _ALIASES.get(name, name)
        if name in ("h", "help"):
            raise CompatError("help")
        if name == "gpu":
            if not eq:
                if i < len(argv) and _GPU_VALUE.match(argv[i]):
                    value = argv[i]
                    i += 1
                else:
                    value = "true"
            out += ["--gpu", value]
            continue
        if name in _FLAGS:
            on = (value.lower() in ("", "true", "1", "yes", "on")) if eq else True
            if name == "tls":
                tls = on
            elif on:
                out.append("--" + name)
            continue
        if name not in _TAKES_VALUE:
            raise CompatError(f"unknown flag {arg!r} (see docker-spaces --help)")
        if not eq:
            if i >= len(argv):
                raise CompatError(f"flag {arg!r} needs a value")
            value = argv[i]
            i += 1
        if name == "port":
            ports.append(value)
        elif name == "cert":
            cert = value
        elif name == "key":
            key = value
        else:
            out += ["--" + name, value]
    if not ports:
        ports = ["8888"]
    for p in ports:
        if not p.isdigit():
            out += ["--port", p]  # already an endpoint description
        elif tls:
            if not cert or not key:
                raise CompatError("-tls needs -cert FILE and -key FILE")
            leaf, chain = _split_chain(cert)
            desc = f"ssl:{p}:privateKey={_escape(key)}:certKey={_escape(leaf)}"
            if chain:
                desc += f":extraCertChain={_escape(chain)}"
            out += ["--port", desc]
        else:
            out += ["--port", f"tcp:{p}"]
    return out


def main(argv: list[str] | None = None) -> None:
    """Console entry point: translate the flags and run twistd in the foreground."""
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("--version", "-version", "-V"):
        from .about import version_text

        print(version_text())
        raise SystemExit(0)
    try:
        plugin_args = translate(args)
    except CompatError as e:
        if str(e) == "help":
            print(USAGE)
            raise SystemExit(0) from None
        print(f"docker-spaces: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    from twisted.scripts.twistd import run

    sys.argv = ["docker-spaces", "--nodaemon", "--pidfile=", "--logfile=-", "dockerspaces", *plugin_args]
    run()
