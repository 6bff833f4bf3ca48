"""The HNSW tier of a memory space: an hnswlib index behind a lock that favours recalls.

hnswlib's ``add_items`` is not safe to run beside ``knn_query``, so the index is guarded by a
readers-writer lock: recalls and checkpoint saves are readers, the builder's ``add_items`` is the
writer. Readers that wait go first; the builder adds in small chunks, so a recall waits at most
for one chunk. Vectors arrive L2-normalised; the inner-product space then gives cosine scores.
Labels are row numbers (LSN - 1) in the space.

``covered`` says which rows the tier answers for: rows ``[0, covered)``. The index may hold
fewer: rows deleted before they were indexed are skipped, and a compaction
(:mod:`engram.shard.compaction`) rebuilds the index from the live rows and swaps it in
(:meth:`HnswTier.swap`), labels unchanged. A row below ``covered`` missing from the index is
always a deleted one (``elements`` counts what hnswlib holds).

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
EXACT_BELOW = 4_096


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


def new_index(dim: int, settings: IndexSettings, capacity: int) -> hnswlib.Index:
    """An empty hnswlib index for ``dim``-dimensional unit vectors."""
    index = hnswlib.Index(space="ip", dim=dim)
    index.init_index(max_elements=capacity, M=settings.m, ef_construction=settings.ef_construction)
    index.set_num_threads(settings.build_threads)
    return index


class HnswTier:
    """Rows ``[0, covered)`` of a space, searchable by approximate nearest neighbour."""

    def __init__(
        self,
        dim: int,
        settings: IndexSettings,
        path: str | None = None,
        deleted: np.ndarray | None = None,
        covered: int | None = None,
    ) -> None:
        """An empty index, or the one saved at ``path`` covering rows ``[0, covered)``
        (``deleted``: its rows that may be marked or missing, whose vectors hnswlib no longer
        hands out)."""
        self.dim = dim
        self._settings = settings
        if path is None:
            self._index = new_index(dim, settings, _INITIAL_CAPACITY)
        else:
            self._index = hnswlib.Index(space="ip", dim=dim)
            self._index.load_index(path, max_elements=0)
            self._index.set_num_threads(settings.build_threads)
        elements = self._index.get_current_count()
        self.covered = elements if covered is None else covered
        self.marked_seq = 0  # every delete up to this sequence is marked in the index
        self.marked = 0  # rows marked deleted
        # while the index is small, its rows and their vectors are also kept here for exact
        # recalls
        self._small: tuple[np.ndarray, np.ndarray] | None = None
        if elements <= EXACT_BELOW:
            rows = np.sort(np.asarray(self._index.get_ids_list(), np.int64))
            if deleted is not None and len(deleted):
                # a marked row's vector is gone: a saved index may have marked any of ``deleted``
                rows = rows[~np.isin(rows, deleted)]
            vectors = np.zeros((len(rows), dim), np.float32)
            if len(rows):
                try:
                    vectors[:] = self._index.get_items(rows, return_type="numpy")
                except RuntimeError:  # rows marked but not listed as deleted: one by one
                    for i, row in enumerate(rows.tolist()):
                        with contextlib.suppress(RuntimeError):
                            vectors[i] = self._index.get_items([row], return_type="numpy")[0]
            self._small = (rows, vectors)
        self._lock = RecallFirstLock()
        self._query_lock = threading.Lock()  # set_ef + knn_query are one step

    @property
    def elements(self) -> int:
        """Rows hnswlib holds (marked ones included); at most ``covered``."""
        return int(self._index.get_current_count())

    @property
    def capacity(self) -> int:
        return int(self._index.get_max_elements())

    @property
    def nbytes(self) -> int:
        """An estimate of the memory the index holds: per row its vector, its level-0 links
        (2M), its label and count; per slot of capacity hnswlib's mutex, level and list
        pointer (see :func:`grown_capacity`); plus the small copy."""
        m = self._settings.m
        small = self._small
        extra = small[0].nbytes + small[1].nbytes if small is not None else 0
        return self.elements * (4 * self.dim + 8 * m + 16) + self.capacity * 52 + extra

    def add(
        self,
        vectors: np.ndarray,
        first_row: int,
        threads: int | None = None,
        deleted: np.ndarray | None = None,
    ) -> None:
        """Covers rows ``first_row .. first_row + len(vectors)``, adding all but those in
        ``deleted`` (rows of deletes up to ``marked_seq``, which searches skip anyway: they
        are covered without taking room); called by the builder only."""
        n = len(vectors)
        labels = np.arange(first_row, first_row + n, dtype=np.int64)
        if deleted is not None and len(deleted):
            keep = ~np.isin(labels, deleted)
            labels, vectors = labels[keep], vectors[keep]
        with self._lock.write():
            if len(labels):
                capacity = self._index.get_max_elements()
                needed = self._index.get_current_count() + len(labels)
                if needed > capacity:
                    self._index.resize_index(grown_capacity(capacity, needed))
                self._index.add_items(
                    vectors,
                    labels.astype(np.uint64),
                    num_threads=threads or self._settings.build_threads,
                )
            if self._small is not None:
                rows, small = self._small
                grown = (
                    np.concatenate([rows, labels]),
                    np.concatenate([small, vectors.astype(np.float32)]),
                )
                self._small = grown if len(grown[0]) <= EXACT_BELOW else None
            self.covered = first_row + n

    def swap(
        self, index: hnswlib.Index, marked: int, small: tuple[np.ndarray, np.ndarray] | None
    ) -> None:
        """Puts ``index`` (a compaction's: the same rows minus deleted ones, ``marked`` of
        them marked) in place of the current one once the searches in progress are done;
        ``small``: its rows (ascending) and their vectors, when it is small enough to search
        exactly. Builder only, between its steps, so the covered rows and marks match."""
        with self._lock.write():
            self._index = index
            self.marked = marked
            self._small = small

    def mark(self, rows: np.ndarray, seq: int) -> None:
        """Marks the indexed ones of ``rows`` deleted, those of every delete up to ``seq``
        (builder only, deletes in sequence order); rows not indexed yet are marked when added.
        """
        with self._lock.write():
            self.marked += mark_rows(self._index, rows[rows < self.covered])
            self.marked_seq = seq

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
            covered = self.covered
            limit = covered if limit_row is None else min(limit_row, covered)
            if limit == 0 or k == 0:
                return np.empty(0, np.int64), np.empty(0, np.float32)
            if self._small is not None:
                return self._exact(cue, k, limit, accept)
            live = self._index.get_current_count() - self.marked  # the most it can return
            if live <= 0:
                return np.empty(0, np.int64), np.empty(0, np.float32)
            fetch = min(live, k + min(covered - limit, 4 * k))
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
        """Brute force over the small copy's rows below ``limit``: small indexes are answered
        exactly (HNSW can leave some of many equal vectors unreachable)."""
        assert self._small is not None
        rows, vectors = self._small
        below = int(np.searchsorted(rows, limit))  # rows ascend: see ``add`` and ``swap``
        rows, vectors = rows[:below], vectors[:below]
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
        """The vectors of ``rows``: rows the index holds and has not marked."""
        with self._lock.read():
            return np.asarray(self._index.get_items(rows.tolist(), return_type="numpy"))


def mark_rows(index: hnswlib.Index, rows: np.ndarray) -> int:
    """Marks ``rows`` deleted in ``index``; returns how many it marked (a row marked already,
    as a saved index keeps its marks, or missing, as a compaction left it out, is skipped)."""
    marked = 0
    for row in rows.tolist():
        try:
            index.mark_deleted(row)
        except RuntimeError:
            continue
        marked += 1
    return marked


def _and_live(
    accept: Callable[[np.ndarray], np.ndarray] | None, deletes: DeleteView
) -> Callable[[np.ndarray], np.ndarray]:
    if accept is None:
        return deletes.live
    rows_ok = accept

    def both(rows: np.ndarray) -> np.ndarray:
        return rows_ok(rows) & deletes.live(rows)

    return both
