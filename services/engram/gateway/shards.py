"""What the gateway asks of shards: the :class:`Shards` interface and its gRPC implementation.

Client streams (``stream.py``), the public service's recalls and listings (``service.py``) and
the canary reach shards only through ``GatewayContext.shards``, so a client stream's state
machine runs unchanged against an in-memory shard in tests. Every failure is an
``engram.contract.errors`` type: a shard's own error as the shard sent it, a shard that did not
answer as :class:`~engram.contract.errors.UnavailableError`.

:class:`GrpcShards` routes with the :class:`~engram.gateway.router.Router`. Its append streams
send each batch as bytes composed around the client's message (``common/wire.py``: a 1.5 MB
batch is not copied into a new ``AppendRequest``) and carry the space's epoch as routed at each
write; recalls and listings go on the router's separate read connection.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from engram.common import wire
from engram.common.settings import Settings
from engram.contract.errors import NotOwnerError, UnavailableError, from_proto, from_rpc_error
from engram.gateway.router import Router
from engram.internal.v1 import shard_pb2 as ipb
from engram.internal.v1 import shard_pb2_grpc
from engram.v1 import streaming_pb2 as pb

APPEND_METHOD = f"/{ipb.DESCRIPTOR.services_by_name['Shard'].full_name}/Append"
# While a space moves, its old owner answers NOT_OWNER until the new one has committed and
# published: a caller asks the routing table again this often, for at most this long.
MOVED_RETRY_S = 0.02
MOVED_WAIT_S = 10.0
# A delete is answered once its tombstone is durable; a wide time range resolves many rows.
# Also the bound of a drop (in-flight writes settle, files go) and of a retention change.
DELETE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class OpenedSession:
    last_sequence: int  # the session's highest durable sequence number (0: nothing yet)
    dim: int  # the space's vector dimension, 0 while it holds no observation


class AppendStream(Protocol):
    """One session's stream of batches to the shard that owns its space."""

    async def write(self, sequence: int, batch: pb.ObservationBatch, traceparent: str = "") -> None:
        """Sends batch ``sequence`` (with the W3C context of its span, if it is traced);
        raises UnavailableError if the stream is broken."""
        ...

    def responses(self) -> AsyncIterator[ipb.AppendResponse]:
        """The shard's answers, in the order of the writes (with pushed ``status`` answers
        between them). Ends when the shard ends the stream or the stream is cancelled;
        raises UnavailableError if the stream fails. Iterated once."""
        ...

    def cancel(self) -> None:
        """Ends the stream at once; answers not yet read are dropped."""
        ...


class Shards(Protocol):
    async def open_session(
        self, space: str, session_id: str, *, create: bool, timeout_s: float = 10.0
    ) -> OpenedSession:
        """Registers a new session (``create``) or reports a known one; raises the shard's
        error (UNKNOWN_SESSION, NOT_OWNER, ...) or UnavailableError."""
        ...

    async def open_append(
        self, space: str, session_id: str, *, timeout_s: float | None = None
    ) -> AppendStream:
        """A new append stream for the session (``timeout_s`` bounds the whole stream)."""
        ...

    def recall(
        self, space: str, req: pb.RecallRequest, session_id: str = "", traceparent: str = ""
    ) -> AsyncIterator[pb.RecallResponse]:
        """The owning shard's answer, chunk by chunk (best first); ``traceparent``: the W3C
        context of the recall's span, if it is traced."""
        ...

    def scan(self, space: str, chunk_size: int = 0) -> AsyncIterator[pb.ListObservationsResponse]:
        """Every observation's id and LSN, in chunks (0: the shard's default size)."""
        ...

    async def delete(self, space: str, request: pb.DeleteRequest) -> pb.DeleteResponse:
        """The owning shard's answer once the delete's tombstone is durable (a NOT_OWNER is
        followed to the new owner); raises the shard's error or UnavailableError."""
        ...

    async def drop_space(self, space: str) -> int:
        """Has the owning shard drop ``space`` (its data, its sessions, its control-plane
        entries); returns the observations it held (0: unknown). Raises the shard's error
        (UNAVAILABLE while the space moves) or UnavailableError."""
        ...

    async def set_retention(self, space: str, retention: pb.Retention) -> pb.Retention:
        """Sets ``space``'s retention on its owning shard once durable; returns it as set."""
        ...

    async def refresh(self) -> None:
        """Reads the routing table again (after a NOT_OWNER: the space moved)."""
        ...


