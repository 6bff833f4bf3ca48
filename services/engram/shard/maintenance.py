"""Background work on one memory space: listing the fresh tier, indexing, checkpoints, memory.

The shard's background threads (:mod:`engram.shard.builder`) call these, one space at a time:

* the partitioner thread: :meth:`Maintenance.partition_step` lists fresh blocks IVF-style once
  the backlog is large (learning the space's quantiser, again when rows drift), and
  :meth:`Maintenance.prepare_spare` readies the next fresh block while writes arrive;
* the builder thread: :meth:`Maintenance.index_step` moves rows from the fresh tier into HNSW
  (:meth:`Maintenance.mark_step` first marks the rows of applied deletes there),
  :meth:`Maintenance.checkpoint` writes the indexed rows to disk and has the WAL they cover
  deleted, and :meth:`Maintenance.release_idle_memory` lets go of fresh blocks once the backlog
  is gone. It picks a space by :meth:`Maintenance.top_lane` and
  :meth:`Maintenance.oldest_low_since` (:class:`~engram.shard.lanes.LaneBacklog`).

A checkpoint takes the session marks, the tombstones (once no delete is between its WAL
record and its tombstones) and a WAL rotation on the event loop, then writes a metadata chunk
for the newly indexed rows (deleted rows' strings empty; after a compaction, the older chunks
holding deleted rows' strings again), the deleted rows' bitmap, the HNSW index and last the
manifest
(:mod:`engram.shard.checkpoint`), and trims the WAL on the event loop again. A move holds
checkpoints back (``checkpoint_holds``) while it copies the current one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import numpy as np

from engram.shard import checkpoint as ckpt
from engram.shard.fresh import (
    BLOCK_ROWS,
    LIST_STEP,
    Block,
    Partitioning,
    as_float32,
    learn_from_backlog,
    list_block,
    target_lists,
)
from engram.shard.index import HnswTier
from engram.shard.sessions import now_us
from engram.shard.state import SpaceState

log = logging.getLogger("engram.shard.space")


class Maintenance(SpaceState):
    def top_lane(self) -> int | None:
        """The most urgent priority among the un-indexed rows (HIGH=1 ... LOW=3)."""
        return self.lanes.top()

    def oldest_low_since(self) -> float | None:
        return self.lanes.oldest_low_since()

    def partition_step(self) -> bool:
        """Lists one fresh block's unlisted rows if the backlog is large (partitioner thread):
        full blocks first, then the block being filled once it grew by ``LIST_STEP`` rows.
        Learns the space's quantiser from the first full block, and again from a full block
        whose rows fit it clearly worse than the rows it was learnt from; and from the whole
        backlog once it needs twice the lists (:func:`~engram.shard.fresh.target_lists`),
        after which full blocks listed with half the lists or fewer are listed again, one a
        step. True if it worked."""
        settings = self._index_settings
        fresh = self.fresh
        backlog = self.backlog()
        if fresh is None or backlog < settings.fresh_partition_rows:
            return False
        blocks = fresh.snapshot()
        p = self.partitioning
        lists = target_lists(backlog, settings.fresh_lists, settings.fresh_list_rows)
        if p is not None and lists >= 2 * p.lists:
            grown = learn_from_backlog(blocks, lists, settings.fresh_nprobe)
            if grown is not None:
                log.info(
                    "space %s: %d un-indexed rows: the fresh tier's quantiser grows from %d to "
                    "%d lists",
                    self.name,
                    backlog,
                    p.nlist,
                    grown.nlist,
                )
                self.partitioning = grown
                return True
        todo = [b for b in blocks if b.full and _unlisted(b) and b.drifted_at != b.filled]
        # a block whose rows fitted badly as it filled waits until it is full to be learnt from
        todo += [
            b
            for b in blocks
            if not b.full and not b.drifted_at and b.filled - _listed(b) >= LIST_STEP
        ]
        if p is not None:  # listed before the quantiser grew: list again with the finer one
            todo += [b for b in blocks if b.full and _coarser(b, p)]
        for block in todo:
            p = self.partitioning
            learnable = block.full and len(block.data) == BLOCK_ROWS
            if p is None and not learnable:
                continue  # no quantiser yet: it is learnt from a full block
            filled = block.filled
            rows = as_float32(block.data[:filled])
            if p is None or (learnable and block.drifted_at):
                if p is not None:
                    log.info(
                        "space %s: rows %d.. fitted the fresh-tier quantiser worse as they "
                        "arrived: learning a new one",
                        self.name,
                        block.first_row,
                    )
                p, leaf = self._learn(rows)  # no assigning it to the old one first, in vain
                list_block(block, p, leaf)
                return True
            listing = block.listing
            start = listing.covered if listing is not None and listing.partitioning is p else 0
            leaf, sims = p.assign(rows[start:filled])
            # (a block listed again for finer lists is not learnt from: the backlog was)
            if _unlisted(block) and float(sims.mean()) < p.fit - settings.fresh_refit_drop:
                if not learnable:  # scanned exactly until it is full, then learnt from
                    block.drifted_at = filled
                    continue
                log.info(
                    "space %s: rows %d.. fit the fresh-tier quantiser worse (%.3f, learnt "
                    "%.3f): learning a new one",
                    self.name,
                    block.first_row,
                    float(sims.mean()),
                    p.fit,
                )
                p, leaf = self._learn(rows)
                start = 0
            if start:
                assert listing is not None
                leaf = np.concatenate([listing.leaf, leaf])
            list_block(block, p, leaf)
            return True
        return False

    def _learn(self, rows: np.ndarray) -> tuple[Partitioning, np.ndarray]:
        s = self._index_settings
        lists = target_lists(self.backlog(), s.fresh_lists, s.fresh_list_rows)
        # one block of rows learns at most a quarter of its rows' worth of lists; a larger
        # backlog then has the quantiser learnt again from all of it (partition_step)
        lists = min(lists, max(s.fresh_lists, len(rows) // 4))
        p, leaf = Partitioning.learn_and_assign(rows, lists, s.fresh_nprobe)
        self.partitioning = p
        return p, leaf

    def prepare_spare(self) -> None:
        """Readies the fresh tier's next block off the event loop (partitioner thread), while
        writes are arriving."""
        if self.fresh is not None and time.monotonic() - self.last_write < 1.0:
            self.fresh.prepare_spare()

    def release_idle_memory(self) -> None:
        """Once the backlog is gone (builder thread): frees the spare block, and has the event
        loop retire the fresh tier's last block if every row in it is indexed."""
        if self.fresh is None:
            return
        self.fresh.release_spare()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the process is stopping
                loop.call_soon_threadsafe(self.retire_indexed_tail)

    def retire_indexed_tail(self) -> None:
        """Event loop: see :meth:`FreshTier.retire_tail`."""
        if self.fresh is not None and self.hnsw is not None:
            self.fresh.retire_tail(self.hnsw.covered)

    def index_step(self, max_rows: int, threads: int | None = None) -> int:
        """Moves up to ``max_rows`` rows from the fresh tier into HNSW; builder thread only."""
        if self.fresh is None:
            return 0
        if self.hnsw is None:
            self.hnsw = HnswTier(self.dim, self._index_settings)
        self.mark_step()
        lo = self.hnsw.covered
        hi = min(self.visible, lo + max_rows)
        if hi <= lo:
            return 0
        # rows deleted before they are indexed are covered without being added
        at = self.tombstones.at[lo:hi]
        dead = np.flatnonzero((at != 0) & (at <= self.hnsw.marked_seq)) + lo if len(at) else None
        self.hnsw.add(self.fresh.rows(lo, hi), lo, threads, dead)
        self.fresh.drop_below(hi)
        self.lanes.drop(hi, lo)
        self.admission.indexed((hi - lo) * self.dim * 4)
        return hi - lo

    def mark_step(self) -> bool:
        """Marks the rows of applied deletes in the HNSW index, one delete at a time (builder
        thread); True if it marked any."""
        pending = self.tombstones.unmarked
        hnsw = self.hnsw
        if hnsw is None or not pending:
            return False
        while pending:
            seq, rows = pending.popleft()
            hnsw.mark(rows, seq)
        return True

    def checkpoint_due(self) -> bool:
        if self.checkpoint_holds:
            return False
        indexed = self.hnsw.covered if self.hnsw is not None else 0
        new = indexed - self.checkpoint_rows
        if self.meta_stale and indexed:
            return True  # a compaction finished: give its disk back too
        if new <= 0:
            return False
        if new >= self._index_settings.checkpoint_every:
            return True
        return time.monotonic() - self.last_checkpoint >= self._index_settings.checkpoint_interval_s

    def checkpoint_age(self, now: float) -> float:
        """Seconds (wall clock ``now``) the rows no checkpoint covers have waited for one: how
        stale the state a restart starts from is; 0 when the checkpoint covers every row."""
        return max(0.0, now - self.checkpointed_at) if self.visible > self.checkpoint_rows else 0.0

    def checkpoint(self) -> int:
        """Writes a checkpoint of the indexed rows and drops the WAL it covers; builder thread.

        Returns the number of rows the checkpoint holds (0: held back by a move).
        """
        with self.checkpoint_lock:
            if self.checkpoint_holds:
                return 0
            return self._checkpoint()

    def _checkpoint(self) -> int:
        assert self.hnsw is not None and self._loop is not None
        loop = self._loop
        rows = self.hnsw.covered

        async def prepare() -> tuple[dict[str, int], int, dict[str, int], np.ndarray]:
            # sessions still being opened, a retention being set may fail: let them settle,
            # then record the durable ones (their WAL records may be trimmed below). Deletes
            # whose records are queued are applied before the tombstones are taken, for the
            # same reason.
            opening = self.sessions.opening
            while opening or self.retention_pending is not None or self.deletes_inflight:
                pending = [*opening.values(), self.retention_pending, *self.deletes_inflight]
                await asyncio.gather(*[f for f in pending if f], return_exceptions=True)
            r = self.retention
            retention = {"max_age_s": r.max_age_s, "max_rows": r.max_rows}
            deleted = self.tombstones.mask(rows)
            return dict(self.sessions.durable), self.wal.rotate(), retention, deleted

        sessions, closed, retention, deleted = asyncio.run_coroutine_threadsafe(
            prepare(), loop
        ).result()
        lo = self.checkpoint_rows
        meta, replaced = (
            self._rewrite_meta(deleted)
            if self.meta_stale
            else (
                list(self._checkpoint_meta),
                [],
            )
        )
        if rows > lo:
            meta.append(self._write_meta(lo, rows, deleted[lo:rows]))
        deleted_file = ckpt.write_deleted(self._ckpt_dir, deleted, self._checkpoint_deleted_file)
        index_file = ckpt.unused_name(f"hnsw-{rows:012d}.bin", self._checkpoint_index_file)
        hnsw = self.hnsw
        ckpt.write_atomic(self._ckpt_dir / index_file, lambda tmp: hnsw.save(str(tmp)))
        manifest = ckpt.Manifest(
            rows=rows,
            dim=self.dim,
            index_file=index_file,
            meta_files=meta,
            sessions=sessions,
            created_us=now_us(),
            retention=retention,
            deleted_file=deleted_file,
        )
        ckpt.write_manifest(self._ckpt_dir, manifest)
        old_deleted = self._checkpoint_deleted_file
        self._checkpoint_deleted_file = deleted_file
        if old_deleted and old_deleted != deleted_file:
            (self._ckpt_dir / old_deleted).unlink(missing_ok=True)
        old_index = self._checkpoint_index_file
        self.checkpoint_rows, self._checkpoint_index_file = rows, index_file
        self._checkpoint_meta = meta
        self.meta_stale = False
        for name in replaced:
            (self._ckpt_dir / name).unlink(missing_ok=True)
        self.last_checkpoint = time.monotonic()
        self.checkpointed_at = manifest.created_us / 1e6
        if old_index and old_index != index_file:
            (self._ckpt_dir / old_index).unlink(missing_ok=True)

        async def trim() -> int:
            return self.wal.delete_through(rows, closed + 1)

        deleted = asyncio.run_coroutine_threadsafe(trim(), loop).result()
        log.info(
            "space %s: checkpoint at %d rows; %d WAL segments deleted", self.name, rows, deleted
        )
        return rows

    def _write_meta(self, lo: int, hi: int, deleted: np.ndarray) -> str:
        """Writes rows ``[lo, hi)``'s metadata chunk, the ``deleted`` ones' strings empty."""
        return ckpt.write_meta(
            self._ckpt_dir,
            lo,
            hi,
            self.ids[lo:hi],
            self.contents[lo:hi],
            self.confidences.view()[lo:hi].copy(),
            self.timestamps_us.view()[lo:hi].copy(),
            deleted,
        )

    def _rewrite_meta(self, deleted: np.ndarray) -> tuple[list[str], list[str]]:
        """After a compaction: the current metadata chunks, each holding more deleted rows
        than it has emptied written again with them empty; and the names replaced."""
        meta, replaced = [], []
        for name in self._checkpoint_meta:
            lo, hi, emptied = ckpt.meta_span(name)
            dead = deleted[lo:hi]
            if int(dead.sum()) > emptied:
                meta.append(self._write_meta(lo, hi, dead))
                replaced.append(name)
            else:
                meta.append(name)
        return meta, replaced


def _listed(block: Block) -> int:
    return block.listing.covered if block.listing is not None else 0


def _unlisted(block: Block) -> bool:
    return _listed(block) < block.filled


def _coarser(block: Block, p: Partitioning) -> bool:
    """Listed whole with a quantiser of at most half the lists of ``p``."""
    listing = block.listing
    return (
        listing is not None
        and listing.covered == block.filled
        and 2 * listing.partitioning.lists <= p.lists
    )
