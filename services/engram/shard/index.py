"""The HNSW tier of a memory space: an hnswlib index behind a lock that favours recalls.

hnswlib's ``add_items`` is not safe to run beside ``knn_query``, so the index is guarded by a
readers-writer lock: recalls and checkpoint saves are readers, the builder's ``add_items`` is the
writer. Readers that wait go first; the builder adds in small chunks, so a recall waits at most
for one chunk. Vectors arrive L2-normalised; the inner-product space then gives cosine scores.
Labels are row numbers (LSN - 1) in the space.

Deleted rows are marked in the index (``mark_deleted``) by the builder, under the writer lock,
one whole delete at a time (:meth:`HnswTier.mark`), and rows deleted before they are indexed
are marked in the same step that adds them; ``marked_seq`` is the last delete sequence whose
rows are all marked. A search skips marked rows and still returns ``k`` others; it filters
the deletes its caller's snapshot sees and it has not marked yet, and tells the caller's
:class:`~engram.shard.tombstones.DeleteView` its ``marked_seq`` (see :mod:`engram.shard.recall`).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import hnswlib
import numpy as np

from engram.common.settings import IndexSettings
from engram.shard.tombstones import DeleteView

_INITIAL_CAPACITY = 16_384
# Indexes up to this size are searched by brute force: exact results, still fast.
_EXACT_BELOW = 4_096


class RecallFirstLock:
    """Readers-writer lock where waiting readers are let in before a waiting writer."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._readers_waiting = 0
        self._writing = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._readers_waiting += 1
            while self._writing:
                self._cond.wait()
            self._readers_waiting -= 1
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._readers or self._readers_waiting:
                self._cond.wait()
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


