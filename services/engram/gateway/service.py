"""The public gRPC service ``engram.v1.EngramStream``, registered with a safe deserializer.

Requests are parsed by :func:`parse` instead of the generated deserializer, so bytes that are
not a valid message become an in-band MALFORMED_MESSAGE error and the stream stays usable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from google.protobuf.message import DecodeError

from engram.common import tracing, validation
from engram.contract.errors import EngramError, abort_details, grpc_status
from engram.gateway.context import GatewayContext
from engram.gateway.stream import ClientStream, Incoming, StreamAbort, recall_span
from engram.v1 import streaming_pb2 as pb

SERVICE = "engram.v1.EngramStream"


def parse(data: bytes) -> Incoming:
    try:
        return Incoming(pb.ObservationRequest.FromString(data), len(data))
    except DecodeError:
        return Incoming(None, len(data))


class EngramStreamService:
    def __init__(self, gw: GatewayContext) -> None:
        self.gw = gw

    async def ObserveStream(  # noqa: N802
        self, requests: AsyncIterator[Incoming], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ObservationResponse]:
        parent = None
        if tracing.active and tracing.client_context:
            parent = tracing.parent_from_headers(context.invocation_metadata())
        async for item in ClientStream(self.gw, parent).run(requests):
            if isinstance(item, StreamAbort):
                await context.abort(grpc_status(item.error), abort_details(item.error))
            yield item

    async def RecallStream(  # noqa: N802
        self, request: pb.StreamingRecallRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamingRecallResponse]:
        span = None
        try:
            space = validation.space_id(request.memory_space_id)
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
            await context.abort(grpc_status(exc), abort_details(exc))

    async def ListObservations(  # noqa: N802
        self, request: pb.ListObservationsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ListObservationsResponse]:
        try:
            space = validation.space_id(request.memory_space_id)
            async for chunk in self.gw.shards.scan(space, request.chunk_size):
                yield chunk
        except EngramError as exc:
            await context.abort(grpc_status(exc), abort_details(exc))


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
        },
    )
