"""Backing a memory space up to a directory or a bucket, and restoring it, as a caller sees it.

What ``engram backup`` / ``engram restore`` call (the format is :mod:`backup_format`, the
destination a :class:`~backup_store.BackupStore`: a path or ``s3://bucket/prefix``)::

    result = await backup_space(shards, "agent-7", "/backups/monday")
    result.lsn, result.bytes, result.seconds, result.location
    result = await restore_space(shards, "/backups/monday/agent-7", space="agent-7-copy")
    await backup_space(shards, "agent-7", open_store("s3://bucket/nightly", s3_endpoint=URL))

A backup asks the space's owner to open a backup (``OpenBackup``: the checkpoint held, the WAL
segment being written closed, the LSN fixed), copies the checkpoint's files (``FetchFile``) and
the WAL records (``ReadWal``) into ``DEST/<space>/``, streaming and checksumming as it writes
(nothing of the backup is held in memory but a chunk, or one upload part), writes
``backup.json`` last and releases the hold (``FinishBackup``; the shard also releases it if this
caller goes away). Ingest goes on meanwhile; the backup holds exactly the rows up to the LSN.

A restore reads ``backup.json`` (refusing a missing one or a newer format), checks every file's
size, and streams the files to the shard that owns the space by the routing table
(``Restore``), hashing as it sends; the shard checks again, refuses a space that holds
something or has another dimension, recovers the space and answers its LSN. Every call goes
through :mod:`engram.common.internal`; ``security`` None is the caller's own settings.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from engram import __version__
from engram.common import internal, validation
from engram.common.settings import SecuritySettings
from engram.contract.errors import ClientError, EngramError, from_proto, from_rpc_error
from engram.control import backup_format as fmt
from engram.control.assignment import default_shard
from engram.control.backup_store import BackupStore, DirStore, Sink, as_store
from engram.control.moves import shard_stats, spaces_of
from engram.internal.v1 import shard_pb2 as ipb
from engram.internal.v1 import shard_pb2_grpc
from engram.v1 import streaming_pb2 as pb

RPC_TIMEOUT_S = 30.0
# A file read or sent slower than this is not waited for (seconds per MB, at least 30 s).
SLOWEST_S_PER_MB = 0.5


@dataclass(frozen=True)
class Progress:
    space: str
    file: str  # the file being copied ("wal.log": the WAL records)
    done_bytes: int
    total_bytes: int  # of the checkpoint's files; the WAL's size is known only at its end


@dataclass(frozen=True)
class BackupResult:
    space: str
    shard: int
    lsn: int
    dim: int
    store: BackupStore  # where this space's backup is: DEST/<space>
    bytes: int
    seconds: float

    @property
    def location(self) -> str:
        return self.store.location

    @property
    def directory(self) -> Path:
        """The backup's directory (a backup into a directory only)."""
        if not isinstance(self.store, DirStore):
            raise ValueError(f"the backup went to {self.location}, not into a directory")
        return self.store.path


@dataclass(frozen=True)
class RestoreResult:
    space: str
    shard: int
    lsn: int
    bytes: int
    seconds: float


OnProgress = Callable[[Progress], None] | None


