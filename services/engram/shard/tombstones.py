"""Which rows of a memory space are deleted, and which rows hold a given id.

:class:`Tombstones` holds, per row, the *delete sequence* that deleted it (uint32, 0 = live).
Every applied delete takes the next sequence number; a recall's snapshot records the number it
saw, and a row is deleted for it iff ``0 < deleted_at[row] <= seq``. That is what makes a
delete visible atomically: the event loop writes a delete's entries first and advances
``seq`` after, and growing the array makes a new one (a reader keeps the one it took), so a
reader sees every entry of the deletes up to its sequence and none of a later one.

The array is created at a space's first delete and only covers rows up to the highest one
deleted (rows beyond it are live), so ingest pays nothing and a space pays 4 bytes a row at
most. Each delete's rows also wait in ``unmarked`` until the builder has marked them in the
HNSW index (hnswlib's ``mark_deleted``, so a search still finds ``k`` live rows).

:class:`IdIndex` finds rows by id without a dict of strings: a sorted array of 32-bit hashes
of the ids with their rows (8 bytes a row), built at a space's first delete by id and extended
with the rows that arrived since at each later one (a sorted run merged in). Candidates are
confirmed against the real id strings, so a hash collision costs a comparison, never a wrong
row. Both are owned by :class:`~engram.shard.state.SpaceState` and used on the event loop,
except :meth:`DeleteView.live` and the builder's reads of ``unmarked``.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np

from engram.shard.columns import StringColumn

# rows that arrived since the sorted part are scanned until there are this many (or an
# eighth of the sorted part), then merged into it
_TAIL_ROWS = 65_536


class Tombstones:
    """Deleted rows by delete sequence; written on the event loop, read by any thread."""

    def __init__(self) -> None:
        self.seq = 0  # the last applied delete's sequence number
        self.count = 0  # rows deleted
        self.at = np.zeros(0, np.uint32)  # row -> sequence that deleted it (0: live)
        # (seq, rows) of applied deletes the HNSW index has not marked yet, oldest first
        self.unmarked: collections.deque[tuple[int, np.ndarray]] = collections.deque()

    def apply(self, rows: np.ndarray) -> int:
        """Deletes ``rows`` (visible rows, any order, repeats allowed) as the next sequence;
        returns how many were live. Rows already deleted are left as they are."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if not len(rows):
            return 0
        top = int(rows[-1]) + 1
        at = self.at
        if top > len(at):
            grown = np.zeros(max(top, len(at) + len(at) // 4), np.uint32)
            grown[: len(at)] = at
            at = grown
        new = rows[at[rows] == 0]
        if len(new):
            seq = self.seq + 1
            at[new] = seq
            self.at = at  # entries first, then the sequence: see the module
            self.seq = seq
            self.count += len(new)
            self.unmarked.append((seq, new))
        elif at is not self.at:
            self.at = at
        return len(new)

    def deleted(self, rows: np.ndarray) -> np.ndarray:
        """Whether each of ``rows`` is deleted now (boolean mask)."""
        return ~DeleteView(self, self.seq, self.at).live(rows)

    def mask(self, n: int) -> np.ndarray:
        """Deleted rows among ``[0, n)`` now, as a boolean array (a copy)."""
        out = np.zeros(n, bool)
        m = min(n, len(self.at))
        out[:m] = self.at[:m] != 0
        return out

    def rows(self, n: int | None = None) -> np.ndarray:
        """The deleted rows (below ``n``), ascending."""
        found = np.flatnonzero(self.at)
        return found if n is None else found[found < n]

    def load(self, deleted: np.ndarray) -> None:
        """Rows a checkpoint holds as deleted (a boolean mask), as one delete."""
        rows = np.flatnonzero(deleted)
        if len(rows):
            self.apply(rows)


class DeleteView:
    """What one recall sees of the tombstones: the deletes up to ``seq``. The HNSW search
    calls :meth:`see` with the sequence its index marks reach (read under the index lock),
    so both tiers hide the same deletes even if the builder marked newer ones meanwhile."""

    __slots__ = ("_tombstones", "at", "seq")

    def __init__(self, tombstones: Tombstones, seq: int, at: np.ndarray) -> None:
        self._tombstones = tombstones
        self.seq = seq
        self.at = at

    def see(self, seq: int) -> None:
        if seq > self.seq:
            # the current array holds every entry up to the current sequence (>= seq)
            self.at = self._tombstones.at
            self.seq = seq

    def live(self, rows: np.ndarray) -> np.ndarray:
        keep = np.ones(len(rows), bool)
        at = self.at
        if not self.seq or not len(at):
            return keep
        inside = rows < len(at)
        dead = at[rows[inside]]
        keep[inside] = (dead == 0) | (dead > self.seq)
        return keep


def hash_ids(ids: Sequence[str]) -> np.ndarray:
    """32-bit hashes of ``ids`` (the process's string hash: the index lives in memory only)."""
    return np.fromiter((hash(i) & 0xFFFF_FFFF for i in ids), np.uint32, len(ids))


class IdIndex:
    """Rows by id; event loop only. See the module for the layout."""

    def __init__(self) -> None:
        self._hashes = np.zeros(0, np.uint32)  # sorted hashes of rows [0, sorted_rows) ...
        self._rows = np.zeros(0, np.uint32)  # ... and their rows
        self._sorted_rows = 0
        self._tail = np.zeros(0, np.uint32)  # hashes of rows [sorted_rows, hashed), by row
        self._hashed = 0

    @property
    def nbytes(self) -> int:
        return self._hashes.nbytes + self._rows.nbytes + self._tail.nbytes

    def find(self, column: StringColumn, visible: int, ids: Sequence[str]) -> dict[str, list[int]]:
        """The rows below ``visible`` holding each of ``ids`` (ids not held are left out)."""
        self._extend(column, visible)
        wanted = hash_ids(ids)
        order = np.argsort(wanted, kind="stable")
        query = wanted[order]
        cand_rows: list[np.ndarray] = []
        cand_q: list[np.ndarray] = []
        lo = np.searchsorted(self._hashes, query, "left")
        hi = np.searchsorted(self._hashes, query, "right")
        counts = hi - lo
        if counts.any():
            at = np.repeat(lo - (np.cumsum(counts) - counts), counts) + np.arange(counts.sum())
            cand_rows.append(self._rows[at].astype(np.int64))
            cand_q.append(np.repeat(order, counts))
        if len(self._tail):
            pos = np.searchsorted(query, self._tail)
            pos_c = np.minimum(pos, len(query) - 1)
            hit = np.flatnonzero(query[pos_c] == self._tail)
            for i in hit.tolist():  # every query id with this hash
                h = self._tail[i]
                j = int(pos_c[i])
                while j < len(query) and query[j] == h:
                    cand_rows.append(np.array([self._sorted_rows + i], np.int64))
                    cand_q.append(np.array([order[j]], np.int64))
                    j += 1
        out: dict[str, list[int]] = {}
        if not cand_rows:
            return out
        for row, q in zip(
            np.concatenate(cand_rows).tolist(), np.concatenate(cand_q).tolist(), strict=True
        ):
            if row < visible and column[row] == ids[q]:
                out.setdefault(ids[q], []).append(row)
        return out

    def _extend(self, column: StringColumn, visible: int) -> None:
        if visible > self._hashed:
            self._tail = np.concatenate([self._tail, hash_ids(column[self._hashed : visible])])
            self._hashed = visible
        if len(self._tail) > max(_TAIL_ROWS, self._sorted_rows // 8):
            rows = np.arange(self._sorted_rows, self._hashed, dtype=np.uint32)
            # two sorted runs: the stable sort merges them in linear time
            tail_order = np.argsort(self._tail, kind="stable")
            hashes = np.concatenate([self._hashes, self._tail[tail_order]])
            rows = np.concatenate([self._rows, rows[tail_order]])
            order = np.argsort(hashes, kind="stable")
            self._hashes, self._rows = hashes[order], rows[order]
            self._sorted_rows = self._hashed
            self._tail = np.zeros(0, np.uint32)
