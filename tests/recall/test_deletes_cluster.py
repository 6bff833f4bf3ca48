"""Deletes on a real cluster, through the shard's Delete RPC: the answer, kill -9 of the shard
right after it (the tombstones come back from the WAL and the checkpoint), and a move of the
space to the other shard (the target never returns a deleted row)."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest

from engram.common import internal
from engram.control.moves import move_space, shard_stats, spaces_of
from engram.internal.v1 import shard_pb2 as ipb
from engram.internal.v1 import shard_pb2_grpc
from engram.v1 import streaming_pb2 as pb
from engram_client import EngramClient

ENV = {"ENGRAM_CHECKPOINT_EVERY": "400", "ENGRAM_CHECKPOINT_INTERVAL_S": "1"}
DIM, ROWS, BATCH = 16, 2000, 200


async def _owner(addresses: dict[int, str], space: str) -> int:
    for _ in range(300):
        found = spaces_of(await shard_stats(addresses)).get(space)
        if found is not None and found.state == "owned" and len(addresses) == 2:
            return found.owner
        await asyncio.sleep(0.1)
    raise AssertionError(f"no shard owns {space}")


async def _delete(address: str, space: str, ids: list[str]) -> pb.DeleteResponse:
    req = ipb.ShardDeleteRequest(delete=pb.DeleteRequest(memory_space_id=space, ids=ids))
    async with internal.aio_channel(address) as channel:
        return await shard_pb2_grpc.ShardStub(channel).Delete(req, timeout=30)


async def _check(client: EngramClient, space: str, vectors: np.ndarray, dead: set[int]) -> None:
    """No recall returns a deleted row, each returns k rows; the listing leaves them out."""
    for row in range(0, ROWS, 37):
        got = await client.recall(space, vectors[row], k=10, consistency="STRONG")
        rows = {int(h.id[1:]) for h in got.hits}
        assert not rows & dead, (row, sorted(rows & dead))
        assert len(got.hits) == 10
    listed = await client.list_ids(space)
    assert sorted(int(i[1:]) for i in listed) == sorted(set(range(ROWS)) - dead)


async def test_delete_survives_kill_and_move(make_cluster, space_id: str) -> None:
    cluster = make_cluster(shards=2, env=ENV)
    addresses = {i: cluster.shard_address(i) for i in range(2)}
    vectors = np.random.default_rng(5).standard_normal((ROWS, DIM)).astype(np.float32)
    async with EngramClient(cluster.gateway_address) as client:
        stream = await client.open_stream(space_id)
        acks = [
            await stream.send(
                vectors[lo : lo + BATCH], ids=[f"r{i}" for i in range(lo, lo + BATCH)]
            )
            for lo in range(0, ROWS, BATCH)
        ]
        await asyncio.gather(*acks)
        await stream.close()
        owner = await _owner(addresses, space_id)
        await asyncio.sleep(1.5)  # a checkpoint covers most rows: some deletes hit its bitmap
        dead = set(range(0, ROWS, 3))
        answer = await _delete(addresses[owner], space_id, [f"r{i}" for i in sorted(dead)])
        assert (answer.deleted, answer.already_deleted, answer.not_found) == (len(dead), 0, 0)
        again = await _delete(addresses[owner], space_id, ["r0", "r1", "nope"])
        assert (again.deleted, again.already_deleted, again.not_found) == (1, 1, 1)
        dead.add(1)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _delete(addresses[owner], space_id, [])
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await _check(client, space_id, vectors, dead)

        cluster.kill(f"shard-{owner}")  # right after the acks: nothing flushed beyond the WAL
        await asyncio.to_thread(cluster.wait_healthy, f"shard-{owner}", 60)
        assert await _owner(addresses, space_id) == owner
        await _check(client, space_id, vectors, dead)
        stats = (await shard_stats(addresses))[owner]
        count = next(s.count for s in stats.spaces if s.memory_space_id == space_id)
        assert count == ROWS - len(dead)

        result = await move_space(addresses, space_id, 1 - owner)
        assert result.target == 1 - owner
        await _check(client, space_id, vectors, dead)
