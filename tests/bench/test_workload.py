"""The benchmark's pure parts: what it writes, how it checks recall, how it summarises."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engram.bench import stats
from engram.bench.profiling import hot_spots
from engram.bench.workload import (
    SpaceData,
    SyntheticSource,
    exact_top_k,
    normalise,
    plan_spaces,
    queries,
    row_of,
)


def test_spaces_are_spread_evenly_over_the_shards() -> None:
    plans = plan_spaces("t", 6, 2, 2000)
    assert [p.shard for p in plans].count(0) == 3
    assert len({p.name for p in plans}) == 6
    assert len({p.pool_start for p in plans}) == 6


def test_batches_are_the_rows_the_ids_name() -> None:
    plan = plan_spaces("t", 1, 1, 2000)[0]
    data = SpaceData(plan, SyntheticSource(16), batch=500)
    out = np.empty((500, 16), np.float32)
    for k in (0, 3, 4, 9):  # passes 0, 0, 1, 2 over the 2,000-row pool
        data.fill_batch(k, out)
        ids = data.ids(k)
        assert len(ids) == 500 and len(data.batch_contents(k)) == 500
        for i in (0, 499):
            assert np.array_equal(out[i], data.row(row_of(ids[i])))


def test_passes_over_the_pool_are_new_vectors() -> None:
    plan = plan_spaces("t", 1, 1, 1000)[0]
    data = SpaceData(plan, SyntheticSource(64), batch=1000)
    a, b = np.empty((1000, 64), np.float32), np.empty((1000, 64), np.float32)
    data.fill_batch(0, a)
    data.fill_batch(1, b)
    cos = np.sum(normalise(a) * normalise(b), axis=1)
    assert np.all(np.abs(cos) < 0.9)  # no duplicates across passes
    # a pass is an isometry: distances within it are those of the corpus
    assert np.allclose(np.linalg.norm(a[:10] - a[10:20], axis=1),
                       np.linalg.norm(b[:10] - b[10:20], axis=1), rtol=1e-5)  # fmt: skip


def test_exact_top_k_matches_brute_force() -> None:
    source = SyntheticSource(32)
    plan = plan_spaces("t", 1, 1, 1000)[0]
    data = SpaceData(plan, source, batch=250)
    batches = [0, 1, 2, 3, 4, 6]  # batch 5 "failed": not in the space
    cues = queries(source, 50_000, 7, seed=1, cycles=2, plan_seed=plan.seed)
    rows, scores = exact_top_k(data, batches, cues, 10)
    all_rows = np.concatenate([np.arange(k * 250, (k + 1) * 250) for k in batches])
    vecs = normalise(np.stack([data.row(int(g)) for g in all_rows]))
    brute = normalise(cues) @ vecs.T
    for q in range(len(cues)):
        want = all_rows[np.argsort(-brute[q])[:10]]
        assert set(rows[q].tolist()) == set(want.tolist())
        assert np.all(np.diff(scores[q]) <= 1e-6)


def test_summaries_and_buckets() -> None:
    s = stats.summary_ms([0.001, 0.002, 0.003])
    assert s["count"] == 3 and s["p50"] == 2.0
    assert stats.summary_ms([])["p99"] is None
    assert stats.buckets([10.2, 10.7, 11.1, 13.0], [1, 2, 3, 4], 10.0, 3) == [3, 3, 0]
    assert stats.ratio(1, 0) is None and stats.ratio(1, 4) == 0.25


def test_py_spy_raw_stacks_become_hot_spots(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text(
        "thread (1): MainThread;run (/x/services/engram/shard/server.py:10);"
        "recall (/x/services/engram/shard/space.py:20);"
        "scan (/x/services/engram/shard/fresh.py:5) 30\n"
        "thread (1): MainThread;run (/x/services/engram/shard/server.py:10);"
        "select (/usr/lib/python3.11/selectors.py:468) 10\n"
    )
    h = hot_spots(raw)
    assert h["samples"] == 40
    assert h["self"][0] == {"function": "scan (engram/shard/fresh.py)", "samples": 30, "pct": 75.0}
    total = {x["function"]: x["pct"] for x in h["total_engram"]}
    assert total["run (engram/shard/server.py)"] == 100.0
