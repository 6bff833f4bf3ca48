"""What one memory space holds, and the one way its rows become visible.

:class:`SpaceState` is the base of the parts composed into :class:`~engram.shard.space.Space`
(see that module for why they are mixins): recovery, the write path, recall and maintenance
each add methods; the state they share is created here, in one ``__init__``, with a comment
per field. It holds:

* the rows: ``visible`` (rows durable and visible to recall, numbered from 0 in LSN order),
  their vectors in the fresh tier ``[indexed, visible)`` and the HNSW tier ``[0, indexed)``,
  their ids, contents, confidences and timestamps in columns by row;
* the WAL, the shard's admission controller and the event loop the space runs on;
* the components with state of their own: :class:`~engram.shard.sessions.Sessions`,
  :class:`~engram.shard.lanes.LaneBacklog`, :class:`VisibilityWaiters` and the deleted rows
  (:class:`~engram.shard.tombstones.Tombstones`, :class:`~engram.shard.tombstones.IdIndex`);
* the bookkeeping of the last checkpoint.

:meth:`SpaceState._make_visible` appends rows to every column and the fresh tier and then
advances ``visible``, so a recall never sees part of a batch; the write path calls it when a
batch is durable, recovery for every row it replays.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from engram.common.settings import AdmissionSettings, IndexSettings, LimitSettings, WalSettings
from engram.shard.admission import AdmissionController
from engram.shard.columns import StringColumn
from engram.shard.fresh import FreshTier, Partitioning
from engram.shard.index import HnswTier
from engram.shard.lanes import LaneBacklog
from engram.shard.sessions import Sessions
from engram.shard.tombstones import IdIndex, Tombstones
from engram.shard.wal import Wal, WalFaults
from engram.v1 import streaming_pb2 as pb

if TYPE_CHECKING:
    from engram.shard.compaction import IndexRebuild


class _Grow:
    """A numpy array that grows by doubling; ``view()`` is the filled part."""

    def __init__(self, dtype: str) -> None:
        self._data = np.empty(1024, dtype=dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.n + len(values)
        if need > len(self._data):
            bigger = np.empty(max(need, 2 * len(self._data)), dtype=self._data.dtype)
            bigger[: self.n] = self._data[: self.n]
            self._data = bigger
        self._data[self.n : need] = values
        self.n = need

    def view(self) -> np.ndarray:
        return self._data[: self.n]


class VisibilityWaiters:
    """Recalls waiting until the visible LSN reaches their target (event loop only): a
    consistent snapshot adds one, the write path wakes them as batches become visible."""

    def __init__(self) -> None:
        self.waiting: list[tuple[int, asyncio.Future[None]]] = []

    def wait(self, loop: asyncio.AbstractEventLoop, target: int) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = loop.create_future()
        self.waiting.append((target, fut))
        return fut

    def wake(self, visible: int) -> None:
        still = []
        for target, fut in self.waiting:
            if fut.done():
                continue
            if visible >= target:
                fut.set_result(None)
            else:
                still.append((target, fut))
        self.waiting = still


class SpaceState:
    """The state of one memory space; the base of :class:`~engram.shard.space.Space`'s parts."""

    def __init__(
        self,
        name: str,
        directory: Path,
        *,
        wal: WalSettings,
        index: IndexSettings,
        limits: LimitSettings,
        faults: WalFaults | None = None,
        admission: AdmissionController | None = None,
    ) -> None:
        self.name = name
        # shared by every space of the shard; a space on its own gets an unlimited one
        self.admission = admission or AdmissionController(
            AdmissionSettings(memory_budget_bytes=1 << 50)
        )
        self.directory = directory
        self._index_settings = index
        self._limits = limits
        self._ckpt_dir = directory / "ckpt"
        self.wal_dir = wal_directory(name, directory, wal)
        self.wal = Wal(self.wal_dir, segment_bytes=wal.segment_bytes, faults=faults)
        self.dim = 0
        self.visible = 0  # rows durable and visible to recall
        self._next_row = 0  # next row to assign
        self.fresh: FreshTier | None = None
        self.hnsw: HnswTier | None = None
        self.ids = StringColumn()
        self.contents = StringColumn()
        self.confidences = _Grow("float32")
        self.timestamps_us = _Grow("int64")
        self.sessions = Sessions()
        # deleted rows by delete sequence, and rows by id (built at the first delete by id)
        self.tombstones = Tombstones()
        self.id_index = IdIndex()
        # WAL futures of deletes not applied yet (a checkpoint waits for them)
        self.deletes_inflight: set[asyncio.Future[None]] = set()
        self._inflight = 0  # WAL records queued and not settled yet
        self._recovering = False  # after a WAL failure, until the WAL is reset
        # moving out: why writes are refused (NOT_OWNER) from the fence on; empty otherwise
        self.fenced_why = ""
        # while positive, no checkpoint is written (a move is copying the current one), and
        # checkpoint_lock is held while one is written
        self.checkpoint_holds = 0
        self.checkpoint_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.checkpoint_rows = 0
        self._checkpoint_index_file = ""
        self._checkpoint_meta: list[str] = []
        self._checkpoint_deleted_file = ""
        self.last_checkpoint = time.monotonic()
        # wall-clock time of the checkpoint on disk (of the space's opening while it has none)
        self.checkpointed_at = time.time()
        # the fresh tier's quantiser, learnt once the backlog is large (again if rows drift)
        self.partitioning: Partitioning | None = None
        # un-indexed rows per priority lane, for the builder's pick
        self.lanes = LaneBacklog()
        self.visibility = VisibilityWaiters()
        # staleness bound of BOUNDED recalls, seconds
        self.bounded_staleness_s = 0.1
        self.last_write = 0.0  # monotonic time rows were last published
        self.last_recall = 0.0  # monotonic time a recall last started
        # the durable retention (engram.shard.retention; zeros: keep everything), and the
        # setting being written, which a checkpoint waits for before it records the retention
        self.retention = pb.Retention()
        self.retention_pending: asyncio.Future[None] | None = None
        # compaction (engram.shard.compaction): the index being rebuilt, deleted rows whose
        # strings are emptied (in memory), whether the checkpoint's metadata chunks still hold
        # deleted rows' strings, and how many compactions finished
        self.rebuild: IndexRebuild | None = None
        self.blanked_rows = 0
        self.meta_stale = False
        self.compactions = 0

    @property
    def ckpt_dir(self) -> Path:
        return self._ckpt_dir

    def disk_bytes(self) -> int:
        """Bytes of the checkpoint and the WAL on disk."""
        total = 0
        for directory in (self._ckpt_dir, self.wal_dir):
            with contextlib.suppress(OSError):
                total += sum(e.stat().st_size for e in os.scandir(directory) if e.is_file())
        return total

    def backlog(self) -> int:
        """Rows visible and not indexed yet (in the fresh tier only)."""
        indexed = self.hnsw.covered if self.hnsw is not None else 0
        return self.visible - indexed

    def _fix_dim(self, dim: int) -> None:
        self.dim = dim
        self.fresh = FreshTier(dim, self.visible, self._index_settings.fresh_float16)

    def _make_visible(
        self,
        vectors: np.ndarray,
        ids: list[str],
        contents: list[str],
        confidences: np.ndarray,
        timestamps_us: np.ndarray,
        norms: np.ndarray | None = None,
    ) -> None:
        """Publishes rows: normalised ``vectors``, or raw ones with their ``norms``."""
        assert self.fresh is not None
        self.ids.extend(ids)
        self.contents.extend(contents)
        self.confidences.extend(confidences)
        self.timestamps_us.extend(timestamps_us)
        self.fresh.append(vectors, norms)
        self.visible += len(vectors)

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError(f"space {self.name} was not started")
        return self._loop


def wal_directory(name: str, directory: Path, wal: WalSettings) -> Path:
    """Where the WAL of space ``name`` (whose directory is ``directory``) lives: under
    ``ENGRAM_WAL_DIR`` if set, else in the space's directory."""
    return Path(wal.directory) / name if wal.directory else directory / "wal"
