"""The fresh tier of a memory space: durable rows not yet in the HNSW index.

Rows live in fixed-size numpy blocks, appended in LSN order the moment a batch is durable, and
are scanned exactly by recalls. The builder copies rows from here into the index; a block is
dropped once every row in it is indexed. Readers take a snapshot (the list of blocks) so a block
the builder drops stays alive for a recall that still scans it.

When the un-indexed backlog grows large (HNSW insertion is far slower than ingest), the shard's
partitioner thread *lists* blocks, IVF-style, as Milvus does with the interim index of growing
segments. A two-level quantiser is trained once per space (``sqrt(nlist)`` coarse centroids,
each with ``sqrt(nlist)`` leaves), so assigning a row costs about ``2 sqrt(nlist)`` dot products
instead of ``nlist``. A block's :class:`Listing` names its first ``covered`` rows leaf by leaf;
a recall scores only the rows of the ``nprobe`` leaves nearest the cue there, and scans the rest
exactly. Full blocks are listed whole, and the block being filled is listed as it grows (every
``LIST_STEP`` rows), so the exact part stays small however fast rows arrive.

Embeddings drift (a new topic, a new source), and a quantiser trained on old rows sends new ones
to a few ill-fitting leaves, where probing the nearest leaves misses their neighbours. So each
listing keeps the quantiser it was made with, and when a full block fits the current quantiser
clearly worse than the rows it was learnt from, the space learns a new one from that block.
"""

from __future__ import annotations

import dataclasses
import math
import mmap
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

BLOCK_ROWS = 16_384  # largest block; the first blocks of a space are smaller (from 1,024 up)
_FIRST_BLOCK_ROWS = 1_024
LEARN_ROWS = 4_096  # rows a quantiser learns from (with 4 k-means rounds: ~0.1 s of a core)
_LEARN_ROUNDS = 4
LIST_STEP = 2_048  # the block being filled is listed again each time it grew by this much
MAX_LISTS = 65_536  # leaves are sorted as 16-bit keys (see Listing.of)
_LEARN_PER_LIST = 8  # rows learnt from per leaf when the space learns from its whole backlog
_LEARN_MAX_ROWS = 65_536


