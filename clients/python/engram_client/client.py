"""The client's streams: batching, credits, acks, in-stream recall, resume after disconnect.

An :class:`ObservationStream` keeps every batch it sent until the server acknowledges it as
durable. When the connection drops (or the server asks for a resync) it opens a new stream with
the same session id; the server's init ack names the last durable sequence number, batches up to
it are settled, and the rest are resent in order — no duplicate, no gap. A batch the server
refuses for good (bad input) fails its own future only; later batches are renumbered so the
session's sequence stays gap-free.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
import numpy as np

from engram.contract.errors import from_proto
from engram.v1 import streaming_pb2 as pb
from engram.v1 import streaming_pb2_grpc
from engram_client.connection import (
    TLS,
    AuthorizedStub,
    key_metadata,
    open_channel,
)
from engram_client.errors import (
    EngramError,
    SessionError,
    StreamFailedError,
    UnavailableError,
    ValidationError,
    from_rpc_error,
)
from engram_client.forgetting import (
    DeleteResult,
    Retention,
    delete_request,
    delete_result,
    retention,
)

log = logging.getLogger("engram_client")

_TOO_LARGE = re.compile(r"larger than max \((\d+) vs\. (\d+)\)")


@dataclass(frozen=True)
class Ack:
    sequence_number: int
    first_lsn: int
    count: int
    duplicate: bool
    memory_id: str


@dataclass(frozen=True)
class Hit:
    id: str
    content: str
    score: float
    confidence: float
    when_us: int
    lsn: int


@dataclass(frozen=True)
class RecallResult:
    hits: list[Hit]
    snapshot_sequence: int  # the space LSN the results were computed at
    latency_us: int
    consistency: str = "BOUNDED"
    staleness_us: int = 0  # age of the oldest durable write not in the snapshot
    waited_us: int = 0  # time the server waited for the snapshot to meet the level
    chunks: int = 1


def _result(
    hits: list[Hit], last: pb.RecallResponse | pb.StreamingRecallResponse, chunks: int
) -> RecallResult:
    m = last.metadata
    return RecallResult(
        hits,
        last.snapshot_sequence,
        m.latency_us,
        pb.Consistency.Name(m.consistency or pb.BOUNDED),
        m.staleness_us,
        m.waited_us,
        chunks,
    )


def recall_request(
    cue: np.ndarray | Sequence[float],
    k: int,
    *,
    min_score: float | None = None,
    consistency: str | int = "BOUNDED",
    deadline_ms: int = 0,
    since_us: int | None = None,
    until_us: int | None = None,
    min_confidence: float | None = None,
    chunk_size: int = 0,
) -> pb.RecallRequest:
    level = (
        pb.Consistency.Value(consistency.upper()) if isinstance(consistency, str) else consistency
    )
    req = pb.RecallRequest(
        cue=np.asarray(cue, dtype=np.float32).tolist(),
        k=k,
        consistency=level,
        deadline_ms=deadline_ms,
        chunk_size=chunk_size,
    )
    for name, value in (
        ("min_score", min_score),
        ("since_us", since_us),
        ("until_us", until_us),
        ("min_confidence", min_confidence),
    ):
        if value is not None:
            setattr(req, name, value)
    return req


@dataclass(frozen=True)
class StreamEvent:
    """Something the application may want to know: kind is 'connected', 'resumed',
    'disconnected', 'status' (a pushed StreamStatus: backpressure level, pause, ...),
    'rejected' (a batch refused for now; the stream resends it after retry-after) or 'error'."""

    kind: str
    detail: str
    status: pb.StreamStatus | None = None


@dataclass
class _Pending:
    batch: pb.ObservationBatch
    future: asyncio.Future[Ack]
    sent_at: float = 0.0


def _hits(results: Sequence[pb.Memory]) -> list[Hit]:
    return [
        Hit(m.id, m.content, m.score, m.confidence, m.when.ToMicroseconds(), m.lsn) for m in results
    ]


def make_batch(
    vectors: np.ndarray,
    *,
    ids: Sequence[str] | None = None,
    contents: Sequence[str] | None = None,
    confidences: np.ndarray | Sequence[float] | None = None,
    timestamps_us: np.ndarray | Sequence[int] | None = None,
    priority: int = pb.PRIORITY_NORMAL,
) -> pb.ObservationBatch:
    """Packs numpy vectors (n x dim) and their metadata into one batch message."""
    arr = np.ascontiguousarray(vectors, dtype="<f4")
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array (n x dim), got shape {arr.shape}")
    b = pb.ObservationBatch(dim=arr.shape[1], vectors=arr.tobytes(), priority=priority)
    if ids is not None:
        b.ids.extend(ids)
    if contents is not None:
        b.contents.extend(contents)
    if confidences is not None:
        b.confidences = np.asarray(confidences, dtype="<f4").tobytes()
    if timestamps_us is not None:
        b.timestamps_us = np.asarray(timestamps_us, dtype="<i8").tobytes()
    return b


class EngramClient:
    """A connection to a gateway.

    ``target`` is its ``host:port``. ``api_key`` (``ek_...``) is sent on every call as
    ``authorization: Bearer`` metadata; ``tls`` is False (plaintext), True (TLS, the system's
    CAs) or a :class:`~engram_client.TLS` (a CA file, a client certificate); see
    :mod:`engram_client.connection`. The channel is made with :data:`CHANNEL_OPTIONS`, or pass a
    ``channel`` of your own (interceptors, other options), which the client uses as it is
    (``tls`` must then be left unset) and leaves open on :meth:`close`.
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        *,
        api_key: str | None = None,
        tls: TLS | bool = False,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        if channel is not None and tls is not False:
            raise ValueError("pass tls= or a channel of your own, not both")
        metadata = key_metadata(api_key) if api_key is not None else None  # checked first
        self.target = target
        self._owns_channel = channel is None
        self._channel = channel or open_channel(target, tls)
        stub = streaming_pb2_grpc.EngramStreamStub(self._channel)
        if metadata is not None:
            stub = cast(streaming_pb2_grpc.EngramStreamStub, AuthorizedStub(stub, metadata))
        self.stub = stub

    async def __aenter__(self) -> EngramClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_channel:
            await self._channel.close()

    async def open_stream(
        self,
        space: str,
        *,
        session_id: str = "",
        on_event: Callable[[StreamEvent], None] | None = None,
        reconnect_timeout_s: float = 120.0,
        target_latency_ms: float = 50.0,
    ) -> ObservationStream:
        """Opens (or, with ``session_id``, resumes) a session on ``space``.

        ``target_latency_ms``: the stream keeps as many batches in flight as the server's
        credits allow while acks come back within this, and fewer when they do not (acks wait
        behind in-flight batches, so in-flight depth is what makes writes slow to be visible).
        0 always uses every credit.
        """
        stream = ObservationStream(
            self, space, session_id, on_event, reconnect_timeout_s, target_latency_ms
        )
        await stream._start()
        return stream

    async def recall(
        self,
        space: str,
        cue: np.ndarray | Sequence[float],
        k: int = 10,
        min_score: float | None = None,
        timeout: float = 10.0,  # noqa: ASYNC109 (a gRPC deadline, passed through)
        *,
        session_id: str = "",
        **options: Any,
    ) -> RecallResult:
        """Standalone recall. ``options``: consistency ("EVENTUAL", "BOUNDED", "SESSION" with
        ``session_id``, "STRONG"), deadline_ms, since_us, until_us, min_confidence, chunk_size."""
        r = recall_request(cue, k, min_score=min_score, **options)
        req = pb.StreamingRecallRequest(
            memory_space_id=space,
            session_id=session_id,
            cue=r.cue,
            max_results=k,
            consistency=r.consistency,
            deadline_ms=r.deadline_ms,
            chunk_size=r.chunk_size,
        )
        for name in ("min_score", "since_us", "until_us", "min_confidence"):
            if r.HasField(name):
                setattr(req, name, getattr(r, name))
        hits: list[Hit] = []
        last = pb.StreamingRecallResponse()
        chunks = 0
        try:
            async for chunk in self.stub.RecallStream(req, timeout=timeout):
                hits.extend(_hits(chunk.results))
                last, chunks = chunk, chunks + 1
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "the gateway") from None
        return _result(hits, last, chunks)

    async def list_observations(self, space: str) -> AsyncIterator[tuple[list[str], list[int]]]:
        """Every observation id in ``space`` with its LSN, in chunks."""
        req = pb.ListObservationsRequest(memory_space_id=space)
        try:
            async for chunk in self.stub.ListObservations(req, timeout=300):
                yield list(chunk.ids), list(chunk.lsns)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "the gateway") from None

    async def list_ids(self, space: str) -> list[str]:
        """Every observation id in ``space``, in LSN order."""
        return [i async for ids, _ in self.list_observations(space) for i in ids]

    async def delete(
        self,
        space: str,
        ids: Sequence[str] = (),
        *,
        since_us: int | None = None,
        until_us: int | None = None,
        request_id: str = "",
        timeout: float = 60.0,  # noqa: ASYNC109 (a gRPC deadline, passed through)
    ) -> DeleteResult:
        """Deletes observations by id and/or time range (``write`` scope); returns once the
        delete is durable: no recall after it returns them (see :mod:`engram_client.forgetting`)."""
        req = delete_request(
            space, ids, since_us=since_us, until_us=until_us, request_id=request_id
        )
        return delete_result(await self._unary(self.stub.Delete, req, timeout))

    async def drop_space(self, space: str, timeout: float = 60.0) -> int:  # noqa: ASYNC109
        """Drops ``space`` and everything in it (``admin`` scope); returns how many observations
        it held (0: there was no such space). A new session on the name starts it empty."""
        req = pb.DropSpaceRequest(memory_space_id=space)
        return int((await self._unary(self.stub.DropSpace, req, timeout)).observations)

    async def set_retention(
        self,
        space: str,
        *,
        max_age_s: int = 0,
        max_rows: int = 0,
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> Retention:
        """Sets ``space``'s retention (``admin`` scope); both 0 clears it. Returns it as set."""
        req = pb.SetRetentionRequest(
            memory_space_id=space, retention=pb.Retention(max_age_s=max_age_s, max_rows=max_rows)
        )
        return retention((await self._unary(self.stub.SetRetention, req, timeout)).retention)

    async def _unary(self, method: Any, request: Any, timeout: float) -> Any:  # noqa: ASYNC109
        try:
            return await method(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "the gateway") from None


class ObservationStream:
    def __init__(
        self,
        client: EngramClient,
        space: str,
        session_id: str,
        on_event: Callable[[StreamEvent], None] | None,
        reconnect_timeout_s: float,
        target_latency_ms: float = 50.0,
    ) -> None:
        self._client = client
        self.space = space
        self.session_id = session_id
        self.dim = 0
        self.last_acked = 0
        self.max_in_flight = 8
        self.reconnects = 0
        self._target_s = target_latency_ms / 1000
        self._depth = 2.0  # latency-driven window (AIMD on ack latency)
        self._ack_latency = 0.0  # EWMA, seconds
        self._on_event = on_event
        self._reconnect_timeout = reconnect_timeout_s
        self._next_seq = 1
        self._pending: dict[int, _Pending] = {}
        self._recalls: dict[str, tuple[pb.RecallRequest, asyncio.Future[RecallResult]]] = {}
        self._recall_parts: dict[str, list[pb.RecallResponse]] = {}
        self._deletes: dict[str, tuple[pb.DeleteRequest, asyncio.Future[DeleteResult]]] = {}
        self._rid = itertools.count(1)
        self._call: grpc.aio.StreamStreamCall | None = None
        self._write_lock = asyncio.Lock()
        self._room = asyncio.Condition()
        self._connected = asyncio.Event()
        self._resync = asyncio.Event()
        self._drain_below = 0  # after a refusal: resync once every earlier batch is answered
        self._closing = False
        self._fatal: BaseException | None = None
        self._rejected: set[int] = set()
        self._resend_at = 0.0
        self._resender: asyncio.Task[None] | None = None
        self.status = pb.StreamStatus(state=pb.StreamStatus.ACTIVE)
        self.rejections = 0
        self._runner: asyncio.Task[None] | None = None
        self._first = asyncio.get_running_loop().create_future()

    # ---------------------------------------------------------------- public

    async def send(
        self,
        vectors: np.ndarray,
        *,
        ids: Sequence[str] | None = None,
        contents: Sequence[str] | None = None,
        confidences: np.ndarray | Sequence[float] | None = None,
        timestamps_us: np.ndarray | Sequence[int] | None = None,
    ) -> asyncio.Future[Ack]:
        """Queues one batch (waiting for a credit); the returned future resolves when durable."""
        batch = make_batch(
            vectors,
            ids=ids,
            contents=contents,
            confidences=confidences,
            timestamps_us=timestamps_us,
        )
        return await self.send_batch(batch)

    async def send_batch(self, batch: pb.ObservationBatch) -> asyncio.Future[Ack]:
        self._raise_if_fatal()
        async with self._room:
            await self._room.wait_for(
                lambda: len(self._pending) < self._window() or self._fatal is not None
            )
        self._raise_if_fatal()
        seq = self._next_seq
        self._next_seq += 1
        fut: asyncio.Future[Ack] = asyncio.get_running_loop().create_future()
        p = _Pending(batch, fut, time.perf_counter())
        self._pending[seq] = p
        async with self._write_lock:
            call = self._call
            if call is not None and self._pending.get(seq) is p:
                p.sent_at = time.perf_counter()
                with contextlib.suppress(Exception):  # a broken call is resumed by the runner
                    await call.write(self._request(seq, p))
        return fut

    async def flush(self) -> None:
        """Waits until every batch sent so far is acknowledged (or failed)."""
        futures = [p.future for p in self._pending.values()]
        if futures:
            await asyncio.wait(futures)
        self._raise_if_fatal()

    async def recall(
        self,
        cue: np.ndarray | Sequence[float],
        k: int = 10,
        min_score: float | None = None,
        **options: Any,
    ) -> RecallResult:
        """Recall on this stream (SESSION consistency reads this session's writes).
        ``options`` as for :meth:`EngramClient.recall`."""
        self._raise_if_fatal()
        rid = f"r{next(self._rid)}"
        req = recall_request(cue, k, min_score=min_score, **options)
        req.request_id = rid
        fut: asyncio.Future[RecallResult] = asyncio.get_running_loop().create_future()
        self._recalls[rid] = (req, fut)
        self._recall_parts[rid] = []
        async with self._write_lock:
            if self._call is not None:
                with contextlib.suppress(Exception):
                    await self._call.write(pb.ObservationRequest(recall=req))
        return await fut

    async def delete(
        self,
        ids: Sequence[str] = (),
        *,
        since_us: int | None = None,
        until_us: int | None = None,
    ) -> DeleteResult:
        """Deletes observations of this stream's space by id and/or time range (``write``
        scope). The server applies it after every batch sent before it is durable, so this
        stream's own writes can be deleted at once; returns once the delete is durable."""
        self._raise_if_fatal()
        rid = f"d{next(self._rid)}"
        req = delete_request("", ids, since_us=since_us, until_us=until_us, request_id=rid)
        fut: asyncio.Future[DeleteResult] = asyncio.get_running_loop().create_future()
        self._deletes[rid] = (req, fut)
        async with self._write_lock:
            if self._call is not None:
                with contextlib.suppress(Exception):  # a reconnect sends it again
                    await self._call.write(pb.ObservationRequest(delete=req))
        return await fut

    async def close(self) -> None:
        """Waits for outstanding acks, then ends the stream."""
        with contextlib.suppress(Exception):
            await self.flush()
        self._closing = True
        async with self._write_lock:
            if self._call is not None:
                with contextlib.suppress(Exception):
                    await self._call.write(
                        pb.ObservationRequest(close=pb.StreamClose(drain_queue=True))
                    )
                    await self._call.done_writing()
        if self._runner is not None:
            self._runner.cancel()
            await asyncio.gather(self._runner, return_exceptions=True)

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def _window(self) -> int:
        """Credits in use: all of them when calm, half under backpressure, one when
        overloaded or while refused batches wait for their retry-after."""
        state = self.status.state
        if self._rejected or state == pb.StreamStatus.OVERLOADED:
            return 1
        credits = self.max_in_flight
        if state == pb.StreamStatus.BACKPRESSURE:
            credits = max(1, credits // 2)
        if self._target_s <= 0:
            return credits
        # at least two in flight: one batch is always on the wire while the other is acked
        return max(min(2, credits), min(credits, int(self._depth)))

    def _adapt(self, latency: float) -> None:
        """Additive increase while acks are fast, multiplicative decrease when slow."""
        a = self._ack_latency
        self._ack_latency = latency if a == 0 else 0.8 * a + 0.2 * latency
        if self._ack_latency > self._target_s:
            self._depth = max(1.0, self._depth * 0.7)
        elif self._ack_latency < self._target_s / 2:
            self._depth = min(float(self.max_in_flight), self._depth + 1 / max(1.0, self._depth))

    # -------------------------------------------------------------- internals

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    def _emit(self, kind: str, detail: str, status: pb.StreamStatus | None = None) -> None:
        if self._on_event is not None:
            self._on_event(StreamEvent(kind, detail, status))

    def _request(self, seq: int, p: _Pending) -> pb.ObservationRequest:
        return pb.ObservationRequest(
            memory_space_id=self.space,
            session_id=self.session_id,
            sequence_number=seq,
            batch=p.batch,
        )

    async def _start(self) -> None:
        self._runner = asyncio.create_task(self._run_guarded())
        await self._first

    async def _run_guarded(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            # e.g. EngramClient.close() with batches in flight
            if self._pending or self._recalls or self._deletes:
                self._fail_all(UnavailableError("the stream was closed before they were answered"))
            raise
        except Exception as exc:  # a bug must not leave callers waiting forever
            log.exception("stream runner failed")
            self._fail_all(StreamFailedError(f"client stream failed: {exc!r}"))

    async def _connect(self) -> grpc.aio.StreamStreamCall:
        call = self._client.stub.ObserveStream()
        init = pb.ObservationRequest(
            memory_space_id=self.space, session_id=self.session_id, init=pb.StreamInit()
        )
        await call.write(init)
        resp = await call.read()
        if resp is grpc.aio.EOF:
            raise UnavailableError("the gateway ended the stream during init")
        if resp.HasField("error"):
            call.cancel()
            raise from_proto(resp.error)
        ack = resp.init_ack
        resumed = bool(self.session_id)
        self.session_id = ack.session_id
        self.dim = ack.dim or self.dim
        self.max_in_flight = max(1, ack.max_in_flight_batches or self.max_in_flight)
        durable = ack.initial_sequence
        if not self._first.done():
            self._next_seq = max(self._next_seq, durable + 1)
        for seq in sorted(s for s in self._pending if s <= durable):
            p = self._pending.pop(seq)
            if not p.future.done():
                p.future.set_result(Ack(seq, 0, 0, True, ""))
        self.last_acked = max(self.last_acked, durable)
        self._rejected.clear()
        async with self._write_lock:
            self._call = call
            for seq, p in sorted(self._pending.items()):
                await call.write(self._request(seq, p))
            for rid, (req, _fut) in self._recalls.items():
                self._recall_parts[rid] = []  # asked again: drop chunks of the lost answer
                await call.write(pb.ObservationRequest(recall=req))
            for delete, _fut in self._deletes.values():  # after the batches it follows
                await call.write(pb.ObservationRequest(delete=delete))
        async with self._room:
            self._room.notify_all()
        self._emit(
            "resumed" if resumed else "connected",
            f"session {self.session_id}, durable up to {durable}",
        )
        return call

    async def _run(self) -> None:
        backoff = 0.05
        down_since: float | None = None
        while True:
            try:
                call = await self._connect()
            except (grpc.aio.AioRpcError, EngramError) as exc:
                # a call refused as a whole (no key, a wrong one, TLS) is typed like in-band
                err = exc if isinstance(exc, EngramError) else from_rpc_error(exc, "the gateway")
                if not err.retryable or (
                    down_since and time.monotonic() - down_since > self._reconnect_timeout
                ):
                    self._fail_all(err)
                    return
                down_since = down_since or time.monotonic()
                self._emit("disconnected", f"connect failed: {_describe(exc)}; retrying")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            if not self._first.done():
                self._first.set_result(None)
            backoff, down_since = 0.05, None
            self._resync.clear()
            why = "stream ended"
            try:
                while True:
                    resp = await call.read()  # not `async for`: init used read() on this call
                    if resp is grpc.aio.EOF:
                        break
                    self._on_response(resp)
                    if self._resync.is_set():
                        why = "resync requested"
                        break
            except grpc.aio.AioRpcError as exc:
                why = _describe(exc)
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self._refuse_oversized(exc.details() or "")
            async with self._write_lock:
                self._call = None
            call.cancel()
            if self._closing:
                return
            self.reconnects += 1
            down_since = time.monotonic()
            self._emit("disconnected", f"{why}; resuming session {self.session_id}")
            await asyncio.sleep(0.01 if self._resync.is_set() else backoff)

    def _fail_all(self, exc: EngramError) -> None:
        self._fatal = exc
        if not self._first.done():
            self._first.set_exception(exc)
        for p in self._pending.values():
            if not p.future.done():
                p.future.set_exception(exc)
        self._pending.clear()
        for _req, fut in self._recalls.values():
            if not fut.done():
                fut.set_exception(exc)
        self._recalls.clear()
        for _delete, fut in self._deletes.values():
            if not fut.done():
                fut.set_exception(exc)
        self._deletes.clear()
        self._emit("error", str(exc))

    def _on_response(self, resp: pb.ObservationResponse) -> None:
        kind = resp.WhichOneof("result")
        if kind == "ack":
            self._settle(resp.sequence_number, resp.ack)
        elif kind == "recall":
            rid = resp.recall.request_id
            parts = self._recall_parts.setdefault(rid, [])
            parts.append(resp.recall)
            if resp.recall.more_results:
                return
            entry = self._recalls.pop(rid, None)
            self._recall_parts.pop(rid, None)
            if entry is not None and not entry[1].done():
                hits = [h for part in parts for h in _hits(part.results)]
                entry[1].set_result(_result(hits, resp.recall, len(parts)))
        elif kind == "deleted":
            pending = self._deletes.pop(resp.deleted.request_id, None)
            if pending is not None and not pending[1].done():
                pending[1].set_result(delete_result(resp.deleted))
        elif kind == "error":
            self._on_error(resp.sequence_number, resp.error)
        elif kind == "status":
            self.status = resp.status
            self._emit("status", resp.status.message, resp.status)
            self._wake_senders()

    def _settle(self, seq: int, ack: pb.ObservationAck) -> None:
        if ack.status == pb.ObservationAck.REJECTED:
            self._on_rejected(seq, ack.retry_after_ms, ack.message)
            return
        p = self._pending.pop(seq, None)
        self.last_acked = max(self.last_acked, seq)
        if p is not None and not ack.duplicate:
            self._adapt(time.perf_counter() - p.sent_at)
        if p is not None and not p.future.done():
            p.future.set_result(Ack(seq, ack.first_lsn, ack.count, ack.duplicate, ack.memory_id))
        self._maybe_resync()
        self._wake_senders()

    def _maybe_resync(self) -> None:
        if self._drain_below and not any(s < self._drain_below for s in self._pending):
            self._drain_below = 0
            self._resync.set()

    def _refuse_oversized(self, details: str) -> None:
        m = _TOO_LARGE.search(details)
        if m is None:
            return
        limit = int(m.group(2))
        for seq, p in sorted(self._pending.items(), reverse=True):
            size = self._request(seq, p).ByteSize()
            if size > limit:
                self._refuse(
                    seq,
                    ValidationError(
                        f"a batch of {size} bytes exceeds the message limit of {limit} bytes: "
                        "split it",
                        code=pb.BATCH_TOO_LARGE,
                    ),
                )

    def _refuse(self, seq: int, exc: EngramError) -> None:
        """Fails batch ``seq`` for good and renumbers the later ones (no gap)."""
        failed = self._pending.pop(seq)
        failed.future.set_exception(exc)
        renumbered: dict[int, _Pending] = {}
        for s, p in sorted(self._pending.items()):
            renumbered[s - 1 if s > seq else s] = p
        self._pending = renumbered
        self._next_seq -= 1

    def _on_rejected(self, seq: int, retry_after_ms: int, message: str) -> None:
        """Refused for now (admission control, the key's rate limit): resend this batch (same
        sequence number) after retry-after."""
        if seq not in self._pending:
            return
        self.rejections += 1
        self._rejected.add(seq)
        loop = asyncio.get_running_loop()
        self._resend_at = max(self._resend_at, loop.time() + retry_after_ms / 1000)
        self._emit("rejected", f"batch {seq}: {message}; retry in {retry_after_ms} ms")
        if self._resender is None or self._resender.done():
            self._resender = asyncio.ensure_future(self._resend_rejected())

    async def _resend_rejected(self) -> None:
        loop = asyncio.get_running_loop()
        while self._rejected:
            delay = self._resend_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            async with self._write_lock:
                seqs = sorted(s for s in self._rejected if s in self._pending)
                self._rejected.clear()
                call = self._call
                if call is None:
                    return  # the reconnect resends everything pending
                for seq in seqs:
                    with contextlib.suppress(Exception):
                        await call.write(self._request(seq, self._pending[seq]))
        self._wake_senders()

    def _wake_senders(self) -> None:
        async def notify() -> None:
            async with self._room:
                self._room.notify_all()

        asyncio.ensure_future(notify())

    def _on_error(self, seq: int, err: pb.StreamError) -> None:
        if err.request_id:
            waiting = self._recalls.pop(err.request_id, None) or self._deletes.pop(
                err.request_id, None
            )
            if waiting is not None and not waiting[1].done():
                waiting[1].set_exception(from_proto(err))
            return
        self._emit("error", f"{pb.ErrorCode.Name(err.code)}: {err.message}")
        if err.code in _STREAM_FATAL:  # e.g. the key was revoked: no resume can help
            self._fail_all(from_proto(err))
            return
        if seq == 0 or seq not in self._pending:
            if err.code == pb.UNKNOWN_SESSION:
                self._fail_all(SessionError(err.message))
            return
        if err.code in _RESEND_LATER:  # like a REJECTED ack: same number, after retry-after
            self._on_rejected(seq, err.retry_after_ms or 100, err.message)
            return
        if err.code == pb.SEQUENCE_GAP and self._drain_below:
            return  # a later batch after the refused one: the resync resends it
        if err.code == pb.SEQUENCE_GAP or err.retryable:
            self._resync.set()  # resume: the server's durable mark decides what to resend
            return
        # refused for good: fail this batch only, renumber the later ones, and resync once
        # the batches before it are answered (their acks are on the way)
        self._refuse(seq, from_proto(err))
        self._drain_below = seq
        self._maybe_resync()
        self._wake_senders()


# In-band errors (for a batch or the stream) that end the session for good: the key is not
# valid any more, or does not cover writing to the space.
_STREAM_FATAL = frozenset({pb.UNAUTHENTICATED, pb.PERMISSION_DENIED})
# A batch refused with one of these is resent, same sequence number, after retry_after_ms.
_RESEND_LATER = frozenset({pb.RATE_LIMITED, pb.OVERLOADED})


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
