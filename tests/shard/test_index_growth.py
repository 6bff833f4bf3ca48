"""The HNSW tier grows its capacity a quarter at a time, and keeps every row searchable."""

from __future__ import annotations

import numpy as np

from engram.common.settings import IndexSettings
from engram.common.threads import trim_heap
from engram.shard.index import HnswTier, grown_capacity


def test_capacity_grows_by_a_quarter_or_to_what_is_needed() -> None:
    assert grown_capacity(16_384, 16_385) == 20_480
    assert grown_capacity(16_384, 40_000) == 40_000


def test_rows_added_past_the_capacity_are_all_found() -> None:
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((17_000, 8)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    tier = HnswTier(8, IndexSettings())
    for lo in range(0, len(rows), 4_000):
        tier.add(rows[lo : lo + 4_000], lo)
    trim_heap()  # hands freed memory back; the index is untouched by it
    found, _ = tier.search(rows[16_999], 1, limit_row=len(rows))
    assert tier.covered == 17_000 and found.tolist() == [16_999]
