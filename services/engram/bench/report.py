"""Turns one run's raw data into the result: figures, targets with met / not met (their rows and
the table printed at the end are :mod:`.targets`), the JSON (the markdown is :mod:`.markdown`,
the plots :mod:`.plots`).

Every figure is computed from the raw telemetry here, once; nothing is adjusted to look better:
a target that is not met is reported with the measured figure, and a figure that could not be
measured is ``null`` with the reason in ``notes``.

Telemetry tuples (see :mod:`.workers`): acks
``(space, k, t_send, t_written, t_ack, n, ok, in_flight)``,
recalls ``(t_issue, latency_s, server_us, fresh, indexed, space, ok, stages)``, visibility samples
``(space, t_send, t_ack, t_received, t_found | None, polls, t_last_poll_issued)``.
"""

from __future__ import annotations

import bisect
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from engram.bench import cost, search, stats, tradeoff
from engram.bench.config import BenchConfig
from engram.bench.load import LoadRun
from engram.bench.monitor import Sample
from engram.bench.targets import PEAK_FRACTION, targets

# ------------------------------------------------------------------------------ helpers


def _nearest(samples: list[Sample], t: float) -> Sample | None:
    if not samples:
        return None
    i = bisect.bisect_left([s.t for s in samples], t)
    cands = [samples[j] for j in (i - 1, i) if 0 <= j < len(samples)]
    return min(cands, key=lambda s: abs(s.t - t))


def _indexed(s: Sample | None) -> int | None:
    if s is None or s.rows() is None:
        return None
    return (s.rows() or 0) - (s.backlog() or 0)


def _rate_between(a: Sample | None, b: Sample | None) -> float | None:
    ia, ib = _indexed(a), _indexed(b)
    if a is None or b is None or ia is None or ib is None or b.t <= a.t:
        return None
    return round((ib - ia) / (b.t - a.t), 1)


