# dockerspaces as a container: the reverse proxy that starts Docker containers on demand.
#
#   docker build -t dockerspaces .
#   docker run -d --restart=always -p 44222:8888 \
#       -v /var/run/docker.sock:/var/run/docker.sock \
#       dockerspaces --user USER --password PASSWORD
#
# The entrypoint is `docker-spaces` (the original's flags, single or double dash, and
# every long option of `twistd dockerspaces`), in the foreground, logging to stdout, no
# pid file. It starts as root only long enough to join the group that owns the mounted
# Docker socket, then runs as the unprivileged user `dockerspaces` (uid 10001).
# Slot containers are siblings on the host: dockerspaces publishes their ports on, and
# reaches them through, this container's default gateway (the host's bridge address).
#
# Build arguments:
#   BASE   the base image: any Debian-like image with python3 >= 3.11 and venv
#          (default: the official python:3.11-slim)
# An optional `wheels/` directory in the build context (from `pip wheel -w wheels .
# setuptools wheel`) makes the build install offline from it (`--no-index`).
# See docs/operations.md.

ARG BASE=python:3.11-slim

FROM ${BASE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1
COPY . /src
RUN python3 -m venv /opt/dockerspaces \
 && if ls /src/wheels/*.whl >/dev/null 2>&1; then \
        /opt/dockerspaces/bin/pip install --no-index --find-links /src/wheels /src; \
    else \
        /opt/dockerspaces/bin/pip install /src; \
    fi \
 && /opt/dockerspaces/bin/python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
 && /opt/dockerspaces/bin/python -c "from twisted.plugin import IPlugin, getPlugins; assert any(p.tapname == 'dockerspaces' for p in getPlugins(IPlugin) if hasattr(p, 'tapname')), 'plugin missing'" \
 && /opt/dockerspaces/bin/python -m compileall -q /opt/dockerspaces/lib

FROM ${BASE}
# --auth accounts keeps its SQLite state here (mount a volume to keep it); the server
# and `docker exec … dockerspaces-admin` both find it through DOCKERSPACES_STATE
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    DOCKERSPACES_STATE=/var/lib/dockerspaces/dockerspaces.sqlite \
    PATH=/usr/local/bin:/opt/dockerspaces/bin:/usr/sbin:/usr/bin:/sbin:/bin
COPY --from=build /opt/dockerspaces /opt/dockerspaces
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/dockerspaces \
        --create-home --shell /usr/sbin/nologin dockerspaces \
 && printf '#!/bin/sh\n# drop to the dockerspaces user (joining the docker socket group), then run docker-spaces\nexec /opt/dockerspaces/bin/python -m dockerspaces.inside "$@"\n' \
        > /usr/local/bin/docker-spaces \
 && chmod 755 /usr/local/bin/docker-spaces \
 && /opt/dockerspaces/bin/docker-spaces --help >/dev/null
WORKDIR /var/lib/dockerspaces
EXPOSE 8888
STOPSIGNAL SIGTERM
ENTRYPOINT ["docker-spaces"]
CMD []
