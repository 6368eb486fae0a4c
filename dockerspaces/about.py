"""What ``--version`` prints: dockerspaces' own version with Twisted's and docker-py's."""

from __future__ import annotations

import platform
from importlib import metadata

from . import __version__


def _version_of(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def version_text() -> str:
    """``dockerspaces X (Twisted Y, docker-py Z, Python W)``, from package metadata."""
    try:
        ours = metadata.version("dockerspaces")
    except metadata.PackageNotFoundError:  # running from a checkout without installing
        ours = __version__
    return (
        f"dockerspaces {ours} (Twisted {_version_of('twisted')}, "
        f"docker-py {_version_of('docker')}, Python {platform.python_version()})"
    )
