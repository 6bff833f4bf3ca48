"""Dropping a memory space on the shard that owns it: its data gone, crash-safe, then forgotten.

:meth:`Drops.drop` (the shard's ``DropSpace`` RPC) runs these steps, in this order::

    refuse     a space moving in or out (fenced / incoming): retryable, naming the move
    stop       the space's sessions are "dropping": their appends and opens are answered
               SPACE_DROPPED from now on; the space is fenced and its writes in flight settle
               (each is acknowledged or failed as usual: an ack precedes the drop's answer)
    marker     <data_dir>/drops/<space>.json, fsynced: from here the drop always completes
    files      the space leaves memory (background threads off it) and its directory, WAL
               (also under ENGRAM_WAL_DIR) and checkpoints are deleted
    ownership  forgotten (owners.json); a space living away from its default shard (it moved
               here) stays OWNED at its epoch instead, with no data: the routing table keeps
               sending its name here, where a new session creates it afresh. Forgetting it
               would route the name to its default shard, which refuses it for good (MOVED)
    control    the control plane forgets its sessions and routing entry
               (:meth:`~engram.control.store.ControlStore.forget_space`); then the marker goes

A shard that starts and finds a marker finishes the drop before it recovers anything
(:meth:`Drops.finish_on_start`), and tells the control plane from its background task
(:meth:`Drops.run`), which also retries a control plane that was unreachable. While a marker
exists, the name cannot be created again (retryable UNAVAILABLE): the control plane's cleanup
must not meet the new space's sessions.

The dropped space's sessions are answered SPACE_DROPPED afterwards too (appends, and opens
that resume them), for as long as the process runs; a new session on the name starts an empty
space, of any dimension. Called by :class:`~engram.shard.node.ShardNode` (start) and the
shard's gRPC service (``DropSpace``, and :meth:`Drops.check` before appends and opens).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from engram.common import validation
from engram.contract.errors import SessionError, UnavailableError
from engram.control.assignment import default_shard
from engram.shard import checkpoint as ckpt
from engram.shard.ownership import OWNED, Owner, Ownership
from engram.v1 import streaming_pb2 as pb

if TYPE_CHECKING:
    from engram.shard.node import ShardNode

log = logging.getLogger("engram.shard.drop")

MARKERS = "drops"
# How often markers whose control-plane step failed are tried again.
RETRY_S = 2.0


@dataclass(frozen=True)
class Marker:
    """What a drop must still finish, written before any file is deleted."""

    space: str
    epoch: int  # the space's epoch here when it was dropped
    keep_route: bool  # the space lives away from its default shard: it stays routed here
    sessions: list[str]  # its sessions, answered SPACE_DROPPED and forgotten in the control plane


class Drops:
    """The drops of one shard: in progress, finished, and waiting for the control plane."""

    def __init__(self, node: ShardNode) -> None:
        self.node = node
        self.directory = node.root / MARKERS
        self._dropping: set[str] = set()  # spaces between "stop" and "files" (see the module)
        self._sessions: dict[str, set[str]] = {}  # space -> its dropped sessions
        self._pending: dict[str, Marker] = {}  # markers on disk: control plane not told yet

    # ------------------------------------------------------------------ refusals

    def check(self, space: str, session_id: str, *, create: bool = False) -> None:
        """Raises SPACE_DROPPED for a session of a dropped (or dropping) space, and
        UNAVAILABLE for a new session on a name whose drop is not finished."""
        if space in self._dropping or session_id in self._sessions.get(space, ()):
            raise SessionError(
                f"memory space {space!r} was dropped; session {session_id!r} ended with it "
                "(a new session on the name starts an empty space)",
                code=pb.SPACE_DROPPED,
            )
        if create and space in self._pending:
            raise UnavailableError(f"memory space {space!r} is still being dropped; retry shortly")

    def _refuse_moving(self, name: str) -> None:
        node = self.node
        incoming = node.incoming.get(name)
        outgoing = node.outgoing.get(name)
        space = node.spaces.get(name)
        if incoming is not None:
            why = f"move {incoming.move_id} is copying it here from shard {incoming.source}"
        elif outgoing is not None:
            why = f"move {outgoing.move_id} is taking it to shard {outgoing.target}"
        elif space is not None and space.fenced_why:
            why = space.fenced_why
        else:
            return
        raise UnavailableError(
            f"memory space {name!r} cannot be dropped while it moves ({why}); retry once the "
            "move has ended"
        )

    # ------------------------------------------------------------------ drop

    async def drop(self, name: str) -> int:
        """Drops ``name`` here (see the module); returns the observations it held (0: unknown)."""
        node = self.node
        if not node.ready:
            raise UnavailableError(f"shard {node.shard_id} is recovering; retry shortly")
        name = validation.space_id(name)
        if name in self._dropping or name in self._pending:
            raise UnavailableError(f"memory space {name!r} is already being dropped; retry shortly")
        self._refuse_moving(name)
        space = node.spaces.get(name)
        if space is None:
            node.placement.check_served(name)  # moved away: NOT_OWNER, the gateway re-routes
            await self._forget_unknown(name)
            return 0
        sessions = set(space.sessions.assigned) | set(space.sessions.durable)
        self._dropping.add(name)
        try:
            await space.fence(f"memory space {name!r} is being dropped")
            observations = space.live_count
            marker = Marker(
                space=name,
                epoch=node.placement.epoch(name),
                keep_route=default_shard(name, node.settings.cluster.shard_count) != node.shard_id,
                sessions=sorted(sessions),
            )
            await asyncio.to_thread(self._write_marker, marker)
            self._sessions[name] = sessions
            self._pending[name] = marker
        finally:
            self._dropping.discard(name)
        await node.retire_space(name, delete=True)
        await asyncio.to_thread(_forget_owner, node.ownership, marker)
        log.info("space %s dropped: %d observations deleted", name, observations)
        await self._tell_control_plane(marker)
        await node.publish_ownership()
        return observations

    async def _forget_unknown(self, name: str) -> None:
        """A space this shard does not hold: whatever the control plane kept of it goes."""
        try:
            await self.node.store.forget_space(name, shard=self.node.shard_id, epoch=0)
        except Exception as exc:  # nothing here to finish later: a retry of the drop does it
            raise UnavailableError(
                f"memory space {name!r} holds nothing here, but the control plane did not "
                f"answer: {exc}; retry"
            ) from None

    async def _tell_control_plane(self, marker: Marker) -> bool:
        """Forgets the space in the control plane, then removes the marker. False if the
        control plane did not answer (:meth:`run` tries again)."""
        try:
            await self.node.store.forget_space(
                marker.space,
                shard=self.node.shard_id,
                epoch=marker.epoch,
                sessions=marker.sessions,
                keep_route=marker.keep_route,
            )
        except Exception as exc:
            log.warning(
                "space %s dropped, but the control plane could not be told (%s); retrying",
                marker.space,
                exc,
            )
            return False
        await asyncio.to_thread(self._remove_marker, marker.space)
        self._pending.pop(marker.space, None)
        return True

    # ------------------------------------------------------------------ restarts

    def finish_on_start(self) -> None:
        """Finishes the drops a crash interrupted (blocking; before anything is recovered)."""
        markers = self._read_markers()
        if not markers:
            return
        ownership = self.node.ownership
        ownership.load()
        for marker in markers:
            log.warning("space %s: finishing its drop (interrupted by a restart)", marker.space)
            self.node.placement.delete_files_now(marker.space)
            _forget_owner(ownership, marker)
            self._sessions[marker.space] = set(marker.sessions)
            self._pending[marker.space] = marker

    async def run(self) -> None:
        """Tells the control plane of the drops it has not heard of yet (background task)."""
        while True:
            for marker in list(self._pending.values()):
                await self._tell_control_plane(marker)
            await asyncio.sleep(RETRY_S)

    # ------------------------------------------------------------------ markers

    def _marker_path(self, name: str) -> Path:
        return self.directory / f"{name}.json"

    def _write_marker(self, marker: Marker) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        body = json.dumps(asdict(marker)).encode()
        ckpt.write_atomic(self._marker_path(marker.space), lambda tmp: tmp.write_bytes(body))

    def _remove_marker(self, name: str) -> None:
        self._marker_path(name).unlink(missing_ok=True)
        ckpt.fsync_dir(self.directory)

    def _read_markers(self) -> list[Marker]:
        if not self.directory.is_dir():
            return []
        out = []
        for entry in sorted(os.scandir(self.directory), key=lambda e: e.name):
            if entry.name.endswith(".tmp"):  # a crash while it was written: nothing deleted yet
                os.unlink(entry.path)
            elif entry.name.endswith(".json"):
                out.append(Marker(**json.loads(Path(entry.path).read_text())))
        return out


def _forget_owner(ownership: Ownership, marker: Marker) -> None:
    """The ownership step (see the module); blocking."""
    owner = Owner(OWNED, marker.epoch) if marker.keep_route else None
    ownership.set(marker.space, owner)
