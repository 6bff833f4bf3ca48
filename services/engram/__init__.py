"""Engram Stream: a streaming memory service for AI agents.

Packages: ``common`` (settings, errors, validation, metrics shared by every service),
``control`` (the control-plane store in Redis and the space -> shard assignment),
``shard`` (WAL, tiers, index, recovery, the shard gRPC service), ``gateway`` (client
streams, sessions, sequencing, routing), ``launcher`` (the local cluster), ``v1`` and
``internal.v1`` (generated protocol code, made by ``make proto``).
"""

__version__ = "0.1.0"
