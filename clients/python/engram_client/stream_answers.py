"""What the gateway answers on an observation stream, and what the stream does about it.

Acks settle their batches (and drive the credit window); recall chunks are gathered by
request_id until the last one; ``deleted`` answers its delete; status pushes are reported and
resize the window. A batch refused for now (REJECTED, RATE_LIMITED, OVERLOADED) is resent with
the same sequence number after retry-after. A batch refused for good (bad input) fails its own
future only; later batches are renumbered so the session's sequence stays gap-free, and the
stream resyncs once the batches before it are answered. A gap or a retryable error resyncs at
once (the server's durable mark decides what to resend); a key no longer valid fails the stream.

A part of :class:`~engram_client.stream.ObservationStream` (see that module).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

from engram.contract.errors import from_proto
from engram.v1 import streaming_pb2 as pb
from engram_client.errors import EngramError, SessionError, ValidationError
from engram_client.forgetting import delete_result
from engram_client.messages import Ack, hits_of, recall_result
from engram_client.stream_state import Pending, StreamState

_TOO_LARGE = re.compile(r"larger than max \((\d+) vs\. (\d+)\)")
# In-band errors (for a batch or the stream) that end the session for good: the key is not
# valid any more, or does not cover writing to the space.
_STREAM_FATAL = frozenset({pb.UNAUTHENTICATED, pb.PERMISSION_DENIED})
# A batch refused with one of these is resent, same sequence number, after retry_after_ms.
_RESEND_LATER = frozenset({pb.RATE_LIMITED, pb.OVERLOADED})


class Answers(StreamState):
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
                hits = [h for part in parts for h in hits_of(part.results)]
                entry[1].set_result(recall_result(hits, resp.recall, len(parts)))
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
        renumbered: dict[int, Pending] = {}
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
