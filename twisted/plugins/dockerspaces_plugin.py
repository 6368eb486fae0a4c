"""twistd plugin: ``twistd -n dockerspaces``; the heavy lifting is in dockerspaces.tap."""

from twisted.application.service import ServiceMaker

dockerspaces = ServiceMaker(
    "dockerspaces",
    "dockerspaces.tap",
    "Reverse proxy that starts Docker containers on demand.",
    "dockerspaces",
)
