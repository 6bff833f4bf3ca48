"""Moves as chaos faults: a space changes shards while the workload writes and recalls.

=========================  ==================================================================
kind                       what happens
=========================  ==================================================================
``move``                   a workload space moves to another shard (engram.control.moves)
``move_kill``              a move is held at a random step (copying, catching_up, fenced,
                           committed: the target's fault file), then the source, the target
                           or the gateway is killed with SIGKILL, or Redis is (it restarts
                           empty); the hold is lifted and the space must end with exactly
                           one owner
=========================  ==================================================================

A move that aborts is not a failure by itself (a killed source or target aborts it, as it
should); what the checkers require afterwards is unchanged: nothing acknowledged lost,
duplicated or reordered. Here a space that does not settle on exactly one owner is counted
(``move_owners_unsettled``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engram.contract.errors import EngramError
from engram.control.moves import move_space, shard_stats, spaces_of
from engram.shard.faults import SETTLE_S as FAULT_FILE_SETTLE_S

if TYPE_CHECKING:
    from engram.chaos.faults import FaultEvent
    from engram.launcher.cluster import LocalCluster

log = logging.getLogger("engram.chaos.moves")

STEPS = ("copying", "catching_up", "fenced", "committed")
VICTIMS = ("source", "target", "gateway", "redis")
MOVE_TIMEOUT_S = 120.0
OWNERS_SETTLE_S = 90.0


class MoveFaults:
    """Carries out ``move`` and ``move_kill`` for the :class:`~engram.chaos.faults.Injector`."""

    def __init__(
        self,
        cluster: LocalCluster,
        spaces: list[str],
        rng: random.Random,
        hold: Callable[[int, str], None],
        event: Callable[[str, str], FaultEvent],
        count: Callable[[str], None],
    ) -> None:
        self.cluster = cluster
        self.spaces = spaces
        self.rng = rng
        self._hold = hold  # (shard, phase): moves into shard wait at phase ("" lifts it)
        self._event = event
        self._count = count

    def _addresses(self) -> dict[int, str]:
        return {i: self.cluster.shard_address(i) for i in range(self.cluster.shards)}

    async def _where(self, space: str) -> tuple[int, int] | None:
        found = spaces_of(await shard_stats(self._addresses())).get(space)
        return (found.owner, found.epoch) if found is not None else None

    async def move(self) -> FaultEvent:
        space = self.rng.choice(self.spaces)
        event = self._event("move", space)
        where = await self._where(space)
        if where is None:
            event.note = "no shard reports the space yet"
            return event
        target = self.rng.choice([i for i in range(self.cluster.shards) if i != where[0]])
        event.params.update(source=where[0], target=target)
        try:
            result = await asyncio.wait_for(
                move_space(self._addresses(), space, target), MOVE_TIMEOUT_S
            )
            event.params.update(epoch=result.epoch, pause_ms=round(result.pause_ms, 1))
        except (EngramError, TimeoutError) as exc:
            event.note = f"move did not happen: {exc}"
        await self._settle(space, event)
        return event

    async def move_kill(self) -> FaultEvent:
        space = self.rng.choice(self.spaces)
        step, victim = self.rng.choice(STEPS), self.rng.choice(VICTIMS)
        event = self._event("move_kill", space)
        where = await self._where(space)
        if where is None:
            event.note = "no shard reports the space yet"
            return event
        source = where[0]
        target = self.rng.choice([i for i in range(self.cluster.shards) if i != source])
        event.params.update(step=step, victim=victim, source=source, target=target)
        self._hold(target, step)
        await asyncio.sleep(FAULT_FILE_SETTLE_S)  # the shard polls its fault file
        move = asyncio.create_task(move_space(self._addresses(), space, target))
        try:
            reached = await self._reach(space, step, move)
            if reached:
                name = {"source": f"shard-{source}", "target": f"shard-{target}"}.get(
                    victim, victim
                )
                with contextlib.suppress(Exception):
                    self.cluster.kill(name, signal.SIGKILL)
            else:
                event.note = f"the move ended before {step}"
        finally:
            self._hold(target, "")
        try:
            result = await asyncio.wait_for(move, MOVE_TIMEOUT_S)
            event.params["outcome"] = f"moved at epoch {result.epoch}"
        except (EngramError, TimeoutError) as exc:
            event.params["outcome"] = f"aborted: {type(exc).__name__}"
        await self._settle(space, event)
        return event

    async def _reach(self, space: str, step: str, move: asyncio.Task[Any]) -> bool:
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline and not move.done():
            stats = await shard_stats(self._addresses())
            for reply in stats.values():
                for s in reply.spaces:
                    if s.memory_space_id == space and s.move_phase == step:
                        return True
            await asyncio.sleep(0.02)
        return False

    async def _settle(self, space: str, event: FaultEvent) -> None:
        """Waits until exactly one shard claims ``space`` and no move of it is in progress."""
        deadline = time.monotonic() + OWNERS_SETTLE_S
        claims: list[tuple[int, int, str]] = []
        while time.monotonic() < deadline:
            stats = await shard_stats(self._addresses())
            claims = [
                (shard, s.epoch, s.state)
                for shard, reply in stats.items()
                for s in reply.spaces
                if s.memory_space_id == space
            ]
            if len(stats) == self.cluster.shards and len(claims) == 1 and claims[0][2] == "owned":
                event.params["owner"] = f"shard-{claims[0][0]}@{claims[0][1]}"
                return
            await asyncio.sleep(0.2)
        event.note = (event.note + "; " if event.note else "") + f"owners unsettled: {claims}"
        self._count("move_owners_unsettled")
