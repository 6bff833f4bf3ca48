"""Deleting rows of a space (engram.shard.deletes): exact in both tiers, idempotent, atomic,
kept through checkpoints and restarts, and never trimmed from the WAL while in flight.

Rows are found by their own vectors: a recall whose cue is a deleted row's vector must not
return it, and must still return ``k`` rows while enough live ones exist.
"""

from __future__ import annotations

import asyncio
import threading
from types import ModuleType
from typing import Any

import numpy as np

from engram.common.settings import IndexSettings, WalSettings
from engram.shard.recall import Filters

FAST_INDEX = IndexSettings(m=8, ef_construction=40, build_threads=1)
SMALL_SEGMENTS = WalSettings(segment_bytes=8 * 1024)
K = 10


async def _fill(
    space: Any, kit: ModuleType, n: int, batch: int = 500, sid: str = "a"
) -> np.ndarray:
    """Appends ``n`` corpus rows with ids ``id<row>`` (timestamps = row); returns them."""
    await space.open_session("a", create=True)
    vectors = kit.corpus_vectors(0, n)
    for seq, lo in enumerate(range(0, n, batch), start=1):
        hi = min(n, lo + batch)
        b = kit.make_batch(vectors[lo:hi], [f"id{i}" for i in range(lo, hi)])
        b.timestamps_us = np.arange(lo, hi, dtype="<i8").tobytes()
        await space.begin_append("a", seq, b)
    return vectors


async def _delete(space: Any, ids: list[str], since: int | None = None, until: int | None = None):
    rows, already, not_found = space.resolve_delete(ids, since, until)
    return await space.begin_delete(rows, "t", already=already, not_found=not_found)


def _recalled(space: Any, cue: np.ndarray, k: int = K, filters: Filters | None = None) -> list[int]:
    out = space.recall(space.snapshot(), cue, k, filters)
    return [r.lsn - 1 for r in out.results]


def _check_exact(space: Any, vectors: np.ndarray, dead: set[int], probes: range) -> None:
    """No probe's recall holds a deleted row, and every one returns ``K`` rows."""
    for row in probes:
        got = _recalled(space, vectors[row])
        assert not dead & set(got), (row, sorted(dead & set(got)))
        assert len(got) == K
        if row not in dead:
            assert got[0] == row  # a live row is found by its own vector
        filtered = _recalled(space, vectors[row], filters=Filters(since_us=1000))
        assert not dead & set(filtered) and len(filtered) == K
        assert min(filtered) >= 1000


async def test_exact_in_both_tiers_marked_or_not(harness: Any, kit: ModuleType) -> None:
    space = harness.space(index=FAST_INDEX)
    vectors = await _fill(space, kit, 6000)
    await asyncio.to_thread(space.index_step, 5000)  # rows 0..4999 in HNSW, the rest fresh
    assert space.hnsw.covered == 5000
    # every third row, and a whole neighbourhood of row 100 (so k must come from further out)
    near = np.argsort(-(kit.normalise(vectors) @ kit.normalise(vectors[100:101])[0]))[:40]
    dead_ids = {f"id{i}" for i in range(0, 6000, 3)} | {f"id{i}" for i in near.tolist()}
    result = await _delete(space, sorted(dead_ids) + ["no-such-id"])
    dead = {int(i[2:]) for i in dead_ids}
    assert (result.deleted, result.already_deleted, result.not_found) == (len(dead), 0, 1)
    assert result.lsn == 6000
    assert space.live_count == 6000 - len(dead) and space.deleted_count == len(dead)
    probes = range(1, 6000, 97)
    _check_exact(space, vectors, dead, probes)  # the index has not marked them: filtered
    assert _recalled(space, vectors[100])[0] not in dead
    await asyncio.to_thread(space.mark_step)
    assert space.hnsw.marked == len([r for r in dead if r < 5000])
    _check_exact(space, vectors, dead, probes)
    await asyncio.to_thread(space.index_step, 5000)  # fresh rows deleted before indexing
    skipped = len([r for r in dead if r >= 5000])  # covered, never added
    assert space.hnsw.covered == 6000 and space.hnsw.elements == 6000 - skipped
    assert space.hnsw.marked == len(dead) - skipped
    _check_exact(space, vectors, dead, probes)
    listed = [i for ids, _ in space.scan_ids(1000) for i in ids]
    assert len(listed) == space.live_count and not dead_ids & set(listed)


async def test_idempotent_and_by_time_range(harness: Any, kit: ModuleType) -> None:
    space = harness.space(index=FAST_INDEX)
    await _fill(space, kit, 1000)
    first = await _delete(space, ["id1", "id2"])
    again = await _delete(space, ["id1", "id2", "id3", "nope"])
    assert (first.deleted, first.already_deleted) == (2, 0)
    assert (again.deleted, again.already_deleted, again.not_found) == (1, 2, 1)
    wal_bytes = space.wal.durable_bytes
    same = await _delete(space, ["id1", "id2", "id3"])  # nothing to write
    assert (same.deleted, same.already_deleted) == (0, 3)
    assert space.wal.durable_bytes == wal_bytes
    ranged = await _delete(space, [], 0, 100)  # timestamps are the rows
    assert ranged.deleted == 97  # rows 1..3 were deleted already
    assert (await _delete(space, [], 900, None)).deleted == 100
    assert space.live_count == 1000 - 200
    lsns = [lsn for _, chunk in space.scan_ids(64) for lsn in chunk]
    assert lsns == list(range(101, 901))


