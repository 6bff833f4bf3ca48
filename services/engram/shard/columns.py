"""Compact per-row string columns (ids, contents) of a memory space.

A Python ``str`` costs about 50 bytes of object header plus an 8-byte list slot on top of its
text: at a million rows, ids and contents in lists took about 0.2 GB, a tenth of the memory
budget per million. Here strings are stored end to end as UTF-8, one chunk per appended batch,
with a 4-byte end offset per row. A chunk is one ``(data, ends)`` tuple, so a reader takes both
halves of the same version.

Compaction (:mod:`engram.shard.compaction`) replaces chunks holding deleted rows with copies in
which those rows are empty strings (:func:`blanked`, then :meth:`StringColumn.replace` on the
event loop). It swaps in a new list of chunks rather than editing the old one, so a
:meth:`StringColumn.view` taken by a recall's snapshot before the swap keeps reading the rows
as they were when the recall began.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

SMALL_CHUNK_ROWS = 1_024  # appends join the last chunk while it stays this small

Chunk = tuple[bytes, np.ndarray]  # the rows' UTF-8 end to end, each row's end offset


class StringColumn:
    """Strings by row number. Appended by one thread, read by any: a reader asks only for rows
    it has seen counted by ``len`` (chunks are published before the count grows)."""

    def __init__(self) -> None:
        self._firsts: list[int] = []  # first row of each chunk (only ever appended to)
        self._chunks: list[Chunk] = []
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

    @property
    def nbytes(self) -> int:
        """Bytes of the strings and their offsets."""
        return sum(len(data) + ends.nbytes for data, ends in self._chunks)

    def view(self) -> StringColumn:
        """The rows held now, as they are now: a later :meth:`replace` does not change them."""
        out = StringColumn()
        out._firsts, out._chunks, out._rows = self._firsts, self._chunks, self._rows
        return out

    def extend(self, values: Sequence[str]) -> None:
        n = len(values)
        if not n:
            return
        chars = np.fromiter(map(len, values), np.int64, n)
        data = "".join(values).encode("utf-8", "surrogatepass")
        if len(data) == int(chars.sum()):  # ASCII only: byte offsets are character offsets
            lengths = chars
        else:
            encoded = [v.encode("utf-8", "surrogatepass") for v in values]
            lengths = np.fromiter(map(len, encoded), np.int64, n)
        ends = np.cumsum(lengths)
        chunks = self._chunks
        if chunks and len(chunks[-1][1]) + n <= SMALL_CHUNK_ROWS:
            # rows arriving a few at a time (the single-observation path) join the last chunk
            # rather than each paying a chunk's ~150 bytes of objects. Readers stay safe: the
            # new chunk starts with the old one, byte for byte and offset for offset.
            old_data, last = chunks[-1]
            base = int(last[-1]) if len(last) else 0
            chunks[-1] = (old_data + data, np.concatenate([last, ends + base]).astype(last.dtype))
        else:
            chunks.append((data, ends.astype(np.int32) if ends[-1] < 2**31 else ends))
            self._firsts.append(self._rows)
        self._rows += n

    def chunks(self) -> list[tuple[int, Chunk]]:
        """Each chunk with its first row (the current version)."""
        return list(zip(self._firsts, self._chunks, strict=False))

    def replace(self, swaps: Sequence[tuple[int, Chunk, Chunk]]) -> int:
        """Puts ``new`` in place of chunk ``i`` for each ``(i, old, new)`` whose chunk is still
        ``old`` (rows may have joined it since); returns how many were replaced. Same thread
        as :meth:`extend` (the event loop)."""
        chunks = list(self._chunks)  # views keep the old list: see the module
        done = 0
        for i, old, new in swaps:
            if chunks[i] is old:
                chunks[i] = new
                done += 1
        self._chunks = chunks
        return done

    def __getitem__(self, key: int | slice) -> str | list[str]:
        if isinstance(key, slice):
            lo, hi, step = key.indices(self._rows)
            if step != 1:
                raise ValueError("StringColumn slices take no step")
            return self._range(lo, hi)
        row = key + self._rows if key < 0 else key
        if not 0 <= row < self._rows:
            raise IndexError(f"row {key} of {self._rows}")
        i = bisect.bisect_right(self._firsts, row) - 1
        j = row - self._firsts[i]
        data, ends = self._chunks[i]
        start = int(ends[j - 1]) if j else 0
        return data[start : int(ends[j])].decode("utf-8", "surrogatepass")

    def _range(self, lo: int, hi: int) -> list[str]:
        out: list[str] = []
        if lo >= hi:
            return out
        i = bisect.bisect_right(self._firsts, lo) - 1
        chunks = self._chunks
        while lo < hi:
            first, (data, ends) = self._firsts[i], chunks[i]
            a, b = lo - first, min(hi - first, len(ends))
            offsets = [int(ends[a - 1]) if a else 0, *ends[a:b].tolist()]
            out.extend(
                data[s:e].decode("utf-8", "surrogatepass")
                for s, e in zip(offsets, offsets[1:], strict=False)
            )
            lo = first + b
            i += 1
        return out


def blanked(chunk: Chunk, dead: np.ndarray) -> Chunk | None:
    """``chunk`` with the rows where ``dead`` (a mask over its rows) is set made empty, or
    None when they are all empty already."""
    data, ends = chunk
    starts = np.concatenate([np.zeros(1, ends.dtype), ends[:-1]])
    lengths = ends - starts
    if not (lengths[dead] > 0).any():
        return None
    keep = np.flatnonzero(~dead & (lengths > 0))
    body = b"".join(data[int(s) : int(e)] for s, e in zip(starts[keep], ends[keep], strict=True))
    return body, np.cumsum(np.where(dead, 0, lengths)).astype(ends.dtype)
