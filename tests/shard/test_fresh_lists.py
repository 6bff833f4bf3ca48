"""A fresh tier whose lists grow with the backlog, and float16 fresh rows."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import numpy as np

from engram.common.settings import IndexSettings
from engram.corpus import Corpus
from engram.shard.fresh import (
    BLOCK_ROWS,
    MAX_LISTS,
    FreshTier,
    Partitioning,
    list_block,
    scan,
    target_lists,
)

DIM = 32


def _normalised(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def test_lists_grow_with_the_backlog_from_the_least_up_to_the_most() -> None:
    assert target_lists(10_000, 1024, 2048) == 1024
    assert target_lists(5_000_000, 1024, 2048) == 2441
    assert target_lists(5_000_000, 1024, 1024) == 4882
    assert target_lists(1 << 40, 1024, 2048) == MAX_LISTS
    assert target_lists(5_000_000, 1024, 0) == 1024  # 0: fixed, as before


async def test_a_growing_backlog_gets_finer_lists_and_keeps_recall(
    harness: Any, kit: ModuleType
) -> None:
    """As the backlog grows the space learns a quantiser with more lists from the whole
    backlog and lists its older blocks again; probing ``nprobe`` lists still finds the exact
    top 10 (recall@10 >= 0.95 on the clustered corpus), and a recall scores a share of the
    rows that falls as the backlog grows."""
    settings = IndexSettings(
        fresh_partition_rows=1, fresh_lists=16, fresh_list_rows=1_024, fresh_nprobe=8
    )
    space = harness.space(index=settings)
    await space.open_session("s", create=True)
    corpus = Corpus(DIM, seed=12)
    n = 15 * 1024 + 10 * BLOCK_ROWS  # the small first blocks, then ten full ones
    raw = corpus.vectors(0, n).astype(np.float32)
    grown = []
    for seq, lo in enumerate(range(0, n, 8_192), start=1):
        await space.begin_append("s", seq, kit.make_batch(raw[lo : lo + 8_192]))
        while space.partition_step():
            pass
        if space.partitioning is not None:
            grown.append(space.partitioning.lists)
    assert grown == sorted(grown) and grown[-1] >= 2 * grown[0]
    p = space.partitioning
    # learnt again each time the backlog needed twice the lists: at least half of them now
    assert p is not None and 2 * p.lists > target_lists(n, 16, 1_024) and p.lists >= 128
    blocks = space.snapshot().blocks
    full = [b for b in blocks if b.full and len(b.data) == BLOCK_ROWS]
    # every full block is listed with the current quantiser (finer lists reached old blocks)
    assert full and all(b.listing is not None and b.listing.partitioning is p for b in full)
    queries = _normalised(corpus.vectors(n + 50_000, 100))
    hits = 0
    for q in queries:
        exact, _ = scan(blocks, q, 0, n, 10, probe=False)
        approx, _ = scan(blocks, q, 0, n, 10)
        hits += len(set(exact.tolist()) & set(approx.tolist()))
    assert hits / (10 * len(queries)) >= 0.95, hits
    stored = _normalised(raw)
    for row in (3, 20_000, n // 2, n - 5):
        res = space.recall(space.snapshot(), stored[row], 3)
        assert res.results[0].lsn == row + 1 and res.results[0].score > 0.999


def test_float16_rows_give_the_same_top_k_as_float32_rows() -> None:
    rows = _normalised(Corpus(DIM, seed=13).vectors(0, 15 * 1024 + 3 * BLOCK_ROWS + 777))
    wide, half = FreshTier(DIM), FreshTier(DIM, half=True)
    wide.append(rows)
    half.append(rows)
    assert half.snapshot()[0].data.dtype == np.float16
    back = half.rows(100, 40_000)
    assert back.dtype == np.float32 and np.allclose(back, rows[100:40_000], atol=2e-3)
    full = [b for t in (wide, half) for b in t.snapshot() if b.full and len(b.data) == BLOCK_ROWS]
    p = Partitioning.learn(rows[-BLOCK_ROWS:], 64, 8)
    for block in full:
        list_block(block, p)
    queries = _normalised(Corpus(DIM, seed=13).vectors(200_000, 50))
    odd = lambda r: r % 2 == 1  # noqa: E731
    for probe in (False, True):
        for q in queries:
            a_rows, a_scores = scan(wide.snapshot(), q, 0, len(rows), 10, probe=probe)
            b_rows, b_scores = scan(half.snapshot(), q, 0, len(rows), 10, probe=probe)
            np.testing.assert_allclose(b_scores, a_scores, atol=2e-3)
            # rows may swap only where float32 scores are within float16's rounding
            assert len(set(a_rows.tolist()) & set(b_rows.tolist())) >= 8
            f_rows, _ = scan(half.snapshot(), q, 0, len(rows), 10, odd, probe=probe)
            assert len(f_rows) == 10 and all(r % 2 == 1 for r in f_rows)
