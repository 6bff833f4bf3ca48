"""The routing table built from the shards' claims: the same rule in Redis and in memory.

A claim replaces another only with a higher epoch; the table's version rises on each change;
the table is complete once every shard published since the store started empty.
"""

from __future__ import annotations

from typing import Any

import pytest

from engram.control.assignment import default_shard, wins
from engram.control.memory import MemoryControlStore
from engram.control.store import ControlStore


@pytest.fixture
def memory_store() -> MemoryControlStore:
    return MemoryControlStore(shard_count=3)


def test_only_a_higher_epoch_wins() -> None:
    assert wins(None, 2, 0)
    assert wins((1, 3), 2, 4)
    assert not wins((1, 3), 2, 3)
    assert not wins((1, 3), 1, 2)


async def _claims_and_epochs(store: Any) -> None:
    empty = await store.assignment()
    assert (empty.epoch, dict(empty.overrides), empty.complete) == (0, {}, False)
    assert empty.owner("alpha") == default_shard("alpha", 3)

    assert await store.publish_owners(0, {"alpha": 0, "beta": 2}) == 2
    assert await store.publish_owners(1, {"alpha": 1}) == 1  # moved to shard 1 at epoch 1
    assert await store.publish_owners(0, {"alpha": 0, "beta": 2}) == 0  # stale: no change
    table = await store.assignment()
    assert table.owner("alpha") == 1 and table.space_epoch("alpha") == 1
    assert table.owner("beta") == 0 and table.space_epoch("beta") == 2
    assert table.epoch == 2  # two publications changed something
    assert not table.complete and table.published == frozenset({0, 1})

    assert await store.publish_owners(2, {}) == 0
    assert (await store.assignment()).complete


async def _any_order(store: Any) -> None:
    # the new owner published first, the old one (restarted with its stale record) after
    await store.publish_owners(2, {"gamma": 5})
    await store.publish_owners(0, {"gamma": 4})
    table = await store.assignment()
    assert (table.owner("gamma"), table.space_epoch("gamma")) == (2, 5)


async def test_claims_and_epochs_in_memory(memory_store: MemoryControlStore) -> None:
    await _claims_and_epochs(memory_store)


async def test_claims_and_epochs_in_redis(redis_store: ControlStore) -> None:
    await _claims_and_epochs(redis_store)


async def test_publishing_order_does_not_matter_in_memory(memory_store: MemoryControlStore) -> None:
    await _any_order(memory_store)


async def test_publishing_order_does_not_matter_in_redis(redis_store: ControlStore) -> None:
    await _any_order(redis_store)
