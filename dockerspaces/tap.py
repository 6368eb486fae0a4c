"""twistd entry: ``Options`` (every option of SPEC's table) and ``makeService``."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

from twisted.application.service import IService
from twisted.python import usage

from .config import Config, ConfigError
from .options import OPTIONS, Opt, build_config

#: an option's row in ``optFlags`` / ``optParameters`` (name, short, [default,] help)
OptionRow = list[str | None]


def _multi_opt(opt: Opt) -> Callable[[Options, str], None]:
    def handler(self: Options, value: str) -> None:
        values = self.given.get(opt.name)
        self.given[opt.name] = [*values, value] if isinstance(values, list) else [value]

    handler.__doc__ = opt.help
    return handler


class Options(usage.Options):
    """``twistd dockerspaces`` options; ``self.config`` is the validated :class:`Config`."""

    synopsis = "[options]"
    longdesc = (
        "Reverse proxy that starts Docker containers on demand: "
        "/x:NAME:TAG:PORT/… starts NAME:TAG and proxies to its PORT."
    )
    optFlags: ClassVar[list[OptionRow]] = [[o.name, None, o.help] for o in OPTIONS if o.flag]
    optParameters: ClassVar[list[OptionRow]] = [
        [o.name, o.short, None, f"{o.help} [default: {o.default}]"]
        for o in OPTIONS
        if not o.flag and not o.multi
    ]

    def __init__(self) -> None:
        super().__init__()
        self.given: dict[str, str | bool | list[str]] = {}  # what was given, by name
        self.config: Config | None = None

    def opt_version(self) -> None:
        """Print dockerspaces' version (with Twisted's and docker-py's) and exit."""
        from .about import version_text

        print(version_text())
        raise SystemExit(0)

    def postOptions(self) -> None:
        """Collect the given options, read ``--config``, validate into a Config."""
        for o in OPTIONS:
            if o.multi:
                continue
            v = self[o.name]
            if o.flag:
                if v:
                    self.given[o.name] = True
            elif v is not None:
                self.given[o.name] = v
        try:
            self.config = build_config(self.given)
            from .web.dockerapi import check_config

            check_config(self.config)
            if self.config.config:
                from .autoscale.config import load_entries

                load_entries(self.config.config)  # [[autoscale]] errors are usage errors
            if self.config.auth == "accounts":
                from .accounts.model import AccountsError
                from .accounts.service import open_snapshot

                try:
                    open_snapshot(self.config.state)  # created, migrated, readable
                except (AccountsError, OSError) as e:
                    raise ConfigError(f"--state {self.config.state}: {e}") from None
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


for _o in OPTIONS:
    if _o.multi:
        setattr(Options, "opt_" + _o.name.replace("-", "_"), _multi_opt(_o))
        if _o.short:
            setattr(Options, "opt_" + _o.short, _multi_opt(_o))


def makeService(options: Options) -> IService:
    """Build the dockerspaces service tree from parsed options (twistd calls this)."""
    from twisted.internet import reactor

    from .app import build_service
    from .logoutput import twistd_destination
    from .procs.parent import build_parent

    if options.config is None:  # postOptions always sets it
        raise usage.UsageError("no configuration")
    # under twistd, ``options.parent`` holds its own options (--logfile, --nodaemon, …)
    log_out = twistd_destination(getattr(options, "parent", None))
    return build_service(options.config, reactor, log_out, split=build_parent)
