"""Compaction on a real cluster: the shard's builder compacts a space after deletes by itself;
recalls and the listing keep answering the live rows, the checkpoint on disk loses the
deleted contents, and kill -9 of the shard and a move of the space keep everything."""

from __future__ import annotations

import asyncio
import contextlib
import re
import urllib.request

import numpy as np

from engram.control.moves import move_space, shard_stats, spaces_of
from engram.v1 import streaming_pb2 as pb
from engram_client import EngramClient

ENV = {
    "ENGRAM_CHECKPOINT_EVERY": "400",
    "ENGRAM_CHECKPOINT_INTERVAL_S": "1",
    "ENGRAM_COMPACT_MIN_ROWS": "500",
    "ENGRAM_COMPACT_DELETED_SHARE": "0.2",
}
DIM, ROWS, BATCH = 16, 2000, 200


def _compactions(port: int, space: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    found = re.search(
        rf'engram_shard_compactions_total\{{memory_space="{re.escape(space)}"\}} (\S+)', text
    )
    return float(found.group(1)) if found else 0.0


async def _owner(addresses: dict[int, str], space: str) -> int:
    for _ in range(300):
        found = spaces_of(await shard_stats(addresses)).get(space)
        if found is not None and found.state == "owned":
            return found.owner
        await asyncio.sleep(0.1)
    raise AssertionError(f"no shard owns {space}")


async def _check(client: EngramClient, space: str, vectors: np.ndarray, dead: set[int]) -> None:
    for row in range(1, ROWS, 41):
        got = await client.recall(space, vectors[row], k=10, consistency="STRONG")
        rows = {int(h.id[1:]) for h in got.hits}
        assert not rows & dead and len(got.hits) == 10
        if row not in dead:
            assert row in rows  # a live row is found by its own vector
        assert all(h.content == f"c{h.id[1:]}" for h in got.hits)
    listed = await client.list_ids(space)
    assert sorted(int(i[1:]) for i in listed) == sorted(set(range(ROWS)) - dead)


async def test_compaction_then_kill_and_move(make_cluster, space_id: str) -> None:
    cluster = make_cluster(shards=2, env=ENV)
    addresses = {i: cluster.shard_address(i) for i in range(2)}
    vectors = np.random.default_rng(9).standard_normal((ROWS, DIM)).astype(np.float32)
    async with EngramClient(cluster.gateway_address) as client:
        stream = await client.open_stream(space_id)
        acks = [
            await stream.send(
                vectors[lo : lo + BATCH],
                ids=[f"r{i}" for i in range(lo, lo + BATCH)],
                contents=[f"c{i}" for i in range(lo, lo + BATCH)],
            )
            for lo in range(0, ROWS, BATCH)
        ]
        await asyncio.gather(*acks)
        await stream.close()
        owner = await _owner(addresses, space_id)
        port = cluster.shard_http_port(owner)
        dead = set(range(0, ROWS, 2))
        answer = await client.delete(space_id, ids=[f"r{i}" for i in sorted(dead)])
        assert answer.deleted == len(dead)
        for _ in range(300):  # the builder compacts on its own, then checkpoints
            if await asyncio.to_thread(_compactions, port, space_id) >= 1:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the space was not compacted")
        await _check(client, space_id, vectors, dead)
        ckpt = cluster.shard_data_dir(owner) / "spaces" / space_id / "ckpt"

        def checkpointed() -> set[str]:
            """The contents the checkpoint's metadata chunks hold (emptied ones left out)."""
            if not ckpt.exists():
                return set()
            out = set()
            for p in ckpt.glob("meta-*.pb"):
                with contextlib.suppress(OSError):  # replaced meanwhile
                    out.update(pb.ObservationBatch.FromString(p.read_bytes()).contents)
            return out - {""}

        for _ in range(100):  # the last rows reach the checkpoint, once the old chunk is gone
            held = checkpointed()
            if "c1999" in held and not {f"c{i}" for i in dead} & held:
                break
            await asyncio.sleep(0.1)
        assert checkpointed() == {f"c{i}" for i in range(ROWS) if i not in dead}

        cluster.kill(f"shard-{owner}")
        await asyncio.to_thread(cluster.wait_healthy, f"shard-{owner}", 60)
        assert await _owner(addresses, space_id) == owner
        await _check(client, space_id, vectors, dead)

        result = await move_space(addresses, space_id, 1 - owner)
        assert result.target == 1 - owner
        await _check(client, space_id, vectors, dead)
        stats = spaces_of(await shard_stats(addresses))[space_id]
        assert stats.rows == ROWS - len(dead)
