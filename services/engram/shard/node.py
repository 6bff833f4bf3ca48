"""A shard process's state: the spaces it holds, ownership, the index builder, heartbeats.

Spaces found in the data directory are recovered at start; a space seen for the first time is
created when a session opens on it, provided the assignment table says this shard owns it.
One builder thread serves all spaces: it moves fresh rows into HNSW in small chunks (so recalls
never wait long for the index lock) and writes checkpoints. While writes arrive it works only
part of the time, so acks and recalls keep the CPU; a partitioner thread keeps large fresh tiers
partitioned (cheap: a fraction of ingest's cost) so recalls stay fast however far HNSW lags.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from pathlib import Path

from engram.common import metrics, validation
from engram.common.settings import Settings
from engram.common.threads import name_os_thread, trim_heap
from engram.contract.errors import NotOwnerError, UnavailableError
from engram.control.assignment import Assignment
from engram.control.store import ControlStore
from engram.shard import faults as fault_file
from engram.shard.admission import AdmissionController
from engram.shard.space import Space
from engram.shard.wal import WalFaults

log = logging.getLogger("engram.shard")

HEARTBEAT_S = 1.0


class ShardNode:
    def __init__(self, settings: Settings, faults: WalFaults | None = None) -> None:
        self.settings = settings
        self.shard_id = settings.shard.shard_id
        self.root = Path(settings.shard.data_dir)
        self.spaces: dict[str, Space] = {}
        self.faults = faults or WalFaults()
        self.assignment = Assignment(settings.cluster.shard_count)
        self.admission = AdmissionController(settings.shard.admission)
        self._picks = 0
        self._build_rate = 2_000.0  # rows/s of the builder's add_items calls (moving average)
        self.store = ControlStore(
            settings.cluster.redis_url, settings.cluster.key_prefix, settings.cluster.shard_count
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = threading.Event()
        self._builder: threading.Thread | None = None
        self._partitioner: threading.Thread | None = None
        self._wake = threading.Event()  # set by stop(): the idle builder need not finish its wait
        self._tasks: list[asyncio.Task[None]] = []
        self.ready = False  # True once every space on disk is recovered and started

    # ---------------------------------------------------------------- lifecycle

    def recover(self) -> None:
        """Recovers every space on disk (blocking; before serving)."""
        spaces_dir = self.root / "spaces"
        spaces_dir.mkdir(parents=True, exist_ok=True)
        recovered: dict[str, Space] = {}
        for entry in sorted(spaces_dir.iterdir()):
            if entry.is_dir():
                space = self._new_space(entry.name)
                space.recover()
                recovered[entry.name] = space
        self.spaces = recovered

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for space in self.spaces.values():
            space.start(self._loop)
        self.ready = True
        self._builder = threading.Thread(target=self._build_loop, name="index-builder", daemon=True)
        self._builder.start()
        self._partitioner = threading.Thread(
            target=self._partition_loop, name="fresh-partitioner", daemon=True
        )
        self._partitioner.start()
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        if self.settings.shard.fault_file:
            log.warning("fault injection enabled: %s", self.settings.shard.fault_file)
            self._tasks.append(
                asyncio.create_task(fault_file.watch(self.settings.shard.fault_file, self.faults))
            )

    async def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for thread in (self._builder, self._partitioner):
            if thread is not None:
                await asyncio.to_thread(thread.join, 30)
        for space in self.spaces.values():
            await space.close()
        await self.store.close()

    def _new_space(self, name: str) -> Space:
        s = self.settings
        return Space(
            name,
            self.root / "spaces" / name,
            wal=s.shard.wal,
            index=s.shard.index,
            limits=s.limits,
            faults=self.faults,
            admission=self.admission,
        )

    # -------------------------------------------------------------------- spaces

    def space(self, name: str, create: bool) -> Space | None:
        """The space, created if ``create`` and this shard owns it; raises NotOwnerError."""
        if not self.ready:
            raise UnavailableError(f"shard {self.shard_id} is recovering; retry shortly")
        name = validation.space_id(name)
        space = self.spaces.get(name)
        if space is not None:
            return space
        owner = self.assignment.owner(name)
        if owner != self.shard_id:
            raise NotOwnerError(
                f"shard {self.shard_id} does not own memory space {name!r} (owner: shard {owner}, "
                f"epoch {self.assignment.epoch})"
            )
        if not create:
            return None
        assert self._loop is not None
        space = self._new_space(name)
        space.recover()  # an empty directory: creates it
        space.start(self._loop)
        self.spaces[name] = space
        log.info("space %s created", name)
        return space

    # ------------------------------------------------------------------- builder

    def _pick(self, spaces: list[Space]) -> Space | None:
        """Strict priority (the space whose un-indexed rows include the most urgent lane),
        except that every ``low_every``-th pick goes to the space whose LOW rows waited longest.
        """
        busy = [s for s in spaces if s.backlog() > 0]
        if not busy:
            return None
        self._picks += 1
        if self._picks % self.settings.shard.admission.low_every == 0:
            waiting = [(s.oldest_low_since(), s) for s in busy]
            lows = [(since, s) for since, s in waiting if since is not None]
            if lows:
                return min(lows, key=lambda item: item[0])[1]
        return min(busy, key=lambda s: (s.top_lane() or 9, -s.backlog()))

    def _chunk(self, backlog: int) -> int:
        """Rows for the next add_items call: about ``build_chunk_ms`` of work at the measured
        rate (a recall waits for the call in progress), at most ``build_chunk``, and small
        while the backlog is small."""
        idx = self.settings.shard.index
        by_time = int(self._build_rate * idx.build_chunk_ms / 1000)
        return max(8, min(idx.build_chunk, by_time, max(16, backlog // 4)))

    def _arriving(self) -> tuple[bool, bool]:
        """Whether writes, and whether recalls, arrived in the last second."""
        now = time.monotonic()
        spaces = list(self.spaces.values())
        writes = any(now - s.last_write < 1.0 for s in spaces)
        return writes, writes or any(now - s.last_recall < 1.0 for s in spaces)

    def _build_loop(self) -> None:
        name_os_thread()
        nice = self.settings.shard.index.builder_nice
        if nice:
            # Linux nice values are per thread, and the threads hnswlib starts inherit it:
            # indexing then yields the CPU to acks and recalls, which must stay fast.
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
            except OSError as exc:
                log.warning("could not lower the index builder's priority: %s", exc)
        idle = True
        while not self._stop.is_set():
            spaces = list(self.spaces.values())
            space = self._pick(spaces)
            if space is None:
                self.admission.idle()
                for s in spaces:
                    if s.checkpoint_due():
                        self._checkpoint(s)
                if not idle:
                    # the backlog is gone: let go of the fresh tier's spare and last blocks
                    # (up to 50 MB a space) and hand back the memory freed blocks and copies
                    # left in the allocator's arenas
                    for s in spaces:
                        s.release_idle_memory()
                    trim_heap()
                    idle = True
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            idle = False
            busy, serving = self._arriving()
            started = time.perf_counter()
            try:
                # one hnswlib thread while writes or recalls arrive: a core stays free for them
                added = space.index_step(self._chunk(space.backlog()), 1 if serving else None)
            except Exception:  # the builder must survive; the rows stay in the fresh tier
                log.exception("space %s: indexing failed; retrying in 1 s", space.name)
                time.sleep(1.0)
                continue
            took = time.perf_counter() - started
            if added and took > 0:
                self._build_rate = 0.8 * self._build_rate + 0.2 * (added / took)
            if busy:
                # leave the CPU to acks and recalls most of the time, the more so the more room
                # the memory budget has: as it fills, indexing is what frees it
                share = max(self.settings.shard.index.build_busy_share, self.admission.pressure)
                if share < 1.0:
                    self._stop.wait(took * (1 - share) / share)
            metrics.shard_indexed_total.labels(space.name).inc(added)
            if space.checkpoint_due():
                self._checkpoint(space)

    def _partition_loop(self) -> None:
        name_os_thread()
        while not self._stop.is_set():
            worked = False
            for space in list(self.spaces.values()):
                try:
                    worked = space.partition_step() or worked
                    space.prepare_spare()
                except Exception:  # recalls then scan the block exactly: slower, still right
                    log.exception("space %s: partitioning failed", space.name)
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

    # ---------------------------------------------------------------- heartbeats

    async def _heartbeat_loop(self) -> None:
        advertise = self.settings.shard.advertise
        while True:
            try:
                await self.store.heartbeat(self.shard_id, advertise, ttl_s=5 * HEARTBEAT_S)
                self.assignment = await self.store.assignment()
            except Exception as exc:  # Redis down: keep serving with the cached assignment
                log.debug("heartbeat failed: %s", exc)
            self.admission.tick()
            snap = self.admission.snapshot()
            metrics.shard_memory_bytes.set(snap.memory_bytes)
            metrics.shard_memory_budget_bytes.set(snap.budget_bytes)
            metrics.shard_pressure.set(snap.pressure)
            for space in self.spaces.values():
                metrics.shard_rows.labels(space.name).set(space.visible)
                metrics.shard_index_backlog.labels(space.name).set(space.backlog())
                metrics.backpressure_state.labels(space.name).set(snap.level)
            await asyncio.sleep(HEARTBEAT_S)
