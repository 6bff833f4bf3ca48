"""Running moves one at a time, and remembering them in the resource's status.

:class:`Mover` carries out a plan's moves in a task of its own, one after the other, through
:func:`engram.control.moves.move_space`, so the operator's loop keeps observing while a space
moves. Before a move starts, ``status.moves.current`` names it (with its move id); when it
ends, an entry goes to ``status.moves.recent`` and an Event is posted. A move outlives its
caller (the target shard runs it), so an operator restarted mid-move finds
``status.moves.current`` and :meth:`Mover.follow` waits for the shards to finish it, then
records how it ended.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from engram.contract.errors import EngramError
from engram.control import rebalance as rb
from engram.control.moves import incoming_of, move_space, shard_stats, spaces_of
from engram_operator.observe import timestamp

log = logging.getLogger("engram_operator.moves")

# Moves kept in status.moves.recent (their times also make the spaces' cooldowns).
RECENT = 20
FOLLOW_POLL_S = 1.0


def iso(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Outcome:
    """How one move ended, as status.moves.recent records it."""

    move: rb.Move
    move_id: str
    started: float
    finished: float
    ok: bool
    message: str = ""
    pause_ms: float = 0.0

    def entry(self) -> dict[str, Any]:
        return {
            "space": self.move.space,
            "source": self.move.source,
            "target": self.move.target,
            "reason": self.move.reason,
            "moveId": self.move_id,
            "result": "Done" if self.ok else "Failed",
            "message": self.message,
            "startedAt": iso(self.started),
            "finishedAt": iso(self.finished),
            "seconds": round(self.finished - self.started, 3),
            "pauseMs": round(self.pause_ms, 1),
        }


# Writes part of the status (a merge patch of status.moves).
SaveMoves = Callable[[dict[str, Any]], Awaitable[None]]
# Posts an Event: (type, reason, message).
PostEvent = Callable[[str, str, str], None]


class Mover:
    def __init__(self, recent: Sequence[Mapping[str, Any]], save: SaveMoves, event: PostEvent):
        self.recent = [dict(r) for r in recent][:RECENT]
        self._save = save
        self._event = event
        self.task: asyncio.Task[None] | None = None
        # The move running now: (move, move id, started), for the status and conditions.
        self.current: tuple[rb.Move, str, float] | None = None
        # The plan whose moves run now, and the moves of it that finished.
        self.done: list[Outcome] = []

    def busy(self) -> bool:
        return self.task is not None and not self.task.done()

    def start(self, addresses: Mapping[int, str], moves: Sequence[rb.Move]) -> None:
        self.done = []
        self.task = asyncio.create_task(self._run(dict(addresses), list(moves)))

    def follow(self, addresses: Mapping[int, str], current: Mapping[str, Any]) -> None:
        """Waits for a move an earlier operator started (status.moves.current)."""
        move = rb.Move(
            str(current.get("space")),
            int(current.get("source", -1)),
            int(current.get("target", -1)),
            str(current.get("reason", "")),
        )
        self.done = []
        self.task = asyncio.create_task(self._follow(dict(addresses), move, current))

    async def _run(self, addresses: dict[int, str], moves: list[rb.Move]) -> None:
        for move in moves:
            move_id = f"op-{uuid.uuid4().hex[:12]}"
            started = time.time()
            self.current = (move, move_id, started)
            await self._save({"current": self.current_entry()})
            what = f"{move.space} from shard-{move.source} to shard-{move.target}"
            self._event("Normal", "MovingSpace", f"moving {what} ({move.reason})")
            try:
                result = await move_space(addresses, move.space, move.target, move_id=move_id)
            except EngramError as exc:
                outcome = Outcome(move, move_id, started, time.time(), False, str(exc))
                self._event("Warning", "MoveFailed", f"the move of {what} failed: {exc}")
            else:
                msg = f"moved in {result.seconds:.1f} s, writes paused {result.pause_ms:.0f} ms"
                outcome = Outcome(move, move_id, started, time.time(), True, msg, result.pause_ms)
                self._event("Normal", "MovedSpace", f"moved {what}: {msg}")
            await self._finish(outcome)

    async def _follow(
        self, addresses: dict[int, str], move: rb.Move, current: Mapping[str, Any]
    ) -> None:
        move_id = str(current.get("moveId", ""))
        started = time.time()
        self.current = (move, move_id, started)
        while True:
            stats = await shard_stats(addresses)
            where = spaces_of(stats).get(move.space)
            moving = move.space in incoming_of(stats) or (where and where.state == "fenced")
            if not moving and stats:
                break
            await asyncio.sleep(FOLLOW_POLL_S)
        ok = where is not None and where.owner == move.target
        msg = "finished while the operator restarted" if ok else "did not complete (aborted)"
        self._event("Normal" if ok else "Warning", "MovedSpace" if ok else "MoveFailed",
                    f"the move of {move.space} to shard-{move.target} {msg}")  # fmt: skip
        await self._finish(Outcome(move, move_id, started, time.time(), ok, msg))

    async def _finish(self, outcome: Outcome) -> None:
        self.done.append(outcome)
        self.recent = [outcome.entry(), *self.recent][:RECENT]
        self.current = None
        await self._save({"current": None, "recent": self.recent})

    def current_entry(self) -> dict[str, Any] | None:
        if self.current is None:
            return None
        move, move_id, started = self.current
        return {
            "space": move.space,
            "source": move.source,
            "target": move.target,
            "reason": move.reason,
            "moveId": move_id,
            "startedAt": iso(started),
        }

    def moving(self, now: float) -> tuple[str, int, int, str, float] | None:
        if self.current is None:
            return None
        move, _, started = self.current
        return (move.space, move.source, move.target, move.reason, now - started)

    def last_moved(self) -> dict[str, float]:
        """When each recently moved space last finished moving (wall clock)."""
        out: dict[str, float] = {}
        for entry in reversed(self.recent):
            if entry.get("result") == "Done":
                out[str(entry["space"])] = timestamp(entry.get("finishedAt"))
        return out

    def per_hour(self, now: float) -> int:
        return sum(1 for e in self.recent if now - timestamp(e.get("finishedAt")) < 3600)
