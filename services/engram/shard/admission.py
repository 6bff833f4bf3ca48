"""Admission control of a shard: memory budget, priority lanes, pressure levels, shedding.

What is counted (all per shard):

* **intake**, per priority lane: batches admitted but not yet durable (observations and bytes);
* **unindexed bytes**: what the fresh tier holds (vectors and metadata not yet in HNSW).

``pressure`` is the fullest of these against its limit: intake + unindexed bytes against the
memory budget, and each lane's intake against its hard limits (``memory_pressure``), or the
latency pressure if higher: recall P99 and visibility lag against their bounds
(:mod:`engram.shard.recall_first`, via :meth:`AdmissionController.set_latency`), scaled so that
at the bound the shard is CRITICAL and at 1.19 × the bound OVERLOADED. Levels NORMAL / WARNING /
CRITICAL / OVERLOADED start at 0.5 / 0.8 / 0.95 of it; a level is left only when pressure falls
below ``hysteresis`` × its threshold and it has lasted ``min_dwell_s``, so levels do not flap.

Shedding, LOW first and HIGH last: a LOW batch is refused from CRITICAL on, a NORMAL one at
OVERLOADED, a HIGH one only when it would not fit in the budget; any lane above its hard limit
is refused, and above its soft limit from CRITICAL on. A refusal carries a retry-after computed
from the measured drain rate (how fast indexing frees memory). A shed that only latency
causes (memory alone would not shed the batch) still admits NORMAL and LOW batches at
``latency_floor_obs_per_s`` (a token bucket), so acks never stop; its retry-after is the
time the floor takes to have room for the batch. Called by
:class:`~engram.shard.space.Space` (admit / settle) and the builder (indexed); level changes
go to listeners (the shard service pushes them to every stream).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from engram.common.settings import AdmissionSettings, LaneLimits
from engram.contract.errors import OverloadedError
from engram.v1 import streaming_pb2 as pb

NORMAL, WARNING, CRITICAL, OVERLOADED = 0, 1, 2, 3
LEVEL_NAMES = ("NORMAL", "WARNING", "CRITICAL", "OVERLOADED")
THRESHOLDS = (0.0, 0.5, 0.8, 0.95)
# Batch sizes to recommend per level: small for latency when calm, large for throughput.
RECOMMENDED_BATCH = (10, 100, 500, 1000)
# Latency pressure per unit of latency ratio: at the bound (1.0) the shard is CRITICAL.
LATENCY_SCALE = 0.8

HIGH, LOW = pb.PRIORITY_HIGH, pb.PRIORITY_LOW
LANES = (pb.PRIORITY_HIGH, pb.PRIORITY_NORMAL, pb.PRIORITY_LOW)
LANE_NAMES = {pb.PRIORITY_HIGH: "high", pb.PRIORITY_NORMAL: "normal", pb.PRIORITY_LOW: "low"}


def lane_of(priority: int) -> int:
    return priority if priority in LANES else pb.PRIORITY_NORMAL


@dataclass
class _Lane:
    limits: LaneLimits
    observations: int = 0
    bytes: int = 0


@dataclass
class Snapshot:
    level: int
    pressure: float
    memory_bytes: int
    budget_bytes: int
    intake: dict[int, tuple[int, int]] = field(default_factory=dict)
    retry_after_ms: int = 0
    latency_pressure: float = 0.0


def level_of(pressure: float) -> int:
    """The level a pressure reaches (before hysteresis and dwell)."""
    return max(lvl for lvl in range(4) if pressure >= THRESHOLDS[lvl])


class FloorBucket:
    """Admits ``rate`` observations/s (bursts of one second) whatever the latency says."""

    def __init__(self, rate: int, now: float) -> None:
        self.rate = rate
        self.tokens = float(rate)
        self._at = now

    def take(self, n: int, now: float) -> bool:
        self.tokens = min(float(self.rate), self.tokens + (now - self._at) * self.rate)
        self._at = now
        if self.tokens < n and self.tokens < self.rate:  # a batch above the rate fits a full one
            return False
        self.tokens -= n
        return True

    def wait_ms(self, n: int) -> int:
        """When ``n`` observations will fit."""
        short = min(n, self.rate) - self.tokens
        return int(min(5_000, max(50, 1000 * short / self.rate)))


class AdmissionController:
    def __init__(
        self, settings: AdmissionSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self._lanes = {
            pb.PRIORITY_HIGH: _Lane(settings.high),
            pb.PRIORITY_NORMAL: _Lane(settings.normal),
            pb.PRIORITY_LOW: _Lane(settings.low),
        }
        self.unindexed_bytes = 0
        self.level = NORMAL
        self.pressure = 0.0
        self.memory_pressure = 0.0  # the pressure memory and intake alone make
        self.latency_pressure = 0.0  # LATENCY_SCALE x the latency ratio (set_latency)
        self._floor = FloorBucket(settings.latency_floor_obs_per_s, clock())
        self._entered = clock()
        self._drain_bps = 0.0  # EWMA of bytes/s freed by indexing
        self._last_drain: float | None = None
        self.listeners: list[Callable[[Snapshot], None]] = []

    # ---------------------------------------------------------------- accounting

    @property
    def budget(self) -> int:
        return self.settings.memory_budget_bytes

    def memory_bytes(self) -> int:
        return self.unindexed_bytes + sum(lane.bytes for lane in self._lanes.values())

    def admit(self, priority: int, observations: int, nbytes: int) -> None:
        """Takes a batch into intake or raises :class:`OverloadedError`."""
        lane_id = lane_of(priority)
        with self._lock:
            lane = self._lanes[lane_id]
            reason = self._refusal(lane_id, lane, observations, nbytes)
            if reason is not None and self._latency_shed(reason):
                if self._floor.take(observations, self._clock()):
                    reason = None
                else:
                    reason = (
                        f"latency: recall latency or visibility lag is above its bound, the "
                        f"shard is {LEVEL_NAMES[self.level]} and its floor of "
                        f"{self._floor.rate} observations/s is taken"
                    )
            if reason is not None:
                if reason.startswith("latency"):
                    retry = self._floor.wait_ms(observations)
                else:
                    retry = self._retry_after_ms(nbytes, lane_id)
                raise OverloadedError(
                    f"{LANE_NAMES[lane_id]} priority batch refused: {reason}; retry in {retry} ms",
                    reason=reason.split(":")[0],
                    retry_after_ms=retry,
                )
            lane.observations += observations
            lane.bytes += nbytes
            self._notify(self._update())  # under the lock: listeners see changes in order

    def _latency_shed(self, reason: str) -> bool:
        """Whether a refusal for the level is the latency's doing: memory alone would not
        have the shard at a level that sheds (the budget and hard limits are never waived)."""
        if reason.split(":")[0] not in ("shed_low", "shed_normal", "lane_soft"):
            return False
        return self._latency_driven()

    def _latency_driven(self) -> bool:
        """The level is the latency's: above memory's own, with latency the higher pressure."""
        return (
            self.latency_pressure > self.memory_pressure
            and level_of(self.memory_pressure) < self.level
        )

    def _refusal(self, lane_id: int, lane: _Lane, n: int, nbytes: int) -> str | None:
        lim = lane.limits
        if self.memory_bytes() + nbytes > self.budget:
            return "memory_budget: the shard's un-indexed data would exceed its memory budget"
        if lane.observations + n > lim.hard_observations or lane.bytes + nbytes > lim.hard_bytes:
            return "lane_full: the priority lane is at its hard capacity"
        level = self.level
        if lane_id == LOW and level >= CRITICAL:
            return f"shed_low: the shard is {LEVEL_NAMES[level]}"
        if lane_id == pb.PRIORITY_NORMAL and level >= OVERLOADED:
            return "shed_normal: the shard is OVERLOADED"
        over_soft = (
            lane.observations + n > lim.soft_observations or lane.bytes + nbytes > lim.soft_bytes
        )
        if over_soft and level >= CRITICAL and lane_id != HIGH:
            return f"lane_soft: the lane is above its soft capacity while {LEVEL_NAMES[level]}"
        return None

    def settle(self, priority: int, observations: int, nbytes: int, durable_bytes: int) -> None:
        """A batch left intake: durable (``durable_bytes`` now in the fresh tier) or failed (0)."""
        lane = self._lanes[lane_of(priority)]
        with self._lock:
            lane.observations -= observations
            lane.bytes -= nbytes
            self.unindexed_bytes += durable_bytes
            self._notify(self._update())  # under the lock: listeners see changes in order

    def loaded(self, unindexed_bytes: int) -> None:
        """Rows recovered into the fresh tier at start."""
        with self._lock:
            self.unindexed_bytes += unindexed_bytes
            self._notify(self._update())  # under the lock: listeners see changes in order

    def released(self, unindexed_bytes: int) -> None:
        """A space left the shard (closed: moved away, or a move's copy discarded): its
        un-indexed rows no longer take memory here."""
        with self._lock:
            self.unindexed_bytes = max(0, self.unindexed_bytes - unindexed_bytes)
            self._notify(self._update())  # under the lock: listeners see changes in order

    def indexed(self, freed_bytes: int) -> None:
        """The builder moved rows into HNSW, freeing ``freed_bytes`` of fresh tier."""
        now = self._clock()
        with self._lock:
            self.unindexed_bytes = max(0, self.unindexed_bytes - freed_bytes)
            if self._last_drain is not None:
                dt = max(now - self._last_drain, 1e-3)
                rate = freed_bytes / dt
                self._drain_bps = (
                    rate if self._drain_bps == 0 else 0.8 * self._drain_bps + 0.2 * rate
                )
            self._last_drain = now
            self._notify(self._update())  # under the lock: listeners see changes in order

    def idle(self) -> None:
        """The builder has nothing to do: the next drain interval starts now."""
        self._last_drain = None

    def set_latency(self, ratio: float) -> None:
        """The latency ratio (:mod:`engram.shard.recall_first`) changed: 1.0 at the bound."""
        with self._lock:
            self.latency_pressure = LATENCY_SCALE * ratio
            self._notify(self._update())  # under the lock: listeners see changes in order

    def tick(self) -> None:
        """Re-evaluates the level (dwell times pass even without traffic)."""
        with self._lock:
            self._notify(self._update())  # under the lock: listeners see changes in order

    # -------------------------------------------------------------------- levels

    def _current_pressure(self) -> float:
        p = self.memory_bytes() / self.budget
        for lane in self._lanes.values():
            lim = lane.limits
            p = max(p, lane.observations / lim.hard_observations, lane.bytes / lim.hard_bytes)
        self.memory_pressure = p
        return max(p, self.latency_pressure)

    def _update(self) -> Snapshot | None:
        """Recomputes pressure and level (lock held); returns a snapshot if the level changed."""
        self.pressure = p = self._current_pressure()
        target = level_of(p)
        now = self._clock()
        if target > self.level:
            self.level, self._entered = target, now
            return self._snapshot()
        if target < self.level and now - self._entered >= self.settings.min_dwell_s:
            level = self.level  # step down only while pressure is well below each threshold
            while level > target and p < THRESHOLDS[level] * self.settings.hysteresis:
                level -= 1
            if level != self.level:
                self.level, self._entered = level, now
                return self._snapshot()
        return None

    def _snapshot(self) -> Snapshot:
        return Snapshot(
            level=self.level,
            pressure=self.pressure,
            memory_bytes=self.memory_bytes(),
            budget_bytes=self.budget,
            intake={k: (v.observations, v.bytes) for k, v in self._lanes.items()},
            retry_after_ms=self._snapshot_retry_ms() if self.level >= CRITICAL else 0,
            latency_pressure=self.latency_pressure,
        )

    def _snapshot_retry_ms(self) -> int:
        return self._floor.wait_ms(1) if self._latency_driven() else self._retry_after_ms(0)

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot()

    def _retry_after_ms(self, nbytes: int, lane_id: int = LOW) -> int:
        """Time for indexing to free enough memory for this lane to be taken again with room
        for ``nbytes``: below the budget for HIGH, below OVERLOADED's exit for NORMAL, below
        CRITICAL's exit for LOW."""
        hysteresis = self.settings.hysteresis
        if lane_id == HIGH:
            target = float(self.budget)
        elif lane_id == pb.PRIORITY_NORMAL:
            target = THRESHOLDS[OVERLOADED] * hysteresis * self.budget
        else:
            target = THRESHOLDS[CRITICAL] * hysteresis * self.budget
        excess = self.memory_bytes() + nbytes - target
        if excess <= 0:
            return 100
        if self._drain_bps <= 0:
            return 1000
        return int(min(30_000, max(100, 1000 * excess / self._drain_bps)))

    def _notify(self, snap: Snapshot | None) -> None:
        """Calls listeners with the lock held (so they see changes in order): a listener must
        only hand the snapshot on (the shard service schedules it on its event loop)."""
        if snap is None:
            return
        for listener in list(self.listeners):
            listener(snap)
