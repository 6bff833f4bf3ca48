"""One client stream on the gateway: init/resume, sequencing, forwarding, acks, recalls.

A stream is a small state machine. Until ``init`` only init is accepted. After it, batches
(and single episodes) are checked, sequenced and forwarded to the owning shard on one internal
``Append`` stream; the shard answers in order once each batch is durable, and those answers
become the client's acks. Sequencing: the next expected number starts at the session's durable
high-water mark + 1; a higher number is a gap (in-band error naming the expected one, nothing
forwarded); a lower one is a duplicate, which the shard re-acknowledges without storing it again.
A message that fails validation consumes no sequence number. Errors caused by one message are
answered in-band and the stream stays open; if the shard becomes unreachable the stream ends
with UNAVAILABLE and the client resumes the session on a new one.

A ``delete`` (by ids and/or a time range) is answered with ``deleted`` once its tombstone is
durable; it is sent to the shard only after every batch this stream forwarded before it is
answered (:class:`~engram.gateway.forget.AnsweredBefore`), so a stream can delete what it has
just written. Its errors are answered in-band with its request_id.

When the space moves, its old owner answers NOT_OWNER from the fence on. The stream keeps every
batch it forwarded until it is answered, so it then follows the space itself (``_reroute``):
it holds new batches back, finds the new owner through the routing table (waiting while the
move commits), reopens the session there and resends, in order, every batch not yet answered;
those the old owner had made durable come back as duplicates. The client sees only a pause.

API keys (:mod:`engram.gateway.auth`): the stream holds its key's principal (given by the
transport from a header, or taken from the first message, an init carrying ``api_key``). Scopes
are checked per message and refused in-band (init: read or write on the space; batches and
deletes: write; recalls: read; a resumed session of a space the key does not cover is refused
without naming that space); a batch over the key's observations/s budget is REJECTED like an
admission refusal (``key_rate_limit``); a key revoked or expired meanwhile ends the stream at
its next message.

Shards are reached only through ``GatewayContext.shards`` (:mod:`engram.gateway.shards`) and
the control plane through ``GatewayContext.store``, so tests drive :meth:`ClientStream.run`
against in-memory implementations of both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.context import Context
from opentelemetry.trace import Span

from engram.common import metrics, tracing, validation
from engram.contract.errors import (
    AuthenticationError,
    EngramError,
    FlowControlError,
    PermissionDeniedError,
    RateLimitedError,
    SequenceError,
    SessionError,
    UnavailableError,
    ValidationError,
    from_proto,
)
from engram.control.store import SessionRecord
from engram.gateway import auth, forget
from engram.gateway.auth import Principal
from engram.gateway.context import GatewayContext
from engram.gateway.flow import TokenBucket
from engram.gateway.shards import AppendStream
from engram.internal.v1 import shard_pb2 as ipb
from engram.v1 import streaming_pb2 as pb

log = logging.getLogger("engram.gateway.stream")

_SESSION_UPDATE_S = 0.5
# How long a stream follows a moving space (NOT_OWNER) before it ends with UNAVAILABLE.
_REROUTE_S = 30.0
_LANE_NAMES = {pb.PRIORITY_HIGH: "high", pb.PRIORITY_NORMAL: "normal", pb.PRIORITY_LOW: "low"}


@dataclass(frozen=True)
class Incoming:
    """A request as the transport delivered it: parsed, or not (``message`` None)."""

    message: pb.ObservationRequest | None
    size: int


@dataclass(frozen=True)
class _Forwarded:
    """A batch forwarded to the shard, kept until answered (resent if the space moves)."""

    batch: pb.ObservationBatch
    at: float  # time.perf_counter() when sent
    n: int
    dim: int
    lane: str  # priority lane name, for metrics
    span: Span | None = None  # the batch's span when it is sampled (tracing on)
    traceparent: str = ""  # that span's W3C context, sent with the batch to the shard


@dataclass(frozen=True)
class StreamAbort:
    """The stream must end with this error (the client then resumes on a new stream)."""

    error: EngramError


_DONE = object()


class ClientStream:
    def __init__(
        self,
        gw: GatewayContext,
        trace_parent: Context | None = None,
        *,
        principal: Principal | None = None,
        transport: str = "grpc",
        peer: str = "",
        on_authenticated: Callable[[Principal], None] | None = None,
    ) -> None:
        """``trace_parent``: the trace the client named when it opened the stream (if it is
        continued: ``ENGRAM_OTEL_CLIENT_CONTEXT``); each batch's and recall's span is its child.

        ``principal``: the key the transport authenticated (a header); None: the stream must
        authenticate with its first message, an init carrying ``api_key``, no larger than
        ``ENGRAM_PREAUTH_MAX_BYTES`` (with authentication off it is :data:`auth.OPEN`).
        ``transport`` and ``peer`` name the client in audit lines; ``on_authenticated`` is
        called once the init's key is accepted (the WebSocket then lifts its frame limit)."""
        self.gw = gw
        self.principal = principal or gw.auth.unauthenticated()
        self.transport = transport
        self.peer = peer
        self._on_authenticated = on_authenticated
        self._trace_parent = trace_parent if tracing.client_context else None
        self.out: asyncio.Queue[object] = asyncio.Queue()
        self.session_id = ""
        self.space = ""
        self.dim = 0
        self.next_expected = 1
        self.last_acked = 0
        self._append: AppendStream | None = None
        self._shard_reader: asyncio.Task[None] | None = None
        # batches forwarded to the shard and not answered yet, by sequence number
        self._sent: dict[int, _Forwarded] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_session_write = 0.0
        self._closing = False
        self._paused = False
        self._bucket: TokenBucket | None = None
        self._rejected_from: int | None = None  # first refused sequence still to be resent
        self._retry_after_ms = 0
        self._shard_status = pb.StreamStatus(state=pb.StreamStatus.ACTIVE)
        self._routed = asyncio.Event()  # clear while the stream follows a moved space
        self._routed.set()
        self._reroute_task: asyncio.Task[None] | None = None
        self._deletes = forget.AnsweredBefore()  # deletes waiting for earlier batches

    # ---------------------------------------------------------------- plumbing

    async def run(
        self, requests: AsyncIterator[Incoming]
    ) -> AsyncIterator[pb.ObservationResponse | StreamAbort]:
        """Consumes a transport's requests; yields responses, and at most one abort (last).

        Transport-neutral: the gRPC service and the WebSocket endpoint both drive it.
        """
        metrics.active_sessions.inc()
        reader = asyncio.create_task(self._read(requests))
        try:
            while True:
                item = await self.out.get()
                if item is _DONE:
                    break
                if isinstance(item, StreamAbort):
                    yield item
                    break
                assert isinstance(item, pb.ObservationResponse)
                yield item
        finally:
            metrics.active_sessions.dec()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            await self._teardown()

    async def _read(self, requests: AsyncIterator[Incoming]) -> None:
        """Flow control is handled the moment it arrives (a SPEED_UP must not wait behind a
        batch held by SLOW_DOWN); everything else goes, in order, through ``_work``. The
        stream ends when the client stops sending or after a close has been handled."""
        work: asyncio.Queue[Incoming | None] = asyncio.Queue(
            maxsize=2 * self.gw.settings.limits.max_in_flight_batches
        )
        worker = asyncio.create_task(self._work(work))
        feeder = asyncio.create_task(self._feed(requests, work))
        try:
            await asyncio.wait({worker, feeder}, return_when=asyncio.FIRST_COMPLETED)
            if not worker.done():
                await worker  # the client stopped sending: finish what it sent
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
        except asyncio.CancelledError:
            worker.cancel()
            feeder.cancel()
            raise
        await self._drain()
        self.out.put_nowait(_DONE)

    async def _feed(
        self, requests: AsyncIterator[Incoming], work: asyncio.Queue[Incoming | None]
    ) -> None:
        try:
            async for incoming in requests:
                msg = incoming.message
                if self.session_id and msg is not None and msg.WhichOneof("operation") == "flow":
                    await self._handle(incoming)
                else:
                    await work.put(incoming)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # transport failure of the client side: just end
            log.debug("client stream ended: %s", exc)
        await work.put(None)

    async def _work(self, work: asyncio.Queue[Incoming | None]) -> None:
        while (incoming := await work.get()) is not None:
            await self._handle(incoming)
            if self._closing:
                return

    async def _drain(self) -> None:
        """Waits for the acks of everything forwarded (so a close answers them all)."""
        deadline = time.monotonic() + 30
        while self._sent and (
            not self._routed.is_set()
            or (self._shard_reader is not None and not self._shard_reader.done())
        ):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.005)
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _teardown(self) -> None:
        for sent in self._sent.values():
            if sent.span is not None:
                tracing.fail(sent.span, UnavailableError("the stream ended before the answer"))
        for task in list(self._tasks):
            task.cancel()
        if self._append is not None:
            self._append.cancel()
        if self._shard_reader is not None:
            self._shard_reader.cancel()
            await asyncio.gather(self._shard_reader, return_exceptions=True)
        if self.session_id:
            with contextlib.suppress(Exception):
                await self.gw.store.update_session(
                    self.session_id,
                    last_acked=self.last_acked,
                    state="detached",
                    ttl_s=self.gw.settings.gateway.session_ttl_s,
                )

    def _send(self, response: pb.ObservationResponse) -> None:
        response.server_timestamp.GetCurrentTime()
        if self.session_id:
            response.session_id = self.session_id
        self.out.put_nowait(response)

    def _error(self, err: EngramError, seq: int = 0, request_id: str = "") -> None:
        proto = err.to_proto()
        proto.request_id = request_id
        metrics.batch_failures_total.labels(pb.ErrorCode.Name(err.code)).inc()
        self._send(pb.ObservationResponse(error=proto, sequence_number=seq))

    # ---------------------------------------------------------------- dispatch

    def _end(self, err: EngramError) -> None:
        """Ends the stream with ``err`` (nothing after this message is handled)."""
        self._closing = True
        self.out.put_nowait(StreamAbort(err))

    def _authenticate(self, incoming: Incoming) -> bool:
        """The first message of a stream without a header key: an init carrying ``api_key``."""
        try:
            self.principal = self.gw.auth.first_message(
                incoming.message,
                incoming.size,
                self.gw.settings.security.preauth_max_bytes,
                self.transport,
                self.peer,
            )
        except AuthenticationError as exc:
            self._end(exc)
            return False
        if self._on_authenticated is not None:
            self._on_authenticated(self.principal)
        return True

    async def _handle(self, incoming: Incoming) -> None:
        if self.principal is None:
            if not self._authenticate(incoming):
                return
        elif why := self.principal.problem():
            auth.audit_failure(self.transport, self.peer, why, self.principal.key_id)
            self._end(AuthenticationError(f"{self.principal.describe()} is {why}"))
            return
        principal = self.principal
        assert principal is not None
        msg = incoming.message
        if msg is None:
            self._error(
                ValidationError(
                    f"a message of {incoming.size} bytes is not an ObservationRequest",
                    code=pb.MALFORMED_MESSAGE,
                )
            )
            return
        op = msg.WhichOneof("operation")
        seq = msg.sequence_number
        try:
            if incoming.size > self.gw.settings.limits.max_batch_bytes:
                raise ValidationError(
                    f"message of {incoming.size} bytes exceeds the limit of "
                    f"{self.gw.settings.limits.max_batch_bytes} bytes: split the batch",
                    code=pb.BATCH_TOO_LARGE,
                )
            if op is None:
                raise ValidationError("the message carries no operation", code=pb.MISSING_OPERATION)
            if op == "init":
                await self._init(msg)
                return
            if not self.session_id:
                raise SessionError(
                    f"'{op}' before init: open the stream with an init message first",
                    code=pb.NOT_INITIALIZED,
                )
            if msg.memory_space_id and msg.memory_space_id.strip() != self.space:
                raise SessionError(
                    f"this stream's session belongs to memory space {self.space!r}, "
                    f"not {msg.memory_space_id!r}",
                    code=pb.SPACE_MISMATCH,
                )
            if op == "batch":
                auth.require(principal, auth.WRITE, self.space)
                await self._batch(seq, msg.batch)
            elif op == "observation":
                auth.require(principal, auth.WRITE, self.space)
                await self._batch(seq, validation.episode_to_batch(msg.observation))
            elif op == "recall":
                auth.require(principal, auth.READ, self.space)
                self._recall(msg.recall)
            elif op == "delete":
                auth.require(principal, auth.WRITE, self.space)
                self._delete(msg.delete)
            elif op == "flow":
                self._flow(msg.flow)
            elif op == "close":
                self._closing = True
        except EngramError as exc:
            request_id = {"recall": msg.recall.request_id, "delete": msg.delete.request_id}.get(
                op or "", ""
            )
            self._error(exc, seq if op in ("batch", "observation") else 0, request_id)

    # -------------------------------------------------------------------- init

    async def _init(self, msg: pb.ObservationRequest) -> None:
        if self.session_id:
            raise SessionError(
                f"the stream is already initialised (session {self.session_id})",
                code=pb.ALREADY_INITIALIZED,
            )
        resume = bool(msg.session_id)
        if resume:
            record = await self._lookup(msg.session_id)
            space = record.space if record else ""
            if space and not self._may_open(space):
                # the other space is not named: its name is the other tenant's
                raise PermissionDeniedError(
                    f"{self._who()} does not cover the memory space of session {msg.session_id!r}"
                )
            if msg.memory_space_id:
                requested = validation.space_id(msg.memory_space_id)
                if space and requested != space:
                    raise SessionError(
                        f"session {msg.session_id!r} belongs to memory space {space!r}, "
                        f"not {requested!r}",
                        code=pb.SPACE_MISMATCH,
                    )
                space = requested
            if not space:
                raise SessionError(
                    f"session {msg.session_id!r} is unknown (name its memory space to resume it)"
                )
            session_id = msg.session_id
        else:
            space = validation.space_id(msg.memory_space_id)
            session_id = "s-" + uuid.uuid4().hex
        if not self._may_open(space):
            raise PermissionDeniedError(
                f"{self._who()} has neither a 'read' nor a 'write' scope for memory space {space!r}"
            )
        opened = await self.gw.shards.open_session(space, session_id, create=not resume)
        self.session_id, self.space, self.dim = session_id, space, opened.dim
        self.next_expected = opened.last_sequence + 1
        self.last_acked = opened.last_sequence
        with contextlib.suppress(Exception):  # Redis is a cache: the shard holds the truth
            await self.gw.store.put_session(
                SessionRecord(session_id, space, "active", self.last_acked),
                self.gw.settings.gateway.session_ttl_s,
            )
        limits = self.gw.settings.limits
        ack = pb.StreamInitAck(
            session_id=session_id,
            initial_sequence=opened.last_sequence,
            max_in_flight_batches=limits.max_in_flight_batches,
            max_batch_size=limits.max_batch_observations,
            dim=opened.dim,
            resumed=resume,
        )
        ack.capabilities.supports_backpressure = True
        ack.capabilities.supports_snapshot_isolation = True
        ack.capabilities.queue_capacity = limits.max_in_flight_batches
        self._send(pb.ObservationResponse(init_ack=ack))

    def _may_open(self, space: str) -> bool:
        """An init needs read or write on its space."""
        p = self.principal
        return p is not None and (p.allows(auth.READ, space) or p.allows(auth.WRITE, space))

    def _who(self) -> str:
        return self.principal.describe() if self.principal is not None else "this client"

    async def _lookup(self, session_id: str) -> SessionRecord | None:
        try:
            return await self.gw.store.get_session(session_id)
        except Exception:
            return None  # Redis down: resume from the shard alone

    # ------------------------------------------------------------------ writes

    async def _batch(self, seq: int, batch: pb.ObservationBatch) -> None:
        """Checks and forwards one batch; with tracing on, under a span if it is sampled."""
        if not tracing.active:
            await self._forward(seq, batch, None)
            return
        span = tracing.start("engram.gateway.batch", self._trace_parent)
        try:
            await self._forward(seq, batch, span)
        except EngramError as exc:
            if span is not None:
                tracing.fail(span, exc)
            raise

    async def _forward(self, seq: int, batch: pb.ObservationBatch, span: Span | None) -> None:
        """``span`` ends when the batch is answered (or here, on an error raised)."""
        if seq == 0:
            raise ValidationError(
                "sequence_number is missing: batches are numbered 1, 2, 3, ...",
                code=pb.INVALID_ARGUMENT,
            )
        if seq > self.next_expected and self._rejected_from is not None:
            # sent before the client learnt that an earlier batch was refused
            self._reject(seq, None, len(batch.vectors) // (4 * batch.dim) if batch.dim else 0)
            if span is not None:
                span.set_attribute("engram.rejected", "behind_rejected")
                span.end()
            return
        if seq > self.next_expected:
            raise SequenceError(
                f"sequence number {seq} skips ahead: expected {self.next_expected}",
                expected=self.next_expected,
            )
        if self._paused:
            raise FlowControlError(
                f"batch {seq} arrived while the stream is paused (send RESUME first)",
                code=pb.STREAM_PAUSED,
            )
        credits = self.gw.settings.limits.max_in_flight_batches
        if len(self._sent) >= credits and seq not in self._sent:
            raise FlowControlError(
                f"{len(self._sent)} batches are already in flight, the limit is {credits}: "
                "wait for acks before sending more",
                code=pb.CREDITS_EXCEEDED,
            )
        # self.dim is learnt from the shard only (init, or an accepted batch): a batch the
        # shard refuses must not fix the dimension this stream checks against
        checked = validation.batch(batch, self.gw.settings.limits, self.dim)
        if self.principal is not None and (
            limited := auth.take_observations(self.principal, checked.n)
        ):
            self._reject(seq, None, checked.n, limited)
            if span is not None:
                span.set_attribute("engram.rejected", "key_rate_limit")
                span.end()
            return
        while self._bucket is not None and not await self._bucket.take(checked.n):
            pass  # the limit changed while this batch waited: take from the new one
        if self._paused:
            raise FlowControlError(
                f"batch {seq} was waiting when the stream was paused (send RESUME first)",
                code=pb.STREAM_PAUSED,
            )
        lane = _LANE_NAMES.get(batch.priority, "normal")
        forward = None
        if span is not None:
            span.set_attributes(
                {
                    "engram.memory_space": self.space,
                    "engram.session": self.session_id,
                    "engram.sequence": seq,
                    "engram.batch.size": checked.n,
                    "engram.lane": lane,
                    "engram.pressure_level": self._shard_status.level,
                }
            )
            forward = tracing.child("engram.gateway.forward", span)
        try:
            await self._routed.wait()
            append = await self._shard_stream()
            parent = tracing.traceparent(span) if span is not None else ""
            self._sent[seq] = _Forwarded(
                batch, time.perf_counter(), checked.n, checked.dim, lane, span, parent
            )
            if seq == self.next_expected:
                self.next_expected += 1
            metrics.batch_size.observe(checked.n)
            try:
                await append.write(seq, batch, parent)
            except UnavailableError as exc:
                if append is self._append:  # else the stream is following a move: it resends
                    self._shard_lost(exc.message)
        finally:
            if forward is not None:
                forward.end()

    async def _shard_stream(self) -> AppendStream:
        if self._append is None:
            self._append = await self.gw.shards.open_append(self.space, self.session_id)
            self._shard_reader = asyncio.create_task(self._read_shard(self._append))
        return self._append

    async def _read_shard(self, stream: AppendStream) -> None:
        try:
            async for resp in stream.responses():
                self._on_shard_response(resp)
        except UnavailableError as exc:
            if stream is self._append:
                self._shard_lost(exc.message)
            return
        if self._sent and stream is self._append:
            self._shard_lost("the shard ended the stream with batches unanswered")

    def _follow_move(self) -> None:
        if self._reroute_task is None or self._reroute_task.done():
            self._routed.clear()
            self._reroute_task = self._spawn(self._reroute())

    async def _reroute(self) -> None:
        """The space moved: reopen the session at its new owner and resend what is unanswered."""
        started = time.perf_counter()
        old, self._append = self._append, None
        if old is not None:
            old.cancel()
        metrics.stream_reroutes_total.inc()
        try:
            await self.gw.shards.open_session(
                self.space, self.session_id, create=False, timeout_s=_REROUTE_S
            )
            append = await self._shard_stream()
            for seq in sorted(self._sent):
                sent = self._sent[seq]
                await append.write(seq, sent.batch, sent.traceparent)
        except EngramError as exc:
            if exc.code == pb.SPACE_DROPPED:
                self._space_dropped()
            else:
                self._shard_lost(f"following memory space {self.space!r} to its new owner: {exc}")
            return
        finally:
            self._routed.set()
        metrics.reroute_pause.observe(time.perf_counter() - started)
        log.info(
            "session %s followed memory space %s to its new owner in %.0f ms",
            self.session_id,
            self.space,
            (time.perf_counter() - started) * 1000,
        )

    def _space_dropped(self) -> None:
        """The shard dropped this stream's space: every batch in flight is answered with
        SPACE_DROPPED, the session ends and the stream stays open for a new init (which, on
        the same name, starts an empty space)."""
        err = SessionError(
            f"memory space {self.space!r} was dropped: session {self.session_id!r} ended with "
            "it and nothing unacknowledged was stored; send an init to go on (a new session "
            "on the name starts an empty space)",
            code=pb.SPACE_DROPPED,
        )
        if not self._sent:
            self._error(err)
        for seq in sorted(self._sent):
            sent = self._sent.pop(seq)
            if sent.span is not None:
                tracing.fail(sent.span, err)
            self._error(err, seq)
        self._deletes.fail(err)
        if self._append is not None:
            self._append.cancel()
        if self._shard_reader is not None:  # it may be the task running this: let it end
            self._tasks.add(self._shard_reader)
            self._shard_reader.add_done_callback(self._tasks.discard)
        self._append = self._shard_reader = None
        self.session_id, self.space, self.dim = "", "", 0
        self.next_expected, self.last_acked, self._rejected_from = 1, 0, None

    def _shard_lost(self, why: str) -> None:
        metrics.shard_stream_failures_total.inc()
        log.warning("session %s: %s; ending the client stream so it resumes", self.session_id, why)
        self.out.put_nowait(StreamAbort(UnavailableError(f"{why}; resume the session")))

    def _on_shard_response(self, resp: ipb.AppendResponse) -> None:
        if resp.HasField("status"):
            self._shard_status = resp.status
            self._send(pb.ObservationResponse(status=self._status(resp.status)))
            return
        seq = resp.sequence_number
        if resp.HasField("error") and resp.error.code == pb.NOT_OWNER and not resp.rejected:
            self._follow_move()  # the batch stays in flight: it is resent to the new owner
            return
        if resp.HasField("error") and resp.error.code == pb.SPACE_DROPPED:
            self._space_dropped()
            return
        sent = self._sent.pop(seq, None)
        self._deletes.answered(self._sent)
        if resp.rejected or (
            resp.HasField("error")
            and resp.error.code == pb.SEQUENCE_GAP
            and self._rejected_from is not None
            and resp.error.expected_sequence <= self._rejected_from
        ):
            self._reject(seq, resp, sent.n if sent else 0)
            if sent is not None and sent.span is not None:
                sent.span.set_attribute("engram.rejected", resp.reject_reason or "behind_rejected")
                sent.span.end()
            return
        if resp.HasField("error"):
            err = from_proto(resp.error)
            if sent is not None and sent.span is not None:
                tracing.fail(sent.span, err)
            if resp.error.code == pb.SEQUENCE_GAP:
                self.next_expected = resp.error.expected_sequence
            else:  # refused before it was sequenced: the number is free again
                self.next_expected = min(self.next_expected, seq)
            metrics.observations_rejected_total.labels(
                self.space, pb.ErrorCode.Name(resp.error.code)
            ).inc(sent.n if sent else 0)
            self._error(err, seq)
            return
        self.last_acked = max(self.last_acked, seq)
        if self._rejected_from is not None and seq >= self._rejected_from:
            self._rejected_from = None
        if sent is not None:
            metrics.observation_latency.observe(time.perf_counter() - sent.at)
            if self.dim == 0 and not resp.duplicate:
                self.dim = sent.dim
            if sent.span is not None:
                _acked(sent.span, resp)
        if not resp.duplicate:
            lane = sent.lane if sent is not None else "normal"
            metrics.observations_total.labels(self.space, lane).inc(resp.count)
            metrics.batches_processed_total.inc()
        ack = pb.ObservationAck(
            status=pb.ObservationAck.ACCEPTED,
            memory_id=resp.first_id,
            first_lsn=resp.first_lsn,
            count=resp.count,
            duplicate=resp.duplicate,
        )
        ts = Timestamp()
        ts.FromMicroseconds(resp.committed_at_us)
        ack.committed_at.CopyFrom(ts)
        self._send(pb.ObservationResponse(ack=ack, sequence_number=seq))
        now = time.monotonic()
        if now - self._last_session_write > _SESSION_UPDATE_S:
            self._last_session_write = now
            self._spawn(self._write_session())

    def _reject(
        self,
        seq: int,
        resp: ipb.AppendResponse | None,
        n: int,
        limited: RateLimitedError | None = None,
    ) -> None:
        """Refused by admission, by the key's rate limit (``limited``), or behind a refused
        batch: the client resends ``seq`` later."""
        if resp is not None and resp.rejected:
            reason, message = resp.reject_reason, resp.error.message
            self._retry_after_ms = resp.retry_after_ms
        elif limited is not None:
            reason, message = "key_rate_limit", limited.message
            self._retry_after_ms = limited.retry_after_ms
        else:
            reason = "behind_rejected"
            message = f"an earlier batch ({self._rejected_from}) of this stream was refused"
        self._rejected_from = min(self._rejected_from or seq, seq)
        self.next_expected = min(self.next_expected, seq)
        metrics.observations_rejected_total.labels(self.space, reason).inc(n)
        ack = pb.ObservationAck(
            status=pb.ObservationAck.REJECTED,
            retry_after_ms=self._retry_after_ms or 100,
            message=message,
        )
        self._send(pb.ObservationResponse(ack=ack, sequence_number=seq))

    async def _write_session(self) -> None:
        with contextlib.suppress(Exception):
            await self.gw.store.update_session(
                self.session_id,
                last_acked=self.last_acked,
                state="active",
                ttl_s=self.gw.settings.gateway.session_ttl_s,
            )

    # ------------------------------------------------------------------ recall

    def _recall(self, req: pb.RecallRequest) -> None:
        validation.recall(req, self.gw.settings.limits)
        if self.principal is not None:
            auth.take_recall(self.principal)
        self._spawn(self._do_recall(req))

    async def _do_recall(self, req: pb.RecallRequest) -> None:
        started = time.perf_counter()
        span = recall_span(self.space, req, self._trace_parent) if tracing.active else None
        parent = tracing.traceparent(span) if span is not None else ""
        try:
            async for chunk in self.gw.shards.recall(self.space, req, self.session_id, parent):
                self._send(pb.ObservationResponse(recall=chunk))
        except EngramError as exc:
            if span is not None:
                tracing.fail(span, exc)
            self._error(exc, request_id=req.request_id)
            return
        if span is not None:
            span.end()
        metrics.recall_latency.observe(time.perf_counter() - started)

    # ------------------------------------------------------------------ delete

    def _delete(self, req: pb.DeleteRequest) -> None:
        if req.memory_space_id and req.memory_space_id.strip() != self.space:
            raise SessionError(
                f"this stream's session belongs to memory space {self.space!r}, "
                f"not {req.memory_space_id!r}: delete elsewhere with the unary Delete call",
                code=pb.SPACE_MISMATCH,
            )
        checked = forget.delete_request(req, self.space, self.gw.settings.limits)
        self._spawn(self._do_delete(checked, self._deletes.wait(self._sent)))

    async def _do_delete(self, req: pb.DeleteRequest, before: asyncio.Future[None]) -> None:
        """Waits for the batches forwarded before the delete, then asks the shard."""
        try:
            await before
            answer = await self.gw.shards.delete(self.space, req)
        except EngramError as exc:
            self._error(exc, request_id=req.request_id)
            return
        answer.request_id = req.request_id
        self._send(pb.ObservationResponse(deleted=answer))

    # -------------------------------------------------------------------- flow

    def _flow(self, flow: pb.FlowControl) -> None:
        """Client flow control: PAUSE / RESUME / SLOW_DOWN / SPEED_UP / BUFFER_STATUS."""
        action = flow.action
        A = pb.FlowControl
        if action == A.PAUSE:
            self._paused = True
        elif action == A.RESUME:
            self._paused = False
        elif action in (A.SLOW_DOWN, A.SPEED_UP):
            old = self._bucket
            if action == A.SLOW_DOWN:
                rate = flow.preferred_rate or max(1, (old.rate if old else 10_000) // 2)
                self._bucket = TokenBucket(rate)
            else:
                self._bucket = TokenBucket(flow.preferred_rate) if flow.preferred_rate else None
            if old is not None:
                old.replaced.set()
        elif action != A.BUFFER_STATUS:
            raise ValidationError(f"unknown flow control action {action}", code=pb.INVALID_ARGUMENT)
        status = self._status(self._shard_status)
        status.message = f"{A.Action.Name(action)}: {status.message}".rstrip(": ")
        self._send(pb.ObservationResponse(status=status))

    def _status(self, shard: pb.StreamStatus) -> pb.StreamStatus:
        """This stream's view: the shard's pressure plus the stream's own state."""
        status = pb.StreamStatus()
        status.CopyFrom(shard)
        if self._paused:
            status.state = pb.StreamStatus.PAUSED
            status.message = "paused by the client; batches are refused until RESUME"
        status.queue_depth = len(self._sent)
        status.queue_capacity = self.gw.settings.limits.max_in_flight_batches
        status.last_acked_sequence = self.last_acked
        status.preferred_rate = self._bucket.rate if self._bucket else 0
        return status

    def _spawn(self, coro: object) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task


def _acked(span: Span, resp: ipb.AppendResponse) -> None:
    span.set_attributes(
        {
            "engram.lsn.first": resp.first_lsn,
            "engram.batch.stored": resp.count,
            "engram.duplicate": resp.duplicate,
        }
    )
    span.end()


def recall_span(space: str, req: pb.RecallRequest, parent: Context | None) -> Span | None:
    """A sampled recall's span on the gateway (None if unsampled); the caller ends it."""
    span = tracing.start("engram.gateway.recall", parent)
    if span is not None:
        span.set_attributes(
            {
                "engram.memory_space": space,
                "engram.recall.k": req.k,
                "engram.recall.consistency": pb.Consistency.Name(req.consistency),
            }
        )
    return span
