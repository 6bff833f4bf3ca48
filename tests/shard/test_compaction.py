"""Compaction (engram.shard.compaction): deleted rows leave the index, the columns and the
checkpoint's files, while recalls on live rows answer as before and acks go on.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from engram.common.settings import IndexSettings
from engram.shard.recall import Filters

COMPACTING = IndexSettings(
    m=8, ef_construction=40, build_threads=1, compact_min_rows=1000, compact_deleted_share=0.2
)
K = 10


async def _fill(space: Any, kit: ModuleType, lo: int, hi: int, sid: str = "a") -> np.ndarray:
    """Appends rows ``lo..hi`` (ids ``id<row>``, contents ``secret<row>``, time = row)."""
    if sid not in space.sessions.durable:
        await space.open_session(sid, create=True)
    vectors = kit.corpus_vectors(lo, hi - lo)
    seq = space.session_mark(sid) or 0
    for start in range(lo, hi, 500):
        end = min(hi, start + 500)
        b = kit.make_batch(
            vectors[start - lo : end - lo],
            [f"id{i}" for i in range(start, end)],
            [f"secret{i}" for i in range(start, end)],
        )
        b.timestamps_us = np.arange(start, end, dtype="<i8").tobytes()
        seq += 1
        await space.begin_append(sid, seq, b)
    return vectors


async def _delete(space: Any, rows: list[int]) -> None:
    found, already, not_found = space.resolve_delete([f"id{r}" for r in rows])
    result = await space.begin_delete(found, "t", already=already, not_found=not_found)
    assert result.deleted == len(rows)


def _compact(space: Any, step: int = 1000) -> None:
    """Runs a whole compaction as the builder would (builder thread: call in a thread)."""
    assert space.compaction_due()
    while True:
        space.mark_step()
        if not space.compact_step(step):
            return


def _recall(space: Any, cue: np.ndarray, filters: Filters | None = None) -> list[tuple]:
    out = space.recall(space.snapshot(), cue, K, filters)
    return [(r.lsn, r.id, r.content, round(r.score, 5)) for r in out.results]


async def test_exact_results_unchanged_and_memory_given_back(harness: Any, kit: ModuleType) -> None:
    space = harness.space(index=COMPACTING)
    vectors = await _fill(space, kit, 0, 4000)
    space.index_step(4000)  # 4,000 rows: searched exactly
    dead = sorted(set(range(0, 4000, 3)) | set(range(200, 260)))
    await _delete(space, dead)
    space.mark_step()
    probes = [vectors[r] for r in range(1, 4000, 53)] + [vectors[r] for r in dead[::97]]
    since = Filters(since_us=1500)
    before = [_recall(space, cue) for cue in probes] + [_recall(space, c, since) for c in probes]
    index_bytes, column_bytes = space.hnsw.nbytes, space.columns_bytes
    assert not space.meta_stale and space.compactions == 0

    await asyncio.to_thread(_compact, space)

    assert space.compactions == 1 and space.rebuild is None
    assert space.hnsw.covered == 4000 and space.hnsw.elements == 4000 - len(dead)
    after = [_recall(space, cue) for cue in probes] + [_recall(space, c, since) for c in probes]
    assert after == before  # same rows, same order, same ids and contents
    returned = {lsn - 1 for result in after for lsn, *_ in result}
    assert not returned & set(dead) and all(len(r) == K for r in after)
    # the memory: the index holds the live rows only, the columns their strings only
    assert space.hnsw.nbytes < index_bytes * 0.8
    assert space.columns_bytes < column_bytes * 0.8
    assert space.ids[dead[0]] == "" and space.contents[dead[0]] == ""
    assert space.ids[1] == "id1" and space.contents[1] == "secret1"
    assert not space.compaction_due()
    # the listing and a second delete of a compacted id: gone (not found), not an error
    listed = [i for ids, _ in space.scan_ids(1000) for i in ids]
    assert len(listed) == 4000 - len(dead) and "id0" not in listed
    again, already, not_found = space.resolve_delete(["id0", "id1"])
    assert (again.tolist(), already, not_found) == ([1], 0, 1)


async def test_hnsw_recall_quality_unchanged(harness: Any, kit: ModuleType) -> None:
    space = harness.space(index=COMPACTING)
    vectors = kit.normalise(await _fill(space, kit, 0, 12_000))
    space.index_step(12_000)
    rng = np.random.default_rng(7)
    dead = sorted(rng.choice(12_000, 4_000, replace=False).tolist())
    await _delete(space, dead)
    space.mark_step()
    live = np.setdiff1d(np.arange(12_000), dead)
    cues = [vectors[r] for r in rng.choice(12_000, 60, replace=False).tolist()]

    def quality() -> float:
        hits = 0
        for cue in cues:
            exact = live[np.argsort(-(vectors[live] @ cue))[:K]]
            got = {lsn - 1 for lsn, *_ in _recall(space, cue)}
            assert not got & set(dead)
            hits += len(got & set(exact.tolist()))
        return hits / (K * len(cues))

    before = quality()
    await asyncio.to_thread(_compact, space)
    assert space.hnsw.elements == len(live) and space.hnsw.marked == 0
    after = quality()
    assert before > 0.9 and after > before - 0.05


async def test_restart_after_compaction_keeps_everything(
    harness: Any, kit: ModuleType, tmp_path: Path
) -> None:
    space = harness.space(index=COMPACTING)
    vectors = await _fill(space, kit, 0, 3000)
    space.index_step(3000)
    await asyncio.to_thread(space.checkpoint)  # its metadata chunk holds every string
    dead = list(range(0, 3000, 2))
    await _delete(space, dead)
    space.mark_step()
    await asyncio.to_thread(_compact, space)
    assert space.checkpoint_due()  # at once: the disk is given back too
    old_files = kit.ckpt_files(space)
    await asyncio.to_thread(space.checkpoint)
    files = kit.ckpt_files(space)
    meta = [f for f in files if f.startswith("meta-")]
    assert meta == ["meta-000000000000-000000003000-000000001500.pb"]
    assert not set(old_files) & set(meta)  # the old chunk is gone
    on_disk = b"".join(p.read_bytes() for p in (space.directory / "ckpt").iterdir())
    assert b"secret0" not in on_disk and b"secret1" in on_disk
    # rows and deletes after the checkpoint: in the WAL only
    await _fill(space, kit, 3000, 3500)
    await _delete(space, [3001, 3003, 1])
    dead += [1, 3001, 3003]
    probes = [vectors[r] for r in range(0, 3000, 37)]
    before = [_recall(space, cue) for cue in probes]

    space = await harness.restart(space)
    assert space.hnsw.covered == 3000 and space.hnsw.elements == 1500
    assert space.visible == 3500 and space.live_count == 3500 - len(dead)
    assert space.blanked_rows == 1500
    listed = [i for ids, _ in space.scan_ids(1000) for i in ids]
    assert listed == [f"id{r}" for r in sorted(set(range(3500)) - set(dead))]
    space.index_step(10_000)
    space.mark_step()
    assert [_recall(space, cue) for cue in probes] == before
    # and again after the next checkpoint (index holding rows skipped as deleted)
    await asyncio.to_thread(space.checkpoint)
    space = await harness.restart(space)
    assert [_recall(space, cue) for cue in probes] == before
    assert space.hnsw.covered == 3500 and space.live_count == 3500 - len(dead)


async def test_acks_go_on_while_a_large_space_compacts(harness: Any, kit: ModuleType) -> None:
    space = harness.space(index=COMPACTING)
    await _fill(space, kit, 0, 20_000)
    space.index_step(20_000)
    await _delete(space, list(range(0, 20_000, 2)))
    space.mark_step()
    assert space.compaction_due()
    done = threading.Event()
    progress: list[int] = []  # the rebuild's position at each ack during the compaction

    def compact() -> None:
        try:
            _compact(space, step=200)
        finally:
            done.set()

    worker = asyncio.get_running_loop().run_in_executor(None, compact)
    await space.open_session("w", create=True)
    seq = 0
    while not done.is_set():
        seq += 1
        b = kit.make_batch(kit.corpus_vectors(seq, 5), [f"w{seq}-{i}" for i in range(5)])
        await space.begin_append("w", seq, b)  # acknowledged (durable and visible)
        job = space.rebuild
        if job is not None:
            progress.append(job.pos)
    await worker
    assert space.compactions == 1
    # acks arrived while the rebuild was under way, at several points of it
    assert len({p for p in progress if 0 < p < 20_000}) >= 3, progress[:20]
    assert space.live_count == 10_000 + 5 * seq
    space.index_step(100_000)
    listed = {i for ids, _ in space.scan_ids(5000) for i in ids}
    assert {f"w{seq}-{i}" for i in range(5)} <= listed and "id1" in listed and "id0" not in listed


async def test_rows_deleted_during_the_rebuild_never_return(harness: Any, kit: ModuleType) -> None:
    space = harness.space(index=COMPACTING)
    vectors = await _fill(space, kit, 0, 6000)
    space.index_step(5000)  # 1,000 rows fresh: indexed while the rebuild runs
    await _delete(space, list(range(0, 5000, 3)))
    space.mark_step()
    space.mark_step()
    assert space.compaction_due()
    space.compact_step(2000)  # rows 0..1999 copied
    late = [1, 2, 4000, 4001, 5500]  # copied, not yet copied, fresh
    await _delete(space, late)
    space.index_step(10_000)  # the builder indexes (and marks) between compaction steps
    await asyncio.to_thread(_compact, space)
    dead = set(range(0, 5000, 3)) | set(late)
    # rows 1 and 2 were copied before their delete: marked in the new index; the others
    # deleted meanwhile were marked in the old one (so skipped) or skipped as they were added
    assert space.hnsw.covered == 6000 and space.hnsw.marked == 2
    assert space.hnsw.elements == 6000 - len(dead) + 2
    for row in [*late, 3, 2999, 5999]:
        got = {lsn - 1 for lsn, *_ in _recall(space, vectors[row])}
        assert not got & dead and len(got) == K
        if row not in dead:
            assert row in got
