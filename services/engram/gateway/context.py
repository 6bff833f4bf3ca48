"""What every client stream on a gateway shares: settings, the control store, the router."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from engram.common.settings import Settings
from engram.contract.errors import from_rpc_error
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

    async def recall(
        self, space: str, req: pb.RecallRequest, session_id: str = ""
    ) -> AsyncIterator[pb.RecallResponse]:
        """The owning shard's answer, chunk by chunk; transport failures become Engram errors."""
        _, stub = await self.router.stub(space, reads=True)
        timeout = (req.deadline_ms or 5000) / 1000 + _RECALL_TIMEOUT_S
        call = stub.Recall(
            ipb.ShardRecallRequest(memory_space_id=space, recall=req, session_id=session_id),
            timeout=timeout,
        )
        try:
            async for chunk in call:
                yield chunk
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, f"the shard of memory space {space!r}") from None
