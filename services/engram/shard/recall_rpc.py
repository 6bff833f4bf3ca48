"""The shard's ``Recall`` RPC (``engram.internal.v1.Shard``), mixed into its service.

Served twice: on the main port by the event loop (:meth:`RecallRpcs.Recall`), and on the recall
port by threads of their own (:meth:`RecallRpcs.recall_blocking`, :mod:`engram.shard.recall_port`),
where a recall does not wait for the loop that receives megabyte batches. Both check the request,
take a snapshot at the requested consistency (a thread that must wait for it hands the wait to
the loop), queue under the queue bound (:mod:`engram.shard.recall_first`) for one of
``ENGRAM_RECALL_WORKERS`` recall workers (on the recall port: that many port threads at once,
each computing its own recall) and answer in chunks of ``chunk_size``, best first. A space this
shard does not hold answers empty (a SESSION recall naming a session: unknown session).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc
import numpy as np
from opentelemetry.trace import Span

from engram.common import tracing, validation
from engram.contract.errors import (
    EngramError,
    SessionError,
    abort_details,
    grpc_status,
    retry_after_metadata,
)
from engram.internal.v1 import shard_pb2 as ipb
from engram.shard.node import ShardNode
from engram.shard.space import Filters, Snapshot, Space
from engram.v1 import streaming_pb2 as pb

log = logging.getLogger("engram.shard.service")


class _Recall:
    """One recall in progress: its request, span and timeline, checked cue and space."""

    def __init__(self, request: ipb.ShardRecallRequest, span: Span | None) -> None:
        self.request = request
        self.r = request.recall
        self.span = span
        self.timeline = tracing.Timeline() if span is not None else None
        self.deadline_s = (self.r.deadline_ms or 5000) / 1000

    def snapshot_taken(self) -> float:
        """Marks the snapshot's end; returns the time the recall starts queueing."""
        if self.timeline is not None:
            self.timeline.end("snapshot")
        return time.perf_counter()


