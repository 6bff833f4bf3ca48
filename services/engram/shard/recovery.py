"""Opening one memory space: the checkpoint loaded, then the WAL replayed over it.

:meth:`Recovery.recover` runs once, before the space serves anything (the shard node at start
and when it creates a space, a move before the copy serves). It removes the files of an
unfinished checkpoint, loads the manifest's metadata chunks and HNSW index, then replays the
WAL: rows at or below the checkpoint are skipped (a checkpoint may end inside a batch), the
rest go to the fresh tier, session records and batches restore the sessions' durable marks,
and delete records the tombstones (over the checkpoint's bitmap; deleting twice is a no-op).
The index's marks are redone by the builder from the tombstones. The WAL itself truncates a
torn or corrupt tail (:meth:`~engram.shard.wal.Wal.replay`).

:meth:`Recovery.apply_record` applies a record copied from another shard's WAL the same way,
while a move fills this space.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from engram.contract.errors import StorageError
from engram.internal.v1 import shard_pb2 as ipb
from engram.shard import checkpoint as ckpt
from engram.shard.fresh import FreshTier
from engram.shard.index import HnswTier
from engram.shard.state import SpaceState
from engram.v1 import streaming_pb2 as pb

log = logging.getLogger("engram.shard.space")


class Recovery(SpaceState):
    def recover(self) -> None:
        """Loads the checkpoint and replays the WAL; runs before the space serves anything."""
        self._ckpt_dir.mkdir(parents=True, exist_ok=True)
        manifest = ckpt.read_manifest(self._ckpt_dir)
        removed = ckpt.remove_unreferenced(self._ckpt_dir, manifest)
        if removed:
            log.warning(
                "space %s: removed files of an unfinished checkpoint: %s", self.name, removed
            )
        if manifest is not None and manifest.rows:
            self._load_checkpoint(manifest)
        replayed = 0
        for _end_lsn, payload in self.wal.replay():
            replayed += self._replay_record(ipb.WalRecord.FromString(payload))
        self.sessions.assigned = dict(self.sessions.durable)
        self._next_row = self.visible
        if self.backlog():
            self.lanes.add(self.visible, pb.PRIORITY_NORMAL, self.backlog())
            self.admission.loaded(self.backlog() * self.dim * 4)
        log.info(
            "space %s recovered: %d rows (%d from checkpoint, %d replayed), %d sessions",
            self.name,
            self.visible,
            self.checkpoint_rows,
            replayed,
            len(self.sessions.durable),
        )

    def apply_record(self, payload: bytes, end_lsn: int) -> asyncio.Future[None]:
        """A record copied from another shard's WAL (a move into this shard, before the space
        serves): appended to this WAL and applied as recovery would; the future resolves once
        it is durable here."""
        fut = self.wal.append(payload, end_lsn)
        before = self.visible
        rec = ipb.WalRecord.FromString(payload)
        self._replay_record(rec)
        sid = rec.session_open.session_id if rec.HasField("session_open") else rec.batch.session_id
        if sid:  # a retention (or delete) record names no session
            self.sessions.assigned[sid] = self.sessions.durable[sid]
        self._next_row = self.visible
        if self.visible > before:
            n = self.visible - before
            self.lanes.add(self.visible, pb.PRIORITY_NORMAL, n)
            self.admission.loaded(n * self.dim * 4)
        return fut

    def _load_checkpoint(self, manifest: ckpt.Manifest) -> None:
        self.dim = manifest.dim
        deleted = ckpt.read_deleted(self._ckpt_dir, manifest.deleted_file, manifest.rows)
        self.hnsw = HnswTier(
            manifest.dim,
            self._index_settings,
            str(self._ckpt_dir / manifest.index_file),
            deleted=np.flatnonzero(deleted),
            covered=manifest.rows,
        )
        for name in manifest.meta_files:
            chunk = ckpt.read_meta(self._ckpt_dir, name)
            self.ids.extend(chunk.ids)
            self.contents.extend(chunk.contents)
            self.confidences.extend(np.frombuffer(chunk.confidences, "<f4"))
            self.timestamps_us.extend(np.frombuffer(chunk.timestamps_us, "<i8"))
        if len(self.ids) != manifest.rows or self.hnsw.elements > manifest.rows:
            raise StorageError(
                f"checkpoint of space {self.name} is inconsistent: manifest says {manifest.rows} "
                f"rows, metadata has {len(self.ids)}, index has {self.hnsw.elements}"
            )
        self.visible = manifest.rows
        self.sessions.durable = dict(manifest.sessions)
        self.checkpoint_rows = manifest.rows
        self.checkpointed_at = manifest.created_us / 1e6
        self._checkpoint_index_file = manifest.index_file
        self._checkpoint_meta = list(manifest.meta_files)
        self._checkpoint_deleted_file = manifest.deleted_file
        self.blanked_rows = sum(ckpt.meta_span(name)[2] for name in manifest.meta_files)
        self.tombstones.load(deleted)
        self.fresh = FreshTier(manifest.dim, manifest.rows, self._index_settings.fresh_float16)
        self.retention = pb.Retention(**manifest.retention)

    def _replay_record(self, rec: ipb.WalRecord) -> int:
        """Applies one durable WAL record; returns the rows it added."""
        if rec.HasField("session_open"):
            self.sessions.durable.setdefault(rec.session_open.session_id, 0)
            return 0
        if rec.HasField("retention"):
            self.retention.CopyFrom(rec.retention.retention)
            return 0
        if rec.HasField("delete"):
            self._replay_delete(rec.delete)
            return 0
        return self._replay_batch(rec.batch)

    def _replay_delete(self, rec: ipb.WalDelete) -> None:
        rows = np.frombuffer(rec.rows, "<u8").astype(np.int64)
        if len(rows) and int(rows.max()) >= self.visible:
            raise StorageError(
                f"WAL of space {self.name} deletes row {int(rows.max())} before it exists "
                f"(visible: {self.visible})"
            )
        self.tombstones.apply(rows)

    def _replay_batch(self, rec: ipb.WalBatch) -> int:
        sid = rec.session_id
        durable = self.sessions.durable
        durable[sid] = max(durable.get(sid, 0), rec.sequence_number)
        b = rec.batch
        first = rec.first_lsn - 1
        n = len(b.vectors) // (4 * b.dim)
        if first + n <= self.visible:
            return 0  # already in the checkpoint
        skip = self.visible - first
        if skip < 0:
            raise StorageError(
                f"WAL of space {self.name} jumps from row {self.visible} to {first}: "
                "rows are missing"
            )
        if self.dim == 0:
            self._fix_dim(b.dim)
        vectors = np.frombuffer(b.vectors, "<f4").reshape(n, b.dim)[skip:]
        self._make_visible(
            _normalise(vectors),
            list(b.ids)[skip:],
            list(b.contents)[skip:] if b.contents else [""] * (n - skip),
            np.frombuffer(b.confidences, "<f4")[skip:],
            np.frombuffer(b.timestamps_us, "<i8")[skip:],
        )
        return n - skip


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
    return (vectors / norms[:, None]).astype(np.float32, copy=False)
