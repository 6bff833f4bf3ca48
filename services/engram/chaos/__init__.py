"""Chaos testing of a local Engram Stream cluster.

A run drives a mixed workload (several sessions on several memory spaces, batches of varied
size, deletes by id of a share of what was acknowledged, recalls at every consistency level)
through the real Python client while injecting faults on a seeded schedule — SIGKILL of
shards (also during their recovery), the gateway and Redis, SIGSTOP of shards, latency, resets
and partitions between gateway and shards through a TCP proxy, fsync errors and ENOSPC on a
shard's WAL — and then checks that every acknowledged observation is stored exactly once, in
its session's order, unless a delete named it, that nothing refused was stored, and that no
row is read after its delete was acknowledged.

Modules: :mod:`~engram.chaos.proxy` (fault-injecting TCP proxy), :mod:`~engram.chaos.faults`
(the faults), :mod:`~engram.chaos.workload` (writers, recallers, visibility probes),
:mod:`~engram.chaos.deletes` (the deleter, the check of recalls),
:mod:`~engram.chaos.ledger` (what was sent and seen), :mod:`~engram.chaos.checkers`
(completeness, duplicates, order), :mod:`~engram.chaos.report`, :mod:`~engram.chaos.harness`
(one run) and :mod:`~engram.chaos.cli` (``python -m engram.chaos``, ``make chaos``).
"""
