"""The in-memory control plane answers as the Redis store does, and the router routes from it."""

from __future__ import annotations

from engram.common.settings import load
from engram.control.assignment import default_shard
from engram.control.memory import MemoryControlStore
from engram.control.store import SessionRecord
from engram.gateway.router import Router


async def test_sessions() -> None:
    store = MemoryControlStore()
    assert await store.get_session("s-1") is None
    await store.update_session("s-1", last_acked=3, state="active", ttl_s=60)
    assert await store.get_session("s-1") is None  # no space yet: a partial record, as in Redis
    await store.put_session(SessionRecord("s-1", "alpha", "active", 3), ttl_s=60)
    await store.update_session("s-1", last_acked=9, state="detached", ttl_s=60)
    assert await store.get_session("s-1") == SessionRecord("s-1", "alpha", "detached", 9)
    assert await store.count_sessions() == 1


async def test_assignment_and_shards_drive_the_router() -> None:
    store = MemoryControlStore(shard_count=2)
    space = "alpha"
    other = 1 - default_shard(space, 2)
    assert await store.publish_owners(other, {space: 1}) == 1
    assert await store.publish_owners(0, {"beta": 0, space: 1}) == 1  # not over an equal epoch
    assert await store.publish_owners(1 - other, {space: 0}) == 0  # nor over a higher one
    assignment = await store.assignment()
    assert (assignment.epoch, assignment.owner(space)) == (2, other)
    assert (assignment.space_epoch(space), assignment.complete) == (1, True)

    await store.heartbeat(0, "127.0.0.1:5000", ttl_s=3)
    await store.heartbeat(1, "127.0.0.1:5001", ttl_s=3)
    await store.heartbeat(7, "127.0.0.1:5007", ttl_s=3)  # an extra shard: listed too
    assert {i: s.address for i, s in (await store.shards()).items()} == {
        0: "127.0.0.1:5000",
        1: "127.0.0.1:5001",
        7: "127.0.0.1:5007",
    }

    router = Router(load({"ENGRAM_SHARD_COUNT": "2"}), store)
    await router.refresh()
    try:
        assert (router.owner(space), router.assignment.epoch) == (other, 2)
        shard_id, _ = await router.channel(space)
        assert shard_id == other
        await store.publish_owners(7, {"moved-out": 3})  # a space moved to the extra shard
        await router.refresh()
        assert (await router.channel("moved-out"))[0] == 7
    finally:
        await router.close()
