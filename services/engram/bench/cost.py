"""What the work costs in CPU: core-seconds per million observations, a figure that carries
from this machine to a cluster of any size (unlike obs/s, which depends on the cores there are).

* ``core_seconds_per_million_acked``: user + system CPU seconds of the service's processes (the
  gateway and every shard, read by PID with psutil, all their threads) over the timed phase,
  per million observations acknowledged in the same interval. Ingest's share of indexing,
  partitioning and the recalls of the run are in it: it is what taking the writes cost;
* ``core_seconds_per_million_indexed``: the same processes' CPU while the backlog drains with
  nothing else to do (writes and recalls stopped), per million rows moved into HNSW meanwhile;
  if the backlog drained before the recalls stopped, from the end of the writes instead (the
  ``window`` field says which);
* ``raw_hnswlib_core_seconds_per_million``: the CPU of raw hnswlib ``add_items`` on the same
  vectors in the limits phase (:func:`engram.bench.limits.hnswlib_rate`; mean of its runs).

Excluded and said so in the report: Redis (control-plane state, not on the data path; its own
core-seconds are given beside), and the load generator (writers, recall process, sampler, the
benchmark itself). The interval is the one between two monitor samples (1 s apart), and the
work counted is the work inside the same two samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engram.bench.monitor import Sample

SERVICE = ("gateway", "shard-")  # process names counted as the service
EXCLUDED = ("redis",)  # cluster processes left out (reported beside)


def _cpu_s(s: Sample, names: list[str]) -> float | None:
    vals = [s.procs[n].get("cpu_s") for n in names if n in s.procs]
    if len(vals) < len(names) or any(v is None for v in vals):
        return None
    return float(sum(v for v in vals if v is not None))


def _bounds(samples: list[Sample], lo: float, hi: float) -> tuple[Sample, Sample] | None:
    inside = [s for s in samples if lo <= s.t <= hi]
    if len(inside) < 2 or inside[-1].t <= inside[0].t:
        return None
    return inside[0], inside[-1]


def _indexed(s: Sample) -> int | None:
    rows, backlog = s.rows(), s.backlog()
    return None if rows is None or backlog is None else rows - backlog


def _per_million(cpu: float | None, work: float) -> float | None:
    return round(cpu / work * 1e6, 2) if cpu is not None and work > 0 else None


def build(
    samples: list[Sample],
    acks: list[tuple[Any, ...]],
    t0: float,
    t_stop: float,
    t_reads: float,
    t_drained: float | None,
    hnswlib_runs: list[dict[str, Any]],
) -> dict[str, Any]:
    """The three figures and how each was measured (see the module docstring)."""
    alive = [s for s in samples if s.procs]
    names = sorted(
        {n for s in alive for n in s.procs if n.startswith(SERVICE) and "gone" not in s.procs[n]}
    )
    excluded = sorted({n for s in alive for n in s.procs if n.startswith(EXCLUDED)})
    out: dict[str, Any] = {
        "processes_counted": names,
        "excluded": excluded + ["the load generator (writers, recall process, sampler, bench)"],
        "core_seconds_per_million_acked": None,
        "core_seconds_per_million_indexed": None,
        "raw_hnswlib_core_seconds_per_million": None,
    }
    raws = [r["core_seconds_per_million"] for r in hnswlib_runs if "core_seconds_per_million" in r]
    if raws:
        out["raw_hnswlib_core_seconds_per_million"] = round(float(np.mean(raws)), 2)
        out["raw_hnswlib_runs"] = raws
    if not names:
        out["not_measured"] = "no PIDs of the gateway and shards (an attached cluster?)"
        return out

    timed = _bounds(alive, t0, t_stop)
    if timed is not None:
        a, b = timed
        cpu = _cpu_s(b, names), _cpu_s(a, names)
        service = None if None in cpu else cpu[0] - cpu[1]  # type: ignore[operator]
        acked = sum(x[5] for x in acks if x[6] and a.t <= x[4] < b.t)
        out["acked"] = {
            "seconds": round(b.t - a.t, 1),
            "core_seconds": None if service is None else round(service, 2),
            "observations": acked,
            "mean_cores": None if service is None else round(service / (b.t - a.t), 2),
        }
        out["core_seconds_per_million_acked"] = _per_million(service, acked)
        redis = [_cpu_s(s, excluded) for s in (a, b)] if excluded else []
        if redis and None not in redis:
            out["acked"]["redis_core_seconds"] = round(redis[1] - redis[0], 2)  # type: ignore[operator]

    end = t_drained if t_drained is not None else (alive[-1].t if alive else t_reads)
    windows = (("drain alone (writes and recalls stopped)", t_reads), ("after the writes", t_stop))
    for window, lo in windows:
        span = _bounds(alive, lo, end)
        if span is None:
            continue
        a, b = span
        ia, ib = _indexed(a), _indexed(b)
        ca, cb = _cpu_s(a, names), _cpu_s(b, names)
        if ia is None or ib is None or ca is None or cb is None or ib <= ia:
            continue
        out["indexed"] = {
            "window": window,
            "seconds": round(b.t - a.t, 1),
            "core_seconds": round(cb - ca, 2),
            "rows": ib - ia,
            "mean_cores": round((cb - ca) / (b.t - a.t), 2),
        }
        out["core_seconds_per_million_indexed"] = _per_million(cb - ca, ib - ia)
        break
    else:
        out["indexed_not_measured"] = "no rows were indexed between two samples after the writes"
    return out