def _shard_memory(s: Sample | None, shard_count: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if s is None:
        return out
    for i in range(shard_count):
        proc, st = s.procs.get(f"shard-{i}"), s.shards.get(i, {})
        if proc is None or "spaces" not in st:
            continue
        out[f"shard-{i}"] = {
            "rss_mb": proc["rss_mb"],
            "rows": sum(sp["count"] for sp in st["spaces"].values()),
            "indexed": sum(sp["indexed"] for sp in st["spaces"].values()),
        }
    return out


def _gb_per_million(rss_mb: float, rows: int) -> float | None:
    return round(rss_mb / 1000 / (rows / 1e6), 3) if rows > 0 else None


def _proc_summary(samples: list[Sample], lo: float, hi: float) -> dict[str, Any]:
    out = {}
    for n in sorted({n for s in samples for n in s.procs}):
        every = [s.procs[n] for s in samples if n in s.procs and "gone" not in s.procs[n]]
        inside = [s.procs[n]["cpu_pct"] for s in samples if n in s.procs and lo < s.t <= hi]
        if every:
            out[n] = {
                "cpu_pct_mean_timed": round(float(np.mean(inside)), 1) if inside else None,
                "rss_mb_max": max(p["rss_mb"] for p in every),
                "rss_mb_end": every[-1]["rss_mb"],
                "threads_cpu_pct_timed": _thread_cpu(samples, n, lo, hi),
            }
    return out


def _thread_cpu(samples: list[Sample], name: str, lo: float, hi: float) -> dict[str, float]:
    """Mean CPU % (100 = one core) of process ``name``'s threads, by thread name, between the
    first and the last sample of the timed phase; largest first, those under 0.5 % left out."""
    inside = [s for s in samples if lo <= s.t <= hi and s.threads.get(name)]
    if len(inside) < 2 or inside[-1].t <= inside[0].t:
        return {}
    first, last = inside[0].threads[name], inside[-1].threads[name]
    span = inside[-1].t - inside[0].t
    pct = {t: 100 * (cpu - first.get(t, 0.0)) / span for t, cpu in last.items()}
    return {t: round(p, 1) for t, p in sorted(pct.items(), key=lambda x: -x[1]) if p >= 0.5}


def _ms(values_s: list[float]) -> list[float]:
    return [v * 1000 for v in values_s]


# ----------------------------------------------------------------------------- sections


def _throughput(cfg: BenchConfig, load: LoadRun, n_sec: int) -> dict[str, Any]:
    t0, t_stop = load.t0, load.t_stop
    span = t_stop - t0
    acks = load.telemetry.acks
    ok = [a for a in acks if a[6]]
    acked_timed = sum(a[5] for a in ok if t0 <= a[4] < t_stop)
    series = stats.buckets([a[4] for a in ok], [a[5] for a in ok], t0, n_sec)
    full = series[: max(1, math.floor(span))]
    out: dict[str, Any] = {
        "timed_seconds": round(span, 3),
        "acked_in_timed_phase": acked_timed,
        "sustained_obs_per_s": round(acked_timed / span, 1) if span > 0 else 0.0,
        "per_second_median": stats.rounded(float(np.median(full))),
        "per_second_min": stats.rounded(min(full)),
        "offered_obs_per_s": None if cfg.find_max else cfg.rate,
        "batches_acked": len(ok),
        "batches_failed": len(acks) - len(ok),
    }
    out["headline_obs_per_s"] = out["sustained_obs_per_s"]
    if cfg.find_max:
        passing = [s for s in load.steps if s["keeps_up"]]
        best = max(passing, key=lambda s: s["offered"]) if passing else None
        out["headline_obs_per_s"] = best["acked"] if best else 0.0
    return out


def _stages(recalls: list[tuple[Any, ...]]) -> dict[str, Any]:
    """Where recalls' time went: the wait for their consistency level, the queue for a shard
    recall thread, the HNSW search (with any wait for the builder's lock), the fresh-tier scan,
    and the rest: the client's latency outside the shard's recall thread (gateway, both hops,
    both event loops)."""
    timed = [r for r in recalls if r[7] is not None]
    waited, queued, index, fresh = ([s[i] / 1e6 for s in (r[7] for r in timed)] for i in range(4))
    rest = [r[1] - r[7][0] / 1e6 - r[7][1] / 1e6 - r[2] / 1e6 for r in timed]
    return {
        "consistency_wait": stats.summary_ms(waited),
        "queued": stats.summary_ms(queued),
        "hnsw": stats.summary_ms(index),
        "fresh": stats.summary_ms(fresh),
        "outside_recall_thread": stats.summary_ms(rest),
    }


def _latency(load: LoadRun, samples: list[Sample]) -> dict[str, Any]:
    tel, t0, t_stop = load.telemetry, load.t0, load.t_stop
    span = t_stop - t0
    in_win = [a for a in tel.acks if a[6] and t0 <= a[4] < t_stop]
    rec_ok = [r for r in tel.recalls if r[6]]
    load_samples = [s for s in samples if s.t >= t0 and s.backlog() is not None]
    peak = max((s.backlog() or 0 for s in load_samples), default=0)
    peak_t = next((s.t for s in load_samples if s.backlog() == peak), None)
    near_peak = []
    for r in rec_ok:
        n = _nearest(load_samples, r[0])
        if n is not None and abs(n.t - r[0]) <= 1.0 and (n.backlog() or 0) >= PEAK_FRACTION * peak:
            near_peak.append(r)
    found = [v for v in tel.vis if v[4] is not None]
    issued = len([r for r in tel.recalls if t0 <= r[0] < t_stop])
    return {
        "ack_ms": stats.summary_ms([a[4] - a[3] for a in in_win]),
        "send_wait_ms": stats.summary_ms([a[3] - a[2] for a in in_win]),
        "in_flight_batches_per_stream": {
            "p50": stats.percentile([a[7] for a in in_win], 50),
            "mean": round(float(np.mean([a[7] for a in in_win])), 2) if in_win else None,
            "max": max((a[7] for a in in_win), default=None),
        },
        "visibility_ms": stats.summary_ms([v[4] - v[2] for v in found]),
        "visibility_lower_bound_ms": stats.summary_ms([max(0.0, v[6] - v[2]) for v in found]),
        "visibility_polls_mean": round(float(np.mean([v[5] for v in found])), 2) if found else None,
        "visibility_ipc_delay_ms": stats.summary_ms([v[3] - v[2] for v in tel.vis]),
        "visibility_samples": len(tel.vis),
        "visibility_missed": len(tel.vis) - len(found),
        "recall_ms_during_ingest": stats.summary_ms([r[1] for r in rec_ok if t0 <= r[0] < t_stop]),
        "recall_ms_during_drain": stats.summary_ms([r[1] for r in rec_ok if r[0] >= t_stop]),
        "recall_ms_at_peak_backlog": stats.summary_ms([r[1] for r in near_peak]),
        "recall_server_ms_during_ingest": stats.summary_ms(
            [r[2] / 1e6 for r in rec_ok if t0 <= r[0] < t_stop]
        ),
        "recall_stages_ms_during_ingest": _stages([r for r in rec_ok if t0 <= r[0] < t_stop]),
        "recall_failed": len(tel.recalls) - len(rec_ok),
        "recalls_per_s_during_ingest": round(issued / span, 2) if span > 0 else 0.0,
        "_peak": peak,
        "_peak_t": peak_t,
        "_near_peak": len(near_peak),
    }


def _indexing_memory(
    cfg: BenchConfig, data: dict[str, Any], load: LoadRun, samples: list[Sample]
) -> dict[str, Any]:
    lim = data["limits"]
    raws = [lim[k]["vectors_per_s"] for k in ("hnswlib", "hnswlib_after_probe") if k in lim]
    raw = round(float(np.mean(raws)), 1)
    probe = data.get("ours", {}).get("index_probe", {}) or {}
    s_t0, s_stop = _nearest(samples, load.t0), _nearest(samples, load.t_stop)
    s_reads = _nearest(samples, load.t_reads_stopped)
    drained = load.t_drained is not None
    s_after = _nearest(samples, load.t_drained) if drained else (samples[-1] if samples else None)
    shards = data["target"]["shards"]
    end, before = (
        _shard_memory(data.get("final"), shards),
        _shard_memory(data.get("before_load"), shards),
    )
    rss_end, rows_end = sum(v["rss_mb"] for v in end.values()), sum(v["rows"] for v in end.values())
    d_rss = rss_end - sum(v["rss_mb"] for v in before.values())
    d_rows = rows_end - sum(v["rows"] for v in before.values())
    final: Sample | None = data.get("final")
    return {
        "raw_hnswlib_vectors_per_s": raw,
        "raw_hnswlib_runs": raws,
        "idle_probe": probe,
        "ratio": stats.ratio(probe.get("rows_per_s"), raw),
        "rows_per_s_during_ingest": _rate_between(s_t0, s_stop),
        "rows_per_s_after_ingest_with_recalls": _rate_between(s_stop, s_reads),
        "rows_per_s_drain_alone": _rate_between(s_reads, s_after),
        "drained": drained,
        "drained_after_s": round(load.t_drained - load.t_stop, 1) if load.t_drained else None,
        "backlog_at_end_of_ingest": s_stop.backlog() if s_stop else None,
        "backlog_at_end": final.backlog() if final else None,
        "memory": {
            "gb_per_million": _gb_per_million(rss_end, rows_end) if end else None,
            "gb_per_million_incremental": _gb_per_million(d_rss, d_rows)
            if end and before
            else None,
            "shards_at_end": end,
            "shards_before_load": before,
            "raw_hnswlib_rss_bytes_per_vector": lim["hnswlib"].get("rss_bytes_per_vector"),
        },
    }


def _peers(data: dict[str, Any]) -> dict[str, Any]:
    ours = data.get("ours", {})
    results = {"engram-stream": ours}
    for p in data.get("peers", []):
        results[p.get("peer", "?")] = p
    comparisons = {}
    for name, p in results.items():
        if name == "engram-stream" or "skipped" in p or "skipped" in ours:
            continue
        comparisons[name] = {
            "ingest_until_searchable_ratio": stats.ratio(
                ours.get("ingest_until_searchable_obs_per_s"),
                p.get("ingest_until_searchable_obs_per_s"),
            ),
            "freshness_p50_ms": [ours["freshness_ms"].get("p50"), p["freshness_ms"].get("p50")],
            "freshness_p99_ms": [ours["freshness_ms"].get("p99"), p["freshness_ms"].get("p99")],
        }
    return {"results": results, "comparisons": comparisons}


def _series(load: LoadRun, samples: list[Sample], n_sec: int) -> dict[str, Any]:
    tel, t0 = load.telemetry, load.t0
    ok = [a for a in tel.acks if a[6]]
    rec = [r for r in tel.recalls if r[6]]
    offered = []
    for i in range(n_sec):
        rate = 0.0
        for t, r in load.rate_changes:
            if t <= t0 + i + 0.5:
                rate = r
        offered.append(rate if t0 + i < load.t_stop else 0.0)
    a_t, a_v = [a[4] for a in ok], [a[4] - a[3] for a in ok]
    r_t, r_v = [r[0] for r in rec], [r[1] for r in rec]
    return {
        "t": list(range(n_sec)),
        "offered_obs_per_s": offered,
        "sent_obs_per_s": stats.buckets(
            [a[2] for a in tel.acks], [a[5] for a in tel.acks], t0, n_sec
        ),
        "acked_obs_per_s": stats.buckets(a_t, [a[5] for a in ok], t0, n_sec),
        "ack_p50_ms": stats.per_second_percentiles(a_t, a_v, t0, n_sec, 50),
        "ack_p99_ms": stats.per_second_percentiles(a_t, a_v, t0, n_sec, 99),
        "recall_p50_ms": stats.per_second_percentiles(r_t, r_v, t0, n_sec, 50),
        "recall_p99_ms": stats.per_second_percentiles(r_t, r_v, t0, n_sec, 99),
        "visibility": [
            [round(v[2] - t0, 3), round((v[4] - v[2]) * 1000, 3)] for v in tel.vis if v[4]
        ],
        "monitor": [
            {
                "t": round(s.t - t0, 2),
                "backlog": s.backlog(),
                "rows": s.rows(),
                "other_cpu_pct": round(s.other_cpu_pct(), 1),
                "shards": {
                    str(k): {
                        "backlog": sum(p["count"] - p["indexed"] for p in v["spaces"].values()),
                        "rows": sum(p["count"] for p in v["spaces"].values()),
                    }
                    for k, v in s.shards.items()
                    if "spaces" in v
                },
                "procs": s.procs,
            }
            for s in samples
        ],
    }  # fmt: skip


# --------------------------------------------------------------------------------- build


def build(cfg: BenchConfig, data: dict[str, Any]) -> dict[str, Any]:
    load: LoadRun = data["load"]
    tel = load.telemetry
    samples: list[Sample] = data["monitor"]
    last_t = max([a[4] for a in tel.acks] + [s.t for s in samples] + [load.t_stop])
    n_sec = max(1, math.ceil(last_t - load.t0))
    live = [dict(st) for st in load.steps]
    if cfg.find_max:  # judged again with every sample in (some were still being polled)
        load.steps[:] = [
            {**search.judge(tel, cfg, rate, lo, hi), "backlog_end": st.get("backlog_end"),
             "live_keeps_up": st["keeps_up"]}
            for (rate, lo, hi), st in zip(load.step_windows, live, strict=True)
        ]  # fmt: skip
    tp = _throughput(cfg, load, n_sec)
    lat = _latency(load, samples)
    ix = _indexing_memory(cfg, data, load, samples)
    quality = data.get("quality", {})
    timed = [s for s in samples if load.t0 < s.t <= load.t_stop]
    other_cpu = round(float(np.mean([s.other_cpu_pct() for s in timed])), 1) if timed else None
    wal_limit = data["limits"]["wal"]["obs_per_s"]
    grpc_limit = data["limits"]["grpc"]["obs_per_s"]
    lim = data["limits"]
    spend = cost.build(
        samples, tel.acks, load.t0, load.t_stop, load.t_reads_stopped, load.t_drained,
        [lim[k] for k in ("hnswlib", "hnswlib_after_probe") if k in lim],
    )  # fmt: skip
    during = data.get("quality_during_backlog")
    if during is not None:
        during = dict(during)
        during["asked_at_s"] = round(during.pop("t_start") - load.t0, 1)
        during["asked_until_s"] = round(during.pop("t_end") - load.t0, 1)
    r: dict[str, Any] = {
        "acked_obs_per_s": tp["headline_obs_per_s"],
        "slo_sustained_obs_per_s": search.best(load.steps) if cfg.find_max else None,
        "recall_at_10_during_backlog": (during or {}).get("recall_at_10"),
        "core_seconds_per_million_acked": spend["core_seconds_per_million_acked"],
        "core_seconds_per_million_indexed": spend["core_seconds_per_million_indexed"],
        "raw_hnswlib_core_seconds_per_million": spend["raw_hnswlib_core_seconds_per_million"],
        "visibility_p99_ms": lat["visibility_ms"]["p99"],
        "recall_p99_ms": lat["recall_ms_at_peak_backlog"]["p99"],
        "recall_at_10": quality.get("recall_at_10"),
        "index_rate_ratio_to_hnswlib": ix["ratio"],
        "shard_rss_gb_per_million": ix["memory"]["gb_per_million"],
        "peers": _peers(data),
        "machine": {
            **data["machine"],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
            "other_processes_cpu_pct_during_timed_phase": other_cpu,
        },
        "config": _config(cfg),
        # authentication (an API key on every call) and TLS between the clients and the gateway
        "auth": data["target"].get("auth", False),
        "tls": data["target"].get("tls", False),
        "corpus": data["corpus"],
        "cluster": data["target"],
        "limits": data["limits"],
        "throughput": {
            **tp,
            "ratio_to_wal_limit": stats.ratio(tp["headline_obs_per_s"], wal_limit),
            "ratio_to_grpc_limit": stats.ratio(tp["headline_obs_per_s"], grpc_limit),
        },
        "find_max": None,
        "latency": {k: v for k, v in lat.items() if not k.startswith("_")},
        "recall_quality": {k: v for k, v in quality.items() if k != "latency_s"},
        "recall_quality_during_backlog": during,
        "cost": spend,
        "gave_up": tradeoff.build(
            cfg, tel, load.t0, load.t_stop, n_sec, lat, tp,
            data.get("metrics_before", {}), data.get("metrics_after", {}),
        ),  # fmt: skip
        "backlog": {
            "peak_rows": lat["_peak"],
            "peak_at_s": None if lat["_peak_t"] is None else round(lat["_peak_t"] - load.t0, 1),
            "at_end_of_ingest": ix["backlog_at_end_of_ingest"],
            "drained": ix["drained"],
            "drained_after_s": ix["drained_after_s"],
            "at_end": ix["backlog_at_end"],
        },
        "indexing": {k: v for k, v in ix.items() if k != "memory"},
        "memory": ix["memory"],
        "processes": _proc_summary(samples, load.t0, load.t_stop),
        "profile": load.profiles,
        "stream_events": [list(e) for e in tel.events[:50]],
        "tracing": data.get("tracing"),  # None: tracing off
    }  # fmt: skip
    if cfg.find_max:
        r["find_max"] = {
            "scenario": cfg.scenario,
            "recall_rate": cfg.recall_rate,
            "criteria": search.criteria(cfg),
            "steps": load.steps,
            "slo_sustained_obs_per_s": r["slo_sustained_obs_per_s"],
            # the acked rate of that step
            "max_sustainable_obs_per_s": (
                tp["headline_obs_per_s"] if r["slo_sustained_obs_per_s"] else None
            ),
            "verdicts_changed_after_the_run": [
                i + 1 for i, st in enumerate(load.steps) if st["keeps_up"] != st["live_keeps_up"]
            ],
        }
    r["targets"] = targets(cfg, r, lat, ix, quality)
    r["notes"] = _notes(cfg, r, load, other_cpu)
    r["series"] = _series(load, samples, n_sec)
    return r


def _config(cfg: BenchConfig) -> dict[str, Any]:
    """The options of the run, the API key left out (only whether one was given)."""
    out = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()}
    out["api_key"] = "(given)" if cfg.api_key else ""
    return out


