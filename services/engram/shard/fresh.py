"""The fresh tier of a memory space: durable rows not yet in the HNSW index.

Rows live in fixed-size numpy blocks, appended in LSN order the moment a batch is durable, and
are scanned exactly by recalls. The builder copies rows from here into the index; a block is
dropped once every row in it is indexed. Readers take a snapshot (the list of blocks) so a block
the builder drops stays alive for a recall that still scans it.

When the un-indexed backlog grows large (HNSW insertion is far slower than ingest), the builder
*partitions* full blocks, IVF-style, as Milvus does with the interim index of growing segments:
coarse centroids are trained once per space, each full block's rows are grouped by their
nearest centroid (off the ack path), and a recall scans only the rows of the ``nprobe`` lists
nearest the cue in those blocks. The rest (small backlogs, the block being filled) is scanned
exactly.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BLOCK_ROWS = 16_384  # largest block; the first blocks of a space are smaller (from 1,024 up)
_FIRST_BLOCK_ROWS = 1_024


@dataclass
class Block:
    first_row: int
    data: np.ndarray  # (capacity, dim) float32; rows past ``filled`` are unused
    filled: int = 0
    # set by partition(): block rows ordered by list, and where each list starts in ``order``
    order: np.ndarray | None = None
    offsets: np.ndarray | None = None


@dataclass(frozen=True)
class Partitioning:
    centroids: np.ndarray  # (nlist, dim), unit length
    nprobe: int

    def lists_for(self, cue: np.ndarray) -> np.ndarray:
        return np.argsort(-(self.centroids @ cue))[: self.nprobe]


def train(sample: np.ndarray, nlist: int, iterations: int = 8, seed: int = 0) -> np.ndarray:
    """Spherical k-means on normalised rows: ``nlist`` unit centroids."""
    rng = np.random.default_rng(seed)
    nlist = min(nlist, len(sample))
    centroids = sample[rng.choice(len(sample), nlist, replace=False)].copy()
    for _ in range(iterations):
        nearest = np.argmax(sample @ centroids.T, axis=1)
        sums = np.zeros_like(centroids)
        np.add.at(sums, nearest, sample)
        norms = np.linalg.norm(sums, axis=1)
        empty = norms == 0
        sums[empty] = sample[rng.choice(len(sample), int(empty.sum()))]
        norms[empty] = 1.0
        centroids = (sums / norms[:, None]).astype(np.float32)
    return centroids


def partition(block: Block, centroids: np.ndarray) -> None:
    """Groups a full block's rows by nearest centroid (builder thread; readers see the result
    only once both arrays are set)."""
    nearest = np.argmax(block.data[: block.filled] @ centroids.T, axis=1)
    order = np.argsort(nearest, kind="stable").astype(np.int32)
    offsets = np.searchsorted(nearest[order], np.arange(len(centroids) + 1)).astype(np.int32)
    block.offsets = offsets  # set first: scan() uses a block's lists only once order is set
    block.order = order


class FreshTier:
    def __init__(self, dim: int, first_row: int = 0) -> None:
        self.dim = dim
        self.blocks: list[Block] = []
        self.end_row = first_row  # one past the last appended row
        self._last_capacity = 0

    def append(self, vectors: np.ndarray) -> None:
        """Appends normalised rows (called on the event loop after the batch is durable)."""
        done = 0
        n = len(vectors)
        while done < n:
            if not self.blocks or self.blocks[-1].filled == len(self.blocks[-1].data):
                rows = min(BLOCK_ROWS, max(_FIRST_BLOCK_ROWS, 2 * self._last_capacity))
                self._last_capacity = rows
                self.blocks.append(Block(self.end_row, np.empty((rows, self.dim), np.float32)))
            block = self.blocks[-1]
            take = min(n - done, len(block.data) - block.filled)
            block.data[block.filled : block.filled + take] = vectors[done : done + take]
            block.filled += take
            done += take
            self.end_row += take

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """A copy of rows ``[lo, hi)`` (all in this tier)."""
        parts = []
        for block in list(self.blocks):
            b_lo, b_hi = block.first_row, block.first_row + block.filled
            if b_hi <= lo or b_lo >= hi:
                continue
            parts.append(block.data[max(lo, b_lo) - b_lo : min(hi, b_hi) - b_lo])
        return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])

    def drop_below(self, row: int) -> None:
        """Forgets blocks whose every row is below ``row`` (indexed)."""
        keep = 0
        for block in self.blocks:
            full = block.filled == len(block.data)
            if not full or block.first_row + block.filled > row:
                break
            keep += 1
        if keep:
            self.blocks = self.blocks[keep:]
            _trim()

    def snapshot(self) -> list[Block]:
        return list(self.blocks)

    def unpartitioned_full(self) -> list[Block]:
        return [b for b in self.blocks if b.order is None and b.filled == BLOCK_ROWS]


def scan(
    blocks: list[Block],
    cue: np.ndarray,
    lo: int,
    hi: int,
    k: int,
    accept: Callable[[np.ndarray], np.ndarray] | None = None,
    partitioning: Partitioning | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` of rows ``[lo, hi)`` in ``blocks`` that ``accept`` keeps (given row
    numbers, it returns a boolean mask): (rows, scores), best first."""
    rows_out: list[np.ndarray] = []
    scores_out: list[np.ndarray] = []
    lists = partitioning.lists_for(cue) if partitioning is not None else None
    for block in blocks:
        b_lo, b_hi = block.first_row, block.first_row + block.filled
        s_lo, s_hi = max(lo, b_lo), min(hi, b_hi)
        if s_lo >= s_hi:
            continue
        order = block.order
        if lists is not None and order is not None and block.offsets is not None:
            offsets = block.offsets
            local = np.concatenate([order[offsets[c] : offsets[c + 1]] for c in lists])
            local = local[(local >= s_lo - b_lo) & (local < s_hi - b_lo)]
            rows = local.astype(np.int64) + b_lo
            scores = block.data[local] @ cue
        else:
            rows = np.arange(s_lo, s_hi)
            scores = block.data[s_lo - b_lo : s_hi - b_lo] @ cue
        if accept is not None and len(rows):
            scores = np.where(accept(rows), scores, -np.inf)
        if len(scores) > k:
            top = np.argpartition(-scores, k - 1)[:k]
        else:
            top = np.arange(len(scores))
        rows_out.append(rows[top])
        scores_out.append(scores[top])
    if not rows_out:
        return np.empty(0, np.int64), np.empty(0, np.float32)
    rows = np.concatenate(rows_out)
    scores = np.concatenate(scores_out)
    found = np.isfinite(scores)
    rows, scores = rows[found], scores[found]
    order = np.argsort(-scores, kind="stable")[:k]
    return rows[order].astype(np.int64), scores[order].astype(np.float32)


def _trim() -> None:
    """Hands freed block memory back to the OS (glibc keeps large freed chunks otherwise)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
except (OSError, AttributeError):
    _LIBC = None
