"""A connection to a gateway and its unary calls: recall, listing, delete, drop, retention.

:class:`EngramClient` opens the channel (:mod:`engram_client.connection`) and the streams
(:class:`~engram_client.stream.ObservationStream`, where batching, credits, acks and resume
live). The names applications and tests import from here are re-exported from their modules:
:class:`ObservationStream`, and :class:`Ack`, :class:`Hit`, :class:`RecallResult`,
:class:`StreamEvent`, :func:`make_batch`, :func:`recall_request` (:mod:`engram_client.messages`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, cast

import grpc
import numpy as np

from engram.v1 import streaming_pb2 as pb
from engram.v1 import streaming_pb2_grpc
from engram_client.connection import (
    TLS,
    AuthorizedStub,
    key_metadata,
    open_channel,
)
from engram_client.errors import from_rpc_error
from engram_client.forgetting import (
    DeleteResult,
    Retention,
    delete_request,
    delete_result,
    retention,
)
from engram_client.messages import (
    Ack,
    Hit,
    RecallResult,
    StreamEvent,
    hits_of,
    make_batch,
    recall_request,
    recall_result,
)
from engram_client.stream import ObservationStream

__all__ = [
    "Ack",
    "EngramClient",
    "Hit",
    "ObservationStream",
    "RecallResult",
    "StreamEvent",
    "make_batch",
    "recall_request",
]


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
                hits.extend(hits_of(chunk.results))
                last, chunks = chunk, chunks + 1
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, "the gateway") from None
        return recall_result(hits, last, chunks)

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
