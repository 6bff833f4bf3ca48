"""The state an :class:`~engram_client.stream.ObservationStream`'s parts share.

:class:`StreamState` is the base of the parts composed into the stream (that module lists them
and says why they are mixins). It creates the state in one ``__init__``: the session (space, id,
dimension, the last durable sequence number), the batches sent and not acknowledged
(:class:`Pending`, kept to be resent after a reconnect), the recalls and deletes waiting for
their answers, the call of the current connection and the locks around it, the credit window,
and what failed the stream for good.

It also holds what every part uses: events for the application (``_emit``), the request of one
batch (``_request``), waking the senders that wait for a credit (``_wake_senders``), failing
everything waiting (``_fail_all``) and the credit window itself (``_window``: how many batches
may be in flight, ``_adapt``: the window driven by ack latency). The connection reaches the
answers only through the abstract methods declared here: ``_on_response`` and
``_refuse_oversized`` (:mod:`~engram_client.stream_answers`).
"""

from __future__ import annotations

import asyncio
import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc

from engram.v1 import streaming_pb2 as pb
from engram_client.errors import EngramError
from engram_client.forgetting import DeleteResult
from engram_client.messages import Ack, RecallResult, StreamEvent

if TYPE_CHECKING:
    from engram_client.client import EngramClient


@dataclass
class Pending:
    """A batch sent and not acknowledged yet (resent after a reconnect)."""

    batch: pb.ObservationBatch
    future: asyncio.Future[Ack]
    sent_at: float = 0.0


class StreamState(ABC):
    """What one client stream knows; the parts in ``stream*.py`` add the behaviour."""

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
        self._pending: dict[int, Pending] = {}
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

    def _raise_if_fatal(self) -> None:
        if self._fatal is not None:
            raise self._fatal

    def _emit(self, kind: str, detail: str, status: pb.StreamStatus | None = None) -> None:
        if self._on_event is not None:
            self._on_event(StreamEvent(kind, detail, status))

    def _request(self, seq: int, p: Pending) -> pb.ObservationRequest:
        return pb.ObservationRequest(
            memory_space_id=self.space,
            session_id=self.session_id,
            sequence_number=seq,
            batch=p.batch,
        )

    def _wake_senders(self) -> None:
        async def notify() -> None:
            async with self._room:
                self._room.notify_all()

        asyncio.ensure_future(notify())

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

    # ------------------------------------------------- provided by the other parts

    @abstractmethod
    def _on_response(self, resp: pb.ObservationResponse) -> None:
        """One message from the gateway on the current call."""

    @abstractmethod
    def _refuse_oversized(self, details: str) -> None:
        """The call failed with RESOURCE_EXHAUSTED (``details``): fail the batches too large."""
