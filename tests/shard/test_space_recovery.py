"""Restart of engram.shard.space.Space: WAL replay, checkpoints, session marks.

After a clean restart a space holds exactly the acknowledged batches, once each, in LSN order,
whether they come back from the WAL, from a checkpoint, or from both (a checkpoint may end in
the middle of a batch); session marks come back too, so a retry across the restart is still a
duplicate.
"""

from __future__ import annotations

import asyncio
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from engram.common.settings import IndexSettings, WalSettings
from engram.contract.errors import SequenceError

SMALL_SEGMENTS = WalSettings(segment_bytes=8 * 1024)
FAST_INDEX = IndexSettings(m=8, ef_construction=40, build_threads=1)


async def _fill(space: Any, ledger: Any, sessions: list[str], batches: int, n: int = 7) -> None:
    """Appends ``batches`` rounds over ``sessions``, several batches in flight at once."""
    for _ in range(batches):
        pending = []
        for sid in sessions:
            p = ledger.batch(
                sid, ledger.next_seq(sid) + len([q for q in pending if q.sid == sid]), n
            )
            pending.append(p)
        futs = [space.begin_append(p.sid, p.seq, p.batch) for p in pending]
        for p, result in zip(pending, await asyncio.gather(*futs), strict=True):
            ledger.record(p, result)


async def _open(space: Any, ledger: Any, *sids: str) -> None:
    for sid in sids:
        await space.open_session(sid, create=True)
        ledger.open(sid)


async def test_restart_replays_wal(harness: Any, ledger: Any) -> None:
    space = harness.space()
    await _open(space, ledger, "a", "b", "idle")
    for _ in range(10):
        await _fill(space, ledger, ["a", "b", "a"], 1, n=5)
    ledger.check(space)
    ids_before = ledger.ids()

    space = await harness.restart(space)
    ledger.check(space)
    assert space.session_mark("idle") == 0
    assert space.session_count == 3
    assert space.checkpoint_rows == 0

    # A retry of an old sequence number is a duplicate, even after the restart.
    for sid in ("a", "b"):
        for seq in (1, ledger.marks[sid]):
            dup = await space.begin_append(sid, seq, ledger.batch(sid, seq, 5).batch)
            assert dup.duplicate
    with pytest.raises(SequenceError) as info:
        space.begin_append("a", ledger.marks["a"] + 2, ledger.batch("a", 0, 1).batch)
    assert info.value.expected == ledger.marks["a"] + 1
    assert ledger.ids() == ids_before

    result = await ledger.append(space, "a", ledger.next_seq("a"), 3)
    assert result.first_lsn == len(ids_before) + 1
    await ledger.append(space, "idle", 1, 2)
    ledger.check(space)

    space = await harness.restart(space)
    ledger.check(space)


async def test_restart_is_repeatable(harness: Any, ledger: Any) -> None:
    space = harness.space(wal=SMALL_SEGMENTS)
    await _open(space, ledger, "a")
    await _fill(space, ledger, ["a"], 20, n=9)
    for _ in range(3):
        space = await harness.restart(space)
        ledger.check(space)
    assert len(ledger.acked) == 20


async def test_restart_after_checkpoint(harness: Any, ledger: Any, kit: ModuleType) -> None:
    space = harness.space(wal=SMALL_SEGMENTS, index=FAST_INDEX)
    await _open(space, ledger, "a", "b", "idle")
    await _fill(space, ledger, ["a", "b"], 30)
    segments_before = len(kit.wal_files(space))
    assert segments_before > 3

    assert space.index_step(10_000) == space.visible
    rows = await asyncio.to_thread(space.checkpoint)
    assert rows == space.visible == space.checkpoint_rows > 0
    segments_after = len(kit.wal_files(space))
    assert segments_after <= 2 < segments_before, "the checkpoint deleted no WAL segment"
    ledger.check(space)

    # More batches go to the WAL only.
    await _fill(space, ledger, ["b", "a"], 5)
    space = await harness.restart(space)
    assert space.checkpoint_rows == rows
    assert space.hnsw is not None and space.hnsw.covered == rows
    assert space.backlog() == space.visible - rows
    ledger.check(space)
    assert space.session_mark("idle") == 0
    dup = await space.begin_append("a", 1, ledger.batch("a", 1, 7).batch)
    assert dup.duplicate

    # A second round on top of the loaded checkpoint.
    await _fill(space, ledger, ["a", "b"], 10)
    space.index_step(10_000)
    rows2 = await asyncio.to_thread(space.checkpoint)
    assert rows2 == space.visible > rows
    manifest_files = kit.ckpt_files(space)
    assert f"hnsw-{rows:012d}.bin" not in manifest_files, "the old index was not removed"
    assert f"hnsw-{rows2:012d}.bin" in manifest_files
    await _fill(space, ledger, ["b"], 3)
    space = await harness.restart(space)
    ledger.check(space)
    await ledger.append(space, "idle", 1, 4)
    space = await harness.restart(space)
    ledger.check(space)


