"""Fuzzing the WAL's record reader and recovery (``shard/wal.py``: the segment scan and
``Wal.replay``'s repair) on valid segments damaged in the ways a disk or a crash damages
them: bytes flipped or overwritten, a zeroed range, the last segment cut short, garbage
inserted or appended, and length fields claiming huge sizes.

What must hold, as the module docstring documents: replay yields exactly the records before
the first bad one (none before it lost, none invented), cuts that segment there and deletes
every later one; a second replay yields the same and repairs nothing; no exception escapes
(StorageError is the documented one, for I/O failures, not for content); and reading
allocates nothing in proportion to a length field the file cannot back.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from tests.fuzz.bounds import FUZZ, SCRATCH, bounded

from engram.shard.wal import HEADER_SIZE, Wal, encode_record, segment_name

Record = tuple[int, bytes]
# The reader's own buffer (64 KiB) and bookkeeping: the most a scan may add to what it yields.
READ_SLACK = 1 << 20


@dataclass(frozen=True)
class Layout:
    """Records as written, by segment: where each one starts and ends in its file."""

    segments: list[list[tuple[int, int, Record]]]  # per segment: (start, end, record)

    def count_before(self, segment: int, offset: int) -> int:
        """Records wholly before byte ``offset`` of ``segment`` (all earlier segments')."""
        earlier = sum(len(records) for records in self.segments[:segment])
        return earlier + sum(1 for _, end, _ in self.segments[segment] if end <= offset)

    def start_of_record_at(self, segment: int, offset: int) -> int:
        for start, end, _ in self.segments[segment]:
            if start <= offset < end:
                return start
        return offset

    @property
    def records(self) -> list[Record]:
        return [record for records in self.segments for _, _, record in records]


def write_wal(directory: Path, segments: list[list[Record]]) -> Layout:
    """Segment files as the committer writes them (the record format of wal.py)."""
    layout = []
    for number, records in enumerate(segments, start=1):
        data = bytearray()
        placed = []
        for lsn, payload in records:
            start = len(data)
            data += encode_record(payload, lsn)
            placed.append((start, len(data), (lsn, payload)))
        (directory / segment_name(number)).write_bytes(bytes(data))
        layout.append(placed)
    return Layout(layout)


@st.composite
def wal_contents(draw: st.DrawFn) -> list[list[Record]]:
    """1..4 segments of 0..6 records each, LSNs rising; at least one record."""
    lsn = 0
    segments = []
    for _ in range(draw(st.integers(1, 4))):
        records = []
        for _ in range(draw(st.integers(0, 6))):
            lsn += draw(st.integers(0, 1000))
            size = draw(st.sampled_from([0, 1, 7, 64, 300, 2000]))
            records.append((lsn, draw(st.binary(min_size=size, max_size=size))))
        segments.append(records)
    if not any(segments):
        segments[-1].append((lsn + 1, b"last"))
    return segments


@dataclass(frozen=True)
class Damage:
    kind: str  # flip, set, zero, huge_length, insert, append, truncate
    segment: int
    offset: int
    value: int
    data: bytes


@st.composite
def damages(draw: st.DrawFn, layout: Layout) -> list[Damage]:
    """One damage in each of 1..3 segments (two in one file could undo each other)."""
    used = [i for i, records in enumerate(layout.segments) if records]
    out = []
    for segment in draw(st.lists(st.sampled_from(used), min_size=1, max_size=3, unique=True)):
        size = layout.segments[segment][-1][1]
        kinds = ["flip", "set", "zero", "huge_length", "insert", "append"]
        if segment == len(layout.segments) - 1:
            kinds.append("truncate")  # a crash cuts only the segment being written
        out.append(
            Damage(
                kind=draw(st.sampled_from(kinds)),
                segment=segment,
                offset=draw(st.integers(0, size - 1)),
                value=draw(st.integers(0, 255)),
                data=draw(st.binary(min_size=1, max_size=40)),
            )
        )
    return out


def apply(directory: Path, layout: Layout, damage: Damage) -> int:
    """Damages one file; returns how many records must survive replay for this damage alone:
    those wholly before the first byte that differs from the undamaged file."""
    path = directory / segment_name(damage.segment + 1)
    original = path.read_bytes()
    data = bytearray(original)
    at = damage.offset
    if damage.kind == "flip":
        data[at] ^= 1 << (damage.value % 8)
    elif damage.kind == "set":
        data[at] = damage.value
    elif damage.kind == "zero":
        data[at : at + 1 + damage.value] = bytes(len(data[at : at + 1 + damage.value]))
    elif damage.kind == "huge_length":  # the length field of the record holding ``at``
        at = layout.start_of_record_at(damage.segment, at)
        claimed = min(len(data) + 1 + damage.value * 0x00FF_FFFF, 0xFFFF_FFFF)
        data[at + 4 : at + 8] = claimed.to_bytes(4, "little")
    elif damage.kind == "insert":
        data[at:at] = damage.data
    elif damage.kind == "append":
        data += damage.data
    elif damage.kind == "truncate":
        del data[at:]
    if data == original:  # e.g. a byte set to the value it had
        return len(layout.records)
    path.write_bytes(bytes(data))
    first_difference = next(
        (i for i, (a, b) in enumerate(zip(original, data, strict=False)) if a != b),
        min(len(original), len(data)),
    )
    # appended garbage: this segment's records survive, the later segments' do not
    return layout.count_before(damage.segment, first_difference)


def replay(directory: Path) -> list[Record]:
    return [(lsn, bytes(payload)) for lsn, payload in Wal(directory).replay()]


@FUZZ
@given(data=st.data(), contents=wal_contents())
def test_replay_stops_at_the_first_bad_record(data: st.DataObject, contents: list[list[Record]]):
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        directory = Path(tmp)
        layout = write_wal(directory, contents)
        plan = data.draw(damages(layout))
        survive = len(layout.records)
        for damage in plan:
            survive = min(survive, apply(directory, layout, damage))
        on_disk = sum(path.stat().st_size for path in directory.iterdir())
        with bounded(on_disk, factor=2, what="replay"):
            replayed = replay(directory)
        assert replayed == layout.records[:survive]
        # repaired: the files hold exactly those records, and a second replay changes nothing
        left = sorted(path.name for path in directory.iterdir())
        assert replay(directory) == replayed
        assert sorted(path.name for path in directory.iterdir()) == left
        sizes = [(directory / name).stat().st_size for name in left]
        expected = sum(HEADER_SIZE + len(payload) for _, payload in replayed)
        assert sum(sizes) == expected


@FUZZ
@given(blob=st.binary(max_size=8192), length=st.integers(0, 0xFFFF_FFFF))
def test_any_bytes_as_a_segment(blob: bytes, length: int) -> None:
    """Garbage, or one valid-looking header whose length field claims up to 4 GiB."""
    with tempfile.TemporaryDirectory(dir=SCRATCH) as tmp:
        directory = Path(tmp)
        header = encode_record(b"", 1)[:4] + length.to_bytes(4, "little") + bytes(12)
        for number, content in enumerate((blob, header + blob), start=1):
            (directory / segment_name(number)).write_bytes(content)
        with bounded(2 * len(blob) + HEADER_SIZE, factor=1, what="replay"):
            replayed = replay(directory)
        for lsn, payload in replayed:
            assert 0 <= lsn < 1 << 64 and len(payload) <= len(blob)
        assert replay(directory) == replayed
