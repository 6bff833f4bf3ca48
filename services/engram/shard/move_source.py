"""The source side of a move: what the target may read of a space, the fence, the release.

The target drives the move (:mod:`engram.shard.move_target`) through the source's RPCs:

``OpenMoveOut``  the space stops writing checkpoints (so the files it lists stay), and the
                 target gets the checkpoint's files and the epoch; writes go on
``FetchFile``    a checkpoint file, in chunks
``ReadWal``      the records of the closed WAL segments after the one the target has; the
                 segment being written is closed first, so each call returns everything
                 durable at its start
``Fence``        recorded durably first (FENCED in ``owners.json``), then the space refuses
                 every write with NOT_OWNER, and once the writes in flight have settled its
                 last segment is closed; answers the space's final LSN
``FinishMoveOut``  committed: the space is MOVED to the target at the new epoch, stops
                 serving and its files are deleted. Not committed: unfenced, writes resume

A source that restarts while FENCED comes back fenced (reads served, writes refused) and asks
the target whether the move committed (:meth:`Outgoing.resolve`); an open move that was not
fenced is simply forgotten by a restart, and the target's next call fails, which aborts it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from engram.contract.errors import NotOwnerError, StorageError, ValidationError
from engram.internal.v1 import shard_pb2 as ipb
from engram.shard import checkpoint as ckpt
from engram.shard.ownership import FENCED, MOVED, Owner
from engram.shard.space import Space

if TYPE_CHECKING:
    from engram.shard.node import ShardNode

log = logging.getLogger("engram.shard.move")

CHUNK_BYTES = 1 << 20
# An open move whose target has not called for this long is asked whether it still runs it.
IDLE_S = 30.0


class Outgoing:
    """One space moving out of this shard (at most one move per space)."""

    def __init__(self, node: ShardNode, space: Space, move_id: str, target: int) -> None:
        self.node = node
        self.space = space
        self.move_id = move_id
        self.target = target
        self.fenced = False
        self.final_lsn = 0
        self.started = self.touched = time.monotonic()
        self.files: list[str] = []

    @property
    def name(self) -> str:
        return self.space.name

    def check(self, move_id: str) -> None:
        """Refuses a call for another move than this one."""
        self.touched = time.monotonic()
        if move_id != self.move_id:
            raise ValidationError(
                f"move {move_id!r} is not the move of memory space {self.name!r} in progress "
                f"here ({self.move_id!r})"
            )

    # ------------------------------------------------------------------ copy

    async def open(self) -> ipb.OpenMoveOutResponse:
        """Holds checkpoints (waiting for one in progress) and lists the checkpoint's files."""
        space = self.space
        space.checkpoint_holds += 1
        await asyncio.to_thread(_wait_free, space)
        manifest = ckpt.read_manifest(space.ckpt_dir)
        files: list[str] = []
        if manifest is not None and manifest.rows:
            files = manifest.files()
        self.files = files
        owner = self.node.ownership.get(self.name)
        out = ipb.OpenMoveOutResponse(
            epoch=owner.epoch if owner else 0, dim=space.dim, visible=space.visible
        )
        for name in files:
            out.files.add(name=name, size=(space.ckpt_dir / name).stat().st_size)
        return out

    def read_file(self, name: str, offset: int) -> Iterator[bytes]:
        """Chunks of a listed checkpoint file from ``offset`` (any thread)."""
        if name not in self.files:
            raise ValidationError(
                f"{name!r} is not a checkpoint file of memory space {self.name!r} "
                f"(listed: {self.files})"
            )
        for chunk in file_chunks(self.space, name, offset):
            self.touched = time.monotonic()
            yield chunk

    async def closed_segments(self, after: int) -> list[int]:
        """Closes the segment being written (unless fenced: it is final) and returns the
        closed segments numbered above ``after``."""
        wal = self.space.wal
        if not self.fenced:
            await wal.close_segment()
        return [n for n in wal.closed_segments() if n > after]

    def read_segment(self, number: int) -> Iterator[tuple[int, bytes]]:
        return self.space.wal.read_closed(number)

    # ------------------------------------------------------------------ fence and end

    async def fence(self) -> int:
        """Stops acknowledging writes (durably first) and returns the final LSN."""
        if not self.fenced:
            owner = self.node.ownership.get(self.name) or Owner(FENCED, 0)
            await asyncio.to_thread(
                self.node.ownership.set, self.name, owner.fenced(self.move_id, self.target)
            )
            self.fenced = True
            self.final_lsn = await self.space.fence(
                f"memory space {self.name!r} is moving to shard {self.target}"
            )
            log.info(
                "space %s fenced for move %s to shard %d at LSN %d",
                self.name,
                self.move_id,
                self.target,
                self.final_lsn,
            )
        return self.final_lsn

    async def finish(self, committed: bool, epoch: int) -> None:
        """The move's outcome, from the target (or found by :meth:`resolve`)."""
        node = self.node
        if committed:
            if not self.fenced:
                raise StorageError(
                    f"move {self.move_id} of memory space {self.name!r} cannot commit: the "
                    "source was never fenced"
                )
            await asyncio.to_thread(
                node.ownership.set, self.name, Owner(MOVED, epoch, peer=self.target)
            )
            node.outgoing.pop(self.name, None)
            log.info(
                "space %s moved to shard %d at epoch %d; deleting its files here",
                self.name,
                self.target,
                epoch,
            )
            await node.retire_space(self.name, delete=True)
            return
        if self.fenced:
            owner = node.ownership.get(self.name)
            if owner is not None and owner.state == FENCED:
                await asyncio.to_thread(node.ownership.set, self.name, owner.unfenced())
            self.space.unfence()
        self.space.checkpoint_holds = max(0, self.space.checkpoint_holds - 1)
        node.outgoing.pop(self.name, None)
        log.info("space %s: move %s aborted; it stays here", self.name, self.move_id)

    async def resolve(self, status: ipb.MoveStatusResponse | None) -> bool:
        """Ends a move the target no longer drives, given the target's answer to MoveStatus
        (None: the target did not answer). True if it ended."""
        if status is None:
            return False
        if status.state == ipb.MoveStatusResponse.COMMITTED:
            await self.finish(True, status.epoch)
            return True
        if status.state == ipb.MoveStatusResponse.UNKNOWN:
            await self.finish(False, 0)
            return True
        return False


def file_chunks(space: Space, name: str, offset: int) -> Iterator[bytes]:
    """A checkpoint file of ``space`` from ``offset``, in chunks (a move's or a backup's copy)."""
    with open(space.ckpt_dir / name, "rb") as f:
        f.seek(offset)
        while chunk := f.read(CHUNK_BYTES):
            yield chunk


def _wait_free(space: Space) -> None:
    """Blocks until no checkpoint of ``space`` is being written."""
    with space.checkpoint_lock:
        pass


def not_owner(name: str, owner: Owner, shard_id: int) -> NotOwnerError:
    """The answer of a shard that no longer holds ``name``."""
    return NotOwnerError(
        f"shard {shard_id} does not own memory space {name!r}: it moved to shard {owner.peer} "
        f"at epoch {owner.epoch}"
    )
