"""The local rebalancer: measures load, asks the pure decisions, carries the moves out.

``engram up --rebalance`` runs it for as long as the cluster runs; ``engram up --shards N``
on a data directory that had fewer shards runs it until the new shards are filled. Every
``interval_s`` it asks each shard for its Stats, turns two successive answers into each
space's load and a :class:`~engram.control.rebalance.Cluster` (:mod:`engram.control.loads`),
calls :func:`~engram.control.rebalance.plan` and
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

from engram.common.settings import SecuritySettings
from engram.contract.errors import EngramError
from engram.control import rebalance as rb
from engram.control.loads import Sample, cluster_of
from engram.control.moves import move_space, shard_stats

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
    # How to reach the shards (the cluster's token and mTLS; None: this process's settings).
    security: SecuritySettings | None = None
    moves_done: int = 0
    _previous: Sample | None = None
    _state: rb.Cluster | None = None

    async def round(self) -> rb.Plan | None:
        """One measurement, plan and its moves; None until two measurements exist."""
        addresses = dict(self.addresses())
        now = time.monotonic()
        sample = Sample(now, await shard_stats(addresses, self.security))
        previous, self._previous = self._previous, sample
        if previous is None or len(sample.stats) < len(addresses):
            return None
        state = self._state or rb.Cluster(shards=(), spaces=())
        cluster = cluster_of(
            previous,
            sample,
            {i: self._status(i) for i in addresses},
            last_moved={s.space: s.last_moved for s in state.spaces if s.last_moved is not None},
            last_round=state.last_round,
            unfinished=state.unfinished,
        )
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
                result = await move_space(
                    addresses, move.space, move.target, security=self.security
                )
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
