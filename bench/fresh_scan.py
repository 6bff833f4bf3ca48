"""Recall cost of a large fresh tier, in-process: no cluster, one space's fresh tier alone.

Fills a fresh tier with ``--rows`` rows of the clustered corpus (dim 384 by default), lists it
with the shard's own partitioner (``Maintenance.partition_step``, run to the end as if the
partitioner thread had kept up), then times single-cue recalls over the whole backlog and
compares their top 10 with an exact search of the same rows. Prints one JSON line per size:
rows, lists, nprobe, recall P50/P99 (ms), recall@10, bytes per row, partitioning seconds.

    .venv/bin/python bench/fresh_scan.py --rows 500000,2000000
    .venv/bin/python bench/fresh_scan.py --rows 2000000 --list-rows 0      # fixed lists
    .venv/bin/python bench/fresh_scan.py --rows 2000000 --float16

The settings are the shard's (``ENGRAM_FRESH_*``), overridden by the options. Memory: about
``rows * dim * 4`` bytes (half with ``--float16``) plus 8 bytes a row for the listings.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time

import numpy as np

from engram.common.settings import IndexSettings
from engram.corpus import Corpus
from engram.shard.fresh import FreshTier, Partitioning, scan
from engram.shard.maintenance import Maintenance

_BATCH = 8_192


class _Space:
    """What ``Maintenance.partition_step`` reads of a space: its fresh tier and settings."""

    def __init__(self, fresh: FreshTier, settings: IndexSettings) -> None:
        self.fresh = fresh
        self._index_settings = settings
        self.partitioning: Partitioning | None = None
        self.name = "bench"

    def backlog(self) -> int:
        return self.fresh.end_row

    def _learn(self, rows: np.ndarray) -> tuple[Partitioning, np.ndarray]:
        return Maintenance._learn(self, rows)  # type: ignore[arg-type]


def _exact(blocks: list, queries: np.ndarray, k: int) -> np.ndarray:
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_r = np.zeros((len(queries), k), np.int64)
    for b in blocks:
        s = queries @ np.asarray(b.data[: b.filled], np.float32).T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        cand_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], axis=1)
        cand_r = np.concatenate([best_r, top + b.first_row], axis=1)
        keep = np.argsort(-cand_s, axis=1)[:, :k]
        best_s = np.take_along_axis(cand_s, keep, 1)
        best_r = np.take_along_axis(cand_r, keep, 1)
    return best_r


def run(rows: int, settings: IndexSettings, queries: int, seed: int) -> dict[str, object]:
    corpus = Corpus(_DIM, seed=seed)
    fresh = FreshTier(_DIM, 0, settings.fresh_float16)
    space = _Space(fresh, settings)
    partition_s = 0.0
    for lo in range(0, rows, _BATCH):  # listed as rows arrive, as the partitioner thread does
        v = corpus.vectors(lo, min(_BATCH, rows - lo))
        fresh.append(v, np.linalg.norm(v, axis=1))
        t = time.process_time()
        while Maintenance.partition_step(space):  # type: ignore[arg-type]
            pass
        partition_s += time.process_time() - t
    q = corpus.vectors(rows + 1_000_000, queries)  # held out: never written
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    blocks = fresh.snapshot()
    truth = _exact(blocks, q, 10)
    took, hits = [], 0
    for i, cue in enumerate(q):
        t0 = time.perf_counter()
        found, _ = scan(blocks, cue, 0, rows, 10)
        took.append(time.perf_counter() - t0)
        hits += len(set(found.tolist()) & set(truth[i].tolist()))
    p = space.partitioning
    listed = sum(b.listing.covered for b in blocks if b.listing is not None)
    return {
        "rows": rows,
        "float16": settings.fresh_float16,
        "lists": p.nlist if p is not None else 0,
        "quantisers": len({id(b.listing.partitioning) for b in blocks if b.listing}),
        "nprobe": settings.fresh_nprobe,
        "list_rows": settings.fresh_list_rows,
        "recall_p50_ms": round(float(np.percentile(took, 50)) * 1e3, 2),
        "recall_p99_ms": round(float(np.percentile(took, 99)) * 1e3, 2),
        "recall_at_10": round(hits / (10 * len(q)), 4),
        "bytes_per_row": round(_DIM * np.dtype(fresh.dtype).itemsize + 8 * listed / rows, 1),
        "partition_cpu_s": round(partition_s, 1),
    }


_DIM = 384


def main() -> None:
    global _DIM
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="500000,2000000", help="comma-separated backlog sizes")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--list-rows", type=int, help="ENGRAM_FRESH_LIST_ROWS (0: fixed lists)")
    ap.add_argument("--lists", type=int, help="ENGRAM_FRESH_LISTS")
    ap.add_argument("--nprobe", type=int, help="ENGRAM_FRESH_NPROBE")
    ap.add_argument("--float16", action="store_true", help="ENGRAM_FRESH_FLOAT16=true")
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    _DIM = args.dim
    changes: dict[str, object] = {"fresh_partition_rows": 1}
    for field, value in (
        ("fresh_list_rows", args.list_rows),
        ("fresh_lists", args.lists),
        ("fresh_nprobe", args.nprobe),
    ):
        if value is not None:
            changes[field] = value
    if args.float16:
        changes["fresh_float16"] = True
    settings = dataclasses.replace(IndexSettings(), **changes)
    for rows in (int(r) for r in args.rows.split(",")):
        print(json.dumps(run(rows, settings, args.queries, args.seed)), flush=True)


if __name__ == "__main__":
    main()
