"""The shard's background threads: the index builder and the fresh-tier partitioner.

One builder thread serves all spaces of a shard: it moves fresh rows into HNSW in small chunks
(so recalls never wait long for the index lock), writes checkpoints, and compacts spaces with
many deleted rows (:mod:`engram.shard.compaction`) in steps of the same size, taking turns
with indexing. While writes arrive (at least ``TRICKLE_ROWS_PER_S`` rows a second: a trickle,
such as the visibility canary's one row a second, costs acks nothing) it works only part of the
time, so acks and recalls keep the CPU. The partitioner keeps large
fresh tiers partitioned (cheap: a fraction of ingest's cost) so recalls stay fast however far
HNSW lags. Both yield to recalls first (:mod:`engram.shard.recall_first`): before each step
they wait while recalls are queued (the builder also while they are slow), for at most
``ENGRAM_RECALL_YIELD_MAX_MS`` at a time, and not at all while memory is CRITICAL (indexing is
what frees it). Both take the spaces from :meth:`ShardNode.working_spaces` and name the space
they work on in ``working`` (:meth:`ShardNode.retire_space` waits until neither works on a
space it takes away). Started and stopped by :class:`~engram.shard.node.ShardNode`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from engram.common import metrics
from engram.common.threads import name_os_thread, trim_heap
from engram.shard.admission import CRITICAL, THRESHOLDS
from engram.shard.space import Space

if TYPE_CHECKING:
    from engram.shard.node import ShardNode

log = logging.getLogger("engram.shard")

# Rows a second, all of a shard's spaces, below which arriving writes do not make the builder
# rest: acknowledging them costs a few milliseconds of CPU a second, and resting would leave an
# idle shard indexing at a fraction of its speed (a canary writing a row a second did that).
TRICKLE_ROWS_PER_S = 1_000.0


class ArrivalRate:
    """Rows a second published by a shard's spaces, over windows of at least ``window_s``."""

    def __init__(self, window_s: float = 1.0) -> None:
        self._window_s = window_s
        self._mark: tuple[float, int] | None = None
        self.rows_per_s: float | None = None  # None until a first whole window

    def update(self, now: float, total_rows: int) -> float | None:
        """The rate of the last full window (None before the first), given the spaces' row
        count now (it falls when a space is dropped or moves away: that window counts as no
        rows)."""
        if self._mark is None:
            self._mark = (now, total_rows)
        elif now - self._mark[0] >= self._window_s:
            t0, n0 = self._mark
            self.rows_per_s = max(0, total_rows - n0) / (now - t0)
            self._mark = (now, total_rows)
        return self.rows_per_s


