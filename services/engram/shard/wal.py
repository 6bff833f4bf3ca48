"""Write-ahead log of one memory space: segment files, group commit, replay and repair.

Owns the directory of one space's WAL and every file in it named ``wal-<n:016d>.log``
(segments, numbered from 1). The shard calls it from its asyncio event loop: :meth:`Wal.replay`
once when the space is opened, then :meth:`Wal.start`, :meth:`Wal.append` for every ingested
batch, :meth:`Wal.rotate` and :meth:`Wal.delete_through` around checkpoints, :meth:`Wal.reset`
after a storage failure, and :meth:`Wal.close` at shutdown.

Records are opaque payloads (a serialized protobuf made by the caller) tagged with ``end_lsn``,
the caller's log sequence number of the last observation in the record (u64, non-decreasing).
Each record is framed, little-endian::

    magic u32 = 0x454E4731 ("ENG1") | payload_len u32 | end_lsn u64 | crc u32 | payload

where ``crc`` is CRC32C over the first 16 header bytes and the payload.

One committer thread per Wal does all writing: it takes everything queued, computes the CRCs,
writes the records with ``pwritev``, calls ``fdatasync`` once and then settles every future of
that round on the event loop (group commit; records arriving during an fsync form the next
round). The event loop thread only queues records and reads counters. Each round records its
fsync time and size (``engram_shard_wal_fsync_seconds``, ``engram_shard_wal_group_records``).

Once synced, the written pages are dropped from the page cache (``POSIX_FADV_DONTNEED``): the
WAL is read back only when a space is opened, so keeping them would grow the cache by every
byte ingested (75 MB/s a shard at full load), which a container's memory limit counts, and
each write would take a page the machine had not used yet instead of one just freed. On a VM
whose host backs guest memory lazily, such first-touched pages cost several times more.

A failed write or fsync fails that round's futures with :class:`StorageError` and puts the WAL
in the ``failed`` state, in which every append fails at once, until :meth:`Wal.reset` has cut
the current segment back to its last durable offset. Replay never refuses a WAL: at the first
bad record it truncates there, deletes every later segment, logs a warning and stops.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import logging
import os
import re
import struct
import threading
import time
from collections import deque
from collections.abc import Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import google_crc32c

from engram.common import metrics
from engram.common.threads import name_os_thread
from engram.contract.errors import StorageError

log = logging.getLogger("engram.shard.wal")

MAGIC: Final = 0x454E4731  # "ENG1" as a number; little-endian on disk, so the bytes read "1GNE"
_PREFIX: Final = struct.Struct("<IIQ")  # magic, payload_len, end_lsn: the CRC covers these
_CRC: Final = struct.Struct("<I")
HEADER_SIZE: Final = _PREFIX.size + _CRC.size  # 20
MAX_PAYLOAD: Final = 0xFFFF_FFFF
MAX_LSN: Final = 0xFFFF_FFFF_FFFF_FFFF

_SEGMENT_NAME: Final = re.compile(r"wal-(\d{16})\.log")
_IOV_MAX: Final = 1024  # buffers per pwritev call (Linux's IOV_MAX)
_PAGE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

Payload = bytes | memoryview
# A queued record; ``None`` in the queue is a rotation marker.
_Record = tuple[Payload, int, "asyncio.Future[None]"]
_Item = _Record | None


def segment_name(number: int) -> str:
    """File name of segment ``number``."""
    return f"wal-{number:016d}.log"


def record_header(payload: bytes, end_lsn: int) -> bytes:
    """The 20-byte header that precedes ``payload`` on disk."""
    prefix = _PREFIX.pack(MAGIC, len(payload), end_lsn)
    crc = google_crc32c.extend(google_crc32c.value(prefix), payload)
    return prefix + _CRC.pack(crc)


def encode_record(payload: bytes, end_lsn: int) -> bytes:
    """One whole record as bytes (for tools and tests; the committer avoids this copy)."""
    return record_header(payload, end_lsn) + payload


@dataclass
class WalFaults:
    """Fault hook for tests and chaos runs: the committer consults it before each write and
    each fsync."""

    fail_fsync: int = 0  # the next N fsyncs raise OSError(EIO) instead of syncing
    fail_write: int = 0  # the next N writes raise OSError(ENOSPC) after writing part of the data
    persistent_fsync_error: bool = False  # every fsync fails while True
    persistent_enospc: bool = False  # every write fails while True

    def before_write(self, nbytes: int) -> None:
        """Raises OSError(ENOSPC) when a write fault is due; the caller then writes a torn
        part of its ``nbytes`` before passing the error on."""
        if self.persistent_enospc:
            raise OSError(errno.ENOSPC, "injected: no space left on device")
        if self.fail_write > 0:
            self.fail_write -= 1
            raise OSError(errno.ENOSPC, "injected: no space left on device")

    def before_sync(self) -> None:
        """Raises OSError(EIO) when an fsync fault is due."""
        if self.persistent_fsync_error:
            raise OSError(errno.EIO, "injected: fsync I/O error")
        if self.fail_fsync > 0:
            self.fail_fsync -= 1
            raise OSError(errno.EIO, "injected: fsync I/O error")


@dataclass(slots=True)
class _Segment:
    size: int  # durable bytes in the file
    last_lsn: int | None  # end_lsn of its last durable record; None while it holds none


@dataclass(slots=True)
class _Scan:
    good_end: int  # offset just past the last valid record
    size: int  # file size when read
    last_lsn: int | None
    problem: str | None  # why reading stopped before the end of the file


class _IOFailure(Exception):
    """An OSError of the committer, described for the StorageError of every affected append."""


def _describe(op: str, path: Path | str, exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return f"WAL {op} failed on {path}: {name} ({exc.strerror})"


def _as_bytes(payload: Payload) -> bytes:
    """``payload`` as bytes without copying when possible (google_crc32c takes only bytes)."""
    if type(payload) is bytes:
        return payload
    if isinstance(payload, memoryview):
        base = payload.obj
        if type(base) is bytes and payload.c_contiguous and payload.nbytes == len(base):
            return base
        return payload.tobytes()
    return bytes(payload)


def _nbytes(payload: Payload) -> int:
    return payload.nbytes if isinstance(payload, memoryview) else len(payload)


def _skip(bufs: list[bytes | memoryview], n: int) -> list[bytes | memoryview]:
    """``bufs`` without their first ``n`` bytes."""
    for i, buf in enumerate(bufs):
        size = len(buf)
        if n < size:
            return [memoryview(buf)[n:], *bufs[i + 1 :]] if n else bufs[i:]
        n -= size
    return []


def _take(bufs: list[bytes | memoryview], n: int) -> list[bytes | memoryview]:
    """The first ``n`` bytes of ``bufs``."""
    out: list[bytes | memoryview] = []
    for buf in bufs:
        if n <= 0:
            break
        out.append(buf if len(buf) <= n else memoryview(buf)[:n])
        n -= len(buf)
    return out


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _list_segments(directory: Path) -> list[int]:
    numbers = []
    for entry in os.scandir(directory):
        match = _SEGMENT_NAME.fullmatch(entry.name)
        if match and entry.is_file(follow_symlinks=False):
            numbers.append(int(match.group(1)))
    return sorted(numbers)


def _scan_segment(path: Path) -> Generator[tuple[int, bytes], None, _Scan]:
    """Yields the valid records of one segment; returns where and why reading stopped."""
    with open(path, "rb", buffering=1 << 16) as f:
        size = os.fstat(f.fileno()).st_size
        offset = 0
        last: int | None = None
        while offset < size:
            header = f.read(HEADER_SIZE)
            if len(header) < HEADER_SIZE:
                return _Scan(offset, size, last, f"short header ({len(header)} bytes)")
            magic, length, lsn = _PREFIX.unpack_from(header)
            if magic != MAGIC:
                return _Scan(offset, size, last, f"bad magic 0x{magic:08x}")
            if offset + HEADER_SIZE + length > size:
                return _Scan(offset, size, last, f"length {length} past end of file")
            payload = f.read(length)
            if len(payload) != length:
                return _Scan(offset, size, last, f"length {length} past end of file")
            crc = google_crc32c.extend(google_crc32c.value(header[: _PREFIX.size]), payload)
            if crc != _CRC.unpack_from(header, _PREFIX.size)[0]:
                return _Scan(offset, size, last, "CRC32C mismatch")
            yield lsn, payload
            last = lsn
            offset += HEADER_SIZE + length
        return _Scan(offset, size, last, None)


def _create_segment(directory: Path, number: int) -> int:
    """Creates (or empties a leftover of) segment ``number``, makes the name durable, returns
    its fd."""
    fd = os.open(
        directory / segment_name(number),
        os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
        0o644,
    )
    try:
        _fsync_dir(directory)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _groups(items: list[_Item]) -> Iterator[tuple[list[_Record], bool]]:
    """Splits a round at rotation markers: (records, whether a rotation follows them)."""
    group: list[_Record] = []
    for item in items:
        if item is None:
            yield group, True
            group = []
        else:
            group.append(item)
    if group:
        yield group, False


def _resolve(ok: list[asyncio.Future[None]], bad: list[asyncio.Future[None]], why: str) -> None:
    """Runs on the event loop: settles the futures of one commit round."""
    for fut in ok:
        if not fut.done():
            fut.set_result(None)
    for fut in bad:
        if not fut.done():
            fut.set_exception(StorageError(why))


def _set_done(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class Wal:
    """The WAL of one memory space. See the module docstring for the life cycle."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        segment_bytes: int = 64 << 20,
        faults: WalFaults | None = None,
    ) -> None:
        if segment_bytes <= 0:
            raise ValueError(f"segment_bytes must be positive, got {segment_bytes}")
        self._dir = Path(directory)
        self._segment_bytes = segment_bytes
        self._faults = faults
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the committer waits for records
        self._idle = threading.Condition(self._lock)  # reset() waits for the committer
        self._queue: deque[_Item] = deque()
        self._segments: dict[int, _Segment] = {}  # ascending numbers; the last is current
        self._replayed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._exited: asyncio.Future[None] | None = None
        self._busy = False
        self._stopping = False
        self._failed = False
        self._failure = ""
        # Committer state (also touched by reset() while the committer is idle).
        self._fd = -1
        self._current = 0
        self._written = 0  # offset in the current segment past the last written byte
        self._durable = 0  # offset in the current segment past the last synced byte
        self._uncached = 0  # offset in the current segment below which pages left the cache
        self._written_lsn: int | None = None  # end_lsn of the last written record
        self._durable_lsn = 0  # end_lsn of the last durable record in the whole WAL
        self._durable_at = 0.0  # time.monotonic() when _durable_lsn last rose
        # (end_lsn, when durable) of the latest sync rounds, for staleness measurements
        self._durable_log: collections.deque[tuple[int, float]] = collections.deque(maxlen=1024)
        self._fsyncs = 0
        # Event loop side: where queued records will land, to number rotations at once.
        self._plan_segment = 0
        self._plan_bytes = 0
        self._last_lsn = 0

    # ------------------------------------------------------------------ counters

    @property
    def failed(self) -> bool:
        """True after a commit failed, until :meth:`reset` succeeds."""
        return self._failed

    @property
    def durable_bytes(self) -> int:
        """Bytes of durable records in the live segments (falls when segments are deleted)."""
        with self._lock:
            return sum(seg.size for seg in self._segments.values())

    @property
    def segment_count(self) -> int:
        """Number of live segment files."""
        return len(self._segments)

    @property
    def durable_lsn(self) -> tuple[int, float]:
        """(end_lsn of the last durable record, time.monotonic() when it became durable).

        Read by the owner's event loop while the committer thread writes it: the pair may be
        one round old, never ahead of the disk."""
        return self._durable_lsn, self._durable_at

    def durable_since(self, lsn: int) -> float | None:
        """When the oldest durable record with end_lsn above ``lsn`` became durable
        (time.monotonic()), or None if no durable record is above it."""
        if self._durable_lsn <= lsn:
            return None
        with self._lock:
            for end, at in self._durable_log:
                if end > lsn:
                    return at
        return self._durable_at

    @property
    def fsync_count(self) -> int:
        """fdatasync calls on segment files by this instance."""
        return self._fsyncs

    # ------------------------------------------------------------------ replay and start

    def replay(self) -> Iterator[tuple[int, bytes]]:
        """Yields ``(end_lsn, payload)`` of every valid record, oldest first.

        At the first bad record, truncates its segment there, deletes every later segment and
        logs a warning. Must be consumed to the end once before :meth:`start`.
        """
        if self._thread is not None:
            raise RuntimeError("Wal.replay() after start()")
        self._dir.mkdir(parents=True, exist_ok=True)
        numbers = _list_segments(self._dir)
        segments: dict[int, _Segment] = {}
        last_lsn = 0
        for i, number in enumerate(numbers):
            path = self._dir / segment_name(number)
            try:
                scan = yield from _scan_segment(path)
            except OSError as exc:
                raise StorageError(_describe("read", path, exc)) from exc
            segments[number] = _Segment(scan.good_end, scan.last_lsn)
            if scan.last_lsn is not None:
                last_lsn = scan.last_lsn
            if scan.problem is not None:
                self._repair(path, scan, numbers[i + 1 :])
                break
        self._segments = segments
        self._current = max(segments, default=0)
        self._durable_lsn = self._last_lsn = last_lsn
        self._replayed = True

    def _repair(self, path: Path, scan: _Scan, later: list[int]) -> None:
        """Cuts ``path`` at the bad record and deletes the ``later`` segments, durably."""
        dropped = 0
        try:
            os.truncate(path, scan.good_end)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            for number in later:
                other = self._dir / segment_name(number)
                dropped += other.stat().st_size
                other.unlink()
            _fsync_dir(self._dir)
        except OSError as exc:
            raise StorageError(_describe("repair", exc.filename or path, exc)) from exc
        log.warning(
            "WAL %s: %s at offset %d; truncated %d bytes there and deleted %d later "
            "segment(s) (%d bytes)",
            path,
            scan.problem,
            scan.good_end,
            scan.size - scan.good_end,
            len(later),
            dropped,
        )

    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Opens the last segment (or a new one) for appending and starts the committer."""
        if not self._replayed:
            raise RuntimeError("Wal.start() before replay() was consumed to the end")
        if self._thread is not None:
            raise RuntimeError("Wal.start() called twice")
        self._loop = loop if loop is not None else asyncio.get_running_loop()
        try:
            self._open_for_append()
        except OSError as exc:
            raise StorageError(_describe("open", exc.filename or self._dir, exc)) from exc
        self._plan_segment, self._plan_bytes = self._current, self._durable
        self._exited = self._loop.create_future()
        self._thread = threading.Thread(
            target=self._run, name=f"wal-committer:{self._dir.name}", daemon=True
        )
        self._thread.start()

    def _open_for_append(self) -> None:
        last = self._current
        if last and self._segments[last].size < self._segment_bytes:
            self._fd = os.open(self._dir / segment_name(last), os.O_WRONLY | os.O_CLOEXEC)
            self._written = self._durable = self._segments[last].size
            self._uncached = 0
            return
        self._fd = _create_segment(self._dir, last + 1)
        with self._lock:
            self._segments[last + 1] = _Segment(0, None)
            self._current = last + 1
        self._written = self._durable = self._uncached = 0

    # ------------------------------------------------------------------ event loop API

    def append(self, payload: Payload, end_lsn: int) -> asyncio.Future[None]:
        """Queues a record; the future resolves once it is durable, or fails with
        StorageError. Call from the event loop thread; keep ``payload`` unchanged until then."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("Wal.append() before start()")
        size = _nbytes(payload)
        if size > MAX_PAYLOAD:
            raise ValueError(f"WAL payload of {size} bytes exceeds {MAX_PAYLOAD}")
        if not self._last_lsn <= end_lsn <= MAX_LSN:
            raise ValueError(f"end_lsn {end_lsn} below the previous {self._last_lsn} or not u64")
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            refusal = self._refusal()
            if refusal is not None:
                fut.set_exception(StorageError(refusal))
                return fut
            self._queue.append((payload, end_lsn, fut))
            self._plan_bytes += HEADER_SIZE + size
            if self._plan_bytes >= self._segment_bytes:
                self._queue_rotation()
            self._work.notify()
        self._last_lsn = end_lsn
        return fut

    def _refusal(self) -> str | None:
        if self._stopping:
            return f"WAL {self._dir} is closed"
        if self._failed:
            return f"WAL failed until reset: {self._failure}"
        return None

    def _queue_rotation(self) -> int:
        """Queues a rotation marker (lock held); returns the number of the segment it closes."""
        closed = self._plan_segment
        self._queue.append(None)
        self._plan_segment += 1
        self._plan_bytes = 0
        return closed

    def rotate(self) -> int:
        """Closes the current segment once every record queued before is durable and returns
        its number; later appends go to the next segment.

        Returns at once: the committer carries the rotation out in order with the appends, so
        it has happened once any append queued after it has resolved; until then
        :meth:`delete_through` still treats the segment as current. If the WAL fails first,
        the segment stays current."""
        if self._loop is None:
            raise RuntimeError("Wal.rotate() before start()")
        refusal = self._refusal()
        if refusal is not None:
            raise StorageError(refusal)
        with self._lock:
            closed = self._queue_rotation()
            self._work.notify()
        return closed

    async def close_segment(self) -> int:
        """Closes the current segment if anything was queued for it, waits until the committer
        has moved past it, and returns the number of the last closed segment (0: none). Every
        record of a closed segment is durable. Event loop only (a move reads closed segments
        with :meth:`read_closed`)."""
        if self._loop is None:
            raise RuntimeError("Wal.close_segment() before start()")
        with self._lock:
            refusal = self._refusal()
            if refusal is not None:
                raise StorageError(refusal)
            if self._plan_bytes:
                closed = self._queue_rotation()
                self._work.notify()
            else:
                closed = self._plan_segment - 1
        while closed > 0:
            with self._lock:
                if self._current > closed:
                    break
                failed = self._failed
            if failed:
                raise StorageError(f"WAL {self._dir} failed before segment {closed} closed")
            await asyncio.sleep(0.001)
        return closed

    def closed_segments(self) -> list[int]:
        """Numbers of the live segments no longer written to, oldest first."""
        with self._lock:
            return [n for n in self._segments if n < self._current]

    def read_closed(self, number: int) -> Iterator[tuple[int, bytes]]:
        """Yields ``(end_lsn, payload)`` of every record of closed segment ``number`` (any
        thread). Raises StorageError if it is not closed or cannot be read whole."""
        if number not in self.closed_segments():
            raise StorageError(f"WAL {self._dir}: segment {number} is not a closed segment")
        path = self._dir / segment_name(number)
        try:
            scan = yield from _scan_segment(path)
        except OSError as exc:
            raise StorageError(_describe("read", path, exc)) from exc
        if scan.problem is not None:
            raise StorageError(f"WAL {path}: {scan.problem} at offset {scan.good_end}")

    def delete_through(self, end_lsn: int, closed_before: int) -> int:
        """Deletes the oldest closed segments numbered below ``closed_before`` whose records all
        have end_lsn <= ``end_lsn``; returns how many. Never deletes the current segment."""
        if not self._replayed:
            raise RuntimeError("Wal.delete_through() before replay()")
        victims: list[int] = []
        with self._lock:
            for number, seg in self._segments.items():
                if number >= closed_before or number >= self._current:
                    break
                if seg.last_lsn is not None and seg.last_lsn > end_lsn:
                    break
                victims.append(number)
        for number in victims:
            path = self._dir / segment_name(number)
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                self._fsync_dir_after_delete()
                raise StorageError(_describe("delete", path, exc)) from exc
            with self._lock:
                del self._segments[number]
        if victims:
            self._fsync_dir_after_delete()
        return len(victims)

    def _fsync_dir_after_delete(self) -> None:
        try:
            _fsync_dir(self._dir)
        except OSError as exc:
            raise StorageError(_describe("directory fsync", self._dir, exc)) from exc

    def reset(self) -> None:
        """Leaves the failed state: cuts the current segment back to its last durable offset
        and syncs it. Raises StorageError if that fails (the WAL stays failed)."""
        if self._loop is None:
            raise RuntimeError("Wal.reset() before start()")
        with self._lock:
            if not self._failed or self._stopping:
                return
            while self._busy or self._queue:
                self._idle.wait()
            path = self._dir / segment_name(self._current)
            try:
                os.ftruncate(self._fd, self._durable)
                self._fdatasync()
            except OSError as exc:
                raise StorageError(_describe("reset", path, exc)) from exc
            self._written = self._durable
            self._written_lsn = self._segments[self._current].last_lsn
            self._failed = False
            self._failure = ""
            self._plan_segment, self._plan_bytes = self._current, self._durable
        self._last_lsn = self._durable_lsn
        log.info("WAL %s reset to offset %d", path, self._durable)

    async def close(self) -> None:
        """Waits until every queued record is settled, stops the committer, closes files."""
        thread, exited = self._thread, self._exited
        with self._lock:
            self._stopping = True
            self._work.notify()
        if thread is None or exited is None:
            return
        await exited
        thread.join()

    # ------------------------------------------------------------------ committer thread

    def _run(self) -> None:
        name_os_thread()
        try:
            while True:
                with self._lock:
                    while not self._queue and not self._stopping:
                        self._work.wait()
                    if not self._queue:
                        break
                    items = list(self._queue)
                    self._queue.clear()
                    self._busy = True
                try:
                    self._round(items)
                finally:
                    with self._lock:
                        self._busy = False
                        self._idle.notify_all()
        finally:
            self._close_file()
            self._call_soon(_set_done, self._exited)

    def _call_soon(self, *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(*args)  # type: ignore[arg-type]
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    def _round(self, items: list[_Item]) -> None:
        """Writes and syncs one round of queued items, then settles their futures."""
        records = [item for item in items if item is not None]
        if self._failed:
            self._settle(records, 0, f"WAL failed until reset: {self._failure}")
            return
        done = 0
        try:
            for group, rotate in _groups(items):
                self._write(group)
                self._sync()
                done += len(group)
                if group:
                    metrics.shard_wal_group_records.observe(len(group))
                if rotate:
                    self._next_segment()
        except _IOFailure as exc:
            self._enter_failed(str(exc))
        except Exception as exc:  # a bug: fail safe rather than lose the thread
            log.exception("WAL %s committer error", self._dir)
            self._enter_failed(f"internal error: {exc!r}")
        self._settle(records, done, self._failure)

    def _enter_failed(self, why: str) -> None:
        with self._lock:
            self._failed = True
            self._failure = why
        log.error("WAL %s failed: %s", self._dir, why)

    def _settle(self, records: list[_Record], done: int, why: str) -> None:
        ok = [record[2] for record in records[:done]]
        bad = [record[2] for record in records[done:]]
        if ok or bad:
            self._call_soon(_resolve, ok, bad, why)

    def _write(self, group: list[_Record]) -> None:
        """Frames ``group`` (CRC off the event loop) and writes it at the segment's end."""
        if not group:
            return
        bufs: list[bytes | memoryview] = []
        for payload, end_lsn, _ in group:
            data = _as_bytes(payload)
            bufs.append(record_header(data, end_lsn))
            if data:
                bufs.append(data)
        try:
            for start in range(0, len(bufs), _IOV_MAX):
                self._write_bufs(bufs[start : start + _IOV_MAX])
        except OSError as exc:
            raise _IOFailure(_describe("write", self._current_path(), exc)) from exc
        self._written_lsn = group[-1][1]

    def _write_bufs(self, bufs: list[bytes | memoryview]) -> None:
        nbytes = sum(len(buf) for buf in bufs)
        if self._faults is not None:
            try:
                self._faults.before_write(nbytes)
            except OSError:
                self._write_torn(bufs, nbytes // 2)
                raise
        while bufs:
            n = os.pwritev(self._fd, bufs, self._written)
            if n <= 0:
                raise OSError(errno.EIO, "pwritev wrote nothing")
            self._written += n
            bufs = _skip(bufs, n)

    def _write_torn(self, bufs: list[bytes | memoryview], n: int) -> None:
        """Fault injection: leaves the first ``n`` bytes past the written offset on disk."""
        if n > 0:
            try:
                os.pwritev(self._fd, _take(bufs, n), self._written)
            except OSError:
                pass

    def _sync(self) -> None:
        """fdatasyncs the current segment if anything was written since the last sync."""
        if self._written == self._durable:
            return
        started = time.perf_counter()
        try:
            self._fdatasync()
        except OSError as exc:
            raise _IOFailure(_describe("fdatasync", self._current_path(), exc)) from exc
        metrics.shard_wal_fsync_seconds.observe(time.perf_counter() - started)
        last = self._written_lsn
        self._drop_cached(self._written)
        with self._lock:
            seg = self._segments[self._current]
            seg.size = self._durable = self._written
            seg.last_lsn = last
        if last is not None:
            if last != self._durable_lsn:
                self._durable_at = time.monotonic()
                with self._lock:
                    self._durable_log.append((last, self._durable_at))
            self._durable_lsn = last

    def _drop_cached(self, end: int) -> None:
        """Drops the current segment's synced pages below ``end`` from the page cache (whole
        pages only: the kernel keeps the partly written last one). Advice: errors are ignored."""
        if end <= self._uncached or not hasattr(os, "posix_fadvise"):
            return
        start = self._uncached - self._uncached % _PAGE
        try:
            os.posix_fadvise(self._fd, start, end - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            return
        self._uncached = end

    def _fdatasync(self) -> None:
        if self._faults is not None:
            self._faults.before_sync()
        os.fdatasync(self._fd)
        self._fsyncs += 1

    def _next_segment(self) -> None:
        """Closes the (synced) current segment and opens the next one."""
        number = self._current + 1
        try:
            fd = _create_segment(self._dir, number)
        except OSError as exc:
            raise _IOFailure(_describe("create", self._dir / segment_name(number), exc)) from exc
        os.close(self._fd)
        self._fd = fd
        with self._lock:
            self._segments[number] = _Segment(0, None)
            self._current = number
        self._written = self._durable = self._uncached = 0
        self._written_lsn = None

    def _current_path(self) -> Path:
        return self._dir / segment_name(self._current)

    def _close_file(self) -> None:
        """At exit: drops undurable bytes if failed (best effort), closes the segment."""
        if self._fd < 0:
            return
        if self._failed:
            try:
                os.ftruncate(self._fd, self._durable)
                os.fdatasync(self._fd)
            except OSError as exc:
                log.warning("%s", _describe("truncate at close", self._current_path(), exc))
        os.close(self._fd)
        self._fd = -1
