"""An observation stream's connection: opened, resumed after every drop, failed for good.

The stream keeps every batch it sent until the server acknowledges it as durable. When the
connection drops (or the server asks for a resync) it opens a new call with the same session id;
the server's init ack names the last durable sequence number, batches up to it are settled, and
the rest are resent in order, then the recalls and deletes still waiting — no duplicate, no gap.
Connecting again backs off from 50 ms to 2 s; a refusal that no retry helps (no key, a wrong
one) or ``reconnect_timeout_s`` of failed attempts fails the stream.

A part of :class:`~engram_client.stream.ObservationStream` (see that module).
"""

from __future__ import annotations

import asyncio
import logging
import time

import grpc

from engram.contract.errors import from_proto
from engram.v1 import streaming_pb2 as pb
from engram_client.errors import (
    EngramError,
    StreamFailedError,
    UnavailableError,
    from_rpc_error,
)
from engram_client.messages import Ack
from engram_client.stream_state import StreamState

log = logging.getLogger("engram_client")


class Connection(StreamState):
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


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc)