class Background:
    """The builder and partitioner threads of one shard."""

    def __init__(self, node: ShardNode) -> None:
        self.node = node
        self._picks = 0
        self._turns = 0  # while a space compacts, every other step is a compaction step
        self._compact_failed: dict[str, float] = {}  # space -> monotonic time of its failure
        self._build_rate = 2_000.0  # rows/s of the builder's add_items calls (moving average)
        self._arrivals = ArrivalRate()
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by stop(): the idle builder need not finish its wait
        self._threads: list[threading.Thread] = []
        # the space each thread works on ("builder", "partitioner"), None between steps
        self.working: dict[str, Space | None] = {"builder": None, "partitioner": None}

    def start(self) -> None:
        for target, name in (
            (self._build_loop, "index-builder"),
            (self._partition_loop, "fresh-partitioner"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Asks both threads to stop and joins them (blocking)."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(30)

    def busy_with(self, space: Space) -> bool:
        return any(s is space for s in self.working.values())

    @contextlib.contextmanager
    def _working_on(self, role: str, space: Space) -> Iterator[bool]:
        """Names ``space`` as worked on by ``role`` for the block, which is told whether the
        space is still served (else it must leave it alone; see the module)."""
        self.working[role] = space
        try:
            yield self.node.spaces.get(space.name) is space
        finally:
            self.working[role] = None

    def _pick(self, spaces: list[Space]) -> Space | None:
        """Strict priority (the space whose un-indexed rows include the most urgent lane),
        except that every ``low_every``-th pick goes to the space whose LOW rows waited longest.
        """
        busy = [s for s in spaces if s.backlog() > 0]
        if not busy:
            return None
        self._picks += 1
        if self._picks % self.node.settings.shard.admission.low_every == 0:
            waiting = [(s.oldest_low_since(), s) for s in busy]
            lows = [(since, s) for since, s in waiting if since is not None]
            if lows:
                return min(lows, key=lambda item: item[0])[1]
        return min(busy, key=lambda s: (s.top_lane() or 9, -s.backlog()))

    def _chunk(self, backlog: int) -> int:
        """Rows for the next add_items call: about ``build_chunk_ms`` of work at the measured
        rate (a recall waits for the call in progress), at most ``build_chunk``, and small
        while the backlog is small."""
        idx = self.node.settings.shard.index
        by_time = int(self._build_rate * idx.build_chunk_ms / 1000)
        return max(8, min(idx.build_chunk, by_time, max(16, backlog // 4)))

    def _yield_to_recalls(self, latency: bool = True) -> None:
        """Waits while recalls come first, unless memory presses (see the module)."""
        if self.node.admission.memory_pressure < THRESHOLDS[CRITICAL]:
            self.node.recalls.wait_for_recalls(self._stop, latency)

    def _arriving(self) -> tuple[bool, bool]:
        """Whether writes arrive at more than a trickle (the builder then rests between steps),
        and whether any writes or recalls arrived in the last second (it then leaves a core
        free)."""
        now = time.monotonic()
        spaces = self.node.working_spaces()
        rate = self._arrivals.update(now, sum(s.visible for s in spaces))
        writes = any(now - s.last_write < 1.0 for s in spaces)
        serving = writes or any(now - s.last_recall < 1.0 for s in spaces)
        # no whole window yet (the first look): any write counts, as it did before rates
        return writes and (rate is None or rate >= TRICKLE_ROWS_PER_S), serving

    def _build_loop(self) -> None:
        name_os_thread()
        nice = self.node.settings.shard.index.builder_nice
        if nice:
            # Linux nice values are per thread, and the threads hnswlib starts inherit it:
            # indexing then yields the CPU to acks and recalls, which must stay fast.
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            except OSError as exc:
                log.warning("could not lower the index builder's priority: %s", exc)
        idle = True
        while not self._stop.is_set():
            self._yield_to_recalls()
            spaces = self.node.working_spaces()
            space = self._pick(spaces)
            compacting = self._compacting(spaces) if space is None or self._turns % 2 else None
            self._turns += 1
            if compacting is not None:
                idle = False
                with self._working_on("builder", compacting) as served:
                    rest = self._compact_step(compacting) if served else 0.0
                if rest:
                    self._stop.wait(rest)
                continue
            if space is None:
                self.node.admission.idle()
                for s in spaces:
                    with self._working_on("builder", s) as served:
                        if served:
                            s.mark_step()  # deletes' rows, out of the index's searches
                        if served and s.checkpoint_due():
                            self._checkpoint(s)
                if not idle:
                    # the backlog is gone: let go of the fresh tier's spare and last blocks
                    # (up to 50 MB a space) and hand back the memory freed blocks and copies
                    # left in the allocator's arenas
                    for s in spaces:
                        with self._working_on("builder", s) as served:
                            if served:
                                s.release_idle_memory()
                    trim_heap()
                    idle = True
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            idle = False
            with self._working_on("builder", space) as served:
                rest = self._build_step(space) if served else 0.0
            if rest:
                self._stop.wait(rest)

    def _build_step(self, space: Space) -> float:
        """One add_items call on ``space`` (and its checkpoint if due); returns how long to
        rest after it, so acks and recalls keep the CPU while writes arrive."""
        busy, serving = self._arriving()
        started = time.perf_counter()
        try:
            # one hnswlib thread while writes or recalls arrive: a core stays free for them
            added = space.index_step(self._chunk(space.backlog()), 1 if serving else None)
        except Exception:  # the builder must survive; the rows stay in the fresh tier
            log.exception("space %s: indexing failed; retrying in 1 s", space.name)
            return 1.0
        took = time.perf_counter() - started
        if added and took > 0:
            self._build_rate = 0.8 * self._build_rate + 0.2 * (added / took)
        metrics.shard_indexed_total.labels(space.name).inc(added)
        if space.checkpoint_due():
            self._checkpoint(space)
        if not busy:
            return 0.0
        # leave the CPU to acks and recalls most of the time, the more so the more room the
        # memory budget has: as it fills, indexing is what frees it
        share = max(
            self.node.settings.shard.index.build_busy_share, self.node.admission.memory_pressure
        )
        return took * (1 - share) / share if share < 1.0 else 0.0

    def _compacting(self, spaces: list[Space]) -> Space | None:
        """The space being compacted, else one due for it (see :mod:`engram.shard.compaction`)."""
        now = time.monotonic()
        spaces = [s for s in spaces if now - self._compact_failed.get(s.name, -1e9) > 60.0]
        for s in spaces:
            if s.rebuild is not None:
                return s
        for s in spaces:
            try:
                if s.compaction_due():
                    return s
            except Exception:  # a space racing a drop: its next look will tell
                log.exception("space %s: could not tell whether to compact", s.name)
        return None

    def _compact_step(self, space: Space) -> float:
        """One compaction step on ``space``; returns how long to rest after it (as indexing)."""
        busy, serving = self._arriving()
        started = time.perf_counter()
        try:
            space.mark_step()  # the marks the copy skips by, up to date
            looked = space.compact_step(self._chunk(space.visible), 1 if serving else None)
        except Exception:  # the old index stays in use; compaction starts over later
            log.exception("space %s: compaction failed; trying again in 60 s", space.name)
            self._compact_failed[space.name] = time.monotonic()
            return 0.0
        if not looked:
            metrics.shard_compactions_total.labels(space.name).inc()
        took = time.perf_counter() - started
        if not busy:
            return 0.0
        share = self.node.settings.shard.index.build_busy_share
        return took * (1 - share) / share if share < 1.0 else 0.0

    def _partition_loop(self) -> None:
        name_os_thread()
        while not self._stop.is_set():
            worked = False
            for space in self.node.working_spaces():
                self._yield_to_recalls(latency=False)  # its work is what makes recalls cheap
                failed = False
                with self._working_on("partitioner", space) as served:
                    try:
                        if served:
                            worked = space.partition_step() or worked
                            space.prepare_spare()
                    except Exception:  # recalls then scan the block exactly: slower, still right
                        log.exception("space %s: partitioning failed", space.name)
                        failed = True
                if failed:
                    self._stop.wait(1.0)
            if not worked:
                self._stop.wait(0.02)

    def _checkpoint(self, space: Space) -> None:
        if self._stop.is_set():
            return
        try:
            space.checkpoint()
            metrics.shard_checkpoints_total.labels(space.name).inc()
        except Exception:
            log.exception("space %s: checkpoint failed; the WAL keeps everything", space.name)
            space.last_checkpoint = time.monotonic()
