"""The shard's gRPC service (``engram.internal.v1.Shard``), called by gateways.

``Append`` keeps one stream per client session: requests are started in arrival order (LSNs and
WAL records in that order) and answered in the same order as each becomes durable, so a gateway
can keep many batches in flight. Errors are answered in-band per batch; the stream stays open.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import AsyncIterator

import grpc
from opentelemetry.trace import Span

from engram.common import metrics, tracing
from engram.common.threads import name_os_thread
from engram.contract.errors import (
    EngramError,
    NotOwnerError,
    OverloadedError,
    SessionError,
    abort_details,
    grpc_status,
)
from engram.internal.v1 import shard_pb2 as ipb
from engram.internal.v1 import shard_pb2_grpc
from engram.shard import admission, retention
from engram.shard.backup import BackupRpcs
from engram.shard.delete_rpc import DeleteRpcs
from engram.shard.move_rpcs import MoveRpcs
from engram.shard.node import ShardNode
from engram.shard.ownership import MOVED
from engram.shard.recall_rpc import RecallRpcs
from engram.shard.space import AppendResult
from engram.v1 import streaming_pb2 as pb

log = logging.getLogger("engram.shard.service")

_END = object()


class ShardService(RecallRpcs, MoveRpcs, BackupRpcs, DeleteRpcs, shard_pb2_grpc.ShardServicer):
    def __init__(self, node: ShardNode) -> None:
        self.node = node
        self._streams: set[asyncio.Queue[object]] = set()
        self._loop = asyncio.get_running_loop()
        self._level = admission.NORMAL
        node.admission.listeners.append(self._on_level)
        # recalls scan with numpy and hnswlib outside the GIL; two at a time (the default) keep
        # both cores busy without starving acks and indexing (four measured no better)
        self._recall_pool = concurrent.futures.ThreadPoolExecutor(
            node.settings.shard.recall_workers,
            thread_name_prefix="recall",
            initializer=name_os_thread,
        )
        self._recall_slots = threading.BoundedSemaphore(node.settings.shard.recall_workers)
        self._last_slow_log = 0.0
        self._recalls: dict[str, int] = {}  # recalls served per space (load, for rebalancing)

    def _on_level(self, snap: admission.Snapshot) -> None:
        """Admission level changed (any thread): push a status to every Append stream."""
        self._loop.call_soon_threadsafe(self._broadcast, snap)

    def _broadcast(self, snap: admission.Snapshot) -> None:
        rising = snap.level > self._level
        self._level = snap.level
        name = admission.LEVEL_NAMES[snap.level]
        for space in self.node.spaces:
            metrics.backpressure_state.labels(space).set(snap.level)
            if rising:
                metrics.backpressure_activations_total.labels(space, name).inc()
        log.info(
            "admission level %s (pressure %.2f, %d of %d bytes; latency pressure %.2f)",
            name,
            snap.pressure,
            snap.memory_bytes,
            snap.budget_bytes,
            snap.latency_pressure,
        )
        metrics.shard_memory_bytes.set(snap.memory_bytes)
        metrics.shard_pressure.set(snap.pressure)
        status = status_message(snap)
        for queue in self._streams:
            queue.put_nowait(ipb.AppendResponse(status=status))

    async def Append(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[ipb.AppendRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ipb.AppendResponse]:
        results: asyncio.Queue[object] = asyncio.Queue()
        self._streams.add(results)
        snap = self.node.admission.snapshot()
        if snap.level != admission.NORMAL:
            results.put_nowait(ipb.AppendResponse(status=status_message(snap)))

        async def intake() -> None:
            try:
                async for req in request_iterator:
                    results.put_nowait((req.sequence_number, self._begin(req)))
            finally:
                results.put_nowait(_END)

        task = asyncio.create_task(intake())
        try:
            while True:
                item = await results.get()
                if item is _END:
                    break
                if isinstance(item, ipb.AppendResponse):
                    yield item
                    continue
                seq, fut = item  # type: ignore[misc]
                yield await _answer(seq, fut)
        finally:
            self._streams.discard(results)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _begin(self, req: ipb.AppendRequest) -> asyncio.Future[AppendResult] | EngramError:
        span = None
        if req.traceparent and tracing.active:  # the gateway traces this batch
            span = tracing.start("engram.shard.append", tracing.parent_from(req.traceparent))
        try:
            self.node.drops.check(req.memory_space_id, req.session_id)
            space = self.node.space(req.memory_space_id, create=False)
            if space is not None and req.epoch > self.node.placement.epoch(space.name):
                raise NotOwnerError(
                    f"shard {self.node.shard_id} holds memory space {space.name!r} at epoch "
                    f"{self.node.placement.epoch(space.name)}, the gateway routed at {req.epoch}"
                )
            if space is None:
                raise SessionError(
                    f"memory space {req.memory_space_id!r} has no session open on this shard"
                )
            if span is None:
                return space.begin_append(req.session_id, req.sequence_number, req.batch)
            span.set_attributes(
                {
                    "engram.memory_space": space.name,
                    "engram.session": req.session_id,
                    "engram.sequence": req.sequence_number,
                    "engram.pressure_level": self._level,
                }
            )
            timeline = tracing.Timeline()
            fut = space.begin_append(req.session_id, req.sequence_number, req.batch, timeline)
            return asyncio.ensure_future(_traced(span, timeline, fut))
        except EngramError as exc:
            if span is not None:
                tracing.fail(span, exc)
            return exc

    async def OpenSession(  # noqa: N802
        self, request: ipb.OpenSessionRequest, context: grpc.aio.ServicerContext
    ) -> ipb.OpenSessionResponse:
        try:
            self.node.drops.check(request.memory_space_id, request.session_id)
            if request.create and request.memory_space_id not in self.node.spaces:
                await self.node.placement.refresh_incomplete()
            space = self.node.space(request.memory_space_id, create=request.create)
            if space is None:
                return ipb.OpenSessionResponse(
                    error=pb.StreamError(
                        code=pb.UNKNOWN_SESSION,
                        message=f"session {request.session_id!r} is unknown in memory space "
                        f"{request.memory_space_id!r}",
                    )
                )
            mark = await space.open_session(request.session_id, request.create)
            return ipb.OpenSessionResponse(last_sequence=mark, dim=space.dim)
        except EngramError as exc:
            return ipb.OpenSessionResponse(error=exc.to_proto())

    async def Scan(  # noqa: N802
        self, request: ipb.ScanRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ListObservationsResponse]:
        try:
            space = self.node.space(request.memory_space_id, create=False)
        except EngramError as exc:
            await context.abort(grpc_status(exc), abort_details(exc))
        if space is None:
            return
        for ids, lsns in space.scan_ids(request.chunk_size or 10_000):
            yield pb.ListObservationsResponse(ids=ids, lsns=lsns, dim=space.dim)

    async def DropSpace(  # noqa: N802
        self, request: ipb.ShardDropRequest, context: grpc.aio.ServicerContext
    ) -> ipb.ShardDropResponse:
        """Drops the space here (:mod:`engram.shard.drop`); its Append streams and sessions
        are answered SPACE_DROPPED from then on."""
        try:
            observations = await self.node.drops.drop(request.memory_space_id)
        except EngramError as exc:
            return ipb.ShardDropResponse(error=exc.to_proto())
        self._recalls.pop(request.memory_space_id, None)
        return ipb.ShardDropResponse(observations=observations)

    async def SetRetention(  # noqa: N802
        self, request: ipb.ShardRetentionRequest, context: grpc.aio.ServicerContext
    ) -> ipb.ShardRetentionResponse:
        """Sets a space's retention once durable (:mod:`engram.shard.retention`); a space not
        created yet is created (empty), so a retention can be set before the first write."""
        try:
            if request.memory_space_id not in self.node.spaces:
                await self.node.placement.refresh_incomplete()
            space = self.node.space(request.memory_space_id, create=True)
            assert space is not None
            await retention.set_retention(space, request.retention)
            return ipb.ShardRetentionResponse(retention=space.retention)
        except EngramError as exc:
            return ipb.ShardRetentionResponse(error=exc.to_proto())

    async def Stats(  # noqa: N802
        self, request: ipb.StatsRequest, context: grpc.aio.ServicerContext
    ) -> ipb.StatsResponse:
        out = ipb.StatsResponse(shard_id=self.node.shard_id)
        if not self.node.ready:
            return out
        node = self.node
        for name, space in sorted(node.spaces.items()):
            owner = node.ownership.get(name)
            moving = node.outgoing.get(name)
            out.spaces.add(
                memory_space_id=name,
                dim=space.dim,
                count=space.live_count,
                indexed=space.visible - space.backlog(),
                checkpoint_lsn=space.checkpoint_rows,
                sessions=space.session_count,
                epoch=owner.epoch if owner else 0,
                state="fenced" if space.fenced_why else "owned",
                recalls=self._recalls.get(name, 0),
                bytes=space.disk_bytes(),
                move_id=moving.move_id if moving else "",
                peer=moving.target if moving else -1,
            )
        for name, incoming in sorted(node.incoming.items()):
            out.spaces.add(
                memory_space_id=name,
                state="incoming",
                epoch=incoming.epoch,
                move_id=incoming.move_id,
                peer=incoming.source,
                move_phase=incoming.phase,
                count=incoming.space.visible if incoming.space is not None else 0,
            )
        for name, owner in node.ownership.items():
            if owner.state == MOVED:
                out.moved.add(memory_space_id=name, owner=owner.peer, epoch=owner.epoch)
        return out


def status_message(snap: admission.Snapshot) -> pb.StreamStatus:
    if snap.level == admission.NORMAL:
        state = pb.StreamStatus.ACTIVE
    elif snap.level == admission.OVERLOADED:
        state = pb.StreamStatus.OVERLOADED
    else:
        state = pb.StreamStatus.BACKPRESSURE
    name = admission.LEVEL_NAMES[snap.level]
    latency = ""
    if snap.latency_pressure >= admission.THRESHOLDS[admission.WARNING]:
        ratio = snap.latency_pressure / admission.LATENCY_SCALE
        latency = f"; recall latency or visibility lag at {ratio:.2f} of its bound"
    return pb.StreamStatus(
        state=state,
        level=snap.level,
        pressure=snap.pressure,
        message=f"shard pressure {name} ({snap.pressure:.2f}): "
        f"{snap.memory_bytes >> 20} of {snap.budget_bytes >> 20} MiB un-indexed data{latency}",
        queue_depth=sum(n for n, _ in snap.intake.values()),
        recommended_batch_size=admission.RECOMMENDED_BATCH[snap.level],
        retry_after_ms=snap.retry_after_ms,
    )


async def _traced(
    span: Span, timeline: tracing.Timeline, fut: asyncio.Future[AppendResult]
) -> AppendResult:
    """``fut``'s result, after ending the batch's span with a child span per step."""
    try:
        r = await fut
    except EngramError as exc:
        tracing.fail(span, exc)
        raise
    except BaseException:  # cancelled: the gateway's stream went away
        span.end()
        raise
    tracing.end_steps(span, timeline, "engram.shard.")
    span.set_attributes(
        {
            "engram.batch.size": r.count,
            "engram.lsn.first": r.first_lsn,
            "engram.duplicate": r.duplicate,
        }
    )
    span.end()
    return r


def _rejected(seq: int, exc: OverloadedError) -> ipb.AppendResponse:
    return ipb.AppendResponse(
        sequence_number=seq,
        rejected=True,
        retry_after_ms=exc.retry_after_ms,
        reject_reason=exc.reason,
        error=exc.to_proto(),
    )


async def _answer(seq: int, fut: asyncio.Future[AppendResult] | EngramError) -> ipb.AppendResponse:
    if isinstance(fut, OverloadedError):
        return _rejected(seq, fut)
    if isinstance(fut, EngramError):
        return ipb.AppendResponse(sequence_number=seq, error=fut.to_proto())
    try:
        r = await fut
    except EngramError as exc:
        return ipb.AppendResponse(sequence_number=seq, error=exc.to_proto())
    return ipb.AppendResponse(
        sequence_number=r.sequence_number,
        first_lsn=r.first_lsn,
        count=r.count,
        duplicate=r.duplicate,
        committed_at_us=r.committed_at_us,
        first_id=r.first_id,
    )
