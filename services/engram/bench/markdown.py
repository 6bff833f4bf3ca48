"""The markdown summary of one run (``summary.md`` next to ``results.json``)."""

from __future__ import annotations

from typing import Any


def _f(x: Any, unit: str = "", nd: int = 1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, (int, float)):
        s = f"{x:,.0f}" if abs(x) >= 1000 else f"{x:,.{nd}f}"
        return f"{s} {unit}".strip()
    return str(x)


def _lat_row(name: str, s: dict[str, Any]) -> str:
    return (
        f"| {name} | {s.get('count', 0)} | {_f(s.get('p50'))} | {_f(s.get('p99'))} "
        f"| {_f(s.get('max'))} |"
    )


def summary(r: dict[str, Any], images: list[str]) -> str:
    m, c, lim = r["machine"], r["config"], r["limits"]
    out = [
        "# Engram Stream benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, {m['os']}, Python "
        f"{m['python']}; data on {m['data_filesystem']}. Load average at start "
        f"{m['load_average_start']}, at end {m.get('load_average_end')} (a shared machine: quote "
        "ratios measured in one run).",
        "",
        f"Scenario: dim {c['dim']}, batches of {c['batch']:,}, {c['spaces']} spaces over "
        f"{r['cluster']['shards']} shards, {c['writers']} writer processes, "
        + (
            "`--find-max`"
            if c["find_max"]
            else f"{c['rate']:,.0f} obs/s offered for {c['seconds']:g} s"
        )
        + f", {c['recall_rate']:g} recalls/s, corpus {r['corpus']['corpus']}.",
        "",
        "## Targets",
        "",
        "| target | goal | measured | met | limit | ratio to limit | note |",
        "|---|---|---|---|---|---|---|",
    ]
    for t in r["targets"]:
        met = {True: "**met**", False: "**NOT met**", None: "n/a"}[t["met"]]
        lim_t = t.get("limit")
        lim_s = f"{lim_t['name']}: {_f(lim_t['value'], nd=3)}" if lim_t else ""
        ratio = t.get("ratio_to_limit")
        out.append(
            f"| {t['name']} | {t['target']} | {_f(t['measured'], t['unit'], 3)} | {met} | {lim_s} "
            f"| {'' if ratio is None else f'{ratio:.3g}'} | {t['note']} |"
        )
    out += ["", "## Limits measured in this run", "", "| limit | figure | obs/s |", "|---|---|---|"]
    h, w, g = lim["hnswlib"], lim["wal"], lim["grpc"]
    out += [
        f"| {h['what']} ({h['count']:,} x {h['dim']}, M={h['M']}, efC={h['ef_construction']}, "
        f"{h['threads']} threads) | {_f(h['vectors_per_s'])} vectors/s (last chunk "
        f"{_f(h['last_chunk_vectors_per_s'])}); {_f(h.get('rss_bytes_per_vector'))} B/vector RSS "
        f"| {_f(h['obs_per_s'])} |",
        f"| {w['what']}, {w['record_bytes'] / 1e6:.2f} MB records | {_f(w['records_per_s'])} "
        f"records/s, {_f(w['mb_per_s'])} MB/s, append p99 {_f(w['append_ms_p99'])} ms "
        f"| {_f(w['obs_per_s'])} |",
        f"| {g['what']} | {_f(g['messages_per_s'])} batches/s, {_f(g['mb_per_s'])} MB/s "
        f"| {_f(g['obs_per_s'])} |",
    ]
    tp = r["throughput"]
    out += [
        "",
        "## Ingest",
        "",
        f"Acked durable: {_f(tp['sustained_obs_per_s'])} obs/s over {tp['timed_seconds']:.1f} s "
        f"(per-second median {_f(tp['per_second_median'])}, min {_f(tp['per_second_min'])}); "
        f"{tp['batches_acked']:,} batches acked, {tp['batches_failed']} failed. Ratio to the WAL "
        f"limit {tp['ratio_to_wal_limit']}, to the gRPC limit {tp['ratio_to_grpc_limit']}.",
    ]
    if r.get("find_max"):
        out += _find_max(r["find_max"])
    out += _gave_up(r["gave_up"], r["config"])
    out += _cost(r["cost"], r.get("recall_quality_during_backlog"))
    lat = r["latency"]
    out += [
        "",
        "## Latency (ms)",
        "",
        "| what | count | p50 | p99 | max |",
        "|---|---|---|---|---|",
        _lat_row("ack (batch sent -> durable ack)", lat["ack_ms"]),
        _lat_row("send wait (client window / credits full)", lat["send_wait_ms"]),
        _lat_row("visibility (ack -> answer of the recall that returns it)", lat["visibility_ms"]),
        _lat_row(
            "visibility lower bound (ack -> that recall was sent)", lat["visibility_lower_bound_ms"]
        ),
        _lat_row("  sampler hand-over (harness part of the above)", lat["visibility_ipc_delay_ms"]),
        _lat_row("recall during ingest", lat["recall_ms_during_ingest"]),
        _lat_row("recall at peak backlog", lat["recall_ms_at_peak_backlog"]),
        _lat_row("recall during the drain", lat["recall_ms_during_drain"]),
        _lat_row("recall, server side, during ingest", lat["recall_server_ms_during_ingest"]),
    ]
    stages = lat.get("recall_stages_ms_during_ingest") or {}
    names = {
        "consistency_wait": "waiting for its consistency level",
        "queued": "queued for a shard recall thread",
        "hnsw": "HNSW tier (with any wait for the builder)",
        "fresh": "fresh tier",
        "outside_recall_thread": "outside the recall thread (gateway, hops, event loops)",
    }
    out += [
        _lat_row(f"recall during ingest, {what}", stages[k])
        for k, what in names.items()
        if k in stages
    ]
    depth = lat["in_flight_batches_per_stream"]
    out += [
        "",
        f"Batches in flight per stream when one was sent (the client's window): mean "
        f"{depth['mean']}, max {depth['max']}.",
    ]
    b, ix, mem = r["backlog"], r["indexing"], r["memory"]
    out += [
        "",
        "## Index backlog, indexing, memory",
        "",
        f"Backlog peak {_f(b['peak_rows'])} rows at {b['peak_at_s']} s; drained: {b['drained']}"
        + (
            f" ({b['drained_after_s']} s after ingest)"
            if b["drained"]
            else f" (still {_f(b['at_end'])} rows at the end)"
        )
        + ".",
        f"Indexing: idle probe {_f(ix['idle_probe'].get('rows_per_s'))} rows/s vs raw hnswlib "
        f"{_f(ix['raw_hnswlib_vectors_per_s'])} vectors/s; during ingest "
        f"{_f(ix['rows_per_s_during_ingest'])} rows/s; after ingest with recalls going on "
        f"{_f(ix['rows_per_s_after_ingest_with_recalls'])} rows/s; draining alone "
        f"{_f(ix['rows_per_s_drain_alone'])} rows/s (all shards together).",
        f"Shard RSS per million observations: {_f(r['shard_rss_gb_per_million'], 'GB', 3)} "
        f"(incremental over the load: {_f(mem['gb_per_million_incremental'], 'GB', 3)}; raw "
        f"hnswlib index {_f(mem['raw_hnswlib_rss_bytes_per_vector'])} B/vector).",
        "",
        "| process | mean CPU % (timed) | max RSS MB | end RSS MB |",
        "|---|---|---|---|",
    ]
    for name, p in r["processes"].items():
        out.append(
            f"| {name} | {_f(p['cpu_pct_mean_timed'])} | {_f(p['rss_mb_max'])} "
            f"| {_f(p['rss_mb_end'])} |"
        )
    out += [
        "",
        "CPU by thread over the timed phase (100 = one core; threads under 0.5 % left out):",
        "",
        "| process | thread | mean CPU % |",
        "|---|---|---|",
    ]
    for name, p in r["processes"].items():
        for thread, pct in p.get("threads_cpu_pct_timed", {}).items():
            out.append(f"| {name} | {thread} | {_f(pct)} |")
    out += [
        "",
        "## Side by side (same vectors and batch size)",
        "",
        "| system | ingest until searchable obs/s | freshness p50 ms | p99 ms | max ms | notes |",
        "|---|---|---|---|---|---|",
    ]
    for name, p in r["peers"]["results"].items():
        if "skipped" in p:
            out.append(f"| {name} | skipped | | | | {p['skipped'][:200]} |")
            continue
        f = p["freshness_ms"]
        out.append(
            f"| {name} {p.get('version', '')} | {_f(p['ingest_until_searchable_obs_per_s'])} "
            f"| {_f(f['p50'], nd=2)} | {_f(f['p99'], nd=2)} | {_f(f['max'], nd=2)} "
            f"| {p['count']:,} rows, {f['count']} samples; {p.get('settings', {})} |"
        )
    for name, prof in (r.get("profile") or {}).items():
        out += ["", f"## Profile: {name} (py-spy)", ""]
        if "skipped" in prof:
            out.append(f"skipped: {prof['skipped']}")
            continue
        out += [
            f"{prof['samples']:,} samples. Threads: "
            + ", ".join(f"{t['function']} {t['pct']}%" for t in prof["threads"]),
            "",
            "| self % | function |",
            "|---|---|",
        ]
        out += [f"| {x['pct']} | `{x['function']}` |" for x in prof["self"][:12]]
        out += ["", "| total % | engram function |", "|---|---|"]
        out += [f"| {x['pct']} | `{x['function']}` |" for x in prof["total_engram"][:12]]
    if r["notes"]:
        out += ["", "## Notes", ""] + [f"* {n}" for n in r["notes"]]
    if images:
        out += ["", "## Plots", ""] + [f"![{i}]({i})" for i in images]
    return "\n".join(out) + "\n"


