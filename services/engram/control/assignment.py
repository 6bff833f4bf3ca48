"""Which shard owns a memory space: pure functions over the routing table.

Each shard records the spaces it owns, with their *epoch*, in its own data directory
(``engram.shard.ownership``) and publishes them to the control plane; the table built from
those claims is what gateways route by. A claim replaces another only with a higher epoch
(:func:`wins`), so a shard that comes back with stale knowledge cannot take a space back.
A space nobody has claimed (a new one) belongs to its default shard, a stable hash of its id
over the shard count: the *home* shards are 0..count-1. A shard with a higher id is an *extra*
shard: no space is its by default, it owns exactly the spaces moves gave it (and claims them
here like any shard). ``version`` rises with every change of the table, so a reader can tell
whose view is newer. ``published`` names the shards that have published their claims since
the control plane last started empty: until every home shard has
(:attr:`Assignment.complete`), a space missing from the table may live on a shard that has not
spoken yet, so no shard creates a new space. Extra shards are not waited for (nothing durable
says which exist): a space one holds was moved there, and the shard it came from keeps a MOVED
record and refuses to create it again (``engram.shard.ownership``). The exception is a space
created on a shard while it was a home one, before the count was lowered: if the control
plane loses everything before it is drained, its hash may name a shard that would create it
in the heartbeat or so until the extra shard publishes it. Used by the gateway (routing), the
shard (creating spaces), the stores and the rebalancer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field


def default_shard(space: str, shard_count: int) -> int:
    """Stable across processes, machines and Python versions (unlike ``hash``)."""
    digest = hashlib.blake2b(space.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard_count


def wins(current: tuple[int, int] | None, shard: int, epoch: int) -> bool:
    """Whether a claim of ``shard`` at ``epoch`` replaces ``current`` (shard, epoch): only a
    higher epoch does (equal epochs of two shards cannot happen: one move makes each)."""
    return current is None or epoch > current[1]


@dataclass(frozen=True)
class Assignment:
    shard_count: int
    # The table's version: rises on every change.
    epoch: int = 0
    # space -> owning shard, for every claimed space.
    overrides: Mapping[str, int] = field(default_factory=dict)
    # space -> the owner's epoch.
    epochs: Mapping[str, int] = field(default_factory=dict)
    # Shards that published their claims since the control plane started empty.
    published: frozenset[int] = frozenset()

    def owner(self, space: str) -> int:
        shard = self.overrides.get(space)
        return shard if shard is not None else default_shard(space, self.shard_count)

    def space_epoch(self, space: str) -> int:
        return self.epochs.get(space, 0)

    @property
    def complete(self) -> bool:
        """Whether every home shard has published its claims (a space not in the table is
        new; see the module docstring for the extra shards)."""
        return set(range(self.shard_count)) <= self.published


def decode_claim(value: str) -> tuple[int, int]:
    """``"<shard>:<epoch>"`` (the routing table's value in Redis) -> (shard, epoch)."""
    shard, _, epoch = value.partition(":")
    return int(shard), int(epoch or 0)
