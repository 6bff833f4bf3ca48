"""The local launcher: Redis, shards and a gateway as supervised child processes.

``cluster.LocalCluster`` runs a cluster (``engram up``, the test fixtures); ``supervisor``
holds the restart policy, free of I/O; ``redis_server`` finds and runs redis-server;
``status`` reports on a running cluster (``engram status``); ``procs`` spawns and stops
children by PID.
"""
