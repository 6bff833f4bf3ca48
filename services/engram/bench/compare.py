"""The side-by-side with the peers, and the idle indexing probe.

On the cluster before the main load (nothing else running): Engram Stream ingests the compare
corpus exactly as the peer scripts do (:mod:`engram.bench.peer_engram`), while the owning
shard's Stats are polled ten times a second; the rate at which the space's rows then move into
HNSW is the *indexing probe*, comparable with the raw hnswlib limit measured on the same rows.
Then each peer runs in its own venv on the same vectors.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from engram.bench import peers as peer_venvs
from engram.bench.config import BenchConfig
from engram.bench.monitor import shard_stats
from engram.bench.target import Target
from engram.bench.workload import VectorSource, plan_spaces
from engram.common import internal

PROBE_INTERVAL_S = 0.1


def write_vectors(source: VectorSource, start: int, rows: int, path: Path) -> Path:
    np.save(path, np.ascontiguousarray(source.vectors(start, rows), dtype=np.float32))
    return path


def ours(cfg: BenchConfig, target: Target, vectors: Path, tag: str) -> dict[str, Any]:
    """Runs the peer-style measurement against the cluster and probes its indexing rate."""
    space = plan_spaces(f"cmp{tag}", 1, target.shard_count, cfg.batch)[0]
    total = cfg.compare_count + cfg.compare_samples * cfg.batch
    address = target.shard_addresses.get(space.shard)
    samples: list[tuple[float, int, int]] = []  # (t, visible, indexed)
    stop = threading.Event()

    def probe() -> None:
        assert address is not None
        with internal.sync_channel(address, security=target.shard_security) as channel:
            while not stop.is_set():
                t = time.monotonic()
                st = shard_stats(channel).get("spaces", {}).get(space.name)
                if st is not None:
                    samples.append((t, st["count"], st["indexed"]))
                    if st["indexed"] >= total:
                        return
                stop.wait(PROBE_INTERVAL_S)

    prober = threading.Thread(target=probe, name="index-probe", daemon=True)
    if address is not None:
        prober.start()
    argv = [
        sys.executable, "-m", "engram.bench.peer_engram",
        "--target", target.address, "--space", space.name, "--vectors", str(vectors),
        "--count", str(cfg.compare_count), "--batch", str(cfg.batch),
        "--samples", str(cfg.compare_samples),
    ]  # fmt: skip
    try:
        result = peer_venvs.run_json(argv, timeout=600)
    except (peer_venvs.Unavailable, subprocess.TimeoutExpired) as exc:
        stop.set()
        return {"peer": "engram-stream", "skipped": str(exc)}
    result["space"] = space.name
    if address is None:
        result["index_probe"] = {
            "skipped": "shard addresses unknown (--target without cluster.json)"
        }
        return result
    limit = max(60.0, 20 * total / 1000)
    prober.join(limit)
    stop.set()
    result["index_probe"] = _index_rate(samples, total)
    return result


def _index_rate(samples: list[tuple[float, int, int]], total: int) -> dict[str, Any]:
    """Rows/s from 5 % indexed until all rows indexed (the ingest has ended by then)."""
    start = next((s for s in samples if s[2] >= 0.05 * total), None)
    end = next((s for s in samples if s[2] >= total), None)
    if start is None or end is None or end[0] <= start[0]:
        last = samples[-1] if samples else (0.0, 0, 0)
        return {"rows": total, "indexed": last[2], "complete": False, "rows_per_s": None}
    return {
        "rows": total,
        "indexed": end[2],
        "complete": True,
        "seconds": round(end[0] - start[0], 3),
        "rows_per_s": round((end[2] - start[2]) / (end[0] - start[0]), 1),
    }


def run_peers(cfg: BenchConfig, vectors: Path, work: Path) -> list[dict[str, Any]]:
    out = []
    for name in cfg.peers:
        print(f"  peer {name} ...", flush=True)
        r = peer_venvs.run_peer(
            name, vectors, cfg.compare_count, cfg.batch, cfg.compare_samples, work / name
        )
        if "skipped" in r:
            print(f"  peer {name} skipped: {r['skipped']}", flush=True)
        else:
            print(f"  {describe(r)}", flush=True)
        out.append(r)
    return out


def describe(r: dict[str, Any]) -> str:
    f = r.get("freshness_ms", {})
    return (
        f"{r['peer']}: ingest until searchable {r['ingest_until_searchable_obs_per_s']:,.0f} obs/s "
        f"({r['count']:,} rows); freshness p50 {f.get('p50')} ms, p99 {f.get('p99')} ms"
    )
