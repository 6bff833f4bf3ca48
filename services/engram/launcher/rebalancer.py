"""The local rebalancer: measures load, asks the pure decisions, carries the moves out.

``engram up --rebalance`` runs it for as long as the cluster runs; ``engram up --shards N``
on a data directory that had fewer shards runs it until the new shards are filled. Every
``interval_s`` it asks each shard for its Stats, turns two successive answers into each
space's load (observations and recalls per second, bytes on disk, un-indexed rows), builds a
:class:`~engram.control.rebalance.Cluster`, calls :func:`~engram.control.rebalance.plan` and
moves what the plan says, one space at a time, through :mod:`engram.control.moves`: exactly
what the Kubernetes operator does with the same functions.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from engram.contract.errors import EngramError
from engram.control import rebalance as rb
from engram.control.moves import move_space, shard_stats
from engram.internal.v1 import shard_pb2 as ipb

log = logging.getLogger("engram.launcher.rebalancer")


@dataclass
class Rebalancer:
    # Each shard's gRPC address (called at every round: addresses can change on restart).
    addresses: Callable[[], Mapping[int, str]]
    # Shards that are new (filled first) or draining (emptied first).
    new: set[int] = field(default_factory=set)
    draining: set[int] = field(default_factory=set)
    policy: rb.Policy = field(default_factory=rb.Policy)
    interval_s: float = 10.0
    # Stop once a plan is empty and the new shards are filled (False: run until stopped).
    until_balanced: bool = False
    moves_done: int = 0
    _previous: tuple[float, dict[int, ipb.StatsResponse]] | None = None
    _state: rb.Cluster | None = None

    async def round(self) -> rb.Plan | None:
        """One measurement, plan and its moves; None until two measurements exist."""
        addresses = dict(self.addresses())
        now = time.monotonic()
        stats = await shard_stats(addresses)
        previous, self._previous = self._previous, (now, stats)
        if previous is None or len(stats) < len(addresses):
            return None
        cluster = self._cluster(previous, now, stats, addresses)
        plan = rb.plan(cluster, now, self.policy)
        for skip in plan.skips:
            log.info("rebalance: %s stays on shard-%d: %s", skip.space, skip.shard, skip.reason)
        done = []
        for move in plan.moves:
            log.info(
                "rebalance: moving %s from shard-%d to shard-%d (%s)",
                move.space,
                move.source,
                move.target,
                move.reason,
            )
            try:
                result = await move_space(addresses, move.space, move.target)
            except EngramError as exc:
                log.warning("rebalance: the move of %s failed: %s", move.space, exc)
                continue
            self.moves_done += 1
            done.append(move)
            log.info(
                "rebalance: moved %s in %.1f s (write pause %.0f ms)",
                move.space,
                result.seconds,
                result.pause_ms,
            )
        finished = rb.Plan(
            moves=tuple(done),
            skips=plan.skips,
            hottest_before=plan.hottest_before,
            hottest_after=plan.hottest_after,
            unfinished=plan.unfinished or len(done) < len(plan.moves),
        )
        self._state = rb.record_round(cluster, finished, time.monotonic())
        if not plan.moves and not plan.unfinished:
            self.new.clear()  # filled (or nothing could go there): they are ordinary now
        return plan

    def _cluster(
        self,
        previous: tuple[float, dict[int, ipb.StatsResponse]],
        now: float,
        stats: Mapping[int, ipb.StatsResponse],
        addresses: Mapping[int, str],
    ) -> rb.Cluster:
        before_t, before = previous
        dt = max(1e-3, now - before_t)
        old = {
            s.memory_space_id: s for reply in before.values() for s in reply.spaces
        }  # counts a space had at the last measurement
        spaces = []
        last_moved = {s.space: s.last_moved for s in self._state.spaces} if self._state else {}
        for shard, reply in stats.items():
            for s in reply.spaces:
                if s.state != "owned":
                    continue
                was = old.get(s.memory_space_id)
                load = rb.Load(
                    ingest=max(0, s.count - (was.count if was else s.count)) / dt,
                    recall=max(0, s.recalls - (was.recalls if was else s.recalls)) / dt,
                    bytes=s.bytes,
                    backlog=s.count - s.indexed,
                )
                spaces.append(
                    rb.SpaceState(s.memory_space_id, shard, load, last_moved.get(s.memory_space_id))
                )
        shards = tuple(rb.ShardState(i, self._status(i)) for i in sorted(addresses))
        last_round = self._state.last_round if self._state else None
        unfinished = self._state.unfinished if self._state else False
        return rb.Cluster(shards, tuple(spaces), last_round=last_round, unfinished=unfinished)

    def _status(self, shard: int) -> rb.ShardStatus:
        if shard in self.draining:
            return rb.ShardStatus.DRAINING
        return rb.ShardStatus.NEW if shard in self.new else rb.ShardStatus.ACTIVE

    async def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                plan = await self.round()
            except Exception:  # keep rebalancing whatever one round ran into
                log.exception("rebalance round failed")
                plan = None
            if plan is not None and self.until_balanced and not self.new and not plan.moves:
                log.info("rebalance: balanced after %d moves", self.moves_done)
                return
            await asyncio.to_thread(stop.wait, self.interval_s)


def start_thread(rebalancer: Rebalancer, stop: threading.Event) -> threading.Thread:
    """Runs ``rebalancer`` in a thread of its own (with its own event loop) until ``stop``."""
    thread = threading.Thread(
        target=lambda: asyncio.run(rebalancer.run(stop)), name="engram-rebalancer", daemon=True
    )
    thread.start()
    return thread
