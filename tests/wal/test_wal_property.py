"""Property test of engram.shard.wal replay: after a torn tail or a flipped bit anywhere,
replay returns exactly the records before the damage, and the WAL takes appends again."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from engram.shard.wal import HEADER_SIZE, Wal

Record = tuple[int, bytes]


def payload(index: int, size: int) -> bytes:
    return bytes((index * 31 + i) % 251 for i in range(size))


async def append_all(directory: Path, records: list[Record], segment_bytes: int) -> None:
    wal = Wal(directory, segment_bytes=segment_bytes)
    assert list(wal.replay()) == []
    wal.start()
    await asyncio.gather(*(wal.append(data, lsn) for lsn, data in records))
    await wal.close()


async def reopen_and_append(directory: Path, record: Record) -> list[Record]:
    wal = Wal(directory)
    replayed = [(lsn, bytes(data)) for lsn, data in wal.replay()]
    wal.start()
    await wal.append(record[1], record[0])
    await wal.close()
    return replayed


def layout(directory: Path) -> list[tuple[Path, int, int]]:
    """(file, start, end) of every byte range of every record, in order."""
    out = []
    for path in sorted(directory.glob("wal-*.log")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            end = offset + HEADER_SIZE + int.from_bytes(data[offset + 4 : offset + 8], "little")
            out.append((path, offset, end))
            offset = end
    return out


def locate(records: list[tuple[Path, int, int]], where: int) -> tuple[int, int]:
    """Index of the record holding byte ``where`` (modulo the log's size), and the offset."""
    position = where % sum(end - start for _, start, end in records)
    for index, (_, start, end) in enumerate(records):
        if position < end - start:
            return index, position
        position -= end - start
    raise AssertionError("unreachable")


def damage(directory: Path, cut: bool, where: int, bit: int) -> int:
    """Cuts the WAL at byte ``where`` of the whole log (dropping later files, as a crash
    would) or flips one bit there; returns how many records lie wholly before the damage."""
    records = layout(directory)
    index, position = locate(records, where)
    path, start, _ = records[index]
    if cut:
        with path.open("r+b") as f:
            f.truncate(start + position)
        for later in sorted(directory.glob("wal-*.log")):
            if later.name > path.name:
                later.unlink()
        return index
    data = bytearray(path.read_bytes())
    data[start + position] ^= 1 << bit
    path.write_bytes(bytes(data))
    return index


@settings(max_examples=100, deadline=None, database=None)
@given(
    sizes=st.lists(st.integers(0, 3000), min_size=1, max_size=25),
    segment_bytes=st.integers(500, 12_000),
    cut=st.booleans(),
    where=st.integers(0, 1 << 30),
    bit=st.integers(0, 7),
)
def test_replay_after_damage_is_a_prefix(
    sizes: list[int], segment_bytes: int, cut: bool, where: int, bit: int
) -> None:
    records = [(i // 3, payload(i, size)) for i, size in enumerate(sizes)]
    with tempfile.TemporaryDirectory() as name:
        directory = Path(name)
        asyncio.run(append_all(directory, records, segment_bytes))
        kept = damage(directory, cut, where, bit)

        replayed = [(lsn, bytes(data)) for lsn, data in Wal(directory).replay()]
        assert replayed == records[:kept]
        assert len(layout(directory)) == kept  # the damage is gone from disk

        extra = (len(sizes), b"after repair")
        assert asyncio.run(reopen_and_append(directory, extra)) == records[:kept]
        again = [(lsn, bytes(data)) for lsn, data in Wal(directory).replay()]
        assert again == [*records[:kept], extra]
