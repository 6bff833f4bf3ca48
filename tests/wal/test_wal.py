"""Tests of engram.shard.wal: framing, group commit, replay repair, rotation and faults.

Every test works on real files in tmp_path with real fdatasync.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import mmap
import os
from pathlib import Path

import pytest

from engram.contract.errors import StorageError
from engram.shard.wal import HEADER_SIZE, Wal, WalFaults, encode_record, segment_name

Record = tuple[int, bytes]


def payload(lsn: int, size: int) -> bytes:
    """Deterministic payload whose bytes depend on the record."""
    pattern = lsn.to_bytes(8, "little") + size.to_bytes(4, "little")
    return (pattern * (size // len(pattern) + 1))[:size]


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("wal-*.log"))


async def open_wal(directory: Path, **kwargs: object) -> tuple[Wal, list[Record]]:
    """Replays and starts a Wal; returns it with what it replayed."""
    wal = Wal(directory, **kwargs)  # type: ignore[arg-type]
    replayed = [(lsn, bytes(data)) for lsn, data in wal.replay()]
    wal.start()
    return wal, replayed


def replay(directory: Path) -> list[Record]:
    return [(lsn, bytes(data)) for lsn, data in Wal(directory).replay()]


async def write(directory: Path, records: list[Record], **kwargs: object) -> Wal:
    """Opens a Wal, appends ``records`` concurrently, waits, closes it."""
    wal, _ = await open_wal(directory, **kwargs)
    await asyncio.gather(*(wal.append(data, lsn) for lsn, data in records))
    await wal.close()
    return wal


# ---------------------------------------------------------------------------- round trip


async def test_round_trip_various_sizes(tmp_path: Path) -> None:
    sizes = [0, 1, 19, 20, 21, 4096, 0, 65_537, 1_500_000, 3, 1 << 20]
    records = [(i // 2, payload(i, size)) for i, size in enumerate(sizes)]  # lsns repeat
    wal = await write(tmp_path, records)
    assert wal.durable_bytes == sum(HEADER_SIZE + len(data) for _, data in records)
    assert wal.segment_count == 1
    assert replay(tmp_path) == records


async def test_memoryview_payloads(tmp_path: Path) -> None:
    base = payload(7, 5000)
    views = [memoryview(base), memoryview(base)[100:900], memoryview(bytearray(base))]
    wal, _ = await open_wal(tmp_path)
    await asyncio.gather(*(wal.append(view, i) for i, view in enumerate(views)))
    await wal.close()
    assert replay(tmp_path) == [(0, base), (1, base[100:900]), (2, base)]


async def test_reopen_appends_to_last_segment(tmp_path: Path) -> None:
    first = [(i, payload(i, 100 * i)) for i in range(1, 6)]
    second = [(i, payload(i, 50)) for i in range(6, 9)]
    await write(tmp_path, first)
    wal, replayed = await open_wal(tmp_path)
    assert replayed == first
    await asyncio.gather(*(wal.append(data, lsn) for lsn, data in second))
    await wal.close()
    assert len(segments(tmp_path)) == 1
    assert replay(tmp_path) == first + second


async def test_replay_creates_missing_directory(tmp_path: Path) -> None:
    directory = tmp_path / "a" / "b"
    wal, replayed = await open_wal(directory)
    assert replayed == []
    await wal.append(b"x", 1)
    await wal.close()
    assert replay(directory) == [(1, b"x")]


async def test_group_commit_batches_fsyncs(tmp_path: Path) -> None:
    records = [(i, payload(i, 16_384)) for i in range(200)]
    wal, _ = await open_wal(tmp_path)
    await asyncio.gather(*(wal.append(data, lsn) for lsn, data in records))
    assert 1 <= wal.fsync_count < len(records)
    await wal.close()
    assert replay(tmp_path) == records


def resident_pages(path: Path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in all), by mincore(2) on a mapping."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    page = mmap.PAGESIZE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) as m:
        pages = (len(m) + page - 1) // page
        vec = (ctypes.c_ubyte * pages)()
        address = ctypes.addressof(ctypes.c_char.from_buffer(m))
        try:
            if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(len(m)), vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(v & 1 for v in vec), pages
        finally:
            del address  # the buffer export must end before the mapping closes


async def test_synced_pages_leave_the_page_cache(tmp_path: Path) -> None:
    """The WAL is only read when a space is opened: synced pages are not kept in memory (the
    last, partly written page may stay)."""
    records = [(i, payload(i, 100_000)) for i in range(40)]
    wal, _ = await open_wal(tmp_path)
    for lsn, data in records:
        await wal.append(data, lsn)
    resident, pages = resident_pages(segments(tmp_path)[0])
    assert pages >= 900
    assert resident <= 2, f"{resident} of {pages} pages still cached"
    await wal.close()
    assert replay(tmp_path) == records  # the data is on disk all the same


# ---------------------------------------------------------------------------- repair


CUTS = [1, 7, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, HEADER_SIZE + 500, HEADER_SIZE + 999]


@pytest.mark.parametrize("cut", CUTS)
async def test_torn_tail_keeps_earlier_records(
    tmp_path: Path, cut: int, caplog: pytest.LogCaptureFixture
) -> None:
    records = [(i, payload(i, 1000)) for i in range(1, 6)]
    await write(tmp_path, records)
    (path,) = segments(tmp_path)
    last_start = path.stat().st_size - (HEADER_SIZE + 1000)
    os.truncate(path, last_start + cut)

    with caplog.at_level(logging.WARNING, logger="engram.shard.wal"):
        wal, replayed = await open_wal(tmp_path)
    assert replayed == records[:-1]
    assert path.stat().st_size == last_start
    assert path.name in caplog.text and f"offset {last_start}" in caplog.text

    await wal.append(b"again", 5)
    await wal.close()
    assert replay(tmp_path) == [*records[:-1], (5, b"again")]


def flip_bit(path: Path, offset: int, bit: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


# 1000-byte payloads and room for four records a segment: segments of exactly four records.
SEG = 4 * (HEADER_SIZE + 1000)


async def test_flipped_bit_in_last_segment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = [(i, payload(i, 1000)) for i in range(1, 7)]
    await write(tmp_path, records, segment_bytes=SEG)
    first, last = segments(tmp_path)
    flip_bit(last, HEADER_SIZE + 1000 + HEADER_SIZE + 123)  # payload of its second record

    with caplog.at_level(logging.WARNING, logger="engram.shard.wal"):
        assert replay(tmp_path) == records[:5]
    assert "CRC32C mismatch" in caplog.text and last.name in caplog.text
    assert last.stat().st_size == HEADER_SIZE + 1000
    assert first.stat().st_size == SEG


@pytest.mark.parametrize("offset", [0, 4, 8, 16, HEADER_SIZE + 999])  # magic, len, lsn, crc, data
async def test_flipped_bit_in_middle_segment_drops_later_segments(
    tmp_path: Path, offset: int, caplog: pytest.LogCaptureFixture
) -> None:
    records = [(i, payload(i, 1000)) for i in range(1, 15)]
    await write(tmp_path, records, segment_bytes=SEG)
    files = segments(tmp_path)
    assert len(files) == 4  # 4 + 4 + 4 + 2 records
    flip_bit(files[1], 2 * (HEADER_SIZE + 1000) + offset)  # third record of the second segment

    with caplog.at_level(logging.WARNING, logger="engram.shard.wal"):
        wal, replayed = await open_wal(tmp_path, segment_bytes=SEG)
    assert replayed == records[:6]
    assert segments(tmp_path) == files[:2]
    assert "deleted 2 later segment(s)" in caplog.text
    assert files[1].name in caplog.text
    await wal.append(b"next", 99)
    await wal.close()
    assert replay(tmp_path) == [*records[:6], (99, b"next")]


GARBAGE = {
    "zeros": b"\0" * 100,
    "short": b"\x31\x47",
    "random": bytes(range(256)) * 3,
    "huge length": encode_record(b"x" * 10, 1)[:4] + (1 << 31).to_bytes(4, "little") + b"\0" * 12,
    "bad crc": encode_record(b"y" * 10, 9)[:-1] + b"z",
}


@pytest.mark.parametrize("garbage", GARBAGE.values(), ids=GARBAGE.keys())
async def test_garbage_after_valid_records(tmp_path: Path, garbage: bytes) -> None:
    records = [(i, payload(i, 300)) for i in range(1, 4)]
    await write(tmp_path, records)
    (path,) = segments(tmp_path)
    size = path.stat().st_size
    with path.open("ab") as f:
        f.write(garbage)
    assert replay(tmp_path) == records
    assert path.stat().st_size == size
    assert replay(tmp_path) == records


async def test_zero_length_segments(tmp_path: Path) -> None:
    (tmp_path / segment_name(1)).write_bytes(encode_record(b"one", 1))
    (tmp_path / segment_name(2)).write_bytes(b"")
    (tmp_path / segment_name(3)).write_bytes(encode_record(b"three", 3))
    (tmp_path / segment_name(4)).write_bytes(b"")
    (tmp_path / "unrelated.txt").write_bytes(b"ignored")
    wal, replayed = await open_wal(tmp_path)
    assert replayed == [(1, b"one"), (3, b"three")]
    assert wal.segment_count == 4
    await wal.append(b"five", 5)
    await wal.close()
    assert (tmp_path / segment_name(4)).read_bytes() == encode_record(b"five", 5)
    assert replay(tmp_path) == [(1, b"one"), (3, b"three"), (5, b"five")]


async def test_only_an_empty_segment(tmp_path: Path) -> None:
    (tmp_path / segment_name(1)).write_bytes(b"")
    assert replay(tmp_path) == []


# ---------------------------------------------------------------------------- segments


@pytest.mark.parametrize("concurrent", [True, False])
async def test_rotation_by_size(tmp_path: Path, concurrent: bool) -> None:
    records = [(i, payload(i, 1000)) for i in range(1, 11)]
    wal, _ = await open_wal(tmp_path, segment_bytes=3000)
    if concurrent:
        await asyncio.gather(*(wal.append(data, lsn) for lsn, data in records))
    else:
        for lsn, data in records:
            await wal.append(data, lsn)
    await wal.close()
    sizes = [path.stat().st_size for path in segments(tmp_path)]
    assert sizes == [3 * (HEADER_SIZE + 1000)] * 3 + [HEADER_SIZE + 1000]
    assert replay(tmp_path) == records


async def test_reopen_full_segment_starts_a_new_one(tmp_path: Path) -> None:
    await write(tmp_path, [(1, payload(1, 2000))], segment_bytes=1_000_000)
    wal, _ = await open_wal(tmp_path, segment_bytes=1000)
    await wal.append(b"b", 2)
    await wal.close()
    assert [p.name for p in segments(tmp_path)] == [segment_name(1), segment_name(2)]
    assert replay(tmp_path) == [(1, payload(1, 2000)), (2, b"b")]


async def test_rotate_and_delete_through(tmp_path: Path) -> None:
    wal, _ = await open_wal(tmp_path)
    for lsn in (1, 2, 3):
        await wal.append(payload(lsn, 10), lsn)
    assert wal.rotate() == 1
    for lsn in (3, 5, 6):  # segment 2 starts with a repeated lsn
        await wal.append(payload(lsn, 10), lsn)
    assert wal.rotate() == 2
    await wal.append(payload(7, 10), 7)  # segment 3 is current
    assert wal.segment_count == 3

    assert wal.delete_through(2, closed_before=3) == 0  # segment 1 holds lsn 3
    assert wal.delete_through(3, closed_before=1) == 0  # segment 1 not below the bound
    assert wal.delete_through(3, closed_before=3) == 1  # segment 2 holds 5 and 6
    assert wal.delete_through(6, closed_before=2) == 0  # segment 1 is already gone
    assert wal.delete_through(100, closed_before=100) == 1  # never the current one
    assert [p.name for p in segments(tmp_path)] == [segment_name(3)]
    assert wal.segment_count == 1
    assert wal.durable_bytes == HEADER_SIZE + 10
    await wal.append(payload(8, 10), 8)
    await wal.close()
    assert replay(tmp_path) == [(7, payload(7, 10)), (8, payload(8, 10))]


async def test_rotate_without_records_and_delete_empty_segments(tmp_path: Path) -> None:
    wal, _ = await open_wal(tmp_path)
    assert wal.rotate() == 1
    assert wal.rotate() == 2
    await wal.append(b"a", 1)  # rotations are carried out in order before this record
    assert wal.segment_count == 3
    assert wal.delete_through(0, closed_before=3) == 2
    await wal.close()
    assert [p.name for p in segments(tmp_path)] == [segment_name(3)]


async def test_rotate_is_ordered_with_pending_appends(tmp_path: Path) -> None:
    wal, _ = await open_wal(tmp_path)
    before = [wal.append(payload(i, 50_000), i) for i in range(1, 21)]
    closed = wal.rotate()
    after = [wal.append(payload(i, 10), i) for i in range(21, 24)]
    await asyncio.gather(*before, *after)
    await wal.close()
    assert closed == 1
    seg1 = [(lsn, bytes(d)) for lsn, d in Wal(tmp_path).replay()][:20]
    assert seg1 == [(i, payload(i, 50_000)) for i in range(1, 21)]
    assert segments(tmp_path)[0].stat().st_size == 20 * (HEADER_SIZE + 50_000)
    assert segments(tmp_path)[1].stat().st_size == 3 * (HEADER_SIZE + 10)


# ---------------------------------------------------------------------------- faults


async def expect_storage_error(fut: asyncio.Future[None]) -> StorageError:
    with pytest.raises(StorageError) as info:
        await fut
    return info.value


async def test_fsync_fault(tmp_path: Path) -> None:
    faults = WalFaults()
    wal, _ = await open_wal(tmp_path, faults=faults)
    await wal.append(b"a", 1)
    faults.fail_fsync = 1
    bad = [wal.append(payload(i, 5000), i) for i in (2, 3, 4)]
    errors = [await expect_storage_error(fut) for fut in bad]
    assert "EIO" in errors[0].message and segment_name(1) in errors[0].message
    assert wal.failed

    refused = wal.append(b"x", 5)
    assert refused.done()
    await expect_storage_error(refused)
    with pytest.raises(StorageError):
        wal.rotate()

    wal.reset()
    assert not wal.failed
    assert segments(tmp_path)[0].stat().st_size == HEADER_SIZE + 1
    await wal.append(b"b", 2)  # the failed lsns may be reused
    await wal.close()
    assert replay(tmp_path) == [(1, b"a"), (2, b"b")]


async def test_write_fault_leaves_torn_record_until_reset(tmp_path: Path) -> None:
    faults = WalFaults()
    wal, _ = await open_wal(tmp_path, faults=faults)
    await wal.append(b"a", 1)
    faults.fail_write = 1
    bad = [wal.append(payload(i, 5000), i) for i in (2, 3, 4)]
    error = await expect_storage_error(bad[0])
    for fut in bad[1:]:
        await expect_storage_error(fut)
    assert "ENOSPC" in error.message and segment_name(1) in error.message
    (path,) = segments(tmp_path)
    assert path.stat().st_size > HEADER_SIZE + 1  # a partial record is on disk
    await expect_storage_error(wal.append(b"x", 5))

    wal.reset()
    assert path.stat().st_size == HEADER_SIZE + 1
    await wal.append(b"b", 6)
    await wal.close()
    assert replay(tmp_path) == [(1, b"a"), (6, b"b")]


async def test_failed_round_with_complete_records_never_replays(tmp_path: Path) -> None:
    faults = WalFaults()
    wal, _ = await open_wal(tmp_path, faults=faults)
    await wal.append(b"a", 1)
    faults.fail_write = 1
    bad = [wal.append(payload(i, 100), i) for i in range(2, 60)]  # torn half holds whole records
    for fut in bad:
        await expect_storage_error(fut)
    wal.reset()
    await wal.close()
    assert replay(tmp_path) == [(1, b"a")]


async def test_close_while_failed_drops_undurable_records(tmp_path: Path) -> None:
    faults = WalFaults(fail_fsync=1)
    wal, _ = await open_wal(tmp_path, faults=faults)
    await expect_storage_error(wal.append(b"lost", 1))
    await wal.close()
    assert replay(tmp_path) == []


async def test_persistent_fsync_error(tmp_path: Path) -> None:
    faults = WalFaults()
    wal, _ = await open_wal(tmp_path, faults=faults)
    await wal.append(b"a", 1)
    faults.persistent_fsync_error = True
    await expect_storage_error(wal.append(b"b", 2))
    with pytest.raises(StorageError, match="EIO"):
        wal.reset()
    assert wal.failed
    await expect_storage_error(wal.append(b"c", 3))

    faults.persistent_fsync_error = False
    wal.reset()
    await wal.append(b"d", 4)
    await wal.close()
    assert replay(tmp_path) == [(1, b"a"), (4, b"d")]


async def test_persistent_enospc(tmp_path: Path) -> None:
    faults = WalFaults(persistent_enospc=True)
    wal, _ = await open_wal(tmp_path, faults=faults)
    await expect_storage_error(wal.append(b"a", 1))
    wal.reset()  # truncating and syncing still work
    await expect_storage_error(wal.append(b"b", 2))
    faults.persistent_enospc = False
    wal.reset()
    await wal.append(b"c", 3)
    await wal.close()
    assert replay(tmp_path) == [(3, b"c")]


class FailSecondSync(WalFaults):
    """Lets the next fsync through and fails the one after it."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = -1

    def before_sync(self) -> None:
        if self.armed >= 0:
            self.armed += 1
            if self.armed == 2:
                raise OSError(5, "injected")
        super().before_sync()


