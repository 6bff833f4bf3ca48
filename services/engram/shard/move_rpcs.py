"""The shard's gRPC methods of a move (``engram.internal.v1.Shard``), mixed into its service.

On the target: ``MoveIn`` (starts :class:`~engram.shard.move_target.Incoming`, streaming its
progress for as long as the caller listens), ``CancelMove``, ``MoveStatus``. On the source,
called by the target: ``OpenMoveOut``, ``FetchFile``, ``ReadWal``, ``Fence``,
``FinishMoveOut`` (:class:`~engram.shard.move_source.Outgoing`). Refusals are answered
in-band (``error``) or, for streams, end the call with the error's status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc

from engram.common import validation
from engram.contract.errors import (
    EngramError,
    NotOwnerError,
    StorageError,
    ValidationError,
    abort_details,
    grpc_status,
)
from engram.internal.v1 import shard_pb2 as ipb
from engram.shard.backup import Backup
from engram.shard.move_source import Outgoing
from engram.shard.move_target import Incoming
from engram.shard.node import ShardNode
from engram.shard.ownership import OWNED

Context = grpc.aio.ServicerContext


class MoveRpcs:
    node: ShardNode

    # ------------------------------------------------------------------ target

    async def MoveIn(  # noqa: N802
        self, request: ipb.MoveInRequest, context: Context
    ) -> AsyncIterator[ipb.MoveProgress]:
        node = self.node
        try:
            name = validation.space_id(request.memory_space_id)
            if not node.ready:
                raise NotOwnerError(f"shard {node.shard_id} is recovering; retry shortly")
            if request.source_shard == node.shard_id:
                raise ValidationError(f"memory space {name!r} would move onto its own shard")
            if name in node.incoming or name in node.outgoing:
                raise ValidationError(f"memory space {name!r} is already moving")
            owner = node.ownership.get(name)
            if owner is not None and owner.claims:
                raise ValidationError(f"shard {node.shard_id} already owns memory space {name!r}")
        except EngramError as exc:
            yield ipb.MoveProgress(
                phase=ipb.MoveProgress.ABORTED, error=exc.to_proto(), message=str(exc)
            )
            return
        incoming = Incoming(
            node, name, request.source_shard, request.source_address, request.move_id
        )
        node.incoming[name] = incoming
        progress = incoming.start()  # goes on if this caller goes away
        while (step := await progress.get()) is not None:
            yield step

    async def CancelMove(  # noqa: N802
        self, request: ipb.CancelMoveRequest, context: Context
    ) -> ipb.CancelMoveResponse:
        incoming = self.node.incoming.get(request.memory_space_id)
        if incoming is None:
            err = ValidationError(f"no move of memory space {request.memory_space_id!r} here")
            return ipb.CancelMoveResponse(error=err.to_proto())
        if incoming.committed:
            err = ValidationError(f"the move of {request.memory_space_id!r} already committed")
            return ipb.CancelMoveResponse(error=err.to_proto())
        incoming.cancelled.set()
        return ipb.CancelMoveResponse()

    async def MoveStatus(  # noqa: N802
        self, request: ipb.MoveStatusRequest, context: Context
    ) -> ipb.MoveStatusResponse:
        return self.node.placement.move_status(
            request.memory_space_id, request.move_id, request.epoch
        )

    # ------------------------------------------------------------------ source

    def _outgoing(self, name: str, move_id: str) -> Outgoing:
        out = self.node.outgoing.get(name)
        if out is None:
            raise ValidationError(f"no move of memory space {name!r} is open here")
        out.check(move_id)
        return out

    def _source(self, name: str, move_id: str) -> Outgoing | Backup:
        """What FetchFile and ReadWal read: a move out, or a backup (its id as ``move_id``)."""
        backup = self.node.backups.get(move_id)
        if backup is not None and backup.name == name:
            backup.touched = time.monotonic()
            return backup
        return self._outgoing(name, move_id)

    async def OpenMoveOut(  # noqa: N802
        self, request: ipb.OpenMoveOutRequest, context: Context
    ) -> ipb.OpenMoveOutResponse:
        node = self.node
        try:
            name = validation.space_id(request.memory_space_id)
            if name in node.outgoing or name in node.incoming:
                raise ValidationError(f"memory space {name!r} is already moving")
            space = node.spaces.get(name)
            owner = node.ownership.get(name)
            if space is None or owner is None or owner.state != OWNED:
                node.placement.check_served(name)
                raise ValidationError(f"shard {node.shard_id} holds no memory space {name!r}")
            out = Outgoing(node, space, request.move_id, request.target_shard)
            node.outgoing[name] = out
            try:
                return await out.open()
            except BaseException:
                node.outgoing.pop(name, None)
                space.checkpoint_holds = max(0, space.checkpoint_holds - 1)
                raise
        except (EngramError, OSError) as exc:
            err = exc if isinstance(exc, EngramError) else StorageError(str(exc))
            return ipb.OpenMoveOutResponse(error=err.to_proto())

    async def FetchFile(  # noqa: N802
        self, request: ipb.FetchFileRequest, context: Context
    ) -> AsyncIterator[ipb.FileChunk]:
        try:
            out = self._source(request.memory_space_id, request.move_id)
            chunks = out.read_file(request.name, request.offset)
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                yield ipb.FileChunk(data=chunk)
        except (EngramError, OSError) as exc:
            err = exc if isinstance(exc, EngramError) else StorageError(str(exc))
            await context.abort(grpc_status(err), abort_details(err))

    async def ReadWal(  # noqa: N802
        self, request: ipb.ReadWalRequest, context: Context
    ) -> AsyncIterator[ipb.WalChunk]:
        try:
            out = self._source(request.memory_space_id, request.move_id)
            for number in await out.closed_segments(request.after_segment):
                records = out.read_segment(number)
                while (record := await asyncio.to_thread(next, records, None)) is not None:
                    end_lsn, payload = record
                    yield ipb.WalChunk(segment=number, end_lsn=end_lsn, payload=payload)
                out.touched = time.monotonic()
        except EngramError as exc:
            await context.abort(grpc_status(exc), abort_details(exc))

    async def Fence(  # noqa: N802
        self, request: ipb.FenceRequest, context: Context
    ) -> ipb.FenceResponse:
        try:
            out = self._outgoing(request.memory_space_id, request.move_id)
            return ipb.FenceResponse(visible=await out.fence())
        except EngramError as exc:
            return ipb.FenceResponse(error=exc.to_proto())

    async def FinishMoveOut(  # noqa: N802
        self, request: ipb.FinishMoveOutRequest, context: Context
    ) -> ipb.FinishMoveOutResponse:
        try:
            out = self._outgoing(request.memory_space_id, request.move_id)
            await out.finish(request.committed, request.epoch)
            if request.committed:
                await self.node.publish_ownership()
            return ipb.FinishMoveOutResponse()
        except EngramError as exc:
            return ipb.FinishMoveOutResponse(error=exc.to_proto())
