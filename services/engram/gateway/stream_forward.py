"""A client stream's batches: checked, sequenced, forwarded to the owning shard, answered.

``_batch`` (a batch, or a single episode made into one) checks the sequence number against
``next_expected`` (a higher one is a gap, refused naming the expected number; one sent behind a
refused batch is rejected like it), flow control (pause, credits, the SLOW_DOWN bucket), the
batch itself and the key's observations/s budget. It then writes the batch on the session's
internal ``Append`` stream (opened on first use, ``_shard_stream``) and keeps it in ``_sent``
until the shard answers; while the stream follows a moved space, new batches wait.

``_on_shard_response`` turns the shard's answers, in order, into the client's: an ACCEPTED ack
once durable (perhaps a duplicate), a REJECTED one (admission or the key's rate limit,
``_reject``: resend later, same number), or an error (the number is free again, or a gap moves
``next_expected``). A NOT_OWNER answer starts following the move
(:mod:`~engram.gateway.stream_move`); SPACE_DROPPED ends the session
(:mod:`~engram.gateway.stream_forget`). Each answer releases the deletes waiting for it, and
the session's high-water mark is written to the control-plane store at most every 0.5 s.

A part of :class:`~engram.gateway.stream.ClientStream` (see that module).
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from google.protobuf.timestamp_pb2 import Timestamp
from opentelemetry.trace import Span

from engram.common import metrics, tracing, validation
from engram.contract.errors import (
    EngramError,
    FlowControlError,
    RateLimitedError,
    SequenceError,
    UnavailableError,
    ValidationError,
    from_proto,
)
from engram.gateway import auth
from engram.gateway.shards import AppendStream
from engram.gateway.stream_state import Forwarded, StreamState
from engram.internal.v1 import shard_pb2 as ipb
from engram.v1 import streaming_pb2 as pb

_SESSION_UPDATE_S = 0.5
_LANE_NAMES = {pb.PRIORITY_HIGH: "high", pb.PRIORITY_NORMAL: "normal", pb.PRIORITY_LOW: "low"}


class Forwarding(StreamState):
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
            self._sent[seq] = Forwarded(
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


def _acked(span: Span, resp: ipb.AppendResponse) -> None:
    span.set_attributes(
        {
            "engram.lsn.first": resp.first_lsn,
            "engram.batch.stored": resp.count,
            "engram.duplicate": resp.duplicate,
        }
    )
    span.end()
