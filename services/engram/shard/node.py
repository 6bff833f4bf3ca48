"""A shard process's state: the spaces it serves, their placement, background work, heartbeats.

Spaces this shard owns are recovered at start (:class:`~engram.shard.placement.Placement` says
which, from the ownership file); a space seen for the first time is created when a session
opens on it, if the placement allows. The index builder and the partitioner run in
:mod:`engram.shard.builder`. Every heartbeat registers the shard in the control plane,
publishes the spaces it owns, reads the routing table back and resolves moves whose other side
went quiet. Called by the shard's gRPC service and by the moves.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from engram.common import metrics, validation
from engram.common.settings import Settings
from engram.contract.errors import UnavailableError
from engram.control.assignment import Assignment
from engram.control.store import ControlStore
from engram.shard import faults as fault_file
from engram.shard.admission import AdmissionController
from engram.shard.backup import Backup
from engram.shard.builder import Background
from engram.shard.drop import Drops
from engram.shard.move_source import Outgoing
from engram.shard.move_target import Incoming
from engram.shard.ownership import OWNED, Owner, Ownership
from engram.shard.placement import Placement
from engram.shard.recall_first import RecallLoad, watch
from engram.shard.retention import Enforcer
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
        self.move_faults = fault_file.MoveFaults()
        self.assignment = Assignment(settings.cluster.shard_count)
        self.admission = AdmissionController(settings.shard.admission)
        self.recalls = RecallLoad(settings.shard.recall_first)  # queue bound, latency signal
        self.store = ControlStore(
            settings.cluster.redis_url, settings.cluster.key_prefix, settings.cluster.shard_count
        )
        self.placement = Placement(self)
        self.background = Background(self)
        self.drops = Drops(self)
        self.retention = Enforcer(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._publish_soon = asyncio.Event()
        self.ready = False  # True once every space on disk is recovered and started
        self.backups: dict[str, Backup] = {}  # open backups by id (engram.shard.backup)
        self.restoring: set[str] = set()  # spaces a Restore is filling: no session may create one

    @property
    def ownership(self) -> Ownership:
        return self.placement.ownership

    @property
    def outgoing(self) -> dict[str, Outgoing]:
        return self.placement.outgoing

    @property
    def incoming(self) -> dict[str, Incoming]:
        return self.placement.incoming

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "the shard was not started"
        return self._loop

    # ---------------------------------------------------------------- lifecycle

    def recover(self) -> None:
        """Recovers every space this shard owns (blocking; before serving)."""
        recovered: dict[str, Space] = {}
        self.drops.finish_on_start()  # a drop a crash interrupted: its files must not be served
        for name in self.placement.load():
            space = self.new_space(name)
            space.recover()
            recovered[name] = space
        self.spaces = recovered
        self.placement.fenced_on_start()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        count = self.settings.cluster.shard_count
        if self.shard_id >= count:
            log.info(
                "shard %d is beyond ENGRAM_SHARD_COUNT=%d: it serves only spaces moved to it",
                self.shard_id,
                count,
            )
        for space in self.spaces.values():
            space.start(self._loop)
        self.ready = True
        self.background.start()
        self._tasks.append(asyncio.create_task(self._heartbeat_loop()))
        self._tasks.append(asyncio.create_task(self.drops.run()))
        self._tasks.append(asyncio.create_task(self.retention.run()))
        self._tasks.append(asyncio.create_task(watch(self)))
        if self.settings.shard.fault_file:
            log.warning("fault injection enabled: %s", self.settings.shard.fault_file)
            self._tasks.append(
                asyncio.create_task(
                    fault_file.watch(self.settings.shard.fault_file, self.faults, self.move_faults)
                )
            )

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.background.stop)
        moves = [i.task for i in self.incoming.values() if i.task is not None]
        for incoming in list(self.incoming.values()):
            incoming.cancelled.set()  # they abort at their next step
        if moves:
            await asyncio.wait(moves, timeout=10)
        for space in self.spaces.values():
            await space.close()
        await self.store.close()

    def new_space(self, name: str) -> Space:
        s = self.settings
        space = Space(
            name,
            self.space_dir(name),
            wal=s.shard.wal,
            index=s.shard.index,
            limits=s.limits,
            faults=self.faults,
            admission=self.admission,
        )
        space.bounded_staleness_s = s.shard.bounded_staleness_ms / 1000
        # exported at 0 from the start: an alert's increase() misses a series born at 1
        metrics.shard_wal_failures_total.labels(name)
        return space

    def space_dir(self, name: str) -> Path:
        return self.root / "spaces" / name

    # -------------------------------------------------------------------- spaces

    def space(self, name: str, create: bool) -> Space | None:
        """The space, created if ``create`` and this shard may; raises NotOwnerError for a
        space that lives elsewhere (or UnavailableError while recovering)."""
        if not self.ready:
            raise UnavailableError(f"shard {self.shard_id} is recovering; retry shortly")
        name = validation.space_id(name)
        space = self.spaces.get(name)
        if space is not None:
            return space
        if name in self.restoring:
            raise UnavailableError(f"memory space {name!r} is being restored; retry shortly")
        self.placement.check_served(name)
        self.placement.check_route(name)
        if not create:
            return None
        self.drops.check(name, "", create=True)
        self.placement.check_create(name)
        # epoch 0, or the one a dropped space of this name had (its routing entry may remain)
        epoch = max(self.placement.epoch(name), self.assignment.space_epoch(name))
        self.ownership.set(name, Owner(OWNED, epoch))  # a few ms, once per space
        space = self.new_space(name)
        space.recover()  # an empty directory: creates it
        space.start(self.loop)
        self.spaces[name] = space
        self._publish_soon.set()
        log.info("space %s created", name)
        return space

    def working_spaces(self) -> list[Space]:
        """The spaces background work may touch (those served)."""
        return list(self.spaces.values())

    async def retire_space(self, name: str, *, delete: bool) -> None:
        """Stops serving ``name``: out of the map, background work off it, closed; its files
        deleted if ``delete``."""
        space = self.spaces.pop(name, None)
        metrics.forget_space(name)
        if space is not None:
            while self.background.busy_with(space):  # noqa: ASYNC110 (threads hold no event)
                await asyncio.sleep(0.005)
            await space.close()
        if delete:
            await self.delete_space_files(name)

    async def delete_space_files(self, name: str) -> None:
        await asyncio.to_thread(self.placement.delete_files_now, name)

    async def publish_ownership(self) -> None:
        """Publishes the spaces this shard owns now (a change: do not wait for a heartbeat)."""
        try:
            await self.placement.publish()
        except Exception as exc:  # the heartbeat publishes again
            log.debug("publishing ownership failed: %s", exc)

    # ---------------------------------------------------------------- heartbeats

    async def _heartbeat_loop(self) -> None:
        advertise = self.settings.shard.advertise
        recall = self.settings.shard.recall_advertise
        while True:
            try:
                await self.store.heartbeat(
                    self.shard_id, advertise, ttl_s=5 * HEARTBEAT_S, recall_address=recall
                )
                await self.placement.publish()
                metrics.control_store_up.set(1)
            except Exception as exc:  # Redis down: keep serving with the cached assignment
                metrics.control_store_up.set(0)
                log.debug("heartbeat failed: %s", exc)
            try:
                await self.placement.resolve_silent_moves()
            except Exception:
                log.exception("resolving moves failed")
            self._metrics()
            self._publish_soon.clear()
            try:
                await asyncio.wait_for(self._publish_soon.wait(), HEARTBEAT_S)
            except TimeoutError:
                pass

    def _metrics(self) -> None:
        self.admission.tick()
        snap = self.admission.snapshot()
        metrics.shard_memory_bytes.set(snap.memory_bytes)
        metrics.shard_memory_budget_bytes.set(snap.budget_bytes)
        metrics.shard_pressure.set(snap.pressure)
        now = time.time()
        for space in self.spaces.values():
            metrics.shard_rows.labels(space.name).set(space.visible)
            metrics.shard_index_backlog.labels(space.name).set(space.backlog())
            metrics.shard_checkpoint_age.labels(space.name).set(space.checkpoint_age(now))
            if space.hnsw is not None:  # memory deleted rows hold until compacted
                metrics.shard_space_bytes.labels(space.name, "index").set(space.hnsw.nbytes)
            metrics.shard_space_bytes.labels(space.name, "columns").set(space.columns_bytes)
            metrics.shard_compactions_total.labels(space.name)  # shown at 0 before the first
            metrics.backpressure_state.labels(space.name).set(snap.level)
        started = [m.started for m in (*self.incoming.values(), *self.outgoing.values())]
        metrics.shard_move_oldest.set(time.monotonic() - min(started) if started else 0.0)
