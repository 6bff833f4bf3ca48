"""Backups and restores of a space on its shard: ``OpenBackup``, ``FinishBackup``, ``Restore``.

A backup is a space's checkpoint and WAL as of one LSN, copied while ingest goes on
(the caller is :mod:`engram.control.backups`)::

    OpenBackup    holds the space's checkpoints, as a move does (the files listed stay, no WAL
                  segment is trimmed), notes the last LSN assigned and closes the segment being
                  written: every record up to that LSN, deletes included, is in a closed
                  segment. Answers the LSN, the checkpoint's files and those segments
    FetchFile     (engram.shard.move_rpcs, the backup id as move_id) a listed file, in chunks
    ReadWal       the same: exactly the listed segments, never one written after OpenBackup
    FinishBackup  releases the hold. A backup whose caller has been silent for ``IDLE_S``
                  is released too (a crashed or killed ``engram backup``)

``Restore`` loads a backup into a space this shard owns by the routing table and that holds
nothing. The stream's first chunk names the space, the dimension and the LSN and carries the
backup's ``backup.json``; then each file's bytes (``file`` set) and ``wal.log``'s (``file``
empty), whose records become WAL segment 1 of the space. Everything goes to a staging
directory (``<data_dir>/restore/<space>``) and is checked against ``backup.json`` (size,
SHA-256); only then is it moved into the space's directory and WAL directory as recovery
expects, recovered (in a thread: sessions on the name are refused meanwhile,
``ShardNode.restoring``) and served. The answer is the restored LSN, which must be the
backup's. A restart during a restore leaves the staging directory, which the next restore of
that space replaces; the space itself appears only whole.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import grpc

from engram.common import validation
from engram.contract.errors import EngramError, StorageError, ValidationError
from engram.control import backup_format as fmt
from engram.internal.v1 import shard_pb2 as ipb
from engram.shard import checkpoint as ckpt
from engram.shard.move_source import file_chunks
from engram.shard.ownership import OWNED, Owner
from engram.shard.space import Space
from engram.shard.state import wal_directory
from engram.shard.wal import encode_record, segment_name

if TYPE_CHECKING:
    from engram.shard.node import ShardNode

log = logging.getLogger("engram.shard.backup")

Context = grpc.aio.ServicerContext
# A backup whose caller has not called for this long is released (its checkpoint hold ends).
IDLE_S = 30.0


class Backup:
    """One open backup of a space: what FetchFile and ReadWal may read under its id."""

    def __init__(self, node: ShardNode, space: Space, backup_id: str) -> None:
        self.node = node
        self.space = space
        self.backup_id = backup_id
        self.files: list[str] = []
        self.segments: list[int] = []
        self.touched = time.monotonic()
        self.held = False
        self._watchdog: asyncio.Task[None] | None = None

    @property
    def name(self) -> str:
        return self.space.name

    async def open(self) -> ipb.OpenBackupResponse:
        space = self.space
        space.checkpoint_holds += 1
        self.held = True
        self._watchdog = asyncio.create_task(self._release_when_idle())
        await asyncio.to_thread(_wait_free, space)
        self.files = checkpoint_files(space.ckpt_dir)
        # LSNs are assigned and WAL records queued on this loop, in order: nothing comes
        # between this read and the rotation close_segment queues before its first await.
        lsn = space._next_row
        closed = await space.wal.close_segment()
        self.segments = [n for n in space.wal.closed_segments() if n <= closed]
        out = ipb.OpenBackupResponse(lsn=lsn, dim=space.dim, segments=self.segments)
        for name in self.files:
            out.files.add(name=name, size=(space.ckpt_dir / name).stat().st_size)
        log.info(
            "backup %s of space %s opened at LSN %d: %d checkpoint files, %d WAL segments",
            self.backup_id,
            self.name,
            lsn,
            len(self.files),
            len(self.segments),
        )
        return out

    def read_file(self, name: str, offset: int) -> Iterator[bytes]:
        if name not in self.files:
            raise ValidationError(
                f"{name!r} is not a file of backup {self.backup_id} (listed: {self.files})"
            )
        for chunk in file_chunks(self.space, name, offset):
            self.touched = time.monotonic()
            yield chunk

    async def closed_segments(self, after: int) -> list[int]:
        return [n for n in self.segments if n > after]

    def read_segment(self, number: int) -> Iterator[tuple[int, bytes]]:
        return self.space.wal.read_closed(number)

    def release(self) -> None:
        if self.held:
            self.held = False
            self.space.checkpoint_holds = max(0, self.space.checkpoint_holds - 1)
        self.node.backups.pop(self.backup_id, None)
        if self._watchdog is not None and self._watchdog is not asyncio.current_task():
            self._watchdog.cancel()

    async def _release_when_idle(self) -> None:
        while self.held:
            await asyncio.sleep(min(1.0, IDLE_S / 4))
            if time.monotonic() - self.touched > IDLE_S:
                log.warning(
                    "backup %s of space %s: no call for %.0f s; releasing its checkpoint hold",
                    self.backup_id,
                    self.name,
                    IDLE_S,
                )
                self.release()


def _wait_free(space: Space) -> None:
    """Blocks until no checkpoint of ``space`` is being written."""
    with space.checkpoint_lock:
        pass


def checkpoint_files(directory: Path) -> list[str]:
    """The files of the checkpoint in ``directory`` (held: none is being written), its
    manifest last; none without a manifest. Every file, so whatever a checkpoint holds goes."""
    if not (directory / ckpt.MANIFEST).exists():
        return []
    names = sorted(
        e.name
        for e in directory.iterdir()
        if e.is_file() and e.name != ckpt.MANIFEST and not e.name.endswith((".tmp", ".part"))
    )
    return [*names, ckpt.MANIFEST]


class Restorer:
    """One Restore stream: staged, checked, installed."""

    def __init__(self, node: ShardNode, first: ipb.RestoreChunk) -> None:
        self.node = node
        self.name = validation.space_id(first.memory_space_id)
        self.dim = first.dim
        self.lsn = first.lsn
        if first.file != fmt.MANIFEST:
            raise fmt.BackupError(
                f"the restore of {self.name!r} must start with the backup's {fmt.MANIFEST}"
            )
        self.manifest = fmt.parse(first.data, f"the {fmt.MANIFEST} sent")
        if (self.manifest.dim, self.manifest.lsn) != (self.dim, self.lsn):
            raise fmt.BackupError(
                f"the {fmt.MANIFEST} sent says dimension {self.manifest.dim} and LSN "
                f"{self.manifest.lsn}, the stream {self.dim} and {self.lsn}"
            )
        self.staging = node.root / "restore" / self.name
        self.received: set[str] = set()
        self._file: BinaryIO | None = None
        self._entry: fmt.FileEntry | None = None
        self._hash = hashlib.sha256()
        self._size = 0
        self._wal: fmt.WalReader | None = None

    def check_target(self) -> None:
        """Refuses a space this shard does not own, or one that holds something."""
        node = self.node
        if self.name in node.restoring:
            raise ValidationError(f"memory space {self.name!r} is being restored already")
        if self.name in node.incoming or self.name in node.outgoing:
            raise ValidationError(f"memory space {self.name!r} is moving; restore it later")
        space = node.spaces.get(self.name)
        if space is None:
            node.placement.check_served(self.name)
            node.placement.check_route(self.name)
            node.placement.check_create(self.name)
            return
        if space.dim and space.dim != self.dim:
            raise fmt.BackupError(
                f"memory space {self.name!r} holds vectors of dimension {space.dim}; the "
                f"backup's are of dimension {self.dim}"
            )
        if space.visible:
            raise fmt.BackupError(
                f"memory space {self.name!r} already holds {space.visible} observations on "
                f"shard {node.shard_id}: restore into a new space (engram restore --space "
                "NEW_NAME) or drop it first"
            )

    async def take(self, chunk: ipb.RestoreChunk) -> None:
        """Writes a chunk's bytes to the staging directory (a file ends when the next begins)."""
        name = chunk.file or fmt.WAL_FILE
        if self._entry is None or name != self._entry.name:
            await self._close_file()
            if name in self.received:
                raise fmt.BackupError(f"{name!r} was sent twice")
            self._entry = self.manifest.entry(fmt.check_name(name))
            path = self._path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "wb")  # noqa: ASYNC230, SIM115 (closed in _close_file)
            self._hash, self._size = hashlib.sha256(), 0
            self._wal = fmt.WalReader() if name == fmt.WAL_FILE else None
        assert self._file is not None
        self._hash.update(chunk.data)
        self._size += len(chunk.data)
        if self._size > self._entry.size:
            raise fmt.BackupError(
                f"{name!r} is longer than the {self._entry.size} bytes the backup lists"
            )
        data = chunk.data
        if self._wal is not None:  # wal.log's records become a WAL segment
            data = b"".join(encode_record(r.payload, r.end_lsn) for r in self._wal.feed(chunk.data))
        await asyncio.to_thread(self._file.write, data)

    def _path(self, name: str) -> Path:
        if name == fmt.WAL_FILE:
            return self.staging / "wal" / segment_name(1)
        return self.staging / "ckpt" / name

    async def _close_file(self) -> None:
        if self._file is None or self._entry is None:
            return
        f, entry = self._file, self._entry
        self._file = None
        await asyncio.to_thread(_sync_close, f)
        if self._size != entry.size:
            raise fmt.BackupError(
                f"{entry.name!r} is truncated: {self._size} bytes arrived, the backup lists "
                f"{entry.size}"
            )
        if self._hash.hexdigest() != entry.sha256:
            raise fmt.BackupError(
                f"{entry.name!r} is corrupt: its SHA-256 differs from the one the backup lists"
            )
        if self._wal is not None:
            self._wal.close()
        self.received.add(entry.name)

    async def finish(self) -> int:
        """Checks that every file arrived whole, installs the space and serves it."""
        await self._close_file()
        missing = [f.name for f in self.manifest.files if f.name not in self.received]
        if missing:
            raise fmt.BackupError(f"the restore of {self.name!r} ended without {missing}")
        node = self.node
        old = node.spaces.get(self.name)
        if old is not None:  # empty (checked at the start; sessions refused since)
            await node.retire_space(self.name, delete=True)
        # the epoch the name has here or in the routing table (a dropped space's may remain)
        epoch = max(node.placement.epoch(self.name), node.assignment.space_epoch(self.name))
        await asyncio.to_thread(self._install)
        await asyncio.to_thread(node.ownership.set, self.name, Owner(OWNED, epoch))
        space = node.new_space(self.name)
        try:
            await asyncio.to_thread(space.recover)
            if space.visible != self.lsn:
                raise StorageError(
                    f"the restored memory space {self.name!r} recovered to LSN {space.visible}, "
                    f"the backup is at {self.lsn}"
                )
        except BaseException:
            await node.delete_space_files(self.name)
            raise
        if not space.dim:
            space.dim = self.dim  # an empty backup: the dimension still holds
        space.start(node.loop)
        node.spaces[self.name] = space
        await node.publish_ownership()
        log.info("space %s restored at LSN %d", self.name, space.visible)
        return space.visible

    def _install(self) -> None:
        """Moves the staged files where recovery looks for them (blocking)."""
        directory = self.node.space_dir(self.name)
        wal = wal_directory(self.name, directory, self.node.settings.shard.wal)
        shutil.rmtree(wal, ignore_errors=True)
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
        for part, target in (("ckpt", directory / "ckpt"), ("wal", wal)):
            source = self.staging / part
            if source.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(source, target)
                ckpt.fsync_dir(target.parent)
        shutil.rmtree(self.staging, ignore_errors=True)

    def abandon(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        shutil.rmtree(self.staging, ignore_errors=True)


def _sync_close(f: BinaryIO) -> None:
    f.flush()
    os.fsync(f.fileno())
    f.close()


class BackupRpcs:
    """The shard's backup methods, mixed into its gRPC service."""

    node: ShardNode

    async def OpenBackup(  # noqa: N802
        self, request: ipb.OpenBackupRequest, context: Context
    ) -> ipb.OpenBackupResponse:
        node = self.node
        try:
            name = validation.space_id(request.memory_space_id)
            if not request.backup_id:
                raise ValidationError("backup_id is missing")
            if request.backup_id in node.backups:
                raise ValidationError(f"backup {request.backup_id!r} is open already")
            space = node.spaces.get(name)
            if space is None:
                node.placement.check_served(name)
                raise ValidationError(f"shard {node.shard_id} holds no memory space {name!r}")
            backup = Backup(node, space, request.backup_id)
            node.backups[request.backup_id] = backup
            try:
                return await backup.open()
            except BaseException:
                backup.release()
                raise
        except (EngramError, OSError) as exc:
            err = exc if isinstance(exc, EngramError) else StorageError(str(exc))
            return ipb.OpenBackupResponse(error=err.to_proto())

    async def FinishBackup(  # noqa: N802
        self, request: ipb.FinishBackupRequest, context: Context
    ) -> ipb.FinishBackupResponse:
        backup = self.node.backups.get(request.backup_id)
        if backup is None or backup.name != request.memory_space_id:
            err = ValidationError(
                f"no backup {request.backup_id!r} of memory space {request.memory_space_id!r} "
                "is open here (released after a silence?)"
            )
            return ipb.FinishBackupResponse(error=err.to_proto())
        backup.release()
        log.info("backup %s of space %s finished", backup.backup_id, backup.name)
        return ipb.FinishBackupResponse()

    async def Restore(  # noqa: N802
        self, request_iterator: AsyncIterator[ipb.RestoreChunk], context: Context
    ) -> ipb.RestoreResponse:
        node = self.node
        restorer: Restorer | None = None
        try:
            async for chunk in request_iterator:
                if restorer is None:
                    if not node.ready:
                        raise StorageError(f"shard {node.shard_id} is recovering; retry shortly")
                    first = Restorer(node, chunk)
                    await node.placement.refresh_incomplete()
                    first.check_target()
                    node.restoring.add(first.name)  # from here on this stream owns the name
                    restorer = first
                    await asyncio.to_thread(shutil.rmtree, restorer.staging, True)
                    continue
                await restorer.take(chunk)
            if restorer is None:
                raise ValidationError("the restore stream was empty")
            return ipb.RestoreResponse(lsn=await restorer.finish())
        except (EngramError, OSError) as exc:
            err = exc if isinstance(exc, EngramError) else StorageError(str(exc))
            log.warning("restore refused: %s", err)
            return ipb.RestoreResponse(error=err.to_proto())
        finally:
            if restorer is not None:
                node.restoring.discard(restorer.name)
                await asyncio.to_thread(restorer.abandon)
