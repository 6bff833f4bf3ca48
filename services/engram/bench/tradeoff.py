"""What the service gave up to hold its bounds: the ``gave_up`` section of the report.

At a fixed offered rate (``--rate``; over the whole search with ``--find-max``):

* offered and acknowledged observations/s, and the share acknowledged;
* rejections by reason: the REJECTED acks the writers' streams received (the client resends
  each after its retry-after; the reason is the shard's word in the message, e.g. ``memory``),
  and the gateway's ``engram_streaming_observations_rejected_total`` by reason and
  ``engram_streaming_batch_failures_total`` by code over the load (scraped before and after);
* the pushed backpressure levels over time: the StreamStatus pushes the writers saw (per
  second, the highest level on any stream, the lowest SLOW_DOWN rate), and the shards'
  ``engram_streaming_backpressure_activations_total`` by level over the load;
* whether the recall and visibility bounds held over the timed phase.

:func:`scrape` reads the Prometheus text of every process with an HTTP port (from the
cluster's ``cluster.json``); a process that does not answer is recorded with the error.
"""

from __future__ import annotations

import math
import re
import ssl
import urllib.request
from collections import Counter
from http.client import HTTPException
from pathlib import Path
from typing import Any

from engram.bench import stats

SCRAPED = (
    "engram_streaming_observations_rejected_total",
    "engram_streaming_batch_failures_total",
    "engram_streaming_backpressure_activations_total",
)
LEVELS = ("NORMAL", "WARNING", "CRITICAL", "OVERLOADED")


def scrape(http: dict[str, str], ca_file: str = "") -> dict[str, Any]:
    """``{process: {sample name: {label string: value}}}`` of :data:`SCRAPED` for each
    ``process -> host:port``; ``{"error": ...}`` for a process that does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, Any] = {}
    for name, address in sorted(http.items()):
        ctx = ssl.create_default_context(cafile=ca_file) if ca_file else None
        try:
            text = _get(f"http://{address}/metrics", None)
        except (OSError, HTTPException) as exc:
            if ctx is None:
                out[name] = {"error": repr(exc)}
                continue
            try:  # the gateway serves its HTTP port with TLS when the cluster does
                text = _get(f"https://{address}/metrics", ctx)
            except (OSError, HTTPException) as exc2:
                out[name] = {"error": repr(exc2)}
                continue
        values: dict[str, dict[str, float]] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name in SCRAPED:
                    key = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                    values.setdefault(s.name, {})[key] = s.value
        out[name] = values
    return out


def _get(url: str, ctx: ssl.SSLContext | None) -> str:
    with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:  # noqa: S310 (loopback)
        return str(resp.read().decode())


def http_addresses(data_dir: Path | None) -> dict[str, str]:
    """process name -> host:port of its HTTP port, from the cluster's ``cluster.json``."""
    import json

    if data_dir is None:
        return {}
    try:
        info = json.loads((data_dir / "cluster.json").read_text())
    except (OSError, ValueError):
        return {}
    return {p["name"]: p["http"] for p in info.get("processes", []) if p.get("http")}


def _delta(
    before: dict[str, Any], after: dict[str, Any], metric: str, label: str
) -> dict[str, float]:
    """Increase of counter ``metric`` over the load, summed over processes, by ``label``."""
    out: Counter[str] = Counter()
    for proc, values in after.items():
        if "error" in values:
            continue
        old = before.get(proc, {}).get(metric, {})
        for key, v in values.get(metric, {}).items():
            labels = dict(kv.split("=", 1) for kv in key.split(",") if "=" in kv)
            d = v - old.get(key, 0.0)
            if d > 0:
                out[labels.get(label, "?")] += d
    return {k: round(v, 1) for k, v in sorted(out.items())}


def _reason(detail: str) -> str:
    """The reason in a REJECTED ack's message as the client reports it ("batch 7: NORMAL
    priority batch refused: memory: ...; retry in 50 ms"), numbers left out."""
    m = re.search(r"refused: ([^:;]+)", detail)
    if m:
        return m.group(1).strip()
    text = detail.split(": ", 1)[1] if detail.startswith("batch ") else detail
    return re.sub(r"\d[\d.,]*", "N", text.split("; retry in")[0])[:80]


