"""The client's streams: batching, credits, acks, in-stream recall and delete, resume.

An :class:`ObservationStream` keeps every batch it sent until the server acknowledges it as
durable. When the connection drops (or the server asks for a resync) it opens a new stream with
the same session id; the server's init ack names the last durable sequence number, batches up to
it are settled, and the rest are resent in order — no duplicate, no gap. A batch the server
refuses for good (bad input) fails its own future only; later batches are renumbered so the
session's sequence stays gap-free.

:class:`ObservationStream` is made by :meth:`EngramClient.open_stream
<engram_client.client.EngramClient.open_stream>` and composed of one part per module, each a
mixin over the state they share, :class:`~engram_client.stream_state.StreamState` (one
``__init__``, the credit window and the few methods every part uses):

* this module: what the application calls (``send``, ``recall``, ``delete``, ``flush``,
  ``close``);
* :mod:`~engram_client.stream_connection`: the call opened, resumed after a drop, or failed;
* :mod:`~engram_client.stream_answers`: acks, recall chunks, deletes, errors and rejections.

They are mixins rather than components because all of them read and change the same few fields
(the batches pending, the current call, the next sequence number): as components each would hold
the stream and reach those through it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from engram.v1 import streaming_pb2 as pb
from engram_client.forgetting import DeleteResult, delete_request
from engram_client.messages import Ack, RecallResult, make_batch, recall_request
from engram_client.stream_answers import Answers
from engram_client.stream_connection import Connection
from engram_client.stream_state import Pending


class ObservationStream(Connection, Answers):
    """A session's stream of batches; see the module docstring."""

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
        p = Pending(batch, fut, time.perf_counter())
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