class GrpcShards:
    """The shards over gRPC, each reached through the router's channels."""

    def __init__(self, router: Router, settings: Settings) -> None:
        self.router = router
        self._recall_timeout_s = settings.gateway.recall_timeout_s
        self.moved_wait_s = MOVED_WAIT_S

    async def refresh(self) -> None:
        await self.router.refresh()

    async def open_session(
        self, space: str, session_id: str, *, create: bool, timeout_s: float = 10.0
    ) -> OpenedSession:
        """As :meth:`Shards.open_session`; while the space is moving (NOT_OWNER) it follows
        the routing table for up to ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return await self._open_session(space, session_id, create, timeout_s)
            except NotOwnerError:
                if time.monotonic() > deadline:
                    raise
            await asyncio.sleep(MOVED_RETRY_S)
            await self.router.refresh()

    async def _open_session(
        self, space: str, session_id: str, create: bool, timeout_s: float
    ) -> OpenedSession:
        _, stub = await self.router.stub(space)
        try:
            opened = await stub.OpenSession(
                ipb.OpenSessionRequest(memory_space_id=space, session_id=session_id, create=create),
                timeout=timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(
                f"the shard of memory space {space!r} did not answer: {exc.code().name}"
            ) from None
        if opened.HasField("error"):
            raise from_proto(opened.error)
        return OpenedSession(last_sequence=opened.last_sequence, dim=opened.dim)

    async def open_append(
        self, space: str, session_id: str, *, timeout_s: float | None = None
    ) -> AppendStream:
        _, channel = await self.router.channel(space)
        # requests go as bytes (composed in write), answers are parsed as usual
        call = channel.stream_stream(
            APPEND_METHOD, response_deserializer=ipb.AppendResponse.FromString
        )(timeout=timeout_s, metadata=self.router.call_metadata() or None)
        return _GrpcAppendStream(call, self.router, space, session_id)

    async def recall(
        self, space: str, req: pb.RecallRequest, session_id: str = "", traceparent: str = ""
    ) -> AsyncIterator[pb.RecallResponse]:
        timeout = (req.deadline_ms or 5000) / 1000 + self._recall_timeout_s
        shard_req = ipb.ShardRecallRequest(memory_space_id=space, recall=req, session_id=session_id)
        metadata = (("traceparent", traceparent),) if traceparent else None
        async for chunk in self._read(
            space,
            lambda stub: stub.Recall(shard_req, timeout=timeout, metadata=metadata),
            recall=True,
        ):
            yield chunk

    async def scan(
        self, space: str, chunk_size: int = 0
    ) -> AsyncIterator[pb.ListObservationsResponse]:
        scan_req = ipb.ScanRequest(memory_space_id=space, chunk_size=chunk_size)
        async for chunk in self._read(space, lambda stub: stub.Scan(scan_req)):
            yield chunk

    async def delete(self, space: str, request: pb.DeleteRequest) -> pb.DeleteResponse:
        """As :meth:`Shards.delete`. Routed with the space's epoch, so an owner that lost the
        space answers NOT_OWNER (having written nothing); that alone is retried, at the new owner,
        for up to ``moved_wait_s``."""
        deadline = time.monotonic() + self.moved_wait_s
        while True:
            _, stub = await self.router.stub(space)
            shard_req = ipb.ShardDeleteRequest(
                delete=request, epoch=self.router.assignment.space_epoch(space)
            )
            try:
                answer: pb.DeleteResponse = await stub.Delete(shard_req, timeout=DELETE_TIMEOUT_S)
                return answer
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc, f"the shard of memory space {space!r}")
                if not isinstance(err, NotOwnerError) or time.monotonic() > deadline:
                    raise err from None
            await asyncio.sleep(MOVED_RETRY_S)
            await self.router.refresh()

    async def drop_space(self, space: str) -> int:
        answer: ipb.ShardDropResponse = await self._unary(
            space,
            lambda stub: stub.DropSpace(
                ipb.ShardDropRequest(memory_space_id=space), timeout=DELETE_TIMEOUT_S
            ),
        )
        return answer.observations

    async def set_retention(self, space: str, retention: pb.Retention) -> pb.Retention:
        req = ipb.ShardRetentionRequest(memory_space_id=space, retention=retention)
        answer: ipb.ShardRetentionResponse = await self._unary(
            space, lambda stub: stub.SetRetention(req, timeout=DELETE_TIMEOUT_S)
        )
        return answer.retention

    async def _unary(self, space: str, call: Callable[[shard_pb2_grpc.ShardStub], Any]) -> Any:
        """A unary call's answer from the owning shard, whose in-band ``error`` is raised; a
        NOT_OWNER (the space moved) is followed to the new owner for up to ``moved_wait_s``."""
        deadline = time.monotonic() + self.moved_wait_s
        while True:
            _, stub = await self.router.stub(space)
            try:
                answer = await call(stub)
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc, f"the shard of memory space {space!r}") from None
            if not answer.HasField("error"):
                return answer
            err = from_proto(answer.error)
            if not isinstance(err, NotOwnerError) or time.monotonic() > deadline:
                raise err
            await asyncio.sleep(MOVED_RETRY_S)
            await self.router.refresh()

    async def _read(
        self, space: str, call: Callable[[shard_pb2_grpc.ShardStub], Any], recall: bool = False
    ) -> AsyncIterator[Any]:
        """A read's chunks from the owning shard (``recall``: through its recall port, if it
        has one); a NOT_OWNER before the first chunk (the space moved) is followed to the new
        owner for up to ``moved_wait_s``."""
        deadline = time.monotonic() + self.moved_wait_s
        while True:
            _, stub = await self.router.stub(space, reads=True, recall=recall)
            started = False
            try:
                async for chunk in call(stub):
                    started = True
                    yield chunk
                return
            except grpc.aio.AioRpcError as exc:
                err = from_rpc_error(exc, f"the shard of memory space {space!r}")
                if started or not isinstance(err, NotOwnerError) or time.monotonic() > deadline:
                    raise err from None
            await asyncio.sleep(MOVED_RETRY_S)
            await self.router.refresh()


class _GrpcAppendStream:
    def __init__(
        self, call: grpc.aio.StreamStreamCall, router: Router, space: str, session_id: str
    ) -> None:
        self._call = call
        self._router = router
        self._space = space
        self._session_id = session_id
        self._cancelled = False

    async def write(self, sequence: int, batch: pb.ObservationBatch, traceparent: str = "") -> None:
        # AppendRequest(..., batch=batch, epoch=..., traceparent=...) as bytes, without
        # copying the batch
        data = wire.with_message(
            ipb.AppendRequest(
                memory_space_id=self._space, session_id=self._session_id, sequence_number=sequence
            ),
            ipb.AppendRequest.BATCH_FIELD_NUMBER,
            batch,
            ipb.AppendRequest(
                epoch=self._router.assignment.space_epoch(self._space), traceparent=traceparent
            ),
        )
        try:
            await self._call.write(data)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as exc:
            raise UnavailableError(f"writing to the shard failed: {exc}") from None

    async def responses(self) -> AsyncIterator[ipb.AppendResponse]:
        try:
            async for resp in self._call:
                yield resp
        except asyncio.CancelledError:
            # grpc raises it to a reader of a call cancelled here: the stream just ended
            task = asyncio.current_task()
            if not self._cancelled or (task is not None and task.cancelling()):
                raise
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                raise UnavailableError(
                    f"the shard stream failed: {exc.code().name} {exc.details()}"
                ) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._call.cancel()
