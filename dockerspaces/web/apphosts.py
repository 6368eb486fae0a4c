"""Where an app is public: under its route prefix, or on a host of its own.

Without ``--app-domain`` an ``x:``/``y:`` app lives under ``/SEGMENT/`` on the main host
(its *public path*, the canonical segment: env sorted). With ``--app-domain DOMAIN``
every key has a stable host name ``LABEL.DOMAIN`` (:func:`app_label`: a readable part
from the image and tag plus a hash of the key -- never an env value) and lives at its
root: a browser opening ``/x:…/`` or ``/y:…/`` on the main host is sent there, and every
request for that host goes to that key with its path untouched.

:class:`AppHosts` remembers which key a label names (labels handed out, and the keys of
the broker's containers, adopted ones too) and where clients reach this server (the
scheme and host of the last request for a key, or ``--public-url``), from which each
container is told ``DOCKERSPACES_PUBLIC_PATH`` and ``DOCKERSPACES_PUBLIC_URL``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit

from attrs import define, evolve, field
from twisted.web.server import Request

from ..spec import JobSpec

#: labels remembered (least recently used go first; the broker's containers stay findable)
MAX_LABELS = 4096
#: keys whose last origin is remembered
MAX_ORIGINS = 4096
#: hash characters in a label (base32: 50 bits; collisions only by design of an attacker
#: who can already choose keys, and then only between that attacker's own apps)
HASH_CHARS = 10
#: longest readable part of a label (a DNS label is at most 63 characters)
READABLE_MAX = 40

_NOT_DNS = re.compile(r"[^a-z0-9]+")


def app_label(spec: JobSpec) -> str:
    """The stable DNS label of ``spec``'s key: ``NAME-TAG-HASH`` from the image's last
    name part and tag (lower-cased, other characters as ``-``) and a base32 hash of the
    whole key (mode, image, tag, port and env), e.g. ``tts-777-b4c7q2x0ka``."""
    readable = _NOT_DNS.sub("-", f"{spec.name[-1]}-{spec.tag}".lower()).strip("-")[:READABLE_MAX]
    digest = hashlib.sha256(spec.key.encode("utf-8", "surrogateescape")).digest()
    h = base64.b32encode(digest).decode("ascii").lower()[:HASH_CHARS]
    return f"{readable.rstrip('-')}-{h}" if readable else h


def public_path(spec: JobSpec) -> str:
    """The route prefix of ``spec``'s key with a trailing slash, env sorted (the same
    for every spelling of the key), e.g. ``/y:acme:jupyter:1:8888/``."""
    return "/" + evolve(spec, env=tuple(sorted(spec.env))).segment() + "/"


def host_name(host: bytes | None) -> bytes | None:
    """A ``Host`` header's name, lower-cased, without port (None for an IP literal in
    brackets or no header)."""
    if not host or host.startswith(b"["):
        return None
    return host.rpartition(b":")[0].lower() if b":" in host else host.lower()


def _port_of(host: bytes | None) -> str:
    """``:PORT`` of a ``Host`` header (empty without one)."""
    if not host:
        return ""
    name, colon, port = host.rpartition(b":")
    if colon and name and port.isdigit():
        return ":" + port.decode("ascii")
    return ""


@define
class AppHosts:
    """The apps' public places (see module): labels, origins, public paths and URLs."""

    domain: str | None = None  # --app-domain
    public_url: str | None = None  # --public-url (scheme://host[:port])
    #: the specs of the broker's containers (a label handed out before a restart)
    known: Callable[[], Iterable[JobSpec]] = lambda: ()
    _labels: OrderedDict[str, JobSpec] = field(factory=OrderedDict, repr=False)
    #: --workers: told of a new label (``"app"``, label, segment) and of a key's new
    #: origin (``"origin"``, key, JSON), for the other processes
    noted: Callable[[str, str, str], None] | None = field(default=None, repr=False)
    _origins: dict[str, tuple[bool, bytes | None]] = field(factory=dict, repr=False)
    _suffix: bytes = field(init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        self._suffix = b"." + self.domain.encode("ascii") if self.domain else b""

    # -- labels ---------------------------------------------------------------------
    def remember(self, spec: JobSpec) -> str:
        """``spec``'s label, remembered so that its host routes to it."""
        label = app_label(spec)
        if self.noted is not None and label not in self._labels:
            self.noted("app", label, spec.segment())
        self._keep(label, spec)
        return label

    def _keep(self, label: str, spec: JobSpec) -> None:
        self._labels[label] = spec
        self._labels.move_to_end(label)
        while len(self._labels) > MAX_LABELS:
            self._labels.popitem(last=False)

    def lookup(self, label: str) -> JobSpec | None:
        """The key a label names: one handed out, else one of the broker's containers'."""
        spec = self._labels.get(label)
        if spec is not None:
            return spec
        for s in self.known():
            if not s.worker and app_label(s) == label:
                self.remember(s)
                return s
        return None

    def learn(self, label: str, spec: JobSpec) -> None:
        """Hold a label another process handed out."""
        if label not in self._labels:
            self._keep(label, spec)

    def label_of(self, host: bytes | None) -> str | None:
        """The label when ``host`` (a ``Host`` header) is ``LABEL.DOMAIN`` (one label,
        any port), else None (the main host, or no ``--app-domain``)."""
        suffix = self._suffix
        if not suffix:
            return None
        name = host_name(host)
        if name is None or not name.endswith(suffix):
            return None
        label = name[: -len(suffix)]
        if not label or b"." in label:
            return None
        return label.decode("ascii", "replace")

    # -- where clients reach us ---------------------------------------------------------
    def note(self, request: Request, spec: JobSpec) -> None:
        """Remember how this request reached us (scheme and ``Host``) for ``spec``'s key:
        the public URL a container of it is told when it starts."""
        secure, host = request.isSecure(), request.requestHeaders.getRawHeaders(b"host", [None])[0]
        if self.noted is not None and self._origins.get(spec.key) != (secure, host):
            self.noted(
                "origin", spec.key, json.dumps([secure, None if host is None else host.decode("latin-1")])
            )
        self.set_origin(spec.key, secure, host)

    def set_origin(self, key: str, secure: bool, host: bytes | None) -> None:
        """What :meth:`note` remembers, for ``key`` (noted in a ``--workers`` child)."""
        origins = self._origins
        if len(origins) >= MAX_ORIGINS:
            origins.clear()
        origins[key] = (secure, host)

    def _origin(self, secure: bool, host: bytes | None, name: str | None) -> str | None:
        """``scheme://NAME[:port]`` (``name`` None: the host itself) from ``--public-url``
        when set, else from the request's scheme and ``Host``."""
        if self.public_url is not None:
            parts = urlsplit(self.public_url)
            if name is None:
                return self.public_url
            return f"{parts.scheme}://{name}" + (f":{parts.port}" if parts.port else "")
        if not host:
            return None
        scheme = "https" if secure else "http"
        if name is None:
            return f"{scheme}://{host.decode('latin-1')}"
        return f"{scheme}://{name}{_port_of(host)}"

    def app_origin(self, spec: JobSpec, secure: bool, host: bytes | None) -> str | None:
        """``scheme://LABEL.DOMAIN[:port]`` of ``spec``'s own host (remembered), the
        scheme and port those of ``--public-url`` or else of the request's."""
        label = self.remember(spec)
        return self._origin(secure, host, f"{label}.{self.domain}")

    def origin_of(self, label: str) -> str | None:
        """The origin of app host ``label`` by ``--public-url``'s scheme and port (the
        sign-in hand-off); None for a label no app has, or without ``--public-url``."""
        spec = self.lookup(label)
        if spec is None or self.public_url is None:
            return None
        return self.app_origin(spec, False, None)

    def redirect_to(self, request: Request, spec: JobSpec, path: bytes) -> bytes | None:
        """The URL on ``spec``'s own host for ``path`` (path and query), for a browser
        on the main host; None when it cannot be told (no ``Host``, no --public-url)."""
        host = request.requestHeaders.getRawHeaders(b"host", [None])[0]
        origin = self.app_origin(spec, request.isSecure(), host)
        return None if origin is None else origin.encode("ascii") + path

    def path_for(self, spec: JobSpec) -> str:
        """``DOCKERSPACES_PUBLIC_PATH``: ``/`` on an app host, else the public path."""
        return "/" if self.domain else public_path(spec)

    def url_for(self, spec: JobSpec) -> str:
        """``DOCKERSPACES_PUBLIC_URL``: where browsers reach the app (``--public-url``, or
        the last request for the key); the path alone when neither says (an
        autoscaled worker)."""
        secure, host = self._origins.get(spec.key, (False, None))
        origin = self.app_origin(spec, secure, host) if self.domain else self._origin(secure, host, None)
        return (origin or "") + self.path_for(spec)

    def link(self, spec: JobSpec, secure: bool = False, host: bytes | None = None) -> str | None:
        """The app's public URL for pages (the monitor, the dashboard, the home page):
        on its own host when that can be told (``--public-url``, or the page's own
        request), else its route on the main host (a browser is sent on from there) --
        but a route only for keys without env values (they stay out of pages)."""
        if self.domain:
            origin = self.app_origin(spec, secure, host)
            if origin is not None:
                return origin + "/"
        return None if spec.env else public_path(spec)

    def host_of(self, spec: JobSpec) -> str | None:
        """``LABEL.DOMAIN`` of ``spec`` (remembered); None without ``--app-domain``."""
        return f"{self.remember(spec)}.{self.domain}" if self.domain else None
