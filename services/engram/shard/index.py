"""The HNSW tier of a memory space: an hnswlib index behind a lock that favours recalls.

hnswlib's ``add_items`` is not safe to run beside ``knn_query``, so the index is guarded by a
readers-writer lock: recalls and checkpoint saves are readers, the builder's ``add_items`` is the
writer. Readers that wait go first; the builder adds in small chunks, so a recall waits at most
for one chunk. Vectors arrive L2-normalised; the inner-product space then gives cosine scores.
Labels are row numbers (LSN - 1) in the space.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import hnswlib
import numpy as np

from engram.common.settings import IndexSettings

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

    def __init__(self, dim: int, settings: IndexSettings, path: str | None = None) -> None:
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
        # while the index is small, its vectors are also kept here for exact recalls
        self._small: np.ndarray | None = None
        if self.count <= _EXACT_BELOW:
            rows = np.arange(self.count, dtype=np.int64)
            self._small = np.asarray(
                self._index.get_items(rows, return_type="numpy"), dtype=np.float32
            ).reshape(self.count, dim)
        self._lock = RecallFirstLock()
        self._query_lock = threading.Lock()  # set_ef + knn_query are one step

    def add(self, vectors: np.ndarray, first_row: int, threads: int | None = None) -> None:
        """Adds rows ``first_row .. first_row + len(vectors)``; called by the builder only."""
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
        self.count = first_row + n

    def search(
        self,
        cue: np.ndarray,
        k: int,
        limit_row: int | None = None,
        accept: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Up to ``k`` nearest rows below ``limit_row`` that ``accept`` keeps, best first.

        Rows added after a recall's snapshot (at or beyond ``limit_row``) and rows a filter
        rejects are fetched and dropped, so the search asks for more until it has ``k`` or has
        looked at every row. Small indexes are searched with a beam as wide as the index,
        which makes the result exact.
        """
        with self._lock.read():
            count = self._index.get_current_count()
            limit = count if limit_row is None else min(limit_row, count)
            if limit == 0 or k == 0:
                return np.empty(0, np.int64), np.empty(0, np.float32)
            if count <= _EXACT_BELOW:
                return self._exact(cue, k, limit, accept)
            fetch = min(count, k + min(count - limit, 4 * k))
            while True:
                rows, scores = self._query(cue, fetch, count)
                keep = rows < limit
                if accept is not None and keep.any():
                    # the filter only knows rows of the snapshot: ask it about those alone
                    keep[keep] = accept(rows[keep])
                if keep.sum() >= k or fetch >= count:
                    return rows[keep][:k], scores[keep][:k]
                fetch = min(count, fetch * 4)

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
