"""The one place dockerspaces calls docker-py's private ``APIClient`` methods.

docker-py's public ``pull`` reads registry credentials from ``~/.docker/config.json``
when it is given none, and hides the HTTP response a pull streams from (which the
engine closes to interrupt a pull at shutdown); its public constructor asks the
engine for the API version before the client's ``trust_env`` can be turned off.
These four functions do what is needed with ``_post``, ``_url``,
``_raise_for_status``, ``_stream_helper``, ``_retrieve_server_version`` and
``_version``: setup.cfg bounds docker-py below its next major for them.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any


def post_streaming(client: Any, path: str, params: Mapping[str, str], headers: Mapping[str, str]) -> Any:
    """POST to the engine API ``path`` (``/images/create``) with a streamed answer and
    no timeout; the ``requests`` response, its status checked (``APIError``)."""
    response = client._post(client._url(path), params=params, headers=headers, stream=True, timeout=None)
    client._raise_for_status(response)
    return response


def json_stream(client: Any, response: Any) -> Iterator[Any]:
    """The decoded JSON objects of a streamed answer (pull progress), as they come."""
    return client._stream_helper(response, decode=True)  # type: ignore[no-any-return]


def server_api_version(client: Any) -> str:
    """The API version the engine speaks (asks it: blocking)."""
    return client._retrieve_server_version()  # type: ignore[no-any-return]


def set_api_version(client: Any, version: str) -> None:
    """Make ``client`` speak API ``version`` (a client built with a pinned one)."""
    client._version = version
