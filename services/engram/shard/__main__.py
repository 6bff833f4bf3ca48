"""Entry point of a shard process: ``python -m engram.shard`` (configured by ENGRAM_* variables)."""

from __future__ import annotations

import os
import sys

# One BLAS thread per call: recalls run on their own small pool and the index builder has its
# own threads, so multi-threaded BLAS in every recall thread only oversubscribes the cores
# (measured: six concurrent 64K x 384 scans took 441 ms each instead of 14 ms).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from engram.common import logs, settings, tracing
from engram.common.settings import SettingsError
from engram.shard.server import run

if __name__ == "__main__":
    try:
        cfg = settings.load()
        logs.setup(f"shard-{cfg.shard.shard_id}", cfg.log_level)
        tracing.configure("engram-shard", cfg.tracing, instance=f"shard-{cfg.shard.shard_id}")
    except SettingsError as exc:
        sys.exit(f"engram shard: invalid setting: {exc}")
    try:
        run(cfg)
    finally:
        tracing.shutdown()
