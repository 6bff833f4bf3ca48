"""Retention of a memory space: its setting made durable, and enforced by deleting old rows.

A space's retention (``engram.v1.Retention``: ``max_age_s``, ``max_rows``; 0 is no bound) is
set by the shard's ``SetRetention`` RPC through :func:`set_retention`: a ``WalRecord.retention``
is written like any record and the setting takes effect once it is durable. Recovery replays
such records and the checkpoint manifest keeps the latest one (the WAL holding it may be
trimmed), so a restart or a move keeps it.

:func:`enforce` (a task of the shard node) looks at every space with a retention once per
``TICK_S`` and turns what falls outside it into a delete through the space's own tombstone
path (``resolve_delete`` / ``begin_delete``), exactly like a client's delete:

* by age: rows whose time (``when``) is older than ``max_age_s`` before now;
* by count: the oldest rows (by LSN) beyond ``max_rows`` live ones. Deleted rows are skipped
  with a cursor (every row below it is deleted); a restart starts it at 0 again and the rows
  already deleted count as ``already_deleted``.

Each tick deletes at most ``MAX_ROWS_PER_TICK`` rows a space and waits for that delete to be
durable before it goes on: enforcement holds the event loop for a short step only, never sits
on the ack path (the delete is one more WAL record among the batches), and catches up on a
large excess over a few ticks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import numpy as np

from engram.contract.errors import EngramError, NotOwnerError, StorageError
from engram.internal.v1 import shard_pb2 as ipb
from engram.shard.space import Space
from engram.v1 import streaming_pb2 as pb

if TYPE_CHECKING:
    from engram.shard.node import ShardNode

log = logging.getLogger("engram.shard.retention")

TICK_S = 1.0
MAX_ROWS_PER_TICK = 20_000
REQUEST_ID = "retention"


def set_retention(space: Space, retention: pb.Retention) -> asyncio.Future[None]:
    """Writes ``retention`` into the space's WAL; the future resolves once it is durable and
    in effect (or fails with the WAL's StorageError, the setting unchanged)."""
    loop = space._require_loop()
    if space.fenced_why:
        raise NotOwnerError(space.fenced_why)
    if space.wal.failed:
        raise StorageError(
            f"memory space {space.name!r} cannot make writes durable right now (WAL failure); "
            "the retention is unchanged: retry later"
        )
    wanted = pb.Retention()
    wanted.CopyFrom(retention)
    record = ipb.WalRecord(retention=ipb.WalRetention(retention=wanted))
    done: asyncio.Future[None] = loop.create_future()
    space._inflight += 1
    wal_fut = space.wal.append(record.SerializeToString(), space._next_row)
    space.retention_pending = done

    def settled(f: asyncio.Future[None]) -> None:
        space._inflight -= 1
        if space.retention_pending is done:
            space.retention_pending = None
        if f.cancelled() or f.exception() is not None:
            if not done.done():
                done.set_exception(StorageError(f"the retention was not made durable: {f!r}"))
            space._on_failure()
            return
        space.retention.CopyFrom(wanted)
        if not done.done():
            done.set_result(None)

    wal_fut.add_done_callback(settled)
    return done


class Enforcer:
    """Enforces every space's retention on one shard (its ``run`` is a task of the node)."""

    def __init__(self, node: ShardNode) -> None:
        self.node = node
        # per space object: every row below this one is deleted (for max_rows)
        self._floors: dict[int, tuple[Space, int]] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            for space in list(self.node.spaces.values()):
                r = space.retention
                if not (r.max_age_s or r.max_rows) or space.fenced_why:
                    continue
                try:
                    await self.enforce(space)
                except EngramError as exc:  # a WAL failure, a fence: the next tick tries again
                    log.warning("space %s: retention not enforced this time: %s", space.name, exc)
                except Exception:
                    log.exception("space %s: enforcing retention failed", space.name)
            live = {id(s) for s in self.node.spaces.values()}
            self._floors = {k: v for k, v in self._floors.items() if k in live}

    async def enforce(self, space: Space, now_us: int | None = None) -> int:
        """One step on ``space``: deletes up to ``MAX_ROWS_PER_TICK`` rows outside its
        retention, durably; returns how many it deleted."""
        r = space.retention
        parts: list[np.ndarray] = []
        if r.max_age_s:
            now = time.time_ns() // 1000 if now_us is None else now_us
            cutoff = max(now - r.max_age_s * 1_000_000, -(2**63))
            old, _, _ = space.resolve_delete([], None, cutoff)
            parts.append(np.asarray(old, dtype=np.uint64)[:MAX_ROWS_PER_TICK])
        floor = 0
        if r.max_rows:
            entry = self._floors.get(id(space))
            floor = entry[1] if entry is not None and entry[0] is space else 0
            excess = min(int(space.live_count) - int(r.max_rows), MAX_ROWS_PER_TICK)
            if excess > 0:
                parts.append(np.arange(floor, floor + excess, dtype=np.uint64))
                floor += excess
        if not parts:
            return 0
        rows = np.unique(np.concatenate(parts))[:MAX_ROWS_PER_TICK]
        if not len(rows):
            return 0
        result = await space.begin_delete(rows, REQUEST_ID)
        if r.max_rows:
            self._floors[id(space)] = (space, floor)
        if result.deleted:
            log.info(
                "space %s: retention deleted %d observations (max_age_s=%d, max_rows=%d)",
                space.name,
                result.deleted,
                r.max_age_s,
                r.max_rows,
            )
        return int(result.deleted)
