"""What the rebalancer sees: two measurements of the shards' Stats turned into a Cluster.

Pure functions, no I/O. The local rebalancer (``engram.launcher.rebalancer``) and the
Kubernetes operator both ask every shard for its ``Stats`` (``engram.control.moves.shard_stats``)
every interval, keep the previous answer as a :class:`Sample`, and build the
:class:`~engram.control.rebalance.Cluster` that :func:`~engram.control.rebalance.plan` decides
on with :func:`cluster_of`. A space's ingest and recall rates are the growth of its counters
between the two samples over the time between them; a space new since the last sample
counts as idle (its counters' history is unknown), so a space just moved in does not look
like a burst.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from engram.control import rebalance as rb
from engram.internal.v1 import shard_pb2 as ipb


@dataclass(frozen=True)
class Sample:
    """The shards' Stats answers at one moment (monotonic seconds)."""

    at: float
    stats: Mapping[int, ipb.StatsResponse]


def space_loads(before: Sample, after: Sample) -> dict[str, tuple[int, rb.Load]]:
    """Each owned space's (owner, load) between two samples."""
    dt = max(1e-3, after.at - before.at)
    old = {s.memory_space_id: s for reply in before.stats.values() for s in reply.spaces}
    out: dict[str, tuple[int, rb.Load]] = {}
    for shard, reply in sorted(after.stats.items()):
        for s in reply.spaces:
            if s.state != "owned":
                continue
            was = old.get(s.memory_space_id)
            load = rb.Load(
                ingest=max(0, s.count - (was.count if was else s.count)) / dt,
                recall=max(0, s.recalls - (was.recalls if was else s.recalls)) / dt,
                bytes=s.bytes,
                backlog=s.count - s.indexed,
            )
            out[s.memory_space_id] = (shard, load)
    return out


def cluster_of(
    before: Sample,
    after: Sample,
    statuses: Mapping[int, rb.ShardStatus],
    *,
    last_moved: Mapping[str, float] | None = None,
    last_round: float | None = None,
    unfinished: bool = False,
) -> rb.Cluster:
    """The Cluster of the shards in ``statuses`` (every shard the plan may use) with the
    spaces they own in ``after``; ``last_moved``: when each space last finished moving, on
    the same clock as ``last_round``."""
    last_moved = last_moved or {}
    spaces = tuple(
        rb.SpaceState(space, owner, load, last_moved.get(space))
        for space, (owner, load) in space_loads(before, after).items()
        if owner in statuses
    )
    shards = tuple(rb.ShardState(i, statuses[i]) for i in sorted(statuses))
    return rb.Cluster(shards, spaces, last_round=last_round, unfinished=unfinished)
