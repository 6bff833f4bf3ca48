"""The public gRPC service ``engram.v1.EngramStream``, registered with a safe deserializer.

Requests are parsed by :func:`parse` instead of the generated deserializer, so bytes that are
not a valid message become an in-band MALFORMED_MESSAGE error and the stream stays usable.

With API keys on, every call's ``authorization: Bearer`` metadata is checked before a request
is read (:meth:`EngramStreamService._caller`): a key that is not accepted ends the call with
UNAUTHENTICATED at once. ObserveStream without a metadata key authenticates with its first
message (an init carrying ``api_key``, see :class:`ClientStream`); the unary-request calls
need the metadata key. A key without the scope ends RecallStream and ListObservations with
PERMISSION_DENIED; ObserveStream answers such refusals in-band and goes on.

Forgetting: ``Delete`` needs ``write`` on the space and is answered once the shard's tombstone
is durable; ``DropSpace`` and ``SetRetention`` need ``admin`` and leave an audit line
(``audit event=drop_space|set_retention key_id=.. space=..``). Requests are checked here
(:mod:`engram.gateway.forget`) before any shard is asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from engram.common import tracing, validation
from engram.contract.errors import (
    EngramError,
    abort_details,
    grpc_status,
    retry_after_metadata,
)
from engram.gateway import auth, forget
from engram.gateway.auth import Principal
from engram.gateway.context import GatewayContext
from engram.gateway.stream import ClientStream, Incoming, StreamAbort, recall_span
from engram.v1 import streaming_pb2 as pb

SERVICE = "engram.v1.EngramStream"

audit = logging.getLogger("engram.audit")


# How long a refused ObserveStream waits for the client's first message before it ends.
_REFUSAL_READ_S = 1.0


async def _first_request(requests: AsyncIterator[Incoming]) -> None:
    """Takes the client's first message (gRPC has received it already) before a refusal.

    A grpc.aio client whose write is still in flight when the call's status arrives reports
    ``INTERNAL: Internal error from Core`` instead of that status (grpc/grpc#36066); clients
    open a stream by writing their init, so ending the call once it is read lets them see
    UNAUTHENTICATED. Bounded: a client that sends nothing is refused after a second.
    """
    with contextlib.suppress(Exception):
        await asyncio.wait_for(anext(aiter(requests)), _REFUSAL_READ_S)


def parse(data: bytes) -> Incoming:
    try:
        return Incoming(pb.ObservationRequest.FromString(data), len(data))
    except DecodeError:
        return Incoming(None, len(data))


class EngramStreamService:
    def __init__(self, gw: GatewayContext) -> None:
        self.gw = gw

    def _caller(self, context: grpc.aio.ServicerContext, required: bool) -> Principal | None:
        """The principal of the call's metadata key; None when there is none and it is not
        ``required`` (the stream authenticates in-band). Raises AuthenticationError."""
        if not self.gw.auth.enabled:
            return auth.OPEN
        key = auth.bearer(context.invocation_metadata())
        if key is None and not required:
            return None
        return self.gw.auth.authenticate(key, "grpc", context.peer())

    async def ObserveStream(  # noqa: N802
        self, requests: AsyncIterator[Incoming], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ObservationResponse]:
        try:
            principal = self._caller(context, required=False)
        except EngramError as exc:
            await _first_request(requests)
            await context.abort(grpc_status(exc), abort_details(exc))
        parent = None
        if tracing.active and tracing.client_context:
            parent = tracing.parent_from_headers(context.invocation_metadata())
        stream = ClientStream(
            self.gw, parent, principal=principal, transport="grpc", peer=context.peer()
        )
        async for item in stream.run(requests):
            if isinstance(item, StreamAbort):
                await context.abort(grpc_status(item.error), abort_details(item.error))
            yield item

    async def RecallStream(  # noqa: N802
        self, request: pb.StreamingRecallRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamingRecallResponse]:
        span = None
        try:
            principal = self._caller(context, required=True)
            assert principal is not None
            space = validation.space_id(request.memory_space_id)
            auth.require(principal, auth.READ, space)
            recall = pb.RecallRequest(
                cue=request.cue,
                k=request.max_results,
                consistency=request.consistency,
                deadline_ms=request.deadline_ms,
                chunk_size=request.chunk_size,
            )
            for name in ("min_score", "since_us", "until_us", "min_confidence"):
                if request.HasField(name):
                    setattr(recall, name, getattr(request, name))
            validation.recall(recall, self.gw.settings.limits)
            auth.take_recall(principal)
            if tracing.active:
                parent = None
                if tracing.client_context:
                    parent = tracing.parent_from_headers(context.invocation_metadata())
                span = recall_span(space, recall, parent)
            traceparent = tracing.traceparent(span) if span is not None else ""
            async for chunk in self.gw.shards.recall(
                space, recall, request.session_id, traceparent
            ):
                yield pb.StreamingRecallResponse(
                    results=chunk.results,
                    more_results=chunk.more_results,
                    metadata=chunk.metadata,
                    snapshot_sequence=chunk.snapshot_sequence,
                )
            if span is not None:
                span.end()
        except EngramError as exc:
            if span is not None:
                tracing.fail(span, exc)
            await context.abort(grpc_status(exc), abort_details(exc), retry_after_metadata(exc))

    async def ListObservations(  # noqa: N802
        self, request: pb.ListObservationsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ListObservationsResponse]:
        try:
            principal = self._caller(context, required=True)
            assert principal is not None
            space = validation.space_id(request.memory_space_id)
            auth.require(principal, auth.READ, space)
            async for chunk in self.gw.shards.scan(space, request.chunk_size):
                yield chunk
        except EngramError as exc:
            await context.abort(grpc_status(exc), abort_details(exc))

    async def Delete(  # noqa: N802
        self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteResponse:
        try:
            _, space = self._admitted(request.memory_space_id, context, auth.WRITE)
            checked = forget.delete_request(request, space, self.gw.settings.limits)
            answer = await self.gw.shards.delete(space, checked)
            answer.request_id = request.request_id
            return answer
        except EngramError as exc:
            await context.abort(grpc_status(exc), abort_details(exc))
            raise  # not reached: abort raises

    async def DropSpace(  # noqa: N802
        self, request: pb.DropSpaceRequest, context: grpc.aio.ServicerContext
    ) -> pb.DropSpaceResponse:
        try:
            principal, space = self._admitted(request.memory_space_id, context, auth.ADMIN)
            observations = await self.gw.shards.drop_space(space)
            _audit(context, principal, "drop_space", space, f"observations={observations}")
            return pb.DropSpaceResponse(observations=observations)
        except EngramError as exc:
            await context.abort(grpc_status(exc), abort_details(exc))
            raise

    async def SetRetention(  # noqa: N802
        self, request: pb.SetRetentionRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetRetentionResponse:
        try:
            principal, space = self._admitted(request.memory_space_id, context, auth.ADMIN)
            wanted = forget.retention(request.retention)
            now = await self.gw.shards.set_retention(space, wanted)
            limits = f"max_age_s={now.max_age_s} max_rows={now.max_rows}"
            _audit(context, principal, "set_retention", space, limits)
            return pb.SetRetentionResponse(retention=now)
        except EngramError as exc:
            await context.abort(grpc_status(exc), abort_details(exc))
            raise

    def _admitted(
        self, raw_space: str, context: grpc.aio.ServicerContext, action: str
    ) -> tuple[Principal, str]:
        """The call's key (metadata) and space, once the key holds ``action`` on the space."""
        principal = self._caller(context, required=True)
        assert principal is not None
        space = validation.space_id(raw_space)
        auth.require(principal, action, space)
        return principal, space


def _audit(
    context: grpc.aio.ServicerContext, principal: Principal, event: str, space: str, detail: str
) -> None:
    """An administrative call that changed a space, as a line of ``engram.audit``."""
    audit.info(
        "audit event=%s peer=%s key_id=%s space=%s %s",
        event,
        context.peer() or "-",
        principal.key_id or "-",
        space,
        detail,
    )


def handler(service: EngramStreamService) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "ObserveStream": grpc.stream_stream_rpc_method_handler(
                service.ObserveStream,
                request_deserializer=parse,
                response_serializer=pb.ObservationResponse.SerializeToString,
            ),
            "RecallStream": grpc.unary_stream_rpc_method_handler(
                service.RecallStream,
                request_deserializer=pb.StreamingRecallRequest.FromString,
                response_serializer=pb.StreamingRecallResponse.SerializeToString,
            ),
            "ListObservations": grpc.unary_stream_rpc_method_handler(
                service.ListObservations,
                request_deserializer=pb.ListObservationsRequest.FromString,
                response_serializer=pb.ListObservationsResponse.SerializeToString,
            ),
            **{
                name: grpc.unary_unary_rpc_method_handler(
                    getattr(service, name),
                    request_deserializer=request.FromString,
                    response_serializer=response.SerializeToString,
                )
                for name, request, response in (
                    ("Delete", pb.DeleteRequest, pb.DeleteResponse),
                    ("DropSpace", pb.DropSpaceRequest, pb.DropSpaceResponse),
                    ("SetRetention", pb.SetRetentionRequest, pb.SetRetentionResponse),
                )
            },
        },
    )