async def test_restart_keeps_tombstones(harness: Any, kit: ModuleType) -> None:
    """From the WAL alone, from a checkpoint (bitmap and index marks) and from both."""
    space = harness.space(index=FAST_INDEX, wal=SMALL_SEGMENTS)
    vectors = await _fill(space, kit, 3000)
    await _delete(space, [f"id{i}" for i in range(0, 3000, 5)])
    space = await harness.restart(space)
    dead = set(range(0, 3000, 5))
    _check_exact(space, vectors, dead, range(0, 3000, 101))
    await asyncio.to_thread(space.index_step, 2500)
    await _delete(space, [f"id{i}" for i in range(1, 3000, 5)])  # after the indexing
    dead |= set(range(1, 3000, 5))
    assert await asyncio.to_thread(space.checkpoint) == 2500
    assert space.wal.segment_count < 10  # the WAL it covers is gone
    await _delete(space, ["id2", "id2997"])  # after the checkpoint: in the WAL only
    dead |= {2, 2997}
    space = await harness.restart(space)
    assert space.live_count == 3000 - len(dead)
    _check_exact(space, vectors, dead, range(0, 3000, 101))
    await asyncio.to_thread(space.index_step, 2500)
    _check_exact(space, vectors, dead, range(0, 3000, 101))


async def test_checkpoint_waits_for_a_delete_in_flight(
    harness: Any, kit: ModuleType, gated_faults: Any
) -> None:
    """A delete queued when a checkpoint rotates the WAL: the checkpoint must hold its
    tombstones, or keep its segment; otherwise a crash after the ack brings the row back."""
    space = harness.space(index=FAST_INDEX, wal=SMALL_SEGMENTS, faults=gated_faults)
    vectors = await _fill(space, kit, 2000)
    await asyncio.to_thread(space.index_step, 2000)  # everything indexed: the WAL is trimmable
    gated_faults.arm()
    rows, _, _ = space.resolve_delete(["id7", "id8"], None, None)
    pending = space.begin_delete(rows)
    await gated_faults.wait_entered()  # the delete's record is written, not yet durable
    checkpoint = asyncio.create_task(asyncio.to_thread(space.checkpoint))
    await asyncio.sleep(0.2)
    assert not checkpoint.done()  # it waits for the delete
    gated_faults.release()
    assert (await pending).deleted == 2
    assert await checkpoint == 2000
    space = await harness.restart(space)
    assert space.live_count == 1998
    _check_exact(space, vectors, {7, 8}, range(0, 40))


async def test_a_recall_sees_all_or_nothing_of_a_delete(harness: Any, kit: ModuleType) -> None:
    """Groups of equal rows, each deleted by one delete, some rows of every group in the
    index and some in the fresh tier, while the builder marks the index concurrently."""
    space = harness.space(index=FAST_INDEX)
    await space.open_session("a", create=True)
    groups, size = 30, 6
    base = kit.corpus_vectors(0, groups)
    filler = kit.corpus_vectors(groups, 2000)
    first = np.repeat(base, size // 2, axis=0)
    await space.begin_append("a", 1, kit.make_batch(first, [f"g{i}" for i in range(len(first))]))
    await space.begin_append("a", 2, kit.make_batch(filler))
    await asyncio.to_thread(space.index_step, 10_000)
    second = np.repeat(base, size - size // 2, axis=0)
    ids2 = [f"h{i}" for i in range(len(second))]
    await space.begin_append("a", 3, kit.make_batch(second, ids2))
    per = size // 2
    members = {
        g: {g * per + j for j in range(per)}
        | {len(first) + 2000 + g * (size - per) + j for j in range(size - per)}
        for g in range(groups)
    }
    stop = threading.Event()
    seen: list[tuple[int, int]] = []

    def recalls() -> None:
        while not stop.is_set():
            for g in range(groups):
                got = set(_recalled(space, base[g], k=size))
                seen.append((g, len(got & members[g])))

    def marker() -> None:
        while not stop.is_set():
            space.mark_step()

    threads = [threading.Thread(target=recalls), threading.Thread(target=marker)]
    for t in threads:
        t.start()
    try:
        for g in range(groups):
            await space.begin_delete(np.array(sorted(members[g]), np.uint64))
            await asyncio.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join()
    partial = [(g, n) for g, n in seen if n not in (0, size)]
    assert not partial, partial[:5]
    assert {n for _, n in seen} == {0, size}


async def test_tracked_memory_per_row(harness: Any, kit: ModuleType) -> None:
    """Ingest pays nothing for deletes; a space with deletes pays a few bytes a row."""
    space = harness.space(index=FAST_INDEX)
    await _fill(space, kit, 20_000, batch=5000)
    assert space.tombstones.at.nbytes == 0 and space.id_index.nbytes == 0
    await _delete(space, ["id19999"])
    per_row = (space.tombstones.at.nbytes + space.id_index.nbytes) / space.visible
    assert per_row <= 13, per_row
