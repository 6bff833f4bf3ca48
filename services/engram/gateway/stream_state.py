"""The state a client stream's parts share, and what they ask of each other.

:class:`StreamState` is the base of the parts composed into
:class:`~engram.gateway.stream.ClientStream` (that module lists the parts and says why they are
mixins). It creates the state in one ``__init__``: the key's principal, the session (id, space,
dimension, sequencing marks), the internal ``Append`` stream to the owning shard and the batches
forwarded on it and not answered yet (:class:`Forwarded`, kept so they can be resent when the
space moves), client flow control, and the queue of what the transport sends the client.

It also holds what every part uses: answering the client (``_send``, ``_error``), ending the
stream (``_end``; ``_shard_lost`` when the shard is gone: a :class:`StreamAbort` after which the
client resumes), background tasks (``_spawn``) and the stream's status as the client sees it
(``_status``). A part reaches another only through the abstract methods declared here:
``_shard_stream`` (:mod:`~engram.gateway.stream_forward`), ``_follow_move``
(:mod:`~engram.gateway.stream_move`) and ``_space_dropped``
(:mod:`~engram.gateway.stream_forget`).
"""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from opentelemetry.context import Context
from opentelemetry.trace import Span

from engram.common import metrics, tracing
from engram.contract.errors import EngramError, UnavailableError
from engram.gateway import forget
from engram.gateway.auth import Principal
from engram.gateway.context import GatewayContext
from engram.gateway.flow import TokenBucket
from engram.gateway.shards import AppendStream
from engram.v1 import streaming_pb2 as pb

log = logging.getLogger("engram.gateway.stream")


@dataclass(frozen=True)
class Forwarded:
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


class StreamState(ABC):
    """What one client stream knows; the parts in ``stream_*.py`` add the behaviour."""

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
        # what the transport sends the client: responses, then _DONE or one StreamAbort
        self.out: asyncio.Queue[object] = asyncio.Queue()
        # the session, once an init opened it ("" / 0 before, and again after a drop)
        self.session_id = ""
        self.space = ""
        self.dim = 0  # learnt from the shard only: the init, or an accepted batch
        self.next_expected = 1  # the sequence number the next new batch must carry
        self.last_acked = 0  # the session's durable high-water mark as acked to the client
        # the internal Append stream to the space's owner, opened on first use, and its reader
        self._append: AppendStream | None = None
        self._shard_reader: asyncio.Task[None] | None = None
        # batches forwarded to the shard and not answered yet, by sequence number
        self._sent: dict[int, Forwarded] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # recalls, deletes, session writes ...
        self._last_session_write = 0.0  # time.monotonic() of the last high-water mark written
        self._closing = False  # a close or _end was handled: nothing after it is handled
        self._paused = False  # PAUSE: batches are refused until RESUME
        self._bucket: TokenBucket | None = None  # SLOW_DOWN's rate, None: unlimited
        self._rejected_from: int | None = None  # first refused sequence still to be resent
        self._retry_after_ms = 0  # the last retry-after a rejection named
        self._shard_status = pb.StreamStatus(state=pb.StreamStatus.ACTIVE)  # its last push
        self._routed = asyncio.Event()  # clear while the stream follows a moved space
        self._routed.set()
        self._reroute_task: asyncio.Task[None] | None = None
        self._deletes = forget.AnsweredBefore()  # deletes waiting for earlier batches
        # the space was dropped under this stream: what answers its messages until a new init
        self._dropped: EngramError | None = None

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

    def _end(self, err: EngramError) -> None:
        """Ends the stream with ``err`` (nothing after this message is handled)."""
        self._closing = True
        self.out.put_nowait(StreamAbort(err))

    def _shard_lost(self, why: str) -> None:
        metrics.shard_stream_failures_total.inc()
        log.warning("session %s: %s; ending the client stream so it resumes", self.session_id, why)
        self.out.put_nowait(StreamAbort(UnavailableError(f"{why}; resume the session")))

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

    # ------------------------------------------------- provided by the other parts

    @abstractmethod
    async def _shard_stream(self) -> AppendStream:
        """The session's Append stream to the space's owner, opened (and read) on first use."""

    @abstractmethod
    def _follow_move(self) -> None:
        """The owner answered NOT_OWNER: follow the space to its new owner."""

    @abstractmethod
    def _space_dropped(self) -> None:
        """The shard answered SPACE_DROPPED: end the session, keep the stream open."""
