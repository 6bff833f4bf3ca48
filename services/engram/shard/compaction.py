"""Compaction of one memory space: giving back the memory and disk of deleted rows.

A delete only hides rows (:mod:`engram.shard.tombstones`): their vectors stay in the HNSW index
(marked), their ids and contents in the string columns and the checkpoint's metadata chunks.
Once the deleted share of a space's indexed rows passes ``ENGRAM_COMPACT_DELETED_SHARE`` (and
the space has ``ENGRAM_COMPACT_MIN_ROWS`` indexed rows), the shard's builder thread compacts it,
in steps between its other work, so acks and recalls never wait for it:

1. Index (when the index holds that share of deleted rows): a new hnswlib index is filled with
   the vectors of the live rows of ``[0, covered)``, ``build_chunk`` rows a step, labels
   unchanged (row numbers: LSNs and everything keyed by row stay). Rows the builder indexes
   meanwhile are copied too, at the end. Rows copied and then deleted up to the index's
   ``marked_seq`` are marked in the new index, and it is swapped in under the index's write
   lock (:meth:`~engram.shard.index.HnswTier.swap`): a search sees the old index or the new
   one, and both hide the same rows. The old index's memory goes back when it is freed.
2. Columns: every chunk of the id and content columns holding a deleted row whose string is
   not empty is replaced by a copy where it is (:func:`~engram.shard.columns.blanked`), on the
   event loop (where rows are appended). A recall's snapshot keeps the columns it began with.
3. Disk: the next checkpoint (due at once) writes the new index, and rewrites the metadata
   chunks holding deleted rows with their strings empty (a chunk's name counts its emptied
   rows); files the manifest no longer names are removed.

Deleted rows keep their row, LSN, confidence and timestamp (fixed-width columns). After
compaction, a delete naming a deleted row's id counts it in ``not_found``: the id is gone.
Called by :mod:`engram.shard.builder` (:meth:`Compaction.compaction_due`,
:meth:`Compaction.compact_step`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import hnswlib
import numpy as np

from engram.shard.columns import Chunk, StringColumn, blanked
from engram.shard.index import EXACT_BELOW, HnswTier, grown_capacity, mark_rows, new_index
from engram.shard.state import SpaceState
from engram.shard.tombstones import Tombstones

log = logging.getLogger("engram.shard.space")


class IndexRebuild:
    """A new index being filled with the live rows of a tier's ``[0, pos)``."""

    def __init__(self, tier: HnswTier, index: hnswlib.Index) -> None:
        self.tier = tier
        self.index = index
        self.pos = 0  # rows below this were copied (or skipped: deleted and marked)
        self._rows: list[np.ndarray] = []
        self._vectors: list[np.ndarray] | None = []  # kept while the index is small

    @property
    def copied(self) -> int:
        return int(self.index.get_current_count())

    def step(self, tombstones: Tombstones, max_rows: int, threads: int) -> int:
        """Copies the live rows of the next ``max_rows`` rows; returns how many it looked at."""
        tier = self.tier
        lo = self.pos
        hi = min(lo + max_rows, tier.covered)
        rows = np.arange(lo, hi, dtype=np.int64)
        # rows deleted up to the marks are marked or missing in the tier: nothing to copy
        rows = rows[~deleted_upto(tombstones.at, rows, tier.marked_seq)]
        if len(rows):
            vectors = _vectors(tier, tombstones, rows)
            needed = self.copied + len(rows)
            capacity = self.index.get_max_elements()
            if needed > capacity:
                self.index.resize_index(grown_capacity(capacity, needed))
            self.index.add_items(vectors, rows.astype(np.uint64), num_threads=threads)
            self._rows.append(rows)
            if self._vectors is not None:
                self._vectors.append(vectors)
                if self.copied > EXACT_BELOW:
                    self._vectors = None
        self.pos = hi
        return hi - lo

    def finish(self, tombstones: Tombstones) -> None:
        """Marks the copied rows deleted since up to the tier's marks, and swaps the new index
        in (every covered row copied; builder thread, so no add or mark runs meanwhile)."""
        tier = self.tier
        assert self.pos == tier.covered
        rows = np.concatenate(self._rows) if self._rows else np.zeros(0, np.int64)
        dead = deleted_upto(tombstones.at, rows, tier.marked_seq)
        marked = mark_rows(self.index, rows[dead])
        small = None
        if self._vectors is not None:
            vectors = np.concatenate(self._vectors) if self._vectors else np.zeros((0, tier.dim))
            small = (rows[~dead], np.asarray(vectors, np.float32)[~dead])
        tier.swap(self.index, marked, small)


