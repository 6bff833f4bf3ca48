"""Checkpoints of a memory space: the HNSW index, row metadata and session marks, on disk.

Layout under ``<space>/ckpt/``::

    manifest.json                  the current checkpoint (replaced atomically)
    hnsw-<rows>[-c].bin            the index covering rows [0, rows) (a compacted one holds
                                   only some of the deleted ones)
    meta-<lo>-<hi>[-<n>].pb        ids, contents, confidences, timestamps of rows [lo, hi),
                                   <n> of them deleted rows written as empty strings
    deleted-<rows>[-c].bin         which rows of [0, rows) are deleted: a bitmap (little bit
                                   order); absent while none is. Deletes of later rows, and
                                   those applied after the checkpoint took its tombstones,
                                   are in the WAL it keeps

Every file is written to a temporary name, fsynced, renamed and the directory fsynced, and the
manifest is written last: a crash at any step leaves the previous checkpoint whole, and files
no manifest names are removed at the next start. A file the manifest names is never written
again: a checkpoint that keeps the row count writes its index and bitmap under the other name
(``-c``). Metadata chunks are immutable and accumulate; after a compaction, the next checkpoint
replaces the chunks holding deleted rows' strings with emptied ones (and removes the old files
once the manifest names the new). The index file is rewritten at each checkpoint. Written by
:mod:`engram.shard.maintenance`, read by :mod:`engram.shard.recovery`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engram.v1 import streaming_pb2 as pb

MANIFEST = "manifest.json"


@dataclass
class Manifest:
    rows: int = 0
    dim: int = 0
    index_file: str = ""
    meta_files: list[str] = field(default_factory=list)
    sessions: dict[str, int] = field(default_factory=dict)
    created_us: int = 0
    # the space's retention (max_age_s, max_rows; empty: none): its WAL record may be trimmed
    retention: dict[str, int] = field(default_factory=dict)
    deleted_file: str = ""  # the deleted rows' bitmap ("": none is deleted)

    def files(self) -> list[str]:
        """Every file of the checkpoint, the manifest last (the order to copy them in)."""
        extra = [self.deleted_file] if self.deleted_file else []
        return [*self.meta_files, *extra, self.index_file, MANIFEST]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Writes ``path`` through ``write(tmp_path)``, then fsync, rename, fsync the directory."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    commit_file(tmp, path)


def commit_file(tmp: Path, path: Path) -> None:
    """Makes the written file ``tmp`` durable as ``path``: fsync, rename, fsync the directory."""
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def read_manifest(directory: Path) -> Manifest | None:
    path = directory / MANIFEST
    if not path.exists():
        return None
    raw = json.loads(path.read_text())
    return Manifest(
        rows=int(raw["rows"]),
        dim=int(raw["dim"]),
        index_file=raw["index_file"],
        meta_files=list(raw["meta_files"]),
        sessions={k: int(v) for k, v in raw["sessions"].items()},
        created_us=int(raw.get("created_us", 0)),
        retention={k: int(v) for k, v in raw.get("retention", {}).items()},
        deleted_file=str(raw.get("deleted_file", "")),
    )


def write_manifest(directory: Path, manifest: Manifest) -> None:
    body = json.dumps(manifest.__dict__, separators=(",", ":")).encode()
    write_atomic(directory / MANIFEST, lambda tmp: tmp.write_bytes(body))


def write_meta(
    directory: Path,
    lo: int,
    hi: int,
    ids: list[str],
    contents: list[str],
    confidences: np.ndarray,
    timestamps_us: np.ndarray,
    deleted: np.ndarray | None = None,
) -> str:
    """Writes the metadata of rows [lo, hi) as one immutable chunk, the strings of the rows
    ``deleted`` marks (a mask over them) empty; returns its file name."""
    emptied = 0
    if deleted is not None and deleted.any():
        dead = deleted.tolist()
        ids = ["" if d else v for v, d in zip(ids, dead, strict=True)]
        contents = ["" if d else v for v, d in zip(contents, dead, strict=True)]
        emptied = int(deleted.sum())
    chunk = pb.ObservationBatch(
        ids=ids,
        contents=contents,
        confidences=confidences.astype("<f4").tobytes(),
        timestamps_us=timestamps_us.astype("<i8").tobytes(),
    )
    name = f"meta-{lo:012d}-{hi:012d}" + (f"-{emptied:012d}" if emptied else "") + ".pb"
    body = chunk.SerializeToString()
    write_atomic(directory / name, lambda tmp: tmp.write_bytes(body))
    return name


def meta_span(name: str) -> tuple[int, int, int]:
    """The rows ``[lo, hi)`` of a metadata chunk and how many of them it holds emptied."""
    parts = name.removesuffix(".pb").split("-")
    if parts[0] != "meta" or len(parts) not in (3, 4):
        raise ValueError(f"{name!r} is not a metadata chunk's name")
    return int(parts[1]), int(parts[2]), int(parts[3]) if len(parts) == 4 else 0


def unused_name(name: str, current: str) -> str:
    """``name``, or its ``-c`` variant if the current checkpoint uses ``name``: a file the
    manifest names is never overwritten."""
    if name != current:
        return name
    stem, dot, ext = name.rpartition(".")
    return f"{stem}-c{dot}{ext}"


def read_meta(directory: Path, name: str) -> pb.ObservationBatch:
    chunk = pb.ObservationBatch()
    chunk.ParseFromString((directory / name).read_bytes())
    return chunk


def write_deleted(directory: Path, deleted: np.ndarray, current: str = "") -> str:
    """Writes which rows of ``[0, len(deleted))`` are deleted (a boolean mask), under a name
    other than ``current`` (the manifest's); returns the file's name, or "" when none is (no
    file then)."""
    if not deleted.any():
        return ""
    name = unused_name(f"deleted-{len(deleted):012d}.bin", current)
    body = np.packbits(deleted, bitorder="little").tobytes()
    write_atomic(directory / name, lambda tmp: tmp.write_bytes(body))
    return name


def read_deleted(directory: Path, name: str, rows: int) -> np.ndarray:
    """The deleted rows of ``[0, rows)`` as a boolean mask ("": none)."""
    if not name:
        return np.zeros(rows, bool)
    bits = np.frombuffer((directory / name).read_bytes(), np.uint8)
    if len(bits) != (rows + 7) // 8:
        raise ValueError(f"{name} holds {len(bits)} bytes, a bitmap of {rows} rows needs more")
    return np.unpackbits(bits, count=rows, bitorder="little").astype(bool)


def remove_unreferenced(directory: Path, manifest: Manifest | None) -> list[str]:
    """Deletes files no manifest names (left by a crash mid-checkpoint); returns their names."""
    keep = {MANIFEST}
    if manifest is not None:
        keep.update(manifest.files())
    removed = []
    for entry in directory.iterdir():
        if entry.name not in keep:
            entry.unlink()
            removed.append(entry.name)
    if removed:
        fsync_dir(directory)
    return removed
