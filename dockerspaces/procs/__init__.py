"""``--workers N``: one broker process, N proxy processes, leases over AMP.

- :mod:`.commands`: the AMP commands between a proxy process and the broker's;
- :mod:`.brokerside`: the broker's end (one box per child, leases reclaimed when it dies);
- :mod:`.childside`: the proxy process's end (``RemoteBroker``, ``RemoteLease``, shared tables);
- :mod:`.pool`: the parent's service that binds the ports and keeps N children running;
- :mod:`.child`: a child's ``main``.

The process picture is in ``docs/architecture.md``.
"""