def _notes(
    cfg: BenchConfig, r: dict[str, Any], load: LoadRun, other_cpu: float | None
) -> list[str]:
    notes = []
    tel, ix, lat = load.telemetry, r["indexing"], r["latency"]
    if other_cpu is not None and other_cpu >= 20:
        notes.append(
            f"other processes on this machine used {other_cpu:.0f}% CPU (100 = one core) on "
            "average during the timed phase: figures are depressed by that much contention"
        )
    if cfg.find_max and not any(s["keeps_up"] for s in load.steps):
        notes.append("--find-max: no step held the SLO")
    changed = (r["find_max"] or {}).get("verdicts_changed_after_the_run")
    if changed:
        notes.append(
            f"--find-max: the verdict of step(s) {changed} changed once every visibility sample "
            "was in (the search chose its next rate on the earlier verdict)"
        )
    c = r["cost"]
    notes.append(
        "core-seconds count the CPU of "
        + ", ".join(c["processes_counted"] or ["nothing"])
        + "; not counted: "
        + ", ".join(c["excluded"])
    )
    if lat["visibility_missed"]:
        notes.append(f"{lat['visibility_missed']} visibility samples were not found within 10 s")
    if not lat["visibility_samples"]:
        notes.append("no visibility samples were taken")
    if not ix["idle_probe"].get("rows_per_s"):
        notes.append("the idle indexing probe did not complete: indexing ratio not measured")
    if r["memory"]["gb_per_million"] is None:
        notes.append("shard RSS per million not measured (no PIDs or Stats for the shards)")
    elif not ix["drained"]:
        notes.append(
            f"the index backlog did not drain within {cfg.drain_timeout:g} s "
            f"({ix['backlog_at_end']} rows still un-indexed): shard RSS per million is measured "
            "with those rows in the fresh tier, not once indexed"
        )
    if cfg.dim != 384:
        notes.append(f"the targets are stated for dim 384; this run used dim {cfg.dim}")
    if r["tracing"] is not None:
        t = r["tracing"]
        received = "" if t["spans_received"] is None else f", {t['spans_received']} spans received"
        notes.append(f"tracing on: ratio {t['ratio']:g}, spans to {t['endpoint']}{received}")
    if cfg.profile_seconds > 0:
        notes.append(
            f"py-spy sampled the gateway and shard-0 at {cfg.profile_rate} Hz for "
            f"{cfg.profile_seconds:g} s from second {cfg.profile_start:g} of the timed phase"
        )
    notes.extend(f"load process failure: {f.splitlines()[0]}" for f in tel.failures)
    if r["throughput"]["batches_failed"]:
        notes.append(f"{r['throughput']['batches_failed']} batches failed (not acknowledged)")
    if tel.events:
        notes.append(f"{len(tel.events)} stream events (disconnects, resumes, errors) under load")
    return notes


# --------------------------------------------------------------------------------- output


def write(cfg: BenchConfig, out_dir: Path, result: dict[str, Any]) -> None:
    from engram.bench import markdown, plots

    images: list[str] = []
    if cfg.plots:
        try:
            images = plots.draw(result, out_dir)
        except ImportError as exc:
            result["notes"].append(f"plots skipped: {exc} (pip install matplotlib)")
    text = json.dumps(result, indent=1, default=str) + "\n"
    (out_dir / "results.json").write_text(text)
    if cfg.json_path:
        Path(cfg.json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.json_path).write_text(text)
    (out_dir / "summary.md").write_text(markdown.summary(result, images))