async def backup_space(
    addresses: Mapping[int, str],
    space: str,
    to: BackupStore | str | os.PathLike[str],
    *,
    security: SecuritySettings | None = None,
    on_progress: OnProgress = None,
    backup_id: str = "",
) -> BackupResult:
    """Backs ``space`` up into ``to/<space>/`` (a directory or ``s3://bucket/prefix``) as of
    one LSN, while ingest goes on.

    ``addresses``: every shard's gRPC address. Raises :class:`~backup_format.BackupError` for a
    bad request (unknown space, a backup already in the way), the shard's error otherwise."""
    started = time.monotonic()
    space = validation.space_id(space)
    where = spaces_of(await shard_stats(addresses, security)).get(space)
    if where is None:
        raise fmt.BackupError(f"no shard holds a memory space {space!r}", code=pb.INVALID_SPACE_ID)
    target = as_store(to).space(space)
    if await target.size(fmt.MANIFEST) is not None:
        raise fmt.BackupError(
            f"{target} holds a backup already: remove it or back up into another location"
        )
    await target.clear()  # the files of a backup that did not finish
    backup_id = backup_id or f"b-{uuid.uuid4().hex[:12]}"
    shard = where.owner
    async with internal.aio_channel(addresses[shard], security=security) as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        try:
            opened = await stub.OpenBackup(
                ipb.OpenBackupRequest(memory_space_id=space, backup_id=backup_id),
                timeout=RPC_TIMEOUT_S,
            )
            if opened.HasField("error"):
                raise from_proto(opened.error)
            try:
                files = await _copy(stub, space, backup_id, opened, target, on_progress)
            finally:
                await _finish(stub, space, backup_id)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, f"shard-{shard}") from None
    manifest = fmt.BackupManifest(
        space=space,
        dim=opened.dim,
        lsn=opened.lsn,
        created=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        engram_version=__version__,
        files=files,
    )
    await target.put(fmt.MANIFEST, manifest.to_json())  # the commit point
    return BackupResult(
        space, shard, opened.lsn, opened.dim, target, manifest.total_bytes, _since(started)
    )


async def _copy(
    stub: shard_pb2_grpc.ShardStub,
    space: str,
    backup_id: str,
    opened: ipb.OpenBackupResponse,
    target: BackupStore,
    on_progress: OnProgress,
) -> list[fmt.FileEntry]:
    """Copies the listed files and the WAL records into ``target``; returns their entries."""
    total = sum(f.size for f in opened.files)
    done = 0
    entries: list[fmt.FileEntry] = []
    for info in opened.files:
        h = hashlib.sha256()
        size = 0
        async with _writing(target, fmt.check_name(info.name)) as out:
            call = stub.FetchFile(
                ipb.FetchFileRequest(memory_space_id=space, move_id=backup_id, name=info.name),
                timeout=_timeout(info.size),
            )
            async for chunk in call:
                await out.write(chunk.data)
                h.update(chunk.data)
                size += len(chunk.data)
                done += len(chunk.data)
                if on_progress is not None:
                    on_progress(Progress(space, info.name, done, total))
            if size != info.size:
                raise EngramError(
                    f"copied {size} bytes of {info.name}, the shard listed {info.size}"
                )
        entries.append(fmt.FileEntry(info.name, size, h.hexdigest()))
    h, size = hashlib.sha256(), 0
    async with _writing(target, fmt.WAL_FILE) as out:
        if opened.segments:
            call = stub.ReadWal(
                ipb.ReadWalRequest(memory_space_id=space, move_id=backup_id, after_segment=0),
                timeout=RPC_TIMEOUT_S * 10,
            )
            async for record in call:
                if record.segment not in opened.segments:
                    raise EngramError(f"the shard sent WAL segment {record.segment}, not listed")
                framed = fmt.wal_record(record)
                await out.write(framed)
                h.update(framed)
                size += len(framed)
                if on_progress is not None:
                    on_progress(Progress(space, fmt.WAL_FILE, done + size, total))
    entries.append(fmt.FileEntry(fmt.WAL_FILE, size, h.hexdigest()))
    return entries


@contextlib.asynccontextmanager
async def _writing(target: BackupStore, name: str) -> AsyncIterator[Sink]:
    """A file of ``target`` being written: durable when the block ends, dropped if it fails."""
    sink = await target.create(name)
    try:
        yield sink
    except BaseException:
        await sink.abort()
        raise
    await sink.close()


async def _finish(stub: shard_pb2_grpc.ShardStub, space: str, backup_id: str) -> None:
    try:
        await stub.FinishBackup(
            ipb.FinishBackupRequest(memory_space_id=space, backup_id=backup_id), timeout=5.0
        )
    except grpc.aio.AioRpcError:
        pass  # the shard releases the hold by itself once this caller is silent