@pytest.mark.parametrize("chunk", [1, 25, 69, 70, 71])
async def test_checkpoint_in_the_middle_of_a_batch(harness: Any, ledger: Any, chunk: int) -> None:
    space = harness.space(wal=SMALL_SEGMENTS, index=FAST_INDEX)
    await _open(space, ledger, "a", "b")
    await _fill(space, ledger, ["a", "b"], 10, n=7)  # batches of 7: 70 rows per 5 rounds
    assert space.index_step(chunk) == chunk
    assert await asyncio.to_thread(space.checkpoint) == chunk
    await _fill(space, ledger, ["b", "a"], 4, n=5)
    space = await harness.restart(space)
    assert space.checkpoint_rows == chunk
    ledger.check(space)

    # Index the rest in odd steps, checkpoint again in the middle of another batch.
    space.index_step(chunk + 13)
    await asyncio.to_thread(space.checkpoint)
    await _fill(space, ledger, ["a"], 2, n=3)
    space = await harness.restart(space)
    ledger.check(space)
    while space.index_step(17):
        pass
    await asyncio.to_thread(space.checkpoint)
    space = await harness.restart(space)
    assert space.checkpoint_rows == space.visible
    ledger.check(space)


async def test_checkpoint_while_a_batch_is_in_flight(
    harness: Any, ledger: Any, gated_faults: Any
) -> None:
    space = harness.space(wal=SMALL_SEGMENTS, index=FAST_INDEX, faults=gated_faults)
    await _open(space, ledger, "a", "b")
    await _fill(space, ledger, ["a", "b"], 10)
    space.index_step(10_000)

    gated_faults.arm()
    p = ledger.batch("a", ledger.next_seq("a"), 6)
    fut = space.begin_append("a", p.seq, p.batch)
    await gated_faults.wait_entered()
    rows = await asyncio.to_thread(space.checkpoint)
    assert rows == space.visible
    gated_faults.release()
    ledger.record(p, await fut)
    await _fill(space, ledger, ["b"], 2)

    space = await harness.restart(space)
    ledger.check(space)
    assert space.checkpoint_rows == rows


async def test_checkpoint_twice_at_the_same_row_count(
    harness: Any, ledger: Any, kit: ModuleType
) -> None:
    space = harness.space(index=FAST_INDEX)
    await _open(space, ledger, "a")
    await _fill(space, ledger, ["a"], 6)
    space.index_step(10_000)
    await asyncio.to_thread(space.checkpoint)
    files = kit.ckpt_files(space)
    await asyncio.to_thread(space.checkpoint)
    # the same files, the index under its other name (the manifest's is never overwritten)
    again = kit.ckpt_files(space)
    assert [f.replace("-c.", ".") for f in again] == files
    space = await harness.restart(space)
    ledger.check(space)
    await asyncio.to_thread(space.checkpoint)  # right after a restart: nothing new
    space = await harness.restart(space)
    ledger.check(space)


async def test_sessions_without_batches_survive_wal_deletion(
    harness: Any, ledger: Any, kit: ModuleType
) -> None:
    space = harness.space(wal=SMALL_SEGMENTS, index=FAST_INDEX)
    await _open(space, ledger, "early")
    await _fill(space, ledger, ["early"], 20)
    await _open(space, ledger, "late")  # its WalSessionOpen record sits among the batches
    await _fill(space, ledger, ["early"], 20)
    space.index_step(10_000)
    await asyncio.to_thread(space.checkpoint)
    assert all(name > "wal-0000000000000001.log" for name in kit.wal_files(space))

    space = await harness.restart(space)
    ledger.check(space)
    assert space.session_mark("late") == 0
    await ledger.append(space, "late", 1, 2)
    space = await harness.restart(space)
    ledger.check(space)


async def test_metadata_survives_wal_and_checkpoint(harness: Any, kit: ModuleType) -> None:
    """Contents, confidences and timestamps come back with their rows from either tier."""
    space = harness.space(wal=SMALL_SEGMENTS, index=FAST_INDEX)
    await space.open_session("m", create=True)
    contents, confidences, timestamps, vectors = [], [], [], []
    rng = np.random.default_rng(3)
    for seq in range(1, 9):
        n = 5
        v = kit.corpus_vectors(seq * 10, n)
        b = kit.make_batch(v, ids=[f"m{seq}.{i}" for i in range(n)])
        b.contents.extend([f"text {seq}/{i} é✓" for i in range(n)])
        conf = rng.uniform(0, 1, n).astype("<f4")
        ts = (1_700_000_000_000_000 + rng.integers(0, 10**9, n)).astype("<i8")
        b.confidences, b.timestamps_us = conf.tobytes(), ts.tobytes()
        await space.begin_append("m", seq, b)
        contents += list(b.contents)
        confidences += conf.tolist()
        timestamps += ts.tolist()
        vectors.append(v)
        if seq == 4:
            space.index_step(13)  # the checkpoint ends inside batch 3
            await asyncio.to_thread(space.checkpoint)

    def check(space: Any) -> None:
        assert space.contents[:] == contents
        assert space.confidences.view().tolist() == confidences
        assert space.timestamps_us.view().tolist() == timestamps
        stored = kit.normalise(np.concatenate(vectors))
        for row in (0, 12, 13, 14, 39):
            top = space.recall(space.snapshot(), stored[row], 1, None).results[0]
            assert top.lsn == row + 1 and top.content == contents[row]
            assert top.confidence == pytest.approx(confidences[row])
            assert top.when.ToMicroseconds() == timestamps[row]

    check(space)
    space = await harness.restart(space)
    assert space.checkpoint_rows == 13
    check(space)
    space.index_step(100)
    await asyncio.to_thread(space.checkpoint)
    space = await harness.restart(space)
    check(space)
