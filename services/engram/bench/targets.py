"""The targets of a run and their verdicts: each figure against its goal (met / not met / no
verdict, with the reason in a note), the limit it is compared with, and the table printed at the
end of ``engram bench``. Called by :mod:`.report`, which computes the figures.
"""

from __future__ import annotations

from typing import Any

from engram.bench import stats
from engram.bench.config import BenchConfig

PEAK_FRACTION = 0.9  # "backlog at its peak": while the backlog is >= 90 % of its peak

TARGETS = {
    "acked_obs_per_s": 100_000.0,
    "visibility_p99_ms": 100.0,
    "recall_p99_ms": 20.0,
    "recall_at_10": 0.95,
    "recall_at_10_during_backlog": 0.95,
    "slo_sustained_obs_per_s": 50_000.0,
    "index_rate_ratio_to_hnswlib": 0.80,
    "shard_rss_gb_per_million": 2.0,
}
HIGHER_IS_BETTER = {
    "acked_obs_per_s",
    "recall_at_10",
    "recall_at_10_during_backlog",
    "index_rate_ratio_to_hnswlib",
    "slo_sustained_obs_per_s",
}


def _target(
    key: str,
    name: str,
    measured: float | None,
    unit: str,
    limit: tuple[str, float | None] | None = None,
    ratio_to_limit: float | None = None,
    note: str = "",
) -> dict[str, Any]:
    goal = TARGETS[key]
    higher = key in HIGHER_IS_BETTER
    met = None if measured is None else (measured >= goal if higher else measured <= goal)
    row: dict[str, Any] = {
        "key": key,
        "name": name,
        "target": f"{'>=' if higher else '<='} {goal:g} {unit}".strip(),
        "measured": None if measured is None else round(measured, 4),
        "unit": unit,
        "met": met,
        "note": note,
    }
    if limit is not None:
        row["limit"] = {"name": limit[0], "value": limit[1]}
        row["ratio_to_limit"] = ratio_to_limit
    return row


def targets(
    cfg: BenchConfig,
    r: dict[str, Any],
    lat: dict[str, Any],
    ix: dict[str, Any],
    quality: dict[str, Any],
) -> list[dict[str, Any]]:
    lim, tp, mem = r["limits"], r["throughput"], ix["memory"]
    io_limit = min(lim["wal"]["obs_per_s"], lim["grpc"]["obs_per_s"])
    io_name = "WAL append" if lim["wal"]["obs_per_s"] <= lim["grpc"]["obs_per_s"] else "gRPC"
    raw_b = mem["raw_hnswlib_rss_bytes_per_vector"]
    raw_gb = round(raw_b / 1000, 3) if raw_b else None
    probe = ix["idle_probe"]
    out = [
        _target(
            "acked_obs_per_s",
            "acked-durable throughput"
            + (" (max sustainable)" if cfg.find_max else f", {tp['timed_seconds']:.0f} s"),
            tp["headline_obs_per_s"],
            "obs/s",
            (f"{io_name} limit obs/s", io_limit),
            stats.ratio(tp["headline_obs_per_s"], io_limit),
            f"recalls/s meanwhile: {lat['recalls_per_s_during_ingest']}",
        ),
        _target(
            "visibility_p99_ms",
            "visibility P99 (ack -> a recall returns it)",
            r["visibility_p99_ms"],
            "ms",
            note=f"{lat['visibility_samples']} samples, {lat['visibility_missed']} never found",
        ),
        _target(
            "recall_p99_ms",
            "recall P99 with the backlog at its peak",
            r["recall_p99_ms"],
            "ms",
            note=f"{lat['_near_peak']} recalls while the backlog was >= {PEAK_FRACTION:.0%} of "
            f"its peak ({lat['_peak']:,} rows)",
        ),
        _target(
            "recall_at_10",
            "recall@10 vs exact search",
            r["recall_at_10"],
            "",
            note=f"{quality.get('queries', 0)} queries; backlog {ix['backlog_at_end']} rows then",
        ),
        _target(
            "recall_at_10_during_backlog",
            "recall@10 vs exact search, backlog at its peak",
            r["recall_at_10_during_backlog"],
            "",
            note=f"asked once every ack was in, before the drain; backlog "
            f"{(r['recall_quality_during_backlog'] or {}).get('backlog_before')} rows then",
        ),
        _target(
            "index_rate_ratio_to_hnswlib",
            "fresh -> HNSW indexing rate / raw hnswlib",
            ix["ratio"],
            "",
            ("raw hnswlib vectors/s", ix["raw_hnswlib_vectors_per_s"]),
            ix["ratio"],
            f"idle probe {probe.get('rows_per_s')} rows/s over {probe.get('rows', '?')} rows",
        ),
        _target(
            "shard_rss_gb_per_million",
            "shard RSS per 1 M observations",
            mem["gb_per_million"],
            "GB",
            ("raw hnswlib index GB per M", raw_gb),
            stats.ratio(mem["gb_per_million"], raw_gb),
            "after the backlog drained" if ix["drained"] else "backlog NOT drained",
        ),
    ]
    if cfg.find_max:
        out.insert(
            0,
            _target(
                "slo_sustained_obs_per_s",
                "highest offered rate holding the SLO",
                r["slo_sustained_obs_per_s"],
                "obs/s",
                note=r["find_max"]["criteria"],
            ),
        )
    if not ix["drained"]:
        # the target is per million observations once indexed: with rows still in the fresh
        # tier (held once, without HNSW links) the figure says nothing about it either way
        out[-1]["met"] = None
    for name, c in r["peers"]["comparisons"].items():
        ratio = c["ingest_until_searchable_ratio"]
        out.append(
            {
                "key": f"ahead_of_{name}_ingest",
                "name": f"ingest until searchable, ours / {name}",
                "target": "> 1 x",
                "measured": ratio,
                "unit": "x",
                "met": None if ratio is None else ratio > 1,
                "note": "same vectors and batch size",
            }
        )
        ours99, theirs99 = c["freshness_p99_ms"]
        out.append(
            {
                "key": f"ahead_of_{name}_freshness",
                "name": f"freshness P99 vs {name}",
                "target": f"< {theirs99} ms",
                "measured": ours99,
                "unit": "ms",
                "met": None if ours99 is None or theirs99 is None else ours99 < theirs99,
                "note": f"p50: ours {c['freshness_p50_ms'][0]} ms, {name} "
                f"{c['freshness_p50_ms'][1]} ms",
            }
        )
    return out


def _num(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f}" if abs(x) >= 1000 else f"{x:,.3g}"


def table(result: dict[str, Any]) -> str:
    rows = [("target", "goal", "measured", "met", "limit", "ratio to limit")]
    for t in result["targets"]:
        lim = t.get("limit")
        ratio = t.get("ratio_to_limit")
        rows.append(
            (
                t["name"],
                t["target"],
                f"{_num(t['measured'])} {t['unit']}".strip(),
                {True: "MET", False: "NOT MET", None: "n/a"}[t["met"]],
                f"{lim['name']} {_num(lim['value'])}" if lim else "",
                "" if ratio is None else f"{ratio:.3g}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    m = result["machine"]
    lines = [
        "",
        f"summary ({m['cpu']}, {m['cores']} cores, load average {m['load_average_start']})",
    ]
    for j, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines.extend(f"note: {n}" for n in result["notes"])
    return "\n".join(lines)
