"""What the benchmark writes: vector sources, memory spaces, batches and their exact content.

Writers cannot generate millions of vectors while they are timed (generation would dominate
their CPU) and cannot hold them all either (60 s at 100 K obs/s of dim 384 is 9 GB). So each
space gets a *pool* of distinct corpus rows, generated before the timed phase, and row ``g`` of a
space is ``pool[g % P] * signs(g // P)``: pass ``c`` over the pool flips the sign of a fixed
random half of the dimensions. A sign flip is an isometry, so every pass has exactly the
clustered structure of the corpus, while vectors of different passes are nearly orthogonal
(new "topics", no duplicates); it costs one multiply per batch. Because rows are a function of
``g``, the exact content of a space is known afterwards and recall@10 can be checked against an
exact search over all of it.

Observation ids are ``<space>/<g>``, so a recall hit maps back to its row.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from engram.control.assignment import default_shard
from engram.corpus import Corpus


class VectorSource(Protocol):
    name: str
    dim: int

    def vectors(self, start: int, n: int) -> np.ndarray:
        """Rows ``start .. start + n`` (float32, n x dim), the same however they are sliced."""
        ...


class SyntheticSource:
    """The deterministic clustered corpus of :mod:`engram.corpus`."""

    def __init__(self, dim: int, seed: int = 7) -> None:
        self.name = "synthetic"
        self.dim = dim
        self._corpus = Corpus(dim, seed=seed)

    def vectors(self, start: int, n: int) -> np.ndarray:
        return self._corpus.vectors(start, n)


class ArraySource:
    """Rows of a saved (m x dim) array, e.g. real text embeddings; row ``g`` beyond ``m`` is
    row ``g % m`` with the signs of pass ``g // m`` (see the module docstring)."""

    def __init__(self, path: Path | str, name: str, seed: int = 11) -> None:
        self.name = name
        self._base = np.load(path, mmap_mode="r")
        if self._base.ndim != 2 or len(self._base) == 0:
            raise ValueError(f"{path} does not hold a non-empty 2-D array")
        self.dim = int(self._base.shape[1])
        self.rows = len(self._base)
        self._seed = seed

    def vectors(self, start: int, n: int) -> np.ndarray:
        m = len(self._base)
        idx = np.arange(start, start + n)
        out = np.asarray(self._base[idx % m], dtype=np.float32)
        passes = idx // m
        for p in np.unique(passes):
            if p:
                out[passes == p] *= cycle_signs(self._seed, int(p), self.dim)
        return out


def cycle_signs(seed: int, cycle: int, dim: int) -> np.ndarray:
    """The ±1 vector of pass ``cycle`` (all +1 for pass 0)."""
    if cycle == 0:
        return np.ones(dim, np.float32)
    rng = np.random.default_rng([seed, cycle, 0x5157])
    return np.where(rng.random(dim) < 0.5, -1.0, 1.0).astype(np.float32)


