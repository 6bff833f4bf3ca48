"""The shard registry: home shards (ids below the count) and extra shards (above) alike.

Every heartbeat registers a shard for a few heartbeats; ``shards()`` lists every shard
registered now, whatever its id, and leaves out one whose registration expired. The same
answers from Redis and from the in-memory store.
"""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from engram.control.memory import MemoryControlStore
from engram.control.store import ControlStore, ShardInfo


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def addresses(shards: dict[int, ShardInfo]) -> dict[int, str]:
    return {i: info.address for i, info in shards.items()}


async def test_memory_lists_home_and_extra_shards_until_they_expire() -> None:
    clock = Clock()
    store = MemoryControlStore(shard_count=3, clock=clock)
    await store.heartbeat(0, "h:0", ttl_s=5)
    await store.heartbeat(3, "h:3", ttl_s=5)  # an extra shard
    assert addresses(await store.shards()) == {0: "h:0", 3: "h:3"}
    clock.now += 4
    await store.heartbeat(3, "h:3b", ttl_s=5)  # a heartbeat renews (and may move) it
    clock.now += 2
    assert addresses(await store.shards()) == {3: "h:3b"}  # shard 0 expired
    clock.now += 5
    assert await store.shards() == {}


async def test_redis_lists_home_and_extra_shards_until_they_expire(
    redis_store: ControlStore,
) -> None:
    await redis_store.heartbeat(1, "h:1", ttl_s=60)
    await redis_store.heartbeat(4, "h:4", ttl_s=60)  # an extra shard
    await redis_store.heartbeat(9, "h:9", ttl_s=0.05)
    await asyncio.sleep(0.2)  # past shard 9's registration (Redis checks expiry on access)
    listed = await redis_store.shards()
    assert addresses(listed) == {1: "h:1", 4: "h:4"}
    assert listed[4].shard_id == 4 and listed[4].heartbeat_us > 0
    # the tools' listing agrees
    assert addresses(await redis_store.registered()) == {1: "h:1", 4: "h:4"}
    await redis_store.heartbeat(9, "h:9", ttl_s=60)  # back: listed again
    assert sorted(await redis_store.shards()) == [1, 4, 9]


async def test_redis_lists_home_shards_registered_without_the_set(
    redis_store: ControlStore, redis_url: str
) -> None:
    """A home shard's registration is read even when the id set misses it (a shard of a
    version that did not keep the set, or a set lost alone)."""
    await redis_store.heartbeat(0, "h:0", ttl_s=60)
    await redis_store.heartbeat(5, "h:5", ttl_s=60)
    raw = aioredis.Redis.from_url(redis_url)
    try:
        await raw.delete("t:shards")
    finally:
        await raw.aclose()
    assert addresses(await redis_store.shards()) == {0: "h:0"}
