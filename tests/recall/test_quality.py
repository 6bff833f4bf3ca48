"""Approximate-search quality of the HNSW tier with the default index settings.

20,000 clustered corpus vectors of dimension 64 (above the 4,096 rows below which the index is
searched exactly) are written to a Space and all moved into HNSW; 200 held-out corpus rows are
the queries. Recall@10 against exact search must be at least 0.95, and so must recall@100 for
k = 100 (the search beam grows with k: ef = max(ef_search, 2k)). Scores of the rows returned
must be their exact cosines, and results best-first.
"""

from __future__ import annotations

import asyncio
from types import ModuleType
from typing import Any

import numpy as np

from engram.common.settings import IndexSettings

DIM = 64
ROWS = 20_000
QUERIES = 200
BATCH = 2_000


async def test_recall_at_k_against_exact_search(harness: Any, kit: ModuleType) -> None:
    corpus = kit.corpus(DIM)
    vectors = corpus.vectors(0, ROWS)
    stored = kit.normalise(vectors)
    space = harness.space(index=IndexSettings())  # the defaults
    await space.open_session("q", create=True)
    futs = [
        space.begin_append(
            "q",
            seq,
            kit.make_batch(vectors[lo : lo + BATCH], [f"v{r}" for r in range(lo, lo + BATCH)]),
        )
        for seq, lo in enumerate(range(0, ROWS, BATCH), 1)
    ]
    await asyncio.gather(*futs)
    assert space.visible == ROWS
    assert await asyncio.to_thread(space.index_step, ROWS) == ROWS
    assert space.backlog() == 0

    cues = corpus.vectors(ROWS + 1_000, QUERIES)  # held out: never written
    q = kit.normalise(cues)
    exact = stored @ q.T  # (ROWS, QUERIES) float32
    snap = space.snapshot()
    assert snap.indexed == ROWS and snap.visible == ROWS

    def measure(k: int) -> float:
        truth = np.argpartition(-exact, k - 1, axis=0)[:k].T
        hits = 0
        for i, cue in enumerate(cues):
            res = space.recall(snap, cue, k, None)
            rows = [m.lsn - 1 for m in res.results]
            assert len(rows) == len(set(rows)) == k
            scores = np.array([m.score for m in res.results])
            assert np.all(np.diff(scores) <= 1e-6), "not best-first"
            np.testing.assert_allclose(scores, exact[rows, i], atol=1e-4)
            assert [m.id for m in res.results] == [f"v{r}" for r in rows]
            hits += len(set(rows) & set(truth[i].tolist()))
        return hits / (k * len(cues))

    at10 = await asyncio.to_thread(measure, 10)
    at100 = await asyncio.to_thread(measure, 100)
    print(f"recall@10 = {at10:.4f}, recall@100 = {at100:.4f}")
    assert at10 >= 0.95
    assert at100 >= 0.95
