"""The partitioned (IVF) fresh tier: large backlogs are scanned list by list, not row by row."""

from __future__ import annotations

import numpy as np

from engram.corpus import Corpus
from engram.shard.fresh import BLOCK_ROWS, FreshTier, Partitioning, partition, scan, train

DIM = 32


def _normalised(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _tier(blocks: int) -> tuple[FreshTier, np.ndarray]:
    corpus = Corpus(DIM, seed=3)
    # the first blocks of a tier are small (1,024 rows and doubling): fill past them
    rows = _normalised(corpus.vectors(0, BLOCK_ROWS * blocks))
    tier = FreshTier(DIM)
    tier.append(rows)
    return tier, rows


def test_partitioned_scan_finds_what_the_exact_scan_finds() -> None:
    tier, rows = _tier(blocks=4)
    full = tier.unpartitioned_full()
    assert len(full) >= 3
    centroids = train(full[0].data, nlist=64)
    for block in full:
        partition(block, centroids)
    assert tier.unpartitioned_full() == []
    ivf = Partitioning(centroids, nprobe=12)
    queries = _normalised(Corpus(DIM, seed=3).vectors(10 * BLOCK_ROWS, 100))
    hits = 0
    for q in queries:
        exact, _ = scan(tier.snapshot(), q, 0, len(rows), 10)
        approx, scores = scan(tier.snapshot(), q, 0, len(rows), 10, partitioning=ivf)
        assert list(scores) == sorted(scores, reverse=True)
        hits += len(set(exact) & set(approx))
    recall = hits / (10 * len(queries))
    assert recall >= 0.9, recall


def test_a_stored_vector_is_always_found_and_ranges_are_respected() -> None:
    tier, rows = _tier(blocks=3)
    full = tier.unpartitioned_full()
    centroids = train(full[0].data, nlist=32)
    for block in full:
        partition(block, centroids)
    ivf = Partitioning(centroids, nprobe=4)
    rng = np.random.default_rng(1)
    for row in rng.integers(0, len(rows), 50):
        # the cue's nearest list is the stored row's own list, so it is always probed
        found, scores = scan(tier.snapshot(), rows[row], 0, len(rows), 1, partitioning=ivf)
        assert found[0] == row and scores[0] > 0.999
    lo, hi = BLOCK_ROWS + 100, 2 * BLOCK_ROWS + 50
    found, _ = scan(tier.snapshot(), rows[5], lo, hi, 50, partitioning=ivf)
    assert len(found) and all(lo <= r < hi for r in found)


def test_filters_apply_inside_partitioned_blocks() -> None:
    tier, rows = _tier(blocks=3)
    full = tier.unpartitioned_full()
    centroids = train(full[0].data, nlist=16)
    for block in full:
        partition(block, centroids)
    ivf = Partitioning(centroids, nprobe=16)  # every list: must equal the exact filtered scan
    even = lambda r: r % 2 == 0  # noqa: E731
    for q in rows[:20]:
        exact, _ = scan(tier.snapshot(), q, 0, len(rows), 10, even)
        approx, _ = scan(tier.snapshot(), q, 0, len(rows), 10, even, partitioning=ivf)
        assert list(approx) == list(exact)
        assert all(r % 2 == 0 for r in approx)