async def test_fault_after_rotation_keeps_the_synced_group(tmp_path: Path) -> None:
    faults = FailSecondSync()
    record = HEADER_SIZE + 100
    wal, _ = await open_wal(tmp_path, faults=faults, segment_bytes=2 * record)
    await wal.append(payload(1, 100), 1)
    faults.armed = 0
    futs = [wal.append(payload(i, 100), i) for i in (2, 3, 4)]  # 2 closes segment 1
    results = await asyncio.gather(*futs, return_exceptions=True)
    assert results[0] is None
    assert all(isinstance(r, StorageError) for r in results[1:])
    faults.armed = -1
    wal.reset()
    for lsn in (5, 6, 7):
        await wal.append(payload(lsn, 100), lsn)
    await wal.close()
    assert [p.stat().st_size for p in segments(tmp_path)] == [2 * record, 2 * record, record]
    assert replay(tmp_path) == [(lsn, payload(lsn, 100)) for lsn in (1, 2, 5, 6, 7)]


# ---------------------------------------------------------------------------- misuse


async def test_start_requires_full_replay(tmp_path: Path) -> None:
    await write(tmp_path, [(1, b"a"), (2, b"b")])
    wal = Wal(tmp_path)
    with pytest.raises(RuntimeError):
        wal.start()
    records = wal.replay()
    next(records)
    records.close()
    with pytest.raises(RuntimeError):
        wal.start()
    assert len(list(wal.replay())) == 2
    wal.start()
    with pytest.raises(RuntimeError):
        wal.start()
    with pytest.raises(RuntimeError):
        list(wal.replay())
    await wal.close()


async def test_append_checks(tmp_path: Path) -> None:
    wal, _ = await open_wal(tmp_path)
    with pytest.raises(RuntimeError):
        Wal(tmp_path / "other").append(b"", 1)
    await wal.append(b"a", 5)
    with pytest.raises(ValueError):
        wal.append(b"b", 4)
    with pytest.raises(ValueError):
        wal.append(b"b", 1 << 64)
    await wal.append(b"c", 5)
    await wal.close()
    await expect_storage_error(wal.append(b"d", 6))
    await wal.close()  # closing twice is harmless
    assert replay(tmp_path) == [(5, b"a"), (5, b"c")]
