"""What every client stream on a gateway shares: settings, the control store, the router."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from engram.common.errors import EngramError, UnavailableError, ValidationError
from engram.common.settings import Settings
from engram.control.store import ControlStore
from engram.gateway.router import Router
from engram.internal.v1 import shard_pb2 as ipb
from engram.v1 import streaming_pb2 as pb

_RECALL_TIMEOUT_S = 10.0


@dataclass
class GatewayContext:
    settings: Settings
    store: ControlStore
    router: Router

    async def recall(self, space: str, req: pb.RecallRequest) -> pb.RecallResponse:
        """Asks the owning shard; turns transport failures into Engram errors."""
        _, stub = await self.router.stub(space)
        out = pb.RecallResponse(request_id=req.request_id)
        try:
            async for chunk in stub.Recall(
                ipb.ShardRecallRequest(memory_space_id=space, recall=req), timeout=_RECALL_TIMEOUT_S
            ):
                out.results.extend(chunk.results)
                out.snapshot_sequence = chunk.snapshot_sequence
                out.metadata.CopyFrom(chunk.metadata)
        except grpc.aio.AioRpcError as exc:
            raise _from_status(exc, space) from None
        return out


def _from_status(exc: grpc.aio.AioRpcError, space: str) -> EngramError:
    code = exc.code()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        details = exc.details() or ""
        name, _, message = details.partition(": ")
        value = pb.ErrorCode.Value(name) if name in pb.ErrorCode.keys() else pb.INVALID_ARGUMENT
        return ValidationError(message or details, code=value)
    return UnavailableError(
        f"the shard of memory space {space!r} did not answer: {code.name} {exc.details()}"
    )