def target_lists(backlog: int, least: int, rows_per_list: int) -> int:
    """Lists a space's quantiser should have for ``backlog`` un-indexed rows: about
    ``rows_per_list`` rows each, and at least ``least`` (``rows_per_list`` 0: always ``least``).

    With the lists growing with the backlog, a recall that probes ``nprobe`` of them scores
    about ``nprobe * rows_per_list`` rows however large the backlog is; with a fixed number it
    scores a fixed share of the backlog (2.3 % at 1,024 lists and 24 probes: 117 K rows at 5 M).
    """
    if rows_per_list <= 0:
        return least
    return max(least, min(MAX_LISTS, backlog // rows_per_list))


@dataclass(frozen=True)
class Listing:
    """The block positions (row - first_row) of leaf ``c`` of ``partitioning`` are
    ``order[offsets[c]:offsets[c + 1]]``; covers positions ``[0, covered)``."""

    covered: int
    leaf: np.ndarray  # (covered,) int32: each row's leaf
    order: np.ndarray  # (covered,) int32
    offsets: np.ndarray  # (nlist + 1,) int32
    partitioning: Partitioning

    @classmethod
    def of(cls, leaf: np.ndarray, partitioning: Partitioning) -> Listing:
        nlist = partitioning.nlist
        # a stable sort of 16-bit keys is a radix sort: 7x faster than sorting the int32 leaves
        keys = leaf.astype(np.uint16) if nlist <= 1 << 16 else leaf
        order = np.argsort(keys, kind="stable").astype(np.int32)
        offsets = np.zeros(nlist + 1, np.int32)
        np.cumsum(np.bincount(leaf, minlength=nlist), out=offsets[1:])
        return cls(len(leaf), leaf, order, offsets, partitioning)


@dataclass
class Block:
    """Rows ``[first_row, first_row + filled)``. ``filled`` grows (the last block only, on the
    event loop); ``listing`` is replaced whole by the partitioner thread, so a reader that reads
    it once sees a consistent one."""

    first_row: int
    data: np.ndarray  # (capacity, dim) float32; rows past ``filled`` are unused
    filled: int = 0
    listing: Listing | None = None
    drifted_at: int = 0  # ``filled`` when its new rows last fitted the quantiser badly

    @property
    def full(self) -> bool:
        return self.filled == len(self.data)


def train(sample: np.ndarray, nlist: int, iterations: int = 8, seed: int = 0) -> np.ndarray:
    """Spherical k-means on normalised rows: ``nlist`` unit centroids."""
    rng = np.random.default_rng(seed)
    sample = np.ascontiguousarray(sample)  # a strided view would keep matmul off BLAS
    nlist = min(nlist, len(sample))
    centroids = sample[rng.choice(len(sample), nlist, replace=False)]
    for _ in range(iterations):
        nearest = np.argmax(sample @ centroids.T, axis=1)
        # the sums of each centroid's members as one matrix product (BLAS runs without the
        # GIL; np.add.reduceat would hold it, stalling the shard's event loop)
        members = np.zeros((nlist, len(sample)), np.float32)
        members[nearest, np.arange(len(sample))] = 1.0
        sums = members @ sample
        norms = np.linalg.norm(sums, axis=1)
        empty = norms == 0
        sums[empty] = sample[rng.choice(len(sample), int(empty.sum()))]
        norms[empty] = 1.0
        centroids = (sums / norms[:, None]).astype(np.float32)
    return centroids


@dataclass(frozen=True)
class Partitioning:
    """A two-level quantiser: a row goes to the nearest coarse centroid, then to the nearest of
    that centroid's leaves; a recall probes the ``nprobe`` leaves nearest the cue."""

    coarse: np.ndarray  # (k1, dim), unit length
    leaves: np.ndarray  # (nlist, dim), unit length
    leaf_start: np.ndarray  # (k1 + 1,): coarse i owns leaves[leaf_start[i]:leaf_start[i + 1]]
    nprobe: int
    fit: float = 1.0  # mean similarity of the rows it learnt from to their leaf
    asked: int = 0  # the lists it was learnt for (``nlist`` may be fewer: empty cells)

    @classmethod
    def learn(cls, rows: np.ndarray, nlist: int, nprobe: int, seed: int = 0) -> Partitioning:
        return cls.learn_and_assign(rows, nlist, nprobe, seed)[0]

    @classmethod
    def learn_and_assign(
        cls, rows: np.ndarray, nlist: int, nprobe: int, seed: int = 0
    ) -> tuple[Partitioning, np.ndarray]:
        """Learns from (at most ``LEARN_ROWS`` evenly spaced of) ``rows``; ``fit`` is measured on
        all of them, so it is not flattered by the rows the leaves were fitted to. Also returns
        the leaf of each row."""
        rows = as_float32(rows)
        sample = rows[:: max(1, len(rows) // LEARN_ROWS)]
        k1 = max(1, min(len(sample), round(math.sqrt(nlist))))
        k2 = max(1, nlist // k1)
        coarse = train(sample, k1, _LEARN_ROUNDS, seed)
        nearest = np.argmax(sample @ coarse.T, axis=1)
        leaves, starts = [], [0]
        for i in range(len(coarse)):
            members = sample[nearest == i]
            leaf = train(members, k2, _LEARN_ROUNDS, seed) if len(members) else coarse[i : i + 1]
            leaves.append(leaf)
            starts.append(starts[-1] + len(leaf))
        all_leaves = np.concatenate(leaves).astype(np.float32)
        made = cls(
            coarse, all_leaves, np.asarray(starts), max(1, min(nprobe, len(all_leaves))), 1.0, nlist
        )
        leaf, sims = made.assign(rows)
        return dataclasses.replace(made, fit=float(sims.mean())), leaf

    @property
    def nlist(self) -> int:
        return len(self.leaves)

    @property
    def lists(self) -> int:
        """The lists it was learnt for."""
        return self.asked or self.nlist

    def assign(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The leaf of each row (int32), and the row's similarity to it."""
        nearest = np.argmax(rows @ self.coarse.T, axis=1)
        by_coarse = np.argsort(nearest, kind="stable")
        bounds = np.searchsorted(nearest[by_coarse], np.arange(len(self.coarse) + 1))
        leaf = np.empty(len(rows), np.int32)
        sims = np.empty(len(rows), np.float32)
        for i in range(len(self.coarse)):
            members = by_coarse[bounds[i] : bounds[i + 1]]
            if len(members):
                lo, hi = self.leaf_start[i], self.leaf_start[i + 1]
                scores = rows[members] @ self.leaves[lo:hi].T
                best = np.argmax(scores, axis=1)
                leaf[members] = lo + best
                sims[members] = scores[np.arange(len(members)), best]
        return leaf, sims

    def lists_for(self, cue: np.ndarray) -> np.ndarray:
        """The leaves to probe: the ``nprobe`` nearest the cue among the leaves of its nearest
        coarse centroids (enough of them to hold ``8 * nprobe`` leaves), and always the leaf
        the cue itself would be assigned to (so a stored row is found by its own vector).

        Scoring only those leaves costs about a fifth of scoring all of them: a recall over a
        drifting backlog computes this for every quantiser it meets (28 at 1.1 M rows of the
        benchmark corpus: 4.8 ms). On that backlog it found the exact top 10 as often as
        scoring every leaf did (recall@10 0.9985 against 0.9955, 200 queries).
        """
        if self.nprobe >= self.nlist:
            return np.arange(self.nlist)
        coarse = self.coarse @ cue
        per_cell = max(1, self.nlist // len(self.coarse))
        cells = min(len(coarse), max(2, math.ceil(8 * self.nprobe / per_cell)))
        near = np.argpartition(-coarse, cells - 1)[:cells]
        candidates = np.concatenate(
            [np.arange(self.leaf_start[c], self.leaf_start[c + 1]) for c in near]
        )
        scores = self.leaves[candidates] @ cue
        take = min(self.nprobe, len(candidates))
        nearest = candidates[np.argpartition(-scores, take - 1)[:take]]
        c = int(np.argmax(coarse))
        lo, hi = self.leaf_start[c], self.leaf_start[c + 1]
        own = lo + int(np.argmax(self.leaves[lo:hi] @ cue))
        return nearest if own in nearest else np.append(nearest, own)


def list_block(block: Block, partitioning: Partitioning, leaf: np.ndarray | None = None) -> None:
    """Lists all of ``block``'s rows now (``leaf``: their leaves, if already assigned)."""
    if leaf is None:
        leaf, _ = partitioning.assign(as_float32(block.data[: block.filled]))
    block.listing = Listing.of(leaf, partitioning)


def as_float32(rows: np.ndarray) -> np.ndarray:
    """``rows`` as float32 (a copy only if they are float16): numpy multiplies float16
    matrices without BLAS, hundreds of times slower."""
    return np.asarray(rows, np.float32)


def learn_from_backlog(
    blocks: list[Block], nlist: int, nprobe: int, seed: int = 0
) -> Partitioning | None:
    """A quantiser of ``nlist`` lists learnt from evenly spaced rows of the full ``blocks``
    (about ``8 * nlist`` of them): when the backlog has outgrown the space's quantiser, one
    block alone is too few rows for the lists it needs. None without full blocks."""
    full = [b for b in blocks if b.full]
    total = sum(b.filled for b in full)
    if not total:
        return None
    stride = max(1, total // min(_LEARN_MAX_ROWS, _LEARN_PER_LIST * nlist))
    sample = np.concatenate([as_float32(b.data[::stride]) for b in full])
    return Partitioning.learn(sample, min(nlist, len(sample)), nprobe, seed)


def block_memory(rows: int, dim: int, dtype: type = np.float32) -> np.ndarray:
    """A ``(rows, dim)`` array (float32, or float16) in memory of its own, its pages mapped.

    Its own mapping goes back to the system the moment the last reference to the block goes
    (the allocator would keep freed blocks otherwise). The pages are touched here, by numpy's
    ``fill``, which runs without the GIL: mapping 25 MB is about 10 ms of kernel time, which
    ``mmap.MAP_POPULATE`` would spend holding the GIL and so stall the event loop.
    """
    size = np.dtype(dtype).itemsize
    memory = mmap.mmap(-1, rows * dim * size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    block = np.frombuffer(memory, dtype).reshape(rows, dim)
    block.fill(0.0)
    return block


class FreshTier:
    """Appended to by the event loop (only ever at the end); blocks are dropped from the front
    by the builder thread, and listed (``Block.listing``) by the partitioner thread.

    With ``half``, rows are stored as float16: half the memory, and a recall's scan reads half
    the bytes (converting them to float32 in a small per-thread buffer before multiplying);
    the builder indexes the float16 values (cosines move by about 1e-3)."""

    def __init__(self, dim: int, first_row: int = 0, half: bool = False) -> None:
        self.dim = dim
        self.dtype: type = np.float16 if half else np.float32
        self.blocks: list[Block] = []
        self.end_row = first_row  # one past the last appended row
        self._last_capacity = 0
        self._spare: np.ndarray | None = None  # a full-size block, its pages already touched

    def append(self, vectors: np.ndarray, norms: np.ndarray | None = None) -> None:
        """Appends rows (called on the event loop after the batch is durable); with ``norms``,
        rows are divided by them on the way in."""
        done = 0
        n = len(vectors)
        while done < n:
            if not self.blocks or self.blocks[-1].filled == len(self.blocks[-1].data):
                self.blocks.append(Block(self.end_row, self._new_block()))
            block = self.blocks[-1]
            take = min(n - done, len(block.data) - block.filled)
            out = block.data[block.filled : block.filled + take]
            if norms is None:
                out[:] = vectors[done : done + take]
            else:
                np.divide(vectors[done : done + take], norms[done : done + take, None], out=out)
            block.filled += take
            done += take
            self.end_row += take

    def _new_block(self) -> np.ndarray:
        rows = min(BLOCK_ROWS, max(_FIRST_BLOCK_ROWS, 2 * self._last_capacity))
        self._last_capacity = rows
        spare, self._spare = self._spare, None
        if rows == BLOCK_ROWS and spare is not None:
            return spare
        return block_memory(rows, self.dim, self.dtype)

    def prepare_spare(self) -> None:
        """Maps the next full-size block (worker thread), so the event loop does not wait for
        the kernel to map a fresh 25 MB block."""
        if self._spare is None and self._last_capacity == BLOCK_ROWS:
            self._spare = block_memory(BLOCK_ROWS, self.dim, self.dtype)

    def release_spare(self) -> None:
        """Lets the prepared block go (the builder, once the backlog is gone)."""
        self._spare = None

    def retire_tail(self, indexed: int) -> bool:
        """Drops the last block if it is not full and every row in it is indexed, and has the
        next blocks start small again (event loop only: nothing is appended meanwhile). A
        drained space would otherwise keep a block of up to 25 MB whose rows are all in HNSW.
        Full blocks are left to :meth:`drop_below`, so the builder's view of the front of the
        list never changes under it."""
        if not self.blocks or self.blocks[-1].full or self.end_row > indexed:
            return False
        del self.blocks[-1]
        self._last_capacity = 0
        return True

    def rows(self, lo: int, hi: int) -> np.ndarray:
        """A float32 copy of rows ``[lo, hi)`` (all in this tier), in row order."""
        parts = []
        for block in list(self.blocks):
            b_lo, b_hi = block.first_row, block.first_row + block.filled
            if b_hi <= lo or b_lo >= hi:
                continue
            parts.append(block.data[max(lo, b_lo) - b_lo : min(hi, b_hi) - b_lo])
        out = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])
        return as_float32(out)

    def drop_below(self, row: int) -> None:
        """Forgets blocks whose every row is below ``row`` (indexed)."""
        keep = 0
        for block in self.blocks:
            if not block.full or block.first_row + block.filled > row:
                break
            keep += 1
        if keep:
            del self.blocks[:keep]  # in place: the loop may be appending

    def snapshot(self) -> list[Block]:
        return list(self.blocks)


def scan(
    blocks: list[Block],
    cue: np.ndarray,
    lo: int,
    hi: int,
    k: int,
    accept: Callable[[np.ndarray], np.ndarray] | None = None,
    probe: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of rows ``[lo, hi)`` in ``blocks`` that ``accept`` keeps (given row numbers, it
    returns a boolean mask): (rows, scores), best first. Exact, except in the listed rows of
    blocks (unless not ``probe``), where only the leaves nearest the cue are scored."""
    rows_out: list[np.ndarray] = []
    scores_out: list[np.ndarray] = []
    probed: dict[int, np.ndarray] = {}  # quantiser -> its leaves nearest the cue
    for block in blocks:
        b_lo, b_hi = block.first_row, block.first_row + block.filled
        s_lo, s_hi = max(lo, b_lo), min(hi, b_hi)
        if s_lo >= s_hi:
            continue
        listing = block.listing if probe else None
        if listing is not None and s_lo - b_lo < listing.covered:
            p = listing.partitioning
            lists = probed.get(id(p))
            if lists is None:
                lists = probed[id(p)] = p.lists_for(cue)
            starts = listing.offsets[lists]
            lens = listing.offsets[lists + 1] - starts
            at = np.repeat(starts - (np.cumsum(lens) - lens), lens) + np.arange(lens.sum())
            local = listing.order[at]
            if s_lo > b_lo or s_hi - b_lo < listing.covered:  # part indexed or past the snapshot
                local = local[(local >= s_lo - b_lo) & (local < s_hi - b_lo)]
            rows = local.astype(np.int64) + b_lo
            scores = _score_rows(block.data, local, cue)
            rest = b_lo + listing.covered  # rows appended since the listing: scanned exactly
            if rest < s_hi:
                rows = np.concatenate([rows, np.arange(rest, s_hi)])
                tail = _score_span(block.data, rest - b_lo, s_hi - b_lo, cue)
                scores = np.concatenate([scores, tail])
        else:
            rows = np.arange(s_lo, s_hi)
            scores = _score_span(block.data, s_lo - b_lo, s_hi - b_lo, cue)
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


_SCRATCH = threading.local()  # each recall thread's buffers for gathered rows
SCRATCH_ROWS = 4_096  # 6 MB a thread at dim 384 (9 MB with float16 rows); larger gathers allocate


def _scratch(name: str, dim: int, dtype: type) -> np.ndarray:
    buf: np.ndarray | None = getattr(_SCRATCH, name, None)
    if buf is None or buf.shape[1] != dim or buf.dtype != dtype:
        buf = np.empty((SCRATCH_ROWS, dim), dtype)
        setattr(_SCRATCH, name, buf)
    return buf


def _score_span(data: np.ndarray, lo: int, hi: int, cue: np.ndarray) -> np.ndarray:
    """``data[lo:hi] @ cue``; float16 rows are converted ``SCRATCH_ROWS`` at a time."""
    if data.dtype == np.float32:
        return data[lo:hi] @ cue
    out = np.empty(hi - lo, np.float32)
    buf = _scratch("wide", data.shape[1], np.float32)
    for at in range(lo, hi, SCRATCH_ROWS):
        end = min(hi, at + SCRATCH_ROWS)
        wide = buf[: end - at]
        wide[:] = data[at:end]
        np.matmul(wide, cue, out=out[at - lo : end - lo])
    return out


def _score_rows(data: np.ndarray, local: np.ndarray, cue: np.ndarray) -> np.ndarray:
    """``data[local] @ cue``, gathering into a reused per-thread buffer with ``np.take``
    (``mode="clip"`` writes straight into it; the positions are valid): about a quarter faster
    than fancy indexing into a new array, measured on 70 blocks of 16,384 rows. Float16 rows
    are gathered as they are (half the bytes read) and widened in a second buffer."""
    n, dim = len(local), data.shape[1]
    if n > SCRATCH_ROWS:
        return as_float32(data[local]) @ cue
    out = _scratch("rows", dim, data.dtype.type)[:n]
    np.take(data, local, axis=0, out=out, mode="clip")
    if data.dtype != np.float32:
        wide = _scratch("wide", dim, np.float32)[:n]
        wide[:] = out
        out = wide
    return out @ cue
