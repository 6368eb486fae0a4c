"""Queue-depth autoscaling of worker containers (``[[autoscale]]`` entries).

Workers are port-3 ``x:`` specs launched through the broker; their number follows a
RabbitMQ queue's depth (ready + unacknowledged messages), read from the management
HTTP API.  A worker is only ever stopped when it holds no unacknowledged message, and
then with SIGTERM and the ``--stop`` grace.  The rooms:

- :mod:`~dockerspaces.autoscale.policy`: the pure rules (how many, which ones may stop);
- :mod:`~dockerspaces.autoscale.rabbit`: reading a queue through the management API;
- :mod:`~dockerspaces.autoscale.config`: ``[[autoscale]]`` TOML entries, the worker spec;
- :mod:`~dockerspaces.autoscale.pool`: the workers of an entry, over the broker;
- :mod:`~dockerspaces.autoscale.service`: the ``Service`` that ticks every entry;
- :mod:`~dockerspaces.autoscale.watch`: re-reading the config on SIGHUP or a change.

See ``docs/autoscaling.md``.
"""
