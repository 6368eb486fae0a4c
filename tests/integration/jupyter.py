"""The Jupyter test image and its dockerspaces profile (the real-app browser tests).

:data:`JUPYTER` ``dockerspaces-test/jupyter:1`` is Debian's ``jupyter-notebook``
(Notebook 6.4) and ``python3-ipykernel`` on the debootstrap'ed python3 base, with an
empty notebook ``/srv/nb/t.ipynb``; :func:`ensure_jupyter_image` (from
:mod:`tests.integration.images`: blocking, a few minutes the first time, cached by a
content-hash label afterwards) builds it. It has no command of its own: the test's
``[[profile]]`` (:func:`profile`) gives it, telling Jupyter its base URL with
``{public_path}``.
"""

from __future__ import annotations

import json

from .images import JUPYTER, ensure_jupyter_image

__all__ = ["JUPYTER", "NOTEBOOK", "NOTEBOOK_DIR", "PORT", "ensure_jupyter_image", "profile"]

PORT = 8888
NOTEBOOK_DIR = "/srv/nb"
NOTEBOOK = "t.ipynb"


def profile(*, keep: bool, start_delay: int = 0) -> str:
    """The TOML ``[[profile]]`` running Notebook 6 in :data:`JUPYTER`: no token, no
    password (dockerspaces is the gate), its base URL ``{public_path}`` (the route
    prefix with ``prefix = "keep"``, ``/`` on an app host), any ``Host`` and origin,
    ready once ``{public_path}api`` answers. ``start_delay`` seconds before Jupyter
    starts make a browser's cold start show the waiting page for sure (it comes when
    a container is not ready within a second)."""
    command = [
        "jupyter-notebook",
        "--ip=0.0.0.0",
        f"--port={PORT}",
        "--no-browser",
        "--allow-root",
        f"--notebook-dir={NOTEBOOK_DIR}",
        "--NotebookApp.token=",
        "--NotebookApp.password=",
        "--NotebookApp.base_url={public_path}",
        "--NotebookApp.allow_origin=*",
        "--NotebookApp.allow_remote_access=True",
    ]
    if start_delay:
        command = ["sh", "-c", f'sleep {start_delay} && exec "$@"', "-", *command]
    lines = [
        "[[profile]]",
        f'image = "{JUPYTER.split(":")[0]}:*"',
        *(['prefix = "keep"'] if keep else []),
        "command = " + json.dumps(command),
        'ready-path = "{public_path}api"',
        "start-timeout = 120",
    ]
    return "\n".join(lines) + "\n"
