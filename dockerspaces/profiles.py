"""Image profiles applied: the run options of a key, and whether its app keeps its prefix.

The first ``[[profile]]`` whose ``image`` pattern matches ``name:tag`` (or ``name``)
applies; its ``command``, ``env`` and ``ready-path`` may use ``{public_path}`` and
``{public_url}`` (:class:`~dockerspaces.web.apphosts.AppHosts`), filled in when the
container is created, and every container is told both as ``DOCKERSPACES_PUBLIC_PATH``
and ``DOCKERSPACES_PUBLIC_URL``.
"""

from __future__ import annotations

import fnmatch

from attrs import define, field

from .config import Config, ImageProfile
from .engine.interface import RunOptions
from .spec import JobSpec
from .web.apphosts import AppHosts, public_path

#: specs whose profile is remembered
CACHED = 1024


@define
class Profiles:
    """The profile of each key, and what follows from it (see module)."""

    config: Config
    apps: AppHosts = field(factory=AppHosts)
    _cache: dict[JobSpec, ImageProfile | None] = field(factory=dict, repr=False)

    def profile_for(self, spec: JobSpec) -> ImageProfile | None:
        """The first profile matching ``spec``'s image (remembered per spec)."""
        cache = self._cache
        if spec in cache:
            return cache[spec]
        found = None
        for p in self.config.profiles:
            if fnmatch.fnmatchcase(spec.ref, p.pattern) or fnmatch.fnmatchcase(spec.image, p.pattern):
                found = p
                break
        if len(cache) >= CACHED:
            cache.clear()
        cache[spec] = found
        return found

    def keeps_prefix(self, spec: JobSpec) -> bool:
        """True when ``spec``'s app gets the whole path, route segment included: its
        profile says ``prefix = "keep"`` and apps are not on hosts of their own (there
        every app lives at the root)."""
        if self.config.app_domain:
            return False
        p = self.profile_for(spec)
        return p is not None and p.prefix == "keep"

    def cookie_paths(self, spec: JobSpec) -> bool:
        """False when ``spec``'s profile says ``cookie-path = "as-sent"``: a stripped
        app's ``Set-Cookie`` paths are passed on, not put under its prefix."""
        p = self.profile_for(spec)
        return p is None or p.cookie_path == "prefix"

    def kept_prefix(self, spec: JobSpec) -> bytes:
        """The prefix a ``keep`` app is forwarded under (its public path less the
        trailing slash: every spelling of the key reaches it the same way)."""
        return public_path(spec)[:-1].encode("latin-1")

    def run_options(self, spec: JobSpec) -> RunOptions:
        """``spec``'s run options: its profile's, placeholders filled, the public path
        and URL added to the env."""
        path, url = self.apps.path_for(spec), self.apps.url_for(spec)
        public = (("DOCKERSPACES_PUBLIC_PATH", path), ("DOCKERSPACES_PUBLIC_URL", url))
        p = self.profile_for(spec)
        if p is None:
            return RunOptions(env=public)
        values = {"public_path": path, "public_url": url}
        return RunOptions(
            volumes=p.volumes,
            shm_size=p.shm_size,
            mem_limit=p.mem_limit,
            nano_cpus=int(p.cpus * 1e9) if p.cpus else None,
            network=p.network,
            ready_path=p.ready_path.format_map(values),
            start_timeout=p.start_timeout,
            gpu=p.gpu,
            worker_release_max=p.worker_release_max,
            command=None if p.command is None else tuple(c.format_map(values) for c in p.command),
            env=tuple((k, v.format_map(values)) for k, v in p.env) + public,
        )