def grown_capacity(capacity: int, needed: int) -> int:
    """The index's next capacity: a quarter more, not double. hnswlib constructs a mutex
    (40 bytes) and a level and list pointer (12 bytes) for every slot of capacity at once, so
    doubling holds about 50 bytes a row of slack on average; a quarter about 12. (The vectors
    and links of empty slots are never touched, so they take no memory.)"""
    return max(needed, capacity + capacity // 4)


class HnswTier:
    """Rows ``[0, count)`` of a space, searchable by approximate nearest neighbour."""

    def __init__(
        self,
        dim: int,
        settings: IndexSettings,
        path: str | None = None,
        deleted: np.ndarray | None = None,
    ) -> None:
        """An empty index, or the one saved at ``path`` (``deleted``: its rows that may be
        marked, whose vectors hnswlib no longer hands out)."""
        self.dim = dim
        self._settings = settings
        self._index = hnswlib.Index(space="ip", dim=dim)
        if path is None:
            self._index.init_index(
                max_elements=_INITIAL_CAPACITY,
                M=settings.m,
                ef_construction=settings.ef_construction,
            )
        else:
            self._index.load_index(path, max_elements=0)
        self._index.set_num_threads(settings.build_threads)
        self.count = self._index.get_current_count()
        self.marked_seq = 0  # every delete up to this sequence is marked in the index
        self.marked = 0  # rows marked deleted
        # while the index is small, its vectors are also kept here for exact recalls
        self._small: np.ndarray | None = None
        if self.count <= _EXACT_BELOW:
            self._small = np.zeros((self.count, dim), np.float32)
            rows = np.arange(self.count, dtype=np.int64)
            if deleted is not None and len(deleted):
                rows = rows[~np.isin(rows, deleted)]
            if len(rows):
                # a marked row's vector is gone: a saved index may have marked any of ``deleted``
                found = self._index.get_ids_list()
                rows = rows[np.isin(rows, np.asarray(found, np.int64))]
                try:
                    vectors = self._index.get_items(rows, return_type="numpy")
                except RuntimeError:  # rows marked but not listed as deleted: one by one
                    vectors = np.zeros((len(rows), dim), np.float32)
                    for i, row in enumerate(rows.tolist()):
                        with contextlib.suppress(RuntimeError):
                            vectors[i] = self._index.get_items([row], return_type="numpy")[0]
                self._small[rows] = np.asarray(vectors, np.float32).reshape(len(rows), dim)
        self._lock = RecallFirstLock()
        self._query_lock = threading.Lock()  # set_ef + knn_query are one step

    def add(
        self,
        vectors: np.ndarray,
        first_row: int,
        threads: int | None = None,
        deleted: np.ndarray | None = None,
    ) -> None:
        """Adds rows ``first_row .. first_row + len(vectors)`` and marks those of them in
        ``deleted`` (rows of deletes up to ``marked_seq``); called by the builder only."""
        n = len(vectors)
        labels = np.arange(first_row, first_row + n, dtype=np.uint64)
        with self._lock.write():
            capacity = self._index.get_max_elements()
            if first_row + n > capacity:
                self._index.resize_index(grown_capacity(capacity, first_row + n))
            self._index.add_items(
                vectors, labels, num_threads=threads or self._settings.build_threads
            )
            if self._small is not None:
                grown = np.concatenate([self._small[:first_row], vectors.astype(np.float32)])
                self._small = grown if len(grown) <= _EXACT_BELOW else None
            if deleted is not None:
                self._mark_rows(deleted)
        self.count = first_row + n

    def mark(self, rows: np.ndarray, seq: int) -> None:
        """Marks the indexed ones of ``rows`` deleted, those of every delete up to ``seq``
        (builder only, deletes in sequence order); rows not indexed yet are marked when added.
        """
        with self._lock.write():
            self._mark_rows(rows[rows < self.count])
            self.marked_seq = seq

    def _mark_rows(self, rows: np.ndarray) -> None:
        for row in rows.tolist():
            try:
                self._index.mark_deleted(row)
            except RuntimeError:  # marked already (a saved index keeps its marks)
                continue
            self.marked += 1

    def search(
        self,
        cue: np.ndarray,
        k: int,
        limit_row: int | None = None,
        accept: Callable[[np.ndarray], np.ndarray] | None = None,
        deletes: DeleteView | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` nearest rows below ``limit_row`` that ``accept`` keeps and ``deletes``
        does not see deleted, best first. ``deletes`` is raised to the marks (see the module).

        Rows added after a recall's snapshot (at or beyond ``limit_row``) and rows a filter
        rejects are fetched and dropped, so the search asks for more until it has ``k`` or has
        looked at every row. Small indexes are searched with a beam as wide as the index,
        which makes the result exact.
        """
        with self._lock.read():
            if deletes is not None:
                deletes.see(self.marked_seq)
                if deletes.seq:
                    accept = _and_live(accept, deletes)
            count = self._index.get_current_count()
            limit = count if limit_row is None else min(limit_row, count)
            if limit == 0 or k == 0:
                return np.empty(0, np.int64), np.empty(0, np.float32)
            if count <= _EXACT_BELOW:
                return self._exact(cue, k, limit, accept)
            live = count - self.marked  # what the index can return at most
            if live <= 0:
                return np.empty(0, np.int64), np.empty(0, np.float32)
            fetch = min(live, k + min(count - limit, 4 * k))
            while True:
                rows, scores = self._query(cue, fetch, live)
                keep = rows < limit
                if accept is not None and keep.any():
                    # the filter only knows rows of the snapshot: ask it about those alone
                    keep[keep] = accept(rows[keep])
                if keep.sum() >= k or fetch >= live:
                    return rows[keep][:k], scores[keep][:k]
                fetch = min(live, fetch * 4)

    def _exact(
        self, cue: np.ndarray, k: int, limit: int, accept: Callable[[np.ndarray], np.ndarray] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Brute force over rows ``[0, limit)``: small indexes are answered exactly (HNSW can
        leave some of many equal vectors unreachable)."""
        rows = np.arange(limit, dtype=np.int64)
        if self._small is not None and len(self._small) >= limit:
            vectors = self._small[:limit]
        else:
            vectors = np.asarray(self._index.get_items(rows, return_type="numpy"), np.float32)
        scores = vectors @ cue
        if accept is not None:
            keep = accept(rows)
            rows, scores = rows[keep], scores[keep]
        if len(scores) > k:
            top = np.argpartition(-scores, k - 1)[:k]
            rows, scores = rows[top], scores[top]
        order = np.argsort(-scores, kind="stable")
        return rows[order], scores[order].astype(np.float32)

    def _query(self, cue: np.ndarray, k: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        ef = max(self._settings.ef_search, 2 * k)
        with self._query_lock:
            for _ in range(3):
                self._index.set_ef(ef)
                try:
                    labels, dists = self._index.knn_query(cue, k=k)
                    return labels[0].astype(np.int64), (1.0 - dists[0]).astype(np.float32)
                except RuntimeError:  # fewer than k reachable: widen, then ask for fewer
                    ef *= 2
                    k = max(1, k // 2)
        return np.empty(0, np.int64), np.empty(0, np.float32)

    def save(self, path: str) -> None:
        """Writes the index to ``path`` (the caller makes it atomic and durable)."""
        with self._lock.read():
            self._index.save_index(path)

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        with self._lock.read():
            return np.asarray(self._index.get_items(rows.tolist(), return_type="numpy"))


def _and_live(
    accept: Callable[[np.ndarray], np.ndarray] | None, deletes: DeleteView
) -> Callable[[np.ndarray], np.ndarray]:
    if accept is None:
        return deletes.live
    rows_ok = accept

    def both(rows: np.ndarray) -> np.ndarray:
        return rows_ok(rows) & deletes.live(rows)

    return both
