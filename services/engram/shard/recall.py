"""Recall in one memory space: snapshots, consistency levels, filters and the two-tier search.

A recall sees a :class:`Snapshot`: the rows below its ``visible`` LSN, the fresh blocks holding
``[indexed, visible)`` and the HNSW tier holding ``[0, indexed)``. :meth:`Recall.snapshot` takes
one (on the event loop, or on a recall port thread: every read in it is safe there);
:meth:`Recall.consistent_snapshot` first waits, up to a deadline, until the visible LSN meets
the recall's consistency level (EVENTUAL, BOUNDED, SESSION, STRONG; the LSN is the one
:meth:`Recall.snapshot_target` names), and raises ``CONSISTENCY_TIMEOUT`` rather than answer
from staler data.

:meth:`Recall.recall` then runs in a worker thread: it searches both tiers with the row
:class:`Filters` applied inside each, drops rows at or beyond the snapshot, de-duplicates rows
found in both (a row being indexed can be in both) and returns the top ``k``.
:meth:`Recall.scan_ids` lists every visible id.

Deleted rows are left out in both tiers: the snapshot records the delete sequence it saw
(:class:`~engram.shard.tombstones.Tombstones`); the HNSW search skips the rows the builder
marked (hnswlib keeps finding ``k`` others) and filters the deletes it has not marked yet, and
raises the recall's sequence to its marks, so the fresh scan hides exactly the same deletes.
Called by the shard's gRPC service.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from engram.common import validation
from engram.common.tracing import Timeline
from engram.contract.errors import ConsistencyTimeout, SessionError
from engram.shard.columns import StringColumn
from engram.shard.fresh import Block, scan
from engram.shard.index import HnswTier
from engram.shard.state import SpaceState
from engram.shard.tombstones import DeleteView
from engram.v1 import streaming_pb2 as pb


@dataclass(frozen=True)
class Snapshot:
    """What a recall sees: rows below ``visible``; the fresh blocks hold ``[indexed, visible)``."""

    visible: int
    indexed: int
    blocks: list[Block]
    hnsw: HnswTier | None
    consistency: int = pb.EVENTUAL
    waited_us: int = 0
    staleness_us: int = 0
    delete_seq: int = 0  # the deletes it sees: 0 < deleted_at[row] <= delete_seq
    deleted_at: np.ndarray | None = None
    # the id and content columns as of the snapshot (a compaction may empty deleted rows'
    # strings later; a recall that began before the delete may still return the row)
    ids: StringColumn | None = None
    contents: StringColumn | None = None


@dataclass(frozen=True)
class Filters:
    """Recall filters; None means no bound."""

    min_score: float | None = None
    since_us: int | None = None
    until_us: int | None = None
    min_confidence: float | None = None

    @classmethod
    def of(cls, r: pb.RecallRequest) -> Filters:
        return cls(
            min_score=r.min_score if r.HasField("min_score") else None,
            since_us=r.since_us if r.HasField("since_us") else None,
            until_us=r.until_us if r.HasField("until_us") else None,
            min_confidence=r.min_confidence if r.HasField("min_confidence") else None,
        )

    @property
    def on_rows(self) -> bool:
        return (self.since_us, self.until_us, self.min_confidence) != (None, None, None)


class Recall(SpaceState):
    def snapshot(self, consistency: int = pb.EVENTUAL, waited_us: int = 0) -> Snapshot:
        # Order matters: the builder may create the index and drop fresh blocks between these
        # reads. Taking the blocks before the index means a dropped block's rows are in the
        # index we read next (rows leave the fresh tier only once indexed).
        visible = self.visible
        blocks = self.fresh.snapshot() if self.fresh is not None else []
        hnsw = self.hnsw
        indexed = hnsw.covered if hnsw is not None else 0
        behind_since = self.wal.durable_since(visible)
        staleness = int((time.monotonic() - behind_since) * 1e6) if behind_since else 0
        tombstones = self.tombstones
        return Snapshot(
            visible,
            indexed,
            blocks,
            hnsw,
            consistency,
            waited_us,
            staleness,
            tombstones.seq,
            tombstones.at,
            self.ids.view(),
            self.contents.view(),
        )

    async def consistent_snapshot(
        self, consistency: int, session_id: str = "", deadline_s: float = 5.0
    ) -> Snapshot:
        """A snapshot that meets ``consistency``, waiting for it up to ``deadline_s``.

        EVENTUAL: now. BOUNDED: now if the newest durable write not yet visible is younger
        than the bound, else everything durable at arrival. STRONG: everything durable (so
        everything acknowledged anywhere) at arrival. SESSION: everything the session has had
        acknowledged. Raises ConsistencyTimeout rather than answer from a staler snapshot.
        """
        level = consistency or pb.BOUNDED
        started = time.perf_counter()
        waited_us = 0
        target = self.snapshot_target(level, session_id)
        if target > self.visible:
            fut = self.visibility.wait(self._require_loop(), target)
            try:
                await asyncio.wait_for(fut, deadline_s)
            except TimeoutError:
                raise ConsistencyTimeout(
                    f"memory space {self.name!r} did not make LSN {target} visible within "
                    f"{deadline_s * 1000:.0f} ms ({pb.Consistency.Name(level)}); "
                    f"visible: {self.visible}"
                ) from None
            waited_us = max(1, int((time.perf_counter() - started) * 1e6))
        return self.snapshot(level, waited_us)

    def snapshot_target(self, level: int, session_id: str = "") -> int:
        """The visible LSN a recall at ``level`` must see (it waits while ``visible`` is
        lower; see :meth:`consistent_snapshot`). Reads only: any thread may ask."""
        durable, _ = self.wal.durable_lsn
        if level == pb.STRONG:
            return durable
        if level == pb.BOUNDED:
            behind_since = self.wal.durable_since(self.visible)
            if behind_since and time.monotonic() - behind_since > self.bounded_staleness_s:
                return durable
        elif level == pb.SESSION:
            if session_id and session_id not in self.sessions.durable:
                raise SessionError(
                    f"session {session_id!r} is unknown in memory space {self.name!r}"
                )
            return self.sessions.rows.get(session_id, self.visible if session_id else 0)
        return 0

    def _row_filter(self, f: Filters) -> Callable[[np.ndarray], np.ndarray] | None:
        if not f.on_rows:
            return None
        conf = self.confidences.view()
        ts = self.timestamps_us.view()

        def accept(rows: np.ndarray) -> np.ndarray:
            keep = np.ones(len(rows), dtype=bool)
            if f.since_us is not None:
                keep &= ts[rows] >= f.since_us
            if f.until_us is not None:
                keep &= ts[rows] < f.until_us
            if f.min_confidence is not None:
                keep &= conf[rows] >= f.min_confidence
            return keep

        return accept

    def recall(
        self,
        snap: Snapshot,
        cue: np.ndarray,
        k: int,
        filters: Filters | float | None = None,
        timeline: Timeline | None = None,
    ) -> pb.RecallResponse:
        """Top-``k`` of the snapshot by cosine similarity; runs in a worker thread. A traced
        recall's ``timeline`` gets the end of each tier: index (HNSW), fresh, merge."""
        started = time.perf_counter()
        self.last_recall = time.monotonic()
        if not isinstance(filters, Filters):
            filters = Filters(min_score=filters)
        min_score = filters.min_score
        out = pb.RecallResponse(snapshot_sequence=snap.visible)
        out.metadata.indexed_count = snap.indexed
        out.metadata.fresh_count = snap.visible - snap.indexed
        out.metadata.consistency = snap.consistency
        out.metadata.waited_us = snap.waited_us
        out.metadata.staleness_us = snap.staleness_us
        if snap.visible == 0:
            return out
        if cue.shape[0] != self.dim:
            raise validation.ValidationError(
                f"cue has {cue.shape[0]} values but memory space {self.name!r} holds vectors of "
                f"dimension {self.dim}",
                code=pb.WRONG_DIMENSION,
            )
        q = (cue / np.linalg.norm(cue)).astype(np.float32)
        accept = self._row_filter(filters)
        at = snap.deleted_at if snap.deleted_at is not None else self.tombstones.at[:0]
        deletes = DeleteView(self.tombstones, snap.delete_seq, at)
        parts_rows, parts_scores = [], []
        t_index = time.perf_counter()
        if snap.hnsw is not None and snap.indexed:
            rows, scores = snap.hnsw.search(
                q, k, limit_row=snap.visible, accept=accept, deletes=deletes
            )
            parts_rows.append(rows)
            parts_scores.append(scores)
        t_fresh = time.perf_counter()
        if timeline is not None:
            timeline.end("index")
        # the deletes the index search saw (its marks may be newer than the snapshot)
        accept = _without_deleted(accept, deletes)
        rows, scores = scan(snap.blocks, q, snap.indexed, snap.visible, k, accept)
        parts_rows.append(rows)
        parts_scores.append(scores)
        t_merge = time.perf_counter()
        if timeline is not None:
            timeline.end("fresh")
        rows = np.concatenate(parts_rows)
        scores = np.concatenate(parts_scores)
        keep = rows < snap.visible
        rows, scores = rows[keep], scores[keep]
        rows, first = np.unique(rows, return_index=True)
        scores = scores[first]
        order = np.argsort(-scores, kind="stable")[:k]
        conf = self.confidences.view()
        ts = self.timestamps_us.view()
        ids = snap.ids if snap.ids is not None else self.ids
        contents = snap.contents if snap.contents is not None else self.contents
        for row, score in zip(rows[order].tolist(), scores[order].tolist(), strict=True):
            if min_score is not None and score < min_score:
                break
            m = out.results.add(
                id=ids[row],
                content=contents[row],
                score=score,
                confidence=float(conf[row]),
                lsn=row + 1,
            )
            m.when.FromMicroseconds(int(ts[row]))
        done = time.perf_counter()
        if timeline is not None:
            timeline.end("merge")
        out.metadata.latency_us = int((done - started) * 1e6)
        out.metadata.index_us = int((t_fresh - t_index) * 1e6)
        out.metadata.fresh_us = int((t_merge - t_fresh) * 1e6)
        return out

    def scan_ids(self, chunk: int) -> list[tuple[list[str], list[int]]]:
        """Every visible id that is not deleted, in LSN order, in chunks of (ids, lsns)."""
        visible = self.visible
        out = []
        for lo in range(0, visible, chunk):
            hi = min(lo + chunk, visible)
            ids = self.ids[lo:hi]
            rows = np.arange(lo, hi)
            dead = self.tombstones.deleted(rows)
            if dead.any():
                live = np.flatnonzero(~dead)
                ids = [ids[i] for i in live.tolist()]
                rows = rows[live]
            if ids:
                out.append((ids, (rows + 1).tolist()))
        return out


def _without_deleted(
    accept: Callable[[np.ndarray], np.ndarray] | None, deletes: DeleteView
) -> Callable[[np.ndarray], np.ndarray] | None:
    """``accept`` that also drops the rows ``deletes`` sees deleted."""
    if not deletes.seq:
        return accept
    if accept is None:
        return deletes.live
    rows_ok = accept

    def both(rows: np.ndarray) -> np.ndarray:
        return rows_ok(rows) & deletes.live(rows)

    return both
