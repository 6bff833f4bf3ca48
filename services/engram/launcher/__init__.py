"""The local launcher: Redis, shards and a gateway as supervised child processes.

``cluster.LocalCluster`` runs a cluster (``engram up``, the test fixtures) with the restart
decisions of ``engram.control.restarts``; ``redis_server`` finds and runs redis-server;
``status`` reports on a running cluster (``engram status``); ``procs`` spawns and stops
children by PID.
"""
