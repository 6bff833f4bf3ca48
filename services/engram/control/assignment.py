"""Which shard owns a memory space: pure functions over an assignment table.

A space's default owner is a stable hash of its id over the shard count; per-space overrides
(written when a space is moved) take precedence. The table carries an epoch that rises on every
change, so a shard and a gateway can tell whose view is newer. Used by the gateway (routing),
the shard (refusing writes for spaces it does not own) and the rebalancer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field


def default_shard(space: str, shard_count: int) -> int:
    """Stable across processes, machines and Python versions (unlike ``hash``)."""
    digest = hashlib.blake2b(space.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard_count


@dataclass(frozen=True)
class Assignment:
    shard_count: int
    epoch: int = 0
    overrides: Mapping[str, int] = field(default_factory=dict)

    def owner(self, space: str) -> int:
        shard = self.overrides.get(space)
        return shard if shard is not None else default_shard(space, self.shard_count)
