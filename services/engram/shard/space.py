"""One memory space on a shard: sequencing, durability, tiers, recall, checkpoints, recovery.

The write path runs on the shard's event loop and is strictly ordered::

    begin_append  validate -> check the session's sequence -> assign LSNs -> queue the WAL record
    (WAL thread)  group commit: write + fdatasync
    _publish      in WAL order: metadata, fresh tier, visible LSN, session high-water mark -> ack

Rows are numbered from 0 in LSN order (row = LSN - 1). Rows ``[0, indexed)`` are in the HNSW
tier, rows ``[indexed, visible)`` in the fresh tier; a recall searches both and merges. The
shard's builder thread moves rows into the index (``index_step``) and writes checkpoints
(``checkpoint``), after which WAL segments the checkpoint covers are deleted.

Session high-water marks are kept twice: ``assigned`` (queued) and ``durable`` (fsynced).
Duplicates are answered from them; a WAL failure rolls ``assigned`` back to ``durable`` and
LSN assignment back to ``visible``, so nothing that was not acked leaves a trace.

:class:`Space` is composed of one part per module, each a mixin over the state they share:

* :mod:`~engram.shard.state`: the shared state (one ``__init__``) and rows made visible;
* :mod:`~engram.shard.recovery`: ``recover``, the checkpoint loaded and the WAL replayed;
* :mod:`~engram.shard.writes`: ``open_session``, ``begin_append``, ``_publish``, WAL failures;
* :mod:`~engram.shard.deletes`: ``resolve_delete``, ``begin_delete`` (built on the write path:
  its records share the WAL's order and failure handling), ``live_count``;
* :mod:`~engram.shard.recall`: ``snapshot``, ``consistent_snapshot``, ``recall``, ``scan_ids``;
* :mod:`~engram.shard.maintenance`: the builder's and partitioner's work (``index_step``,
  ``partition_step``, ``checkpoint`` ...);
* :mod:`~engram.shard.compaction`: ``compaction_due``, ``compact_step``, the memory and disk
  of deleted rows given back.

State that stands on its own is a component instead, owned by the state:
:class:`~engram.shard.sessions.Sessions` (marks, duplicates, sessions being opened, rows per
session), :class:`~engram.shard.lanes.LaneBacklog` (un-indexed rows per priority lane) and
:class:`~engram.shard.state.VisibilityWaiters` (recalls waiting for an LSN). The parts are
mixins, not components, because every one of them reads and advances the same rows:
``visible``, ``dim``, the fresh and HNSW tiers, the columns, the WAL, the loop and the
admission controller. As components each would hold a reference back to all of that, and
``Space`` would forward its attributes (``visible``, ``dim``, ``hnsw``, ``fresh`` ... which
several parts assign) through properties: a function call added to every such read on the
write path. No part calls a method of another; they meet only in the state.

Callers (the shard node and gRPC service, the builder, moves, tests) import everything from
here: :class:`Space`, :class:`AppendResult`, :class:`DeleteResult`, :class:`Snapshot`,
:class:`Filters` and :func:`batch_record`.
"""

from __future__ import annotations

import asyncio

from engram.shard.compaction import Compaction
from engram.shard.deletes import DeleteResult, Deletes
from engram.shard.maintenance import Maintenance
from engram.shard.recall import Filters, Recall, Snapshot
from engram.shard.recovery import Recovery
from engram.shard.sessions import AppendResult
from engram.shard.writes import WritePath, batch_record

__all__ = ["AppendResult", "DeleteResult", "Filters", "Snapshot", "Space", "batch_record"]


class Space(Recovery, Deletes, WritePath, Recall, Maintenance, Compaction):
    """One memory space: ``Space(name, directory, wal=..., index=..., limits=...)``, then
    :meth:`recover`, :meth:`start` on the event loop, and :meth:`close` at the end."""

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.wal.start(loop)

    async def close(self) -> None:
        """Stops the WAL; the space's un-indexed rows stop counting against the shard's memory
        budget (the space leaves the shard, or the shard stops)."""
        await self.wal.close()
        self.admission.released(self.backlog() * self.dim * 4)

    def session_mark(self, session_id: str) -> int | None:
        return self.sessions.durable.get(session_id)

    @property
    def session_count(self) -> int:
        return len(self.sessions.durable)