def levels(pushes: list[tuple[Any, ...]], t0: float, n_sec: int, timed_s: int) -> dict[str, Any]:
    """The StreamStatus pushes the writers saw: per second of the run the highest level on any
    stream (a stream stays at its last pushed level until the next push) and the lowest
    SLOW_DOWN rate pushed in that second (None: none); the seconds at each level count the
    first ``timed_s`` seconds (the timed phase) only."""
    status = sorted((p for p in pushes if p[2] == "status"), key=lambda p: p[0])
    current: dict[int, int] = {}
    level_s: list[int] = []
    rate_s: list[int | None] = []
    j = 0
    for i in range(n_sec):
        hi = t0 + i + 1
        rates = []
        top = max(current.values(), default=0)
        while j < len(status) and status[j][0] < hi:
            p = status[j]
            current[p[1]] = p[3]
            top = max(top, p[3])
            if p[5]:
                rates.append(p[5])
            j += 1
        level_s.append(top)
        rate_s.append(min(rates) if rates else None)
    counts = Counter(LEVELS[p[3]] if 0 <= p[3] < len(LEVELS) else str(p[3]) for p in status)
    return {
        "pushes": len(status),
        "pushes_by_level": dict(counts),
        "seconds_at_level_timed": {
            LEVELS[k]: level_s[:timed_s].count(k) for k in range(len(LEVELS))
        },
        "max_level_per_second": level_s,
        "slow_down_rate_per_second": rate_s,
    }


def build(
    cfg: Any,
    tel: Any,
    t0: float,
    t_stop: float,
    n_sec: int,
    lat: dict[str, Any],
    tp: dict[str, Any],
    metrics_before: dict[str, Any],
    metrics_after: dict[str, Any],
) -> dict[str, Any]:
    """The ``gave_up`` section (see the module docstring); ``lat`` and ``tp`` are the report's
    latency and throughput sections."""
    span = max(t_stop - t0, 1e-9)
    rejected = [p for p in tel.pushes if p[2] == "rejected" and p[0] >= t0]
    offered = tp.get("offered_obs_per_s")
    acked = tp["sustained_obs_per_s"]
    recall_p99 = lat["recall_ms_during_ingest"]["p99"]
    vis_p99 = lat["visibility_ms"]["p99"]
    held_recall = recall_p99 is not None and recall_p99 <= cfg.slo_recall_p99_ms
    held_recall = held_recall and lat["recall_failed"] == 0
    held_vis = vis_p99 is not None and vis_p99 <= cfg.slo_visibility_p99_ms
    held_vis = held_vis and lat["visibility_missed"] == 0
    return {
        "offered_obs_per_s": offered,
        "acked_obs_per_s": acked,
        "acked_share": stats.ratio(acked, offered) if offered else None,
        "not_acked_obs_per_s": round(offered - acked, 1) if offered else None,
        "rejections": {
            "batches_rejected_per_client": len(rejected),
            "rejected_per_s": round(len(rejected) / span, 2),
            "by_reason_client": dict(Counter(_reason(p[7]) for p in rejected).most_common()),
            "observations_rejected_by_reason_gateway": _delta(
                metrics_before, metrics_after, SCRAPED[0], "reason"
            ),
            "observations_failed_by_code_gateway": _delta(
                metrics_before, metrics_after, SCRAPED[1], "code"
            ),
        },
        "levels": {
            **levels(tel.pushes, t0, n_sec, math.floor(span)),
            "activations_by_level_shards": _delta(
                metrics_before, metrics_after, SCRAPED[2], "level"
            ),
        },
        "bounds": {
            "recall_p99_ms_during_ingest": recall_p99,
            "recall_bound_ms": cfg.slo_recall_p99_ms,
            "recall_held": held_recall,
            "visibility_p99_ms": vis_p99,
            "visibility_bound_ms": cfg.slo_visibility_p99_ms,
            "visibility_held": held_vis,
            "acked_within_tolerance": None
            if not offered
            else bool(acked >= (1 - cfg.slo_acked_tolerance) * offered),
        },
        "metrics_errors": {
            k: v["error"] for k, v in metrics_after.items() if isinstance(v, dict) and "error" in v
        },
    }
