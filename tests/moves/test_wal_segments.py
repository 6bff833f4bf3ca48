"""What a move reads of a WAL: closing the segment being written, and reading closed ones."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from engram.contract.errors import StorageError
from engram.shard.wal import Wal

pytestmark = pytest.mark.usefixtures("no_leaked_committers")


async def _wal(path: Path) -> Wal:
    wal = Wal(path, segment_bytes=1 << 20)
    for _ in wal.replay():
        pass
    wal.start()
    return wal


async def test_close_segment_returns_everything_durable_at_the_call(tmp_path: Path) -> None:
    wal = await _wal(tmp_path)
    try:
        assert await wal.close_segment() == 0  # nothing written: nothing to close
        assert wal.closed_segments() == []
        futures = [wal.append(f"r{i}".encode(), i) for i in range(1, 6)]
        closed = await wal.close_segment()
        await asyncio.gather(*futures)
        assert closed == 1 and wal.closed_segments() == [1]
        assert list(wal.read_closed(1)) == [(i, f"r{i}".encode()) for i in range(1, 6)]
        # an empty current segment is not closed again
        assert await wal.close_segment() == 1
        later = wal.append(b"r6", 6)
        assert await wal.close_segment() == 2
        await later
        assert list(wal.read_closed(2)) == [(6, b"r6")]
    finally:
        await wal.close()


async def test_the_segment_being_written_cannot_be_read(tmp_path: Path) -> None:
    wal = await _wal(tmp_path)
    try:
        await wal.append(b"x", 1)
        current = max(wal.closed_segments(), default=0) + 1
        with pytest.raises(StorageError, match="not a closed segment"):
            list(wal.read_closed(current))
    finally:
        await wal.close()


async def test_segments_closed_by_size_are_closed_too(tmp_path: Path) -> None:
    wal = Wal(tmp_path, segment_bytes=4096)
    for _ in wal.replay():
        pass
    wal.start()
    try:
        await asyncio.gather(*(wal.append(b"y" * 1000, i) for i in range(1, 20)))
        last = await wal.close_segment()
        records = [r for n in wal.closed_segments() for r in wal.read_closed(n)]
        assert last == max(wal.closed_segments())
        assert [lsn for lsn, _ in records] == list(range(1, 20))
    finally:
        await wal.close()