def _find_max(fm: dict[str, Any]) -> list[str]:
    out = [
        "",
        f"Find-max, scenario {fm['scenario']} ({fm['criteria']}): the highest offered rate "
        f"holding the SLO is **{_f(fm['slo_sustained_obs_per_s'])} obs/s**. Steps in the "
        "order they ran (back to back on one cluster):",
        "",
        "| step | offered | acked | acked share | ack p99 ms | recall P99 ms (n, failed) "
        "| visibility P99 ms (n, missed) | backlog at end | holds the SLO |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, s in enumerate(fm["steps"], 1):
        failed = [k for k, ok in s["held"].items() if not ok]
        out.append(
            f"| {i} | {_f(s['offered'])} | {_f(s['acked'])} | {_f(s['acked_ratio'], nd=3)} "
            f"| {_f(s['ack_p99_ms'])} | {_f(s['recall_p99_ms'])} ({s['recalls']}, "
            f"{s['recalls_failed']}) | {_f(s['visibility_p99_ms'])} ({s['visibility_samples']}, "
            f"{s['visibility_missed']}) | {_f(s.get('backlog_end'))} "
            f"| {'yes' if s['keeps_up'] else 'no: ' + ', '.join(failed)} |"
        )
    return out


def _gave_up(g: dict[str, Any], c: dict[str, Any]) -> list[str]:
    rej, lev, b = g["rejections"], g["levels"], g["bounds"]

    def held(x: bool | None) -> str:
        return {True: "held", False: "**NOT held**", None: "n/a"}[x]

    out = [
        "",
        "## What the service gave up",
        "",
        f"Offered {_f(g['offered_obs_per_s'])} obs/s, acknowledged {_f(g['acked_obs_per_s'])} "
        f"(share {_f(g['acked_share'], nd=3)}). Recall P99 during ingest "
        f"{_f(b['recall_p99_ms_during_ingest'])} ms (bound {b['recall_bound_ms']:g}): "
        f"{held(b['recall_held'])}; visibility P99 {_f(b['visibility_p99_ms'])} ms (bound "
        f"{b['visibility_bound_ms']:g}): {held(b['visibility_held'])}; at "
        f"{c['recall_rate']:g} recalls/s.",
        "",
        f"Rejections: {rej['batches_rejected_per_client']} batches REJECTED to the clients "
        f"(by reason: {rej['by_reason_client'] or 'none'}); the gateway counted observations "
        f"rejected by reason {rej['observations_rejected_by_reason_gateway'] or 'none'} and "
        f"failed by code {rej['observations_failed_by_code_gateway'] or 'none'}.",
        "",
        f"Pushed levels (StreamStatus on the writers' streams): {lev['pushes']} pushes "
        f"{lev['pushes_by_level'] or ''}; seconds of the timed phase at each level (highest "
        f"on any stream): {lev['seconds_at_level_timed']}; the shards entered levels "
        f"{lev['activations_by_level_shards'] or 'none'}.",
    ]
    if g.get("metrics_errors"):
        out += ["", f"Metrics not read: {g['metrics_errors']}."]
    return out


def _cost(c: dict[str, Any], during: dict[str, Any] | None) -> list[str]:
    out = [
        "",
        "## CPU cost per million observations",
        "",
        f"Core-seconds of {', '.join(c['processes_counted']) or 'nothing'} (not counted: "
        f"{', '.join(c['excluded'])}): {_f(c['core_seconds_per_million_acked'])} per million "
        f"acknowledged, {_f(c['core_seconds_per_million_indexed'])} per million indexed "
        f"({(c.get('indexed') or {}).get('window', 'not measured')}); raw hnswlib "
        f"{_f(c['raw_hnswlib_core_seconds_per_million'])} per million vectors added.",
    ]
    if during:
        out += [
            "",
            f"recall@10 with the backlog at its peak ({_f(during.get('backlog_before'))} rows "
            f"un-indexed, asked {during['asked_at_s']}-{during['asked_until_s']} s into the run): "
            f"{_f(during['recall_at_10'], nd=4)} over {during['queries']} queries.",
        ]
    return out
