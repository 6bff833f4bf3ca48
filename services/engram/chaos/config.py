"""Settings of a chaos run, and the cluster tunables it runs with."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engram.chaos.workload import WorkloadShape
from engram.control.restarts import Policy

# Tunables for the chaos cluster: frequent checkpoints and small WAL segments, so that kills
# also land in checkpoints, segment rotation and WAL trimming.
CLUSTER_ENV = {
    "ENGRAM_CHECKPOINT_EVERY": "20000",
    "ENGRAM_CHECKPOINT_INTERVAL_S": "10",
    "ENGRAM_WAL_SEGMENT_BYTES": str(2 * 1024 * 1024),
}

# Restart quickly and never give up: the run kills the same processes again and again.
SUPERVISOR_POLICY = Policy(
    initial_delay_s=0.2, max_delay_s=2.0, reset_after_s=5.0, max_restarts=100_000, window_s=60.0
)


@dataclass(frozen=True)
class ChaosConfig:
    # Length of the run (workload and faults), seconds.
    seconds: float = 600.0
    # Seed of the fault schedule and of the workload.
    seed: int = 1
    shards: int = 2
    # Memory spaces written, spread over the shards (each shard owns at least one).
    spaces: int = 4
    writers_per_space: int = 2
    # Where results go (latest.json and a timestamped copy).
    results_dir: Path = Path("chaos/results")
    # Cluster data and logs; None: a temporary directory, removed after a passing run.
    data_dir: Path | None = None
    keep_data: bool = False
    shape: WorkloadShape = field(default_factory=WorkloadShape)

    # Every wait is bounded, so a cluster that never recovers fails the run instead of
    # hanging it.
    @property
    def short(self) -> bool:
        return self.seconds < 200

    @property
    def recovery_timeout_s(self) -> float:
        """Longest wait for every process to serve again after a fault."""
        return 30.0 if self.short else 60.0

    @property
    def drain_s(self) -> float:
        """Longest wait for the last acks once the writers stop."""
        return 30.0 if self.short else 90.0

    @property
    def verify_s(self) -> float:
        """Longest time for reading every space back at the end."""
        return 60.0 if self.short else 180.0

    @property
    def warmup_s(self) -> float:
        """Workload without faults before the first one (the "before" baseline)."""
        return min(10.0, max(5.0, self.seconds * 0.03))

    @property
    def tail_s(self) -> float:
        """Workload without new faults at the end (the "after" figures)."""
        return min(20.0, max(8.0, self.seconds * 0.05))

    @property
    def gap_s(self) -> tuple[float, float]:
        """Pause between one fault's recovery and the next fault."""
        return (0.5, 1.5) if self.short else (1.5, 4.0)

    @property
    def long_faults(self) -> bool:
        """Whether pauses and partitions may last past the gRPC keepalive timeout (~15 s)."""
        return self.seconds >= 300

    @property
    def check_every_s(self) -> float:
        return 15.0 if self.short else 30.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["results_dir"] = str(self.results_dir)
        d["data_dir"] = str(self.data_dir) if self.data_dir else None
        d.update(
            warmup_s=self.warmup_s,
            tail_s=self.tail_s,
            gap_s=list(self.gap_s),
            recovery_timeout_s=self.recovery_timeout_s,
            drain_s=self.drain_s,
            verify_s=self.verify_s,
            cluster_env=CLUSTER_ENV,
        )
        return d
