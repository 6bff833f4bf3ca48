"""Recall of engram.shard.space.Space while rows move from the fresh tier into HNSW.

A recall merges the HNSW tier (rows ``[0, indexed)``) with an exact scan of the fresh tier
(``[indexed, visible)``). Whatever the split, and across a checkpoint and restart, a recall must
return each row at most once, with the row's own id, LSN and cosine score, and find a stored
vector as its own best match.
"""

from __future__ import annotations

import asyncio
import threading
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from engram.common.settings import IndexSettings
from engram.contract.errors import ValidationError
from engram.corpus import Corpus
from engram.v1 import streaming_pb2 as pb

DIM = 32
ROWS = 3000
INDEX = IndexSettings(build_threads=1)  # one thread: the graph, hence the test, is deterministic
_CUES = Corpus(DIM).vectors(50_000, 40)  # cues near the stored rows, none of them stored


async def _load(harness: Any, kit: ModuleType, rows: int = ROWS, batch: int = 100) -> tuple:
    ledger = kit.Ledger(dim=DIM)
    space = harness.space(index=INDEX)
    for sid in ("a", "b"):
        await space.open_session(sid, create=True)
        ledger.open(sid)
    for i in range(rows // batch):
        sid = "ab"[i % 2]
        await ledger.append(space, sid, ledger.next_seq(sid), batch)
    return space, ledger


def _check(space: Any, ledger: Any, kit: ModuleType, probe_rows: np.ndarray) -> None:
    ids = ledger.ids()
    stored = ledger.vectors()
    snap = space.snapshot()
    assert snap.visible == space.visible == len(ids)

    for row in probe_rows.tolist():
        res = space.recall(snap, stored[row], 10, None)
        assert res.snapshot_sequence == snap.visible
        assert res.metadata.indexed_count + res.metadata.fresh_count == snap.visible
        assert res.metadata.indexed_count == snap.indexed
        got = [m.id for m in res.results]
        assert len(got) == 10 and len(set(got)) == 10, got
        top = res.results[0]
        assert top.id == ids[row] and top.lsn == row + 1
        assert top.score == pytest.approx(1.0, abs=1e-4)
        scores = [m.score for m in res.results]
        assert scores == sorted(scores, reverse=True)
        for m in res.results:
            assert ids[m.lsn - 1] == m.id
            assert m.score == pytest.approx(float(stored[m.lsn - 1] @ stored[row]), abs=1e-4)

    # Recall@10 against exact search, for cues that are not stored vectors.
    cues = _CUES
    exact = np.argsort(-(stored @ kit.normalise(cues).T), axis=0)[:10].T
    hits = 0
    for cue, want in zip(cues, exact, strict=True):
        res = space.recall(snap, cue, 10, None)
        assert len({m.id for m in res.results}) == len(res.results) == 10
        hits += len({m.lsn - 1 for m in res.results} & set(want.tolist()))
    assert hits / (10 * len(cues)) >= 0.95


async def test_recall_while_rows_move_between_tiers(harness: Any, kit: ModuleType) -> None:
    space, ledger = await _load(harness, kit)
    probes = np.random.default_rng(5).choice(ROWS, 60, replace=False)
    probes = np.concatenate([probes, [0, 1023, 1024, 1234, 1235, ROWS - 1]])

    _check(space, ledger, kit, probes)  # all fresh
    assert space.index_step(1234) == 1234  # inside a batch and past the first fresh block
    _check(space, ledger, kit, probes)
    assert space.index_step(700) == 700
    _check(space, ledger, kit, probes)
    while space.index_step(256):
        pass
    assert space.backlog() == 0
    _check(space, ledger, kit, probes)

    await asyncio.to_thread(space.checkpoint)
    space = await harness.restart(space)
    _check(space, ledger, kit, probes)

    # New rows on top of the loaded index, then part of them indexed.
    for _ in range(2):
        await ledger.append(space, "a", ledger.next_seq("a"), 250)
    more = np.concatenate([probes, np.arange(ROWS, ROWS + 500, 37)])
    _check(space, ledger, kit, more)
    space.index_step(333)
    _check(space, ledger, kit, more)
    space = await harness.restart(space)
    _check(space, ledger, kit, more)


@pytest.mark.parametrize("indexed", [0, 77, 200])
async def test_k_larger_than_count_returns_every_row_once(
    harness: Any, kit: ModuleType, indexed: int
) -> None:
    space, ledger = await _load(harness, kit, rows=200, batch=40)
    space.index_step(indexed)
    cue = ledger.vectors()[7]
    res = space.recall(space.snapshot(), cue, 1000, None)
    assert sorted(m.id for m in res.results) == sorted(ledger.ids())
    scores = [m.score for m in res.results]
    assert scores == sorted(scores, reverse=True)
    assert res.results[0].lsn == 8
    assert res.snapshot_sequence == 200


@pytest.mark.parametrize("indexed", [0, 1500, ROWS])
async def test_min_score_filters(harness: Any, kit: ModuleType, indexed: int) -> None:
    space, ledger = await _load(harness, kit)
    space.index_step(indexed)
    stored = ledger.vectors()
    snap = space.snapshot()
    for row in (3, 1499, 1500, 2999):
        cue = stored[row]
        exact = stored @ stored[row]
        for min_score in (0.999999, 0.97, 0.9):
            res = space.recall(snap, cue, 50, min_score)
            got = {m.lsn - 1 for m in res.results}
            assert all(m.score >= min_score for m in res.results)
            want = set(np.argsort(-exact)[:50].tolist()) & set(np.flatnonzero(exact >= min_score))
            assert row in got
            assert got <= want | {row}
            if indexed == 0:
                assert got == want  # the fresh tier is scanned exactly
            else:
                assert len(got) >= 0.9 * len(want)
        assert [m.lsn - 1 for m in space.recall(snap, cue, 50, 0.999999).results] == [row]


async def test_snapshot_does_not_see_later_rows(harness: Any, kit: ModuleType) -> None:
    space, ledger = await _load(harness, kit, rows=2000)
    space.index_step(500)
    snap = space.snapshot()
    assert snap.visible == 2000
    for _ in range(5):
        await ledger.append(space, "b", ledger.next_seq("b"), 200)
    space.index_step(10_000)  # rows past the snapshot are now in HNSW, and fresh blocks dropped
    stored = ledger.vectors()
    for row in (10, 700, 1999, 2000, 2500, 2999):
        res = space.recall(snap, stored[row], 20, None)
        assert res.snapshot_sequence == 2000
        assert all(m.lsn <= 2000 for m in res.results)
        if row < 2000:
            assert res.results[0].lsn == row + 1
    fresh = space.recall(space.snapshot(), ledger.vectors()[2500], 5, None)
    assert fresh.results[0].lsn == 2501 and fresh.snapshot_sequence == 3000


async def test_recall_on_empty_space_and_wrong_cue(harness: Any, kit: ModuleType) -> None:
    space = harness.space()
    res = space.recall(space.snapshot(), np.ones(DIM, np.float32), 10, None)
    assert list(res.results) == [] and res.snapshot_sequence == 0
    space, _ = await _load(harness, kit, rows=100, batch=50)
    with pytest.raises(ValidationError) as info:
        space.recall(space.snapshot(), np.ones(DIM + 1, np.float32), 10, None)
    assert info.value.code == pb.WRONG_DIMENSION


async def test_recall_concurrent_with_builder(harness: Any, kit: ModuleType) -> None:
    space, ledger = await _load(harness, kit)
    ids = ledger.ids()
    stored = ledger.vectors()
    space.index_step(1)  # the index exists before the race (the next test races its creation)
    done = threading.Event()

    def build() -> None:
        try:
            while space.index_step(64):
                pass
        finally:
            done.set()

    builder = asyncio.create_task(asyncio.to_thread(build))
    rng = np.random.default_rng(11)
    recalls = 0
    try:
        while not done.is_set() or recalls < 20:
            row = int(rng.integers(ROWS))
            snap = space.snapshot()
            res = await asyncio.to_thread(space.recall, snap, stored[row], 10, None)
            got = [m.id for m in res.results]
            assert len(set(got)) == len(got) == 10
            assert got[0] == ids[row], (row, snap.indexed)
            recalls += 1
    finally:
        await builder
    assert space.backlog() == 0


async def test_snapshot_racing_the_first_index_step(harness: Any, kit: ModuleType) -> None:
    space, ledger = await _load(harness, kit, rows=2000)
    assert space.hnsw is None
    real_snapshot = space.fresh.snapshot

    def builder_runs_between() -> list:
        space.index_step(10_000)  # the builder thread, scheduled right here
        return real_snapshot()

    space.fresh.snapshot = builder_runs_between
    snap = space.snapshot()
    res = space.recall(snap, ledger.vectors()[10], 5, None)
    assert res.results[0].id == ledger.ids()[10]


async def test_a_drained_space_lets_its_last_fresh_block_go_and_keeps_recalling(
    harness: Any, kit: ModuleType
) -> None:
    space, ledger = await _load(harness, kit)
    probes = np.array([0, 1500, 2047, 2048, ROWS - 1])
    last = space.fresh.snapshot()[-1]
    assert not last.full  # 3,000 rows: blocks of 1,024 and 2,048 (partly filled)
    space.retire_indexed_tail()
    assert space.fresh.snapshot()[-1] is last  # nothing indexed yet: kept

    while space.index_step(256):
        pass
    space.release_idle_memory()
    await asyncio.sleep(0)  # the retirement runs on the event loop
    assert space.fresh.snapshot() == []
    _check(space, ledger, kit, probes)

    # rows arriving afterwards go to a new, small block and are found at once
    await ledger.append(space, "a", ledger.next_seq("a"), 100)
    assert [len(b.data) for b in space.fresh.snapshot()] == [1024]
    _check(space, ledger, kit, np.concatenate([probes, [ROWS, ROWS + 99]]))
    while space.index_step(256):
        pass
    _check(space, ledger, kit, np.concatenate([probes, [ROWS, ROWS + 99]]))