async def read_backup(source: BackupStore | str | os.PathLike[str]) -> fmt.BackupManifest:
    """The manifest of the backup at ``source``; raises BackupError if there is none, it is
    of a newer format, or a file it lists is missing or of another size."""
    return (await _checked(as_store(source)))[0]


async def _checked(store: BackupStore) -> tuple[fmt.BackupManifest, bytes]:
    """(the manifest, its bytes as stored) of the backup at ``store``, once checked."""
    where = f"{store.location.rstrip('/')}/{fmt.MANIFEST}"
    raw = await store.get(fmt.MANIFEST)
    if raw is None:
        raise fmt.BackupError(
            f"{store} has no {fmt.MANIFEST}: it is not a backup, or its backup did not finish"
        )
    manifest = fmt.parse(raw, where)
    for entry in manifest.files:
        size = await store.size(entry.name)
        named = f"{store.location.rstrip('/')}/{entry.name}"
        if size is None:
            raise fmt.BackupError(f"{named} is missing: the backup is incomplete")
        if size != entry.size:
            raise fmt.BackupError(
                f"{named} is truncated or altered: {size} bytes, the backup lists {entry.size}"
            )
    return manifest, raw


async def restore_space(
    addresses: Mapping[int, str],
    source: BackupStore | str | os.PathLike[str],
    *,
    space: str = "",
    route: Callable[[str], int] | None = None,
    security: SecuritySettings | None = None,
    on_progress: OnProgress = None,
) -> RestoreResult:
    """Restores the backup at ``source`` (``DEST/<space>``: a directory or an S3 prefix) into
    ``space`` (default: the name it was backed up from) of a running cluster.

    The space goes to the shard that holds it, else to its owner by ``route`` (the routing
    table; default: the hash over the shards given). Raises BackupError for a bad backup or a
    target that refuses it (it holds observations, or vectors of another dimension)."""
    started = time.monotonic()
    store = as_store(source)
    manifest, raw = await _checked(store)
    space = validation.space_id(space or manifest.space)
    where = spaces_of(await shard_stats(addresses, security)).get(space)
    if where is not None:
        shard = where.owner
    else:
        shard = route(space) if route is not None else default_shard(space, len(addresses))
    if shard not in addresses:
        raise fmt.BackupError(f"memory space {space!r} belongs to shard-{shard}, not running")

    async def chunks() -> AsyncIterator[ipb.RestoreChunk]:
        yield ipb.RestoreChunk(
            memory_space_id=space,
            dim=manifest.dim,
            lsn=manifest.lsn,
            file=fmt.MANIFEST,
            data=raw,
        )
        done = 0
        for entry in manifest.files:  # the shard checks each file's SHA-256 as it arrives
            name = "" if entry.name == fmt.WAL_FILE else entry.name
            sent = False
            async for data in store.read(entry.name):
                done += len(data)
                sent = True
                yield ipb.RestoreChunk(file=name, data=data)
                if on_progress is not None:
                    on_progress(Progress(space, entry.name, done, manifest.total_bytes))
            if not sent:  # an empty file (a WAL the checkpoint covers whole) is sent too
                yield ipb.RestoreChunk(file=name, data=b"")

    async with internal.aio_channel(addresses[shard], security=security) as channel:
        try:
            reply = await shard_pb2_grpc.ShardStub(channel).Restore(
                chunks(), timeout=_timeout(manifest.total_bytes)
            )
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, f"shard-{shard}") from None
    if reply.HasField("error"):
        err = from_proto(reply.error)
        if isinstance(err, ClientError):
            raise fmt.BackupError(str(err), code=reply.error.code)
        raise err
    return RestoreResult(space, shard, reply.lsn, manifest.total_bytes, _since(started))


def _timeout(size: int) -> float:
    return max(RPC_TIMEOUT_S, size / (1 << 20) * SLOWEST_S_PER_MB)


def _since(started: float) -> float:
    return max(time.monotonic() - started, 1e-9)