class Compaction(SpaceState):
    """A part of :class:`~engram.shard.space.Space`: see the module."""

    def deleted_weight(self) -> tuple[int, int]:
        """Deleted rows still in the index (marked or not), and deleted rows whose strings
        may still be held (not emptied by a compaction)."""
        hnsw = self.hnsw
        if hnsw is None or not self.tombstones.count:
            return 0, 0
        covered = hnsw.covered
        below = int(np.count_nonzero(self.tombstones.at[:covered]))
        missing = covered - hnsw.elements  # rows the index covers without holding: deleted
        return max(0, below - missing), max(0, self.tombstones.count - self.blanked_rows)

    def compaction_due(self) -> bool:
        """Whether a compaction is under way or should start (builder thread)."""
        if self.rebuild is not None:
            return True
        hnsw = self.hnsw
        s = self._index_settings
        if hnsw is None or hnsw.covered < s.compact_min_rows or self.checkpoint_holds:
            return False
        if self.tombstones.count < s.compact_deleted_share * s.compact_min_rows:
            return False  # cheap: too few deletes to matter yet
        in_index, held = self.deleted_weight()
        share = s.compact_deleted_share
        return in_index >= share * max(1, hnsw.elements) or held >= share * hnsw.covered

    def compact_step(self, max_rows: int, threads: int | None = None) -> int:
        """One step of the compaction (builder thread, after its marks are up to date):
        copies up to ``max_rows`` rows into the new index, or finishes. Returns the rows
        looked at (0 when it finished)."""
        hnsw = self.hnsw
        if hnsw is None:
            return 0
        threads = threads or self._index_settings.build_threads
        job = self.rebuild
        if job is None or job.tier is not hnsw:
            in_index, _ = self.deleted_weight()
            share = self._index_settings.compact_deleted_share
            if in_index < share * max(1, hnsw.elements):
                self._finish(rebuilt=False)  # the index is fine: the columns alone
                return 0
            live = max(1, hnsw.elements - in_index)
            job = IndexRebuild(hnsw, new_index(self.dim, self._index_settings, live + live // 8))
            self.rebuild = job
            log.info(
                "space %s: compacting: %d of %d indexed rows deleted",
                self.name,
                in_index,
                hnsw.elements,
            )
        if job.pos < hnsw.covered:
            try:
                return job.step(self.tombstones, max_rows, threads)
            except Exception:
                self.rebuild = None  # the old index stays; the next due check starts again
                raise
        job.finish(self.tombstones)
        self.rebuild = None
        self._finish(rebuilt=True)
        return 0

    def _finish(self, rebuilt: bool) -> None:
        """Empties deleted rows' strings, then has the next checkpoint rewrite the disk."""
        at = self.tombstones.at
        seen = int(np.count_nonzero(at))
        swaps = [_blank_swaps(column, at) for column in (self.ids, self.contents)]
        emptied = sum(len(s) for s in swaps)
        ids, contents = swaps
        self._on_loop(lambda: (self.ids.replace(ids), self.contents.replace(contents)))
        self.blanked_rows = seen
        self.meta_stale = True
        self.compactions += 1
        hnsw = self.hnsw
        log.info(
            "space %s: compacted (index %s, %d string chunks emptied): index %d rows, %d MB; "
            "columns %d MB",
            self.name,
            "rebuilt" if rebuilt else "kept",
            emptied,
            hnsw.elements if hnsw is not None else 0,
            (hnsw.nbytes if hnsw is not None else 0) >> 20,
            self.columns_bytes >> 20,
        )

    @property
    def columns_bytes(self) -> int:
        """Bytes of the id and content columns."""
        return self.ids.nbytes + self.contents.nbytes

    def _on_loop(self, call: Callable[[], object]) -> None:
        """Runs ``call`` on the space's event loop and waits for it (directly if the space
        was not started: nothing else appends then)."""
        loop = self._loop
        if loop is None:
            call()
            return

        async def run() -> None:
            call()

        asyncio.run_coroutine_threadsafe(run(), loop).result()


def deleted_upto(at: np.ndarray, rows: np.ndarray, seq: int) -> np.ndarray:
    """Which of ``rows`` were deleted by a delete up to sequence ``seq`` (a mask)."""
    out = np.zeros(len(rows), bool)
    inside = rows < len(at)
    dead = at[rows[inside]]
    out[inside] = (dead != 0) & (dead <= seq)
    return out


def _vectors(tier: HnswTier, tombstones: Tombstones, rows: np.ndarray) -> np.ndarray:
    """The vectors of ``rows`` from ``tier``. A row hnswlib does not hand out (marked or
    missing) must be a deleted one: then it is zeros, and marked in the new index at the end.
    A live row missing would lose data: that stops the compaction."""
    try:
        return np.asarray(tier.vectors(rows), np.float32).reshape(len(rows), tier.dim)
    except RuntimeError:
        pass
    out = np.zeros((len(rows), tier.dim), np.float32)
    for i, row in enumerate(rows.tolist()):
        try:
            out[i] = tier.vectors(np.array([row]))[0]
        except RuntimeError:
            if not tombstones.deleted(np.array([row]))[0]:
                raise RuntimeError(f"the index has no vector for live row {row}") from None
    return out


def _blank_swaps(column: StringColumn, at: np.ndarray) -> list[tuple[int, Chunk, Chunk]]:
    """The chunks of ``column`` holding deleted rows with strings, and their emptied copies."""
    swaps = []
    for i, (first, chunk) in enumerate(column.chunks()):
        n = len(chunk[1])
        dead = np.zeros(n, bool)
        part = at[first : first + n]
        dead[: len(part)] = part != 0
        if dead.any():
            new = blanked(chunk, dead)
            if new is not None:
                swaps.append((i, chunk, new))
    return swaps
