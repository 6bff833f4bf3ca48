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
durable, after every batch this stream forwarded before it is answered, so a stream can delete
what it has just written. When the space moves, the stream follows it to its new owner and
resends what is unanswered: the client sees only a pause. When it is dropped, the session ends
with SPACE_DROPPED and the stream stays open for a new init.

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

:class:`ClientStream` is composed of one part per module, each a mixin over the state they share,
:class:`~engram.gateway.stream_state.StreamState` (one ``__init__``, and the few methods every
part uses):

* this module: :meth:`ClientStream.run` (a transport's requests in, responses out), the
  authentication by the first message, the dispatch of each message, and the teardown;
* :mod:`~engram.gateway.stream_session`: ``init``, a new or resumed session;
* :mod:`~engram.gateway.stream_forward`: batches checked, sequenced and forwarded to the shard,
  and its answers turned into acks, rejections and errors;
* :mod:`~engram.gateway.stream_move`: following a moved space (``_reroute``);
* :mod:`~engram.gateway.stream_forget`: the ``delete`` op, and the end of a dropped space;
* :mod:`~engram.gateway.stream_recall`: recalls on the stream;
* :mod:`~engram.gateway.stream_flow`: client flow control (PAUSE, SLOW_DOWN ...).

They are mixins rather than components for the reason the shard's ``Space`` parts are
(:mod:`engram.shard.space`): each of them reads and advances the same fields (the session's
marks, the batches in flight, the shard stream, the output queue); as components each would
hold the stream and reach all of that through it. A part calls another only through the
abstract methods :class:`~engram.gateway.stream_state.StreamState` declares.

Transports and tests import from here: :class:`ClientStream`, :class:`Incoming`,
:class:`StreamAbort` and :func:`recall_span`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from engram.common import metrics, tracing, validation
from engram.contract.errors import (
    AuthenticationError,
    EngramError,
    SessionError,
    UnavailableError,
    ValidationError,
)
from engram.gateway import auth
from engram.gateway.stream_flow import FlowControl
from engram.gateway.stream_forget import Forgetting
from engram.gateway.stream_forward import Forwarding
from engram.gateway.stream_move import MoveFollowing
from engram.gateway.stream_recall import Recalls, recall_span
from engram.gateway.stream_session import SessionOpening
from engram.gateway.stream_state import StreamAbort
from engram.v1 import streaming_pb2 as pb

__all__ = ["ClientStream", "Incoming", "StreamAbort", "recall_span"]

log = logging.getLogger("engram.gateway.stream")


@dataclass(frozen=True)
class Incoming:
    """A request as the transport delivered it: parsed, or not (``message`` None)."""

    message: pb.ObservationRequest | None
    size: int


_DONE = object()


class ClientStream(SessionOpening, Forwarding, MoveFollowing, Forgetting, Recalls, FlowControl):
    """One client stream: ``ClientStream(gw, ...)`` (see
    :meth:`~engram.gateway.stream_state.StreamState.__init__`), then :meth:`run` with the
    transport's requests."""

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

    # ---------------------------------------------------------------- dispatch

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
                if self._dropped is not None:  # the client has not learnt of the drop yet
                    raise SessionError(self._dropped.message, code=pb.SPACE_DROPPED)
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