class RecallRpcs:
    node: ShardNode
    _loop: asyncio.AbstractEventLoop
    _recall_pool: concurrent.futures.ThreadPoolExecutor
    _recall_slots: threading.BoundedSemaphore  # as many as the pool's workers, for port threads
    _recalls: dict[str, int]
    _last_slow_log: float

    async def Recall(  # noqa: N802
        self, request: ipb.ShardRecallRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RecallResponse]:
        """Recall at the requested consistency, on the event loop (the main port)."""
        call = _Recall(request, _span(context.invocation_metadata()))
        try:
            space, cue = self._target(call)
            if space is None:
                chunks = self._nothing(call)
            else:
                snap = await space.consistent_snapshot(
                    call.r.consistency, request.session_id, call.deadline_s
                )
                queued_at = call.snapshot_taken()
                entered = self.node.recalls.enter()  # refused beyond the queue bound
                try:
                    out = await self._loop.run_in_executor(
                        self._recall_pool, self._search, call, space, snap, cue, queued_at
                    )
                finally:
                    self.node.recalls.leave(entered)
                chunks = self._answer(call, space, out, queued_at)
        except EngramError as exc:
            if call.span is not None:
                tracing.fail(call.span, exc)
            await context.abort(grpc_status(exc), abort_details(exc), retry_after_metadata(exc))
        for chunk in chunks:
            yield chunk

    def recall_blocking(
        self, request: ipb.ShardRecallRequest, metadata: Sequence[tuple[str, Any]]
    ) -> list[pb.RecallResponse]:
        """As :meth:`Recall`, on a recall port thread: the chunks, or raises EngramError."""
        call = _Recall(request, _span(metadata))
        try:
            space, cue = self._target(call)
            if space is None:
                return self._nothing(call)
            level = call.r.consistency or pb.BOUNDED
            if space.snapshot_target(level, request.session_id) <= space.visible:
                snap = space.snapshot(level)
            else:  # the wait for visibility is the loop's
                waiting = asyncio.run_coroutine_threadsafe(
                    space.consistent_snapshot(level, request.session_id, call.deadline_s),
                    self._loop,
                )
                snap = waiting.result(call.deadline_s + 1.0)
            queued_at = call.snapshot_taken()
            entered = self.node.recalls.enter()
            try:
                with self._recall_slots:  # the port's thread is the worker: no hand-off
                    out = self._search(call, space, snap, cue, queued_at)
            finally:
                self.node.recalls.leave(entered)
            return self._answer(call, space, out, queued_at)
        except EngramError as exc:
            if call.span is not None:
                tracing.fail(call.span, exc)
            raise

    def _target(self, call: _Recall) -> tuple[Space | None, np.ndarray]:
        """The checked cue and the space (None: not held here)."""
        req, r = call.request, call.r
        cue = validation.recall(r, self.node.settings.limits)
        space = self.node.space(req.memory_space_id, create=False)
        if space is None and r.consistency == pb.SESSION and req.session_id:
            raise SessionError(
                f"session {req.session_id!r} is unknown in memory space {req.memory_space_id!r}"
            )
        if space is not None:
            self._recalls[space.name] = self._recalls.get(space.name, 0) + 1
        return space, cue

    @staticmethod
    def _nothing(call: _Recall) -> list[pb.RecallResponse]:
        empty = pb.RecallResponse(request_id=call.r.request_id)
        empty.metadata.consistency = call.r.consistency or pb.BOUNDED
        if call.span is not None:
            call.span.end()
        return [empty]

    @staticmethod
    def _search(
        call: _Recall, space: Space, snap: Snapshot, cue: np.ndarray, queued_at: float
    ) -> pb.RecallResponse:
        """The recall itself, on a recall worker."""
        queued_us = int((time.perf_counter() - queued_at) * 1e6)
        if call.timeline is not None:
            call.timeline.end("queued")
        out = space.recall(snap, cue, call.r.k, Filters.of(call.r), call.timeline)
        out.metadata.queued_us = queued_us
        return out

    def _answer(
        self, call: _Recall, space: Space, out: pb.RecallResponse, queued_at: float
    ) -> list[pb.RecallResponse]:
        self._note_slow(space.name, out, time.perf_counter() - queued_at)
        if call.span is not None and call.timeline is not None:
            _recalled(call.span, call.timeline, space.name, out)
        chunks = split(out, call.r.chunk_size)
        for chunk in chunks:
            chunk.request_id = call.r.request_id
        return chunks

    def _note_slow(self, space: str, out: pb.RecallResponse, total_s: float) -> None:
        """Logs a recall slower than ``ENGRAM_SLOW_RECALL_MS`` (at most one a second)."""
        limit = self.node.settings.shard.slow_recall_ms
        now = time.monotonic()
        if not limit or total_s * 1000 < limit or now - self._last_slow_log < 1.0:
            return
        self._last_slow_log = now
        m = out.metadata
        log.info(
            "slow recall in %s: %.0f ms on the shard = queued %.1f ms + HNSW %.1f ms (%d rows, "
            "including any wait for the builder) + fresh tier %.1f ms (%d rows) + %.1f ms "
            "merge and hand-back",
            space,
            total_s * 1000,
            m.queued_us / 1000,
            m.index_us / 1000,
            m.indexed_count,
            m.fresh_us / 1000,
            m.fresh_count,
            total_s * 1000 - (m.queued_us + m.index_us + m.fresh_us) / 1000,
        )


def _span(metadata: Sequence[tuple[str, Any]] | None) -> Span | None:
    """The recall's span, if the gateway traces it."""
    if not tracing.active:
        return None
    parent = tracing.parent_from_headers(metadata)
    return tracing.start("engram.shard.recall", parent) if parent is not None else None


def _recalled(span: Span, timeline: tracing.Timeline, space: str, out: pb.RecallResponse) -> None:
    tracing.end_steps(span, timeline, "engram.shard.recall.")
    m = out.metadata
    span.set_attributes(
        {
            "engram.memory_space": space,
            "engram.recall.snapshot_lsn": out.snapshot_sequence,
            "engram.recall.indexed_rows": m.indexed_count,
            "engram.recall.fresh_rows": m.fresh_count,
            "engram.recall.results": len(out.results),
        }
    )
    span.end()


def split(out: pb.RecallResponse, chunk_size: int) -> list[pb.RecallResponse]:
    """Incremental results: the best ``chunk_size`` first, then the rest; the last chunk
    carries ``more_results=False``, the snapshot and the timing metadata."""
    results = list(out.results)
    if not chunk_size or len(results) <= chunk_size:
        return [out]
    chunks = []
    for n, lo in enumerate(range(0, len(results), chunk_size)):
        chunk = pb.RecallResponse(results=results[lo : lo + chunk_size], more_results=True)
        chunk.snapshot_sequence = out.snapshot_sequence
        chunk.metadata.CopyFrom(out.metadata)
        chunk.metadata.chunk_index = n
        chunks.append(chunk)
    chunks[-1].more_results = False
    return chunks
