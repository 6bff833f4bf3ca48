"""Where spaces live, as one shard sees it: ownership, the routing table, moves in and out.

The shard's truth is its ownership file (:mod:`engram.shard.ownership`); the control plane's
routing table is a copy the shards publish (every heartbeat, and at once after a change) and
read back. :class:`Placement` decides, for the shard:

* whether a space may be served here or created here. A space is created only if no shard
  claims it, this shard is its default one, and every shard has published since the control
  plane started (else a space missing from the table may live on a shard not heard yet);
* what a restart finds: INCOMING copies are discarded (their move did not commit), MOVED
  spaces' leftover files deleted, FENCED spaces served for reads and resolved with the target;
* stale claims: where the table shows another shard owning one of this shard's spaces at a
  higher epoch, this shard stops serving it (a move committed that it did not hear of);
* moves in progress: :class:`~engram.shard.move_source.Outgoing` (this shard is the source) and
  :class:`~engram.shard.move_target.Incoming` (the target), and asking a target what became of
  a move its source no longer hears about.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from typing import TYPE_CHECKING

import grpc

from engram.common import grpcutil, internal
from engram.contract.errors import NotOwnerError, UnavailableError
from engram.internal.v1 import shard_pb2 as ipb
from engram.internal.v1 import shard_pb2_grpc
from engram.shard.move_source import IDLE_S, Outgoing, not_owner
from engram.shard.ownership import FENCED, INCOMING, MOVED, Owner, Ownership
from engram.shard.state import wal_directory

if TYPE_CHECKING:
    from engram.shard.move_target import Incoming
    from engram.shard.node import ShardNode

log = logging.getLogger("engram.shard.placement")

# A fenced move whose target has been silent this long is resolved by asking the target.
FENCED_SILENCE_S = 5.0


class Placement:
    def __init__(self, node: ShardNode) -> None:
        self.node = node
        self.ownership = Ownership(node.root)
        self.outgoing: dict[str, Outgoing] = {}
        self.incoming: dict[str, Incoming] = {}

    # ------------------------------------------------------------------ start

    def load(self) -> list[str]:
        """Reads the ownership file and tidies what a crash left; returns the spaces to
        recover (owned or fenced here). Blocking; before serving."""
        spaces_dir = self.node.root / "spaces"
        spaces_dir.mkdir(parents=True, exist_ok=True)
        on_disk = sorted(e.name for e in spaces_dir.iterdir() if e.is_dir())
        self.ownership.load(on_disk)
        keep: list[str] = []
        for name, owner in self.ownership.items():
            if owner.state == INCOMING:
                log.warning(
                    "space %s: discarding the copy of move %s (it did not commit)",
                    name,
                    owner.move_id,
                )
                self.delete_files_now(name)
                self.ownership.set(name, Owner(MOVED, max(0, owner.epoch - 1), peer=owner.peer))
            elif owner.state == MOVED:
                self.delete_files_now(name)
            elif name in on_disk:
                keep.append(name)
            else:  # owned, but its directory is gone: nothing to serve
                log.error("space %s is recorded as %s here but has no directory", name, owner)
        return keep

    def fenced_on_start(self) -> None:
        """Outgoing moves for the spaces a restart found FENCED (reads served, writes not)."""
        for name, owner in self.ownership.items():
            space = self.node.spaces.get(name)
            if owner.state == FENCED and space is not None:
                out = Outgoing(self.node, space, owner.move_id, owner.peer)
                out.fenced = True
                out.final_lsn = space.visible
                out.touched = 0.0  # resolve at the first heartbeat
                space.checkpoint_holds += 1
                space.fenced_why = f"memory space {name!r} is moving to shard {owner.peer}"
                self.outgoing[name] = out

    # ------------------------------------------------------------------ access

    def check_served(self, name: str) -> None:
        """Raises NOT_OWNER for a space this shard does not hold (moved away, being copied)."""
        owner = self.ownership.get(name)
        if owner is None or owner.claims:
            return
        if owner.state == MOVED:
            raise not_owner(name, owner, self.node.shard_id)
        raise NotOwnerError(
            f"shard {self.node.shard_id} does not serve memory space {name!r} yet: a move is "
            "copying it here"
        )

    def check_route(self, name: str) -> None:
        """Raises NOT_OWNER if the routing table puts ``name`` on another shard."""
        table = self.node.assignment
        owner = table.owner(name)
        if owner != self.node.shard_id:
            raise NotOwnerError(
                f"shard {self.node.shard_id} does not own memory space {name!r} (owner: shard "
                f"{owner}, epoch {table.space_epoch(name)})"
            )

    def check_create(self, name: str) -> None:
        """Raises unless this shard may create ``name``, which :meth:`check_route` already
        found routed here: only once every shard has published (see the module docstring)."""
        table = self.node.assignment
        if not table.complete:
            missing = sorted(set(range(table.shard_count)) - table.published)
            raise UnavailableError(
                f"shard {self.node.shard_id} cannot create memory space {name!r} yet: shards "
                f"{missing} have not reported the spaces they own since the control plane "
                "started; retry shortly"
            )

    def epoch(self, name: str) -> int:
        owner = self.ownership.get(name)
        return owner.epoch if owner is not None else 0

    # ------------------------------------------------------------------ routing table

    async def publish(self) -> None:
        """Publishes this shard's claims; reads the table back; acts on stale claims."""
        node = self.node
        claims = self.ownership.claimed()
        await node.store.publish_owners(node.shard_id, claims)
        node.assignment = table = await node.store.assignment()
        for name, epoch in claims.items():
            owner = table.overrides.get(name)
            if owner is not None and owner != node.shard_id and table.space_epoch(name) > epoch:
                await self._lost(name, owner, table.space_epoch(name))

    async def refresh_incomplete(self) -> None:
        """Reads the routing table again if it is not known complete yet (before creating a
        space: the last shard may have published since this one last read it)."""
        if not self.node.assignment.complete:
            try:
                self.node.assignment = await self.node.store.assignment()
            except Exception as exc:  # the creation is refused, retryably
                log.debug("reading the routing table failed: %s", exc)

    async def _lost(self, name: str, owner: int, epoch: int) -> None:
        """Another shard owns ``name`` at a higher epoch: stop serving it, keep its files."""
        if name in self.outgoing:
            return  # a fenced move: resolved with its target
        log.error(
            "space %s: shard %d owns it at epoch %d, above this shard's %d; no longer serving it",
            name,
            owner,
            epoch,
            self.epoch(name),
        )
        await asyncio.to_thread(self.ownership.set, name, Owner(MOVED, epoch, peer=owner))
        await self.node.retire_space(name, delete=False)

    # ------------------------------------------------------------------ moves

    def move_status(self, name: str, move_id: str, epoch: int) -> ipb.MoveStatusResponse:
        """Whether the move that commits ``name`` at ``epoch`` committed here."""
        S = ipb.MoveStatusResponse
        incoming = self.incoming.get(name)
        if incoming is not None and incoming.move_id == move_id:
            return incoming.status()
        owner = self.ownership.get(name)
        # this shard held the space at that epoch (an INCOMING record of it is not a commit),
        # or later: the move committed
        if owner is not None and (
            owner.epoch > epoch or (owner.epoch == epoch and owner.state != INCOMING)
        ):
            return S(state=S.COMMITTED, epoch=owner.epoch)
        return S(state=S.UNKNOWN)

    async def resolve_silent_moves(self) -> None:
        """Asks the targets of moves out that went quiet what became of them."""
        now = time.monotonic()
        for out in list(self.outgoing.values()):
            silence = now - out.touched
            if silence < (FENCED_SILENCE_S if out.fenced else IDLE_S):
                continue
            owner = self.ownership.get(out.name)
            epoch = (owner.epoch if owner is not None else 0) + 1
            status = await self._ask(out.target, out.name, out.move_id, epoch)
            if await out.resolve(status):
                log.info("space %s: move %s resolved", out.name, out.move_id)
                await self.node.publish_ownership()

    async def _ask(
        self, target: int, name: str, move_id: str, epoch: int
    ) -> ipb.MoveStatusResponse | None:
        try:
            shards = await self.node.store.shards()
        except Exception:
            return None
        info = shards.get(target)
        if info is None:
            return None
        opts = grpcutil.options(self.node.settings.limits)
        security = self.node.settings.security
        async with internal.aio_channel(info.address, opts, security) as channel:
            try:
                return await shard_pb2_grpc.ShardStub(channel).MoveStatus(
                    ipb.MoveStatusRequest(memory_space_id=name, move_id=move_id, epoch=epoch),
                    timeout=5.0,
                )
            except grpc.aio.AioRpcError:
                return None

    # ------------------------------------------------------------------ files

    def delete_files_now(self, name: str) -> None:
        """Deletes a space's directory and WAL (blocking)."""
        directory = self.node.space_dir(name)
        wal = wal_directory(name, directory, self.node.settings.shard.wal)
        shutil.rmtree(wal, ignore_errors=True)
        shutil.rmtree(directory, ignore_errors=True)
