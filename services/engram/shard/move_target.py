"""The target side of a move: it runs the move, from the copy to the commit.

::

    1 open      source: OpenMoveOut (checkpoints held; files and epoch e listed)
                here: owners.json INCOMING(e + 1); any old copy of the space deleted
    2 copy      the checkpoint's files, chunk by chunk, fsynced; the space is opened on them
                (index and metadata loaded) while the source keeps acknowledging writes
    3 catch up  rounds of ReadWal: every record is appended to this shard's own WAL and
                applied, as recovery would; until a round brings little (or too many rounds)
    4 fence     source: Fence (durable), writes there get NOT_OWNER; a last ReadWal; every
                record durable here; the space's LSN must equal the source's final LSN
    5 commit    owners.json OWNED(e + 1): from here on the move has happened. The space
                serves; the new owner is published to Redis
    6 release   source: FinishMoveOut(committed) -> MOVED there, files deleted

A failure or a cancel before 5 aborts: the source is told (FinishMoveOut not committed: it
unfences), this copy is deleted, and the space's entry here goes back to what it was. A crash
here before 5 leaves INCOMING, which the next start discards (the source, if fenced, asks
MoveStatus, hears UNKNOWN and unfences). After 5 the source learns the outcome from
FinishMoveOut or, if that does not reach it, from MoveStatus. Sessions' high-water marks are
in the checkpoint and the WAL records, so they move with the data: resends stay exactly-once.

A move runs in a task of its own (:meth:`Incoming.start`): a caller that goes away (Ctrl-C on
``engram move``) leaves it to finish or abort by itself; ``CancelMove`` stops it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from engram.common import grpcutil, internal, metrics
from engram.contract.errors import (
    EngramError,
    ServerError,
    StorageError,
    UnavailableError,
    from_proto,
    from_rpc_error,
)
from engram.internal.v1 import shard_pb2 as ipb
from engram.internal.v1 import shard_pb2_grpc
from engram.shard import checkpoint as ckpt
from engram.shard.ownership import INCOMING, MOVED, OWNED, Owner
from engram.shard.space import Space

if TYPE_CHECKING:
    from engram.shard.node import ShardNode

log = logging.getLogger("engram.shard.move")

P = ipb.MoveProgress
# A catch-up round that brings less than this, or takes less than FENCE_ROUND_S, is the last
# before the fence: what arrives during the fence is then small, and so is the write pause.
FENCE_BYTES = 4 << 20
FENCE_ROUND_S = 0.25
MAX_ROUNDS = 60
RPC_TIMEOUT_S = 30.0
RELEASE_TRIES_S = 30.0


class Incoming:
    """A move of one space into this shard."""

    def __init__(self, node: ShardNode, name: str, source: int, address: str, move_id: str) -> None:
        self.node = node
        self.name = name
        self.source = source
        self.address = address
        self.move_id = move_id
        self.epoch = 0  # the epoch this shard will own the space at
        self.cancelled = asyncio.Event()
        self.committed = False
        self.space: Space | None = None
        self._previous = node.ownership.get(name)
        self._opened = False
        self._progress = P()
        self.started = time.monotonic()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Queue[ipb.MoveProgress | None]:
        """Runs the move in a task of its own; its progress arrives on the queue, None last."""
        progress: asyncio.Queue[ipb.MoveProgress | None] = asyncio.Queue()

        async def drive() -> None:
            try:
                async for step in self.run():
                    progress.put_nowait(step)
            finally:
                progress.put_nowait(None)

        self.task = asyncio.create_task(drive(), name=f"move-in:{self.name}")
        return progress

    # ------------------------------------------------------------------ the move

    async def run(self) -> AsyncIterator[ipb.MoveProgress]:
        settings = self.node.settings
        channel = internal.aio_channel(
            self.address, grpcutil.options(settings.limits), settings.security
        )
        stub = shard_pb2_grpc.ShardStub(channel)
        try:
            async for progress in self._move(stub):
                yield progress
        except (EngramError, grpc.aio.AioRpcError, OSError) as exc:
            err = exc if isinstance(exc, EngramError) else _from_source(exc, self.source)
            log.warning("move %s of space %s aborted: %s", self.move_id, self.name, err)
            metrics.shard_moves_total.labels("aborted").inc()
            await self._abort(stub)
            yield P(phase=P.ABORTED, error=err.to_proto(), message=str(err))
        finally:
            self.node.incoming.pop(self.name, None)
            await channel.close()

    async def _move(self, stub: shard_pb2_grpc.ShardStub) -> AsyncIterator[ipb.MoveProgress]:
        opened = await stub.OpenMoveOut(
            ipb.OpenMoveOutRequest(
                memory_space_id=self.name, move_id=self.move_id, target_shard=self.node.shard_id
            ),
            timeout=RPC_TIMEOUT_S,
        )
        if opened.HasField("error"):
            raise from_proto(opened.error)
        self._opened = True
        self.epoch = opened.epoch + 1
        await asyncio.to_thread(
            self.node.ownership.set,
            self.name,
            Owner(INCOMING, self.epoch, self.move_id, self.source),
        )
        await self.node.delete_space_files(self.name)
        total = sum(f.size for f in opened.files)
        self._progress = P(phase=P.COPYING, files_bytes=total, source_lsn=opened.visible)
        yield self._progress
        await self._passing(P.COPYING)
        await self._copy(stub, opened)
        self._check_cancel()
        self.space = space = self.node.new_space(self.name)
        await asyncio.to_thread(space.recover)
        space.start(self.node.loop)
        after, rounds = 0, 0
        while True:
            rounds += 1
            started = time.monotonic()
            before = self._progress.wal_bytes
            after = await self._catch_up(stub, after)
            self._progress.phase = P.CATCHING_UP
            self._progress.lsn = space.visible
            yield self._progress
            await self._passing(P.CATCHING_UP)
            self._check_cancel()
            brought = self._progress.wal_bytes - before
            if brought < FENCE_BYTES or time.monotonic() - started < FENCE_ROUND_S:
                break
            if rounds >= MAX_ROUNDS:
                log.warning(
                    "move %s of space %s: still %d bytes a round after %d rounds; fencing",
                    self.move_id,
                    self.name,
                    brought,
                    rounds,
                )
                break
        fenced_at = time.monotonic()
        fence = await stub.Fence(
            ipb.FenceRequest(memory_space_id=self.name, move_id=self.move_id),
            timeout=RPC_TIMEOUT_S,
        )
        if fence.HasField("error"):
            raise from_proto(fence.error)
        self._progress.phase = P.FENCED
        self._progress.source_lsn = fence.visible
        yield self._progress
        await self._passing(P.FENCED)
        await self._catch_up(stub, after)
        if space.visible != fence.visible:
            raise StorageError(
                f"the copy of memory space {self.name!r} reached LSN {space.visible}, the source "
                f"ended at {fence.visible}"
            )
        self._check_cancel()
        await self._commit()
        self._progress.phase = P.COMMITTED
        self._progress.epoch = self.epoch
        self._progress.lsn = space.visible
        pause = time.monotonic() - fenced_at
        self._progress.pause_us = int(pause * 1e6)
        metrics.shard_moves_total.labels("committed").inc()
        metrics.shard_move_pause.observe(pause)
        yield self._progress
        await self._passing(P.COMMITTED)
        await self._release(stub)
        self._progress.phase = P.DONE
        yield self._progress

    async def _copy(self, stub: shard_pb2_grpc.ShardStub, opened: ipb.OpenMoveOutResponse) -> None:
        directory = self.node.space_dir(self.name) / "ckpt"
        directory.mkdir(parents=True, exist_ok=True)
        for info in opened.files:
            final = directory / info.name
            tmp = final.with_name(final.name + ".part")
            with open(tmp, "wb") as f:  # noqa: ASYNC230 (page-cache writes; fsync in a thread)
                call = stub.FetchFile(
                    ipb.FetchFileRequest(
                        memory_space_id=self.name, move_id=self.move_id, name=info.name
                    ),
                    timeout=max(RPC_TIMEOUT_S, info.size / (20 << 20)),
                )
                async for chunk in call:
                    f.write(chunk.data)
                    self._progress.bytes_copied += len(chunk.data)
                    self._check_cancel()
            if tmp.stat().st_size != info.size:
                raise StorageError(
                    f"copied {tmp.stat().st_size} bytes of {info.name}, the source has {info.size}"
                )
            await asyncio.to_thread(ckpt.commit_file, tmp, final)

    async def _catch_up(self, stub: shard_pb2_grpc.ShardStub, after: int) -> int:
        """Applies the source's closed segments after ``after``; returns the last one."""
        assert self.space is not None
        space = self.space
        pending: list[asyncio.Future[None]] = []
        call = stub.ReadWal(
            ipb.ReadWalRequest(
                memory_space_id=self.name, move_id=self.move_id, after_segment=after
            ),
            timeout=RPC_TIMEOUT_S * 10,
        )
        async for chunk in call:
            pending.append(space.apply_record(chunk.payload, chunk.end_lsn))
            after = max(after, chunk.segment)
            self._progress.wal_bytes += len(chunk.payload)
            if len(pending) % 64 == 0:
                await asyncio.sleep(0)  # keep the loop responsive during a long first round
        if pending:
            await asyncio.gather(*pending)
        self._progress.lsn = space.visible
        return after

    async def _commit(self) -> None:
        owner = Owner(OWNED, self.epoch, self.move_id, self.source)
        await asyncio.to_thread(self.node.ownership.set, self.name, owner)
        self.committed = True
        assert self.space is not None
        self.node.spaces[self.name] = self.space
        log.info(
            "space %s moved here from shard %d at epoch %d (move %s, LSN %d)",
            self.name,
            self.source,
            self.epoch,
            self.move_id,
            self.space.visible,
        )
        await self.node.publish_ownership()

    async def _release(self, stub: shard_pb2_grpc.ShardStub) -> None:
        """Tells the source; if it cannot be reached, it asks MoveStatus later by itself."""
        deadline = time.monotonic() + RELEASE_TRIES_S
        req = ipb.FinishMoveOutRequest(
            memory_space_id=self.name, move_id=self.move_id, committed=True, epoch=self.epoch
        )
        while True:
            try:
                await stub.FinishMoveOut(req, timeout=5.0)
                return
            except grpc.aio.AioRpcError as exc:
                if time.monotonic() > deadline:
                    log.warning(
                        "move %s: shard %d did not take the release (%s); it will ask",
                        self.move_id,
                        self.source,
                        exc.code().name,
                    )
                    return
                await asyncio.sleep(0.5)

    # ------------------------------------------------------------------ abort

    @property
    def phase(self) -> str:
        return P.Phase.Name(self._progress.phase).lower()

    async def _passing(self, phase: int) -> None:
        """Waits while the shard's fault file holds moves at ``phase`` (tests only)."""
        await self.node.move_faults.passing(P.Phase.Name(phase).lower())

    def _check_cancel(self) -> None:
        if self.cancelled.is_set():
            raise ServerError(f"move {self.move_id} of memory space {self.name!r} was cancelled")

    async def _abort(self, stub: shard_pb2_grpc.ShardStub) -> None:
        if self.committed or not self._opened:
            return  # nothing here changed yet (or the move happened)
        try:
            await stub.FinishMoveOut(
                ipb.FinishMoveOutRequest(
                    memory_space_id=self.name, move_id=self.move_id, committed=False
                ),
                timeout=5.0,
            )
        except grpc.aio.AioRpcError as exc:  # it asks MoveStatus once it is back
            log.info("move %s: the source did not hear the abort: %s", self.move_id, exc)
        if self.space is not None:
            await self.space.close()
            self.space = None
        await self.node.delete_space_files(self.name)
        restore = self._previous or Owner(MOVED, max(0, self.epoch - 1), peer=self.source)
        await asyncio.to_thread(self.node.ownership.set, self.name, restore)

    def status(self) -> ipb.MoveStatusResponse:
        return ipb.MoveStatusResponse(state=ipb.MoveStatusResponse.IN_PROGRESS, epoch=self.epoch)


def _from_source(exc: BaseException, source: int) -> EngramError:
    if isinstance(exc, grpc.aio.AioRpcError):
        return from_rpc_error(exc, f"shard {source} (the source)")
    return UnavailableError(f"shard {source} (the source): {exc}")