def normalise(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    return (x / norms).astype(np.float32, copy=False)


@dataclass(frozen=True)
class SpacePlan:
    """One memory space of the load: its name, owner shard and pool of corpus rows."""

    name: str
    shard: int
    pool_start: int
    pool_rows: int
    seed: int


def plan_spaces(
    tag: str, count: int, shard_count: int, pool_rows: int, first_row: int = 0
) -> list[SpacePlan]:
    """``count`` space names spread evenly over the shards (by the default assignment)."""
    per_shard: dict[int, list[str]] = {s: [] for s in range(shard_count)}
    want = [
        count // shard_count + (1 if s < count % shard_count else 0) for s in range(shard_count)
    ]
    j = 0
    while any(len(per_shard[s]) < want[s] for s in per_shard):
        name = f"bench-{tag}-{j}"
        shard = default_shard(name, shard_count)
        if len(per_shard[shard]) < want[shard]:
            per_shard[shard].append(name)
        j += 1
        if j > 100_000:
            raise RuntimeError("could not spread spaces over the shards")
    names = []
    for i in range(max(want, default=0)):  # interleave: shard 0, 1, 0, 1 ...
        for s in range(shard_count):
            if i < len(per_shard[s]):
                names.append((per_shard[s][i], s))
    return [
        SpacePlan(name, shard, first_row + i * pool_rows, pool_rows, seed=1000 + i)
        for i, (name, shard) in enumerate(names)
    ]


class SpaceData:
    """The pool of one space and everything derived from it (writers and the checker)."""

    def __init__(self, plan: SpacePlan, source: VectorSource, batch: int) -> None:
        if plan.pool_rows % batch:
            raise ValueError(f"pool of {plan.pool_rows} rows is not a multiple of batch {batch}")
        self.plan = plan
        self.batch = batch
        self.dim = source.dim
        self.pool = np.ascontiguousarray(source.vectors(plan.pool_start, plan.pool_rows))
        self.contents = [
            f"memory {plan.pool_start + j} of {plan.name}" for j in range(plan.pool_rows)
        ]
        self._signs: dict[int, np.ndarray] = {}

    def signs(self, cycle: int) -> np.ndarray:
        s = self._signs.get(cycle)
        if s is None:
            s = self._signs[cycle] = cycle_signs(self.plan.seed, cycle, self.dim)
        return s

    def batch_rows(self, k: int) -> tuple[int, int]:
        """Rows ``[lo, hi)`` of batch ``k`` (0-based) of this space."""
        return k * self.batch, (k + 1) * self.batch

    def fill_batch(self, k: int, out: np.ndarray) -> None:
        """Writes the vectors of batch ``k`` into ``out`` (batch x dim)."""
        lo = (k * self.batch) % self.plan.pool_rows
        np.multiply(
            self.pool[lo : lo + self.batch],
            self.signs(k * self.batch // self.plan.pool_rows),
            out=out,
        )

    def ids(self, k: int) -> list[str]:
        name = self.plan.name
        lo, hi = self.batch_rows(k)
        return [f"{name}/{g}" for g in range(lo, hi)]

    def batch_contents(self, k: int) -> list[str]:
        lo = (k * self.batch) % self.plan.pool_rows
        return self.contents[lo : lo + self.batch]

    def row(self, g: int) -> np.ndarray:
        p = self.plan.pool_rows
        return self.pool[g % p] * self.signs(g // p)

    def blocks(self, batches: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(row numbers, normalised vectors) of the given batches, a pool pass at a time."""
        by_cycle: dict[int, list[int]] = {}
        per_pass = self.plan.pool_rows // self.batch
        for k in batches:
            by_cycle.setdefault(k // per_pass, []).append(k)
        pool_n = normalise(self.pool)
        for cycle, ks in sorted(by_cycle.items()):
            offsets = np.concatenate(
                [
                    np.arange((k % per_pass) * self.batch, (k % per_pass + 1) * self.batch)
                    for k in ks
                ]
            )
            rows = offsets + cycle * self.plan.pool_rows
            yield rows, pool_n[offsets] * self.signs(cycle)


def row_of(observation_id: str) -> int:
    """The row number of a benchmark observation id (``<space>/<g>``), or -1."""
    _, _, tail = observation_id.rpartition("/")
    return int(tail) if tail.isdigit() else -1


def queries(
    source: VectorSource, start: int, n: int, seed: int, cycles: int, plan_seed: int
) -> np.ndarray:
    """``n`` query vectors: held-out corpus rows (never written), each turned by the signs of a
    random pass ``< cycles`` of the space with ``plan_seed``, so it lands among that pass's
    clusters."""
    base = source.vectors(start, n).copy()
    rng = np.random.default_rng(seed)
    for i, c in enumerate(rng.integers(0, max(1, cycles), n)):
        base[i] *= cycle_signs(plan_seed, int(c), source.dim)
    return base


def exact_top_k(
    data: SpaceData, batches: list[int], cues: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-``k`` rows (and scores) of every cue over the given batches."""
    q = normalise(cues)
    nq = len(q)
    best_rows = np.full((nq, 0), -1, np.int64)
    best_scores = np.full((nq, 0), -np.inf, np.float32)
    for rows, vecs in data.blocks(batches):
        scores = vecs @ q.T  # (rows, nq)
        take = min(k, len(rows))
        top = np.argpartition(-scores, take - 1, axis=0)[:take].T  # (nq, take)
        cand_rows = np.concatenate([best_rows, rows[top]], axis=1)
        cand_scores = np.concatenate(
            [best_scores, np.take_along_axis(scores.T, top, axis=1)], axis=1
        )
        order = np.argsort(-cand_scores, axis=1, kind="stable")[:, :k]
        best_rows = np.take_along_axis(cand_rows, order, axis=1)
        best_scores = np.take_along_axis(cand_scores, order, axis=1)
    return best_rows, best_scores
