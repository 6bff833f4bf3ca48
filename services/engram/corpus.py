"""A deterministic synthetic corpus that behaves like real embeddings.

Vectors are drawn around a few hundred cluster centres in a low-rank subspace, with noise, so
nearest-neighbour structure resembles sentence embeddings (uniform random vectors do not: HNSW
recall on them is meaningless). Used by the demo, tests and benchmarks.
"""

from __future__ import annotations

import numpy as np

_BLOCK = 1024  # rows are generated in blocks of this many, each from its own seed


class Corpus:
    def __init__(self, dim: int, *, seed: int = 7, clusters: int = 256, rank: int = 48) -> None:
        rng = np.random.default_rng(seed)
        self.dim = dim
        self._basis = rng.standard_normal((min(rank, dim), dim)).astype(np.float32)
        self._centres = rng.standard_normal((clusters, min(rank, dim))).astype(np.float32)
        self._seed = seed

    def vectors(self, start: int, n: int) -> np.ndarray:
        """Rows ``start .. start + n`` of the corpus (the same rows however they are sliced)."""
        first, last = start // _BLOCK, (start + n - 1) // _BLOCK
        rows = np.concatenate([self._block(b) for b in range(first, last + 1)])
        lo = start - first * _BLOCK
        return rows[lo : lo + n]

    def _block(self, b: int) -> np.ndarray:
        rng = np.random.default_rng([self._seed, b])
        which = rng.integers(0, len(self._centres), _BLOCK)
        latent = self._centres[which] + 0.35 * rng.standard_normal(
            (_BLOCK, self._centres.shape[1])
        ).astype(np.float32)
        out = latent @ self._basis
        out += 0.05 * rng.standard_normal((_BLOCK, self.dim)).astype(np.float32)
        return out.astype(np.float32)
