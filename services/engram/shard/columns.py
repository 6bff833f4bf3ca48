"""Compact per-row string columns (ids, contents) of a memory space.

A Python ``str`` costs about 50 bytes of object header plus an 8-byte list slot on top of its
text: at a million rows, ids and contents in lists took about 0.2 GB, a tenth of the memory
budget per million. Here strings are stored end to end as UTF-8, one chunk per appended batch,
with a 4-byte end offset per row.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import numpy as np

SMALL_CHUNK_ROWS = 1_024  # appends join the last chunk while it stays this small


class StringColumn:
    """Strings by row number. Appended by one thread, read by any: a reader asks only for rows
    it has seen counted by ``len`` (chunks are published before the count grows)."""

    def __init__(self) -> None:
        self._firsts: list[int] = []  # first row of each chunk
        self._data: list[bytes] = []
        self._ends: list[np.ndarray] = []  # each row's end offset within its chunk
        self._rows = 0

    def __len__(self) -> int:
        return self._rows

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
        if self._ends and len(self._ends[-1]) + n <= SMALL_CHUNK_ROWS:
            # rows arriving a few at a time (the single-observation path) join the last chunk
            # rather than each paying a chunk's ~150 bytes of objects. Readers stay safe: the
            # new chunk starts with the old one, byte for byte and offset for offset.
            last = self._ends[-1]
            base = int(last[-1]) if len(last) else 0
            self._data[-1] = self._data[-1] + data
            self._ends[-1] = np.concatenate([last, ends + base]).astype(last.dtype)
        else:
            self._data.append(data)
            self._ends.append(ends.astype(np.int32) if ends[-1] < 2**31 else ends)
            self._firsts.append(self._rows)
        self._rows += n

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
        ends = self._ends[i]
        start = int(ends[j - 1]) if j else 0
        return self._data[i][start : int(ends[j])].decode("utf-8", "surrogatepass")

    def _range(self, lo: int, hi: int) -> list[str]:
        out: list[str] = []
        if lo >= hi:
            return out
        i = bisect.bisect_right(self._firsts, lo) - 1
        while lo < hi:
            first, data, ends = self._firsts[i], self._data[i], self._ends[i]
            a, b = lo - first, min(hi - first, len(ends))
            offsets = [int(ends[a - 1]) if a else 0, *ends[a:b].tolist()]
            out.extend(
                data[s:e].decode("utf-8", "surrogatepass")
                for s, e in zip(offsets, offsets[1:], strict=False)
            )
            lo = first + b
            i += 1
        return out
