"""The shard's ``Delete`` RPC (``engram.internal.v1.Shard``), mixed into its service.

Checks the request (a space id, then the gateway's own rules,
:func:`engram.common.validation.delete`: at most ``ENGRAM_MAX_BATCH_OBSERVATIONS`` ids), refuses
a space this shard does not own at the gateway's epoch (NOT_OWNER, as ``Append`` does),
resolves ids and range to rows and answers once the delete is durable and visible
(:mod:`engram.shard.deletes`). A space this shard owns but has no data for holds none of the
ids. Errors end the call with the error's status.
"""

from __future__ import annotations

import grpc

from engram.common import validation
from engram.common.settings import LimitSettings
from engram.contract.errors import EngramError, NotOwnerError, abort_details, grpc_status
from engram.internal.v1 import shard_pb2 as ipb
from engram.shard.node import ShardNode
from engram.v1 import streaming_pb2 as pb


def check_delete(req: pb.DeleteRequest, limits: LimitSettings) -> str:
    """Returns the request's space id once the request is sane (the gateway's rules,
    :func:`validation.delete`, with this shard's limits); raises ValidationError."""
    name = validation.space_id(req.memory_space_id)
    validation.delete(req, limits)
    return name


class DeleteRpcs:
    node: ShardNode

    async def Delete(  # noqa: N802
        self, request: ipb.ShardDeleteRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteResponse:
        req = request.delete
        try:
            name = check_delete(req, self.node.settings.limits)
            space = self.node.space(name, create=False)
            if space is not None and request.epoch > self.node.placement.epoch(space.name):
                raise NotOwnerError(
                    f"shard {self.node.shard_id} holds memory space {space.name!r} at epoch "
                    f"{self.node.placement.epoch(space.name)}, the gateway routed at "
                    f"{request.epoch}"
                )
            out = pb.DeleteResponse(request_id=req.request_id)
            if space is None:
                out.not_found = len(set(req.ids))
                out.committed_at.GetCurrentTime()
                return out
            rows, already, not_found = space.resolve_delete(
                list(req.ids),
                req.since_us if req.HasField("since_us") else None,
                req.until_us if req.HasField("until_us") else None,
            )
            result = await space.begin_delete(
                rows, req.request_id, already=already, not_found=not_found
            )
        except EngramError as exc:
            await context.abort(grpc_status(exc), abort_details(exc))
        out.deleted = result.deleted
        out.already_deleted = result.already_deleted
        out.not_found = result.not_found
        out.lsn = result.lsn
        out.committed_at.FromMicroseconds(result.committed_at_us)
        return out
