"""The on-disk format of a space's backup: ``backup.json`` and the files it lists.

A backup of space S in directory DIR is ``DIR/S/``::

    backup.json        this manifest, written last (a directory without it is no backup)
    <checkpoint files> the space's checkpoint as the shard wrote it (manifest.json last)
    wal.log            the WAL records of the segments the checkpoint did not cover, up to
                       the backup's LSN: each a ReadWal answer (``WalChunk``: segment, end_lsn,
                       payload) as a length-delimited field 1, so the whole file also parses
                       as one protobuf message; :class:`WalReader` takes it apart again

``backup.json``::

    {"format": 1, "space": "S", "dim": 384, "lsn": 120000, "created": "2025-...Z",
     "engram_version": "0.x", "files": [{"name": "...", "size": 123, "sha256": "..."}, ...]}

The backup holds exactly the rows ``[0, lsn)`` and the deletes made before it. ``files`` is
in restore order (checkpoint files, their manifest last, then ``wal.log``). A reader refuses
a newer ``format`` than it knows, and every file whose size or SHA-256 differs. Written by
:mod:`engram.control.backups`; read there and by the shard's ``Restore``
(:mod:`engram.shard.backup`), which checks every file again as it arrives.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

from engram.common import wire
from engram.contract.errors import ValidationError
from engram.internal.v1 import shard_pb2 as ipb

FORMAT_VERSION = 1
MANIFEST = "backup.json"
WAL_FILE = "wal.log"
_WAL_TAG = wire.varint(1 << 3 | 2)  # field 1, length-delimited
# Names of files inside a backup: plain names, never a path (a shard writes them to disk).
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


class BackupError(ValidationError):
    """A backup that cannot be restored: missing, corrupt, truncated, of a newer format or of
    another dimension than the space it would go into."""


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class BackupManifest:
    space: str
    dim: int
    lsn: int
    created: str
    engram_version: str
    files: list[FileEntry] = field(default_factory=list)
    format: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def entry(self, name: str) -> FileEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise BackupError(f"{name!r} is not a file of the backup of {self.space!r}")

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name) or name == MANIFEST:
        raise BackupError(f"{name!r} is not a backup file name")
    return name


def parse(raw: bytes, where: str) -> BackupManifest:
    """The manifest in ``raw`` (read from ``where``, named in errors); raises BackupError."""
    try:
        doc = json.loads(raw)
        fmt = int(doc["format"])
        if fmt > FORMAT_VERSION:
            raise BackupError(
                f"{where} is of backup format {fmt}; this version of engram reads format "
                f"{FORMAT_VERSION} and older: restore it with a newer engram"
            )
        files = [
            FileEntry(check_name(str(f["name"])), int(f["size"]), str(f["sha256"]))
            for f in doc["files"]
        ]
        manifest = BackupManifest(
            space=str(doc["space"]),
            dim=int(doc["dim"]),
            lsn=int(doc["lsn"]),
            created=str(doc.get("created", "")),
            engram_version=str(doc.get("engram_version", "")),
            files=files,
            format=fmt,
        )
    except BackupError:
        raise
    except (ValueError, KeyError, TypeError) as exc:
        raise BackupError(f"{where} is not a backup manifest: {exc!r}") from None
    if manifest.lsn < 0 or manifest.dim < 0 or any(f.size < 0 for f in files):
        raise BackupError(f"{where}: negative lsn, dim or file size")
    if len({f.name for f in files}) != len(files):
        raise BackupError(f"{where} lists a file twice")
    return manifest


def wal_record(chunk: ipb.WalChunk) -> bytes:
    """One record of ``wal.log``."""
    return wire.field(1, chunk.SerializeToString())


class WalReader:
    """Takes the records out of ``wal.log``'s bytes as they arrive, in pieces of any size."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[ipb.WalChunk]:
        self._buf += data
        out: list[ipb.WalChunk] = []
        pos = 0
        buf = self._buf
        while pos < len(buf):
            if buf[pos : pos + 1] != _WAL_TAG:
                raise BackupError(f"{WAL_FILE} is corrupt: no record begins at byte {pos}")
            length, shift, at = 0, 0, pos + 1
            while at < len(buf) and buf[at] & 0x80:
                length |= (buf[at] & 0x7F) << shift
                shift, at = shift + 7, at + 1
            if at >= len(buf) or shift > 35:
                break  # the length's end has not arrived yet
            length |= buf[at] << shift
            at += 1
            if at + length > len(buf):
                break
            out.append(ipb.WalChunk.FromString(bytes(buf[at : at + length])))
            pos = at + length
        del buf[:pos]
        return out

    def close(self) -> None:
        if self._buf:
            raise BackupError(f"{WAL_FILE} is truncated: it ends inside a record")
