"""A 10-second run of ``engram bench`` against a cluster of its own: the benchmark works end to
end and writes a sane JSON report. It checks the harness, not the service's speed: no figure
is asserted beyond being present and physically plausible."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.cluster  # runs `engram bench`, which starts a cluster

TOP_LEVEL = (
    "acked_obs_per_s",
    "visibility_p99_ms",
    "recall_p99_ms",
    "recall_at_10",
    "index_rate_ratio_to_hnswlib",
    "shard_rss_gb_per_million",
    "peers",
    "machine",
    "targets",
    "slo_sustained_obs_per_s",
    "recall_at_10_during_backlog",
    "core_seconds_per_million_acked",
    "core_seconds_per_million_indexed",
    "raw_hnswlib_core_seconds_per_million",
)


def _engram() -> list[str]:
    script = Path(sys.executable).parent / "engram"
    return [str(script)] if script.exists() else [sys.executable, "-m", "engram.cli"]


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.timeout(240)
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    argv = [
        *_engram(),
        "bench",
        "--seconds", "10",
        "--rate", "5000",
        "--dim", "64",
        "--no-peers",
        "--json", str(out),
        # keep the side-by-side, the limit probes and the pools small: this is a smoke test
        "--compare-count", "5000",
        "--compare-samples", "5",
        "--limit-seconds", "1",
        "--pool", "8000",
        "--drain-timeout", "60",
        "--drain-recall-seconds", "2",
        "--recall-queries", "20",
        "--out", str(tmp_path / "results"),
    ]  # fmt: skip
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=220,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, (
        f"engram bench failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    assert "summary" in proc.stdout and "acked-durable throughput" in proc.stdout

    r = json.loads(out.read_text())
    for key in TOP_LEVEL:
        assert key in r, f"missing top-level key {key!r}"
    assert r["auth"] is False and r["tls"] is False
    assert r["machine"]["cores"] >= 1 and r["machine"]["cpu"]

    # ingest happened and was measured from acks; nothing failed
    assert _positive(r["acked_obs_per_s"])
    assert r["acked_obs_per_s"] <= 5000 * 1.5  # cannot ack more than it offered
    assert r["throughput"]["batches_failed"] == 0
    assert sum(r["series"]["acked_obs_per_s"]) >= r["throughput"]["acked_in_timed_phase"]

    # latencies are positive milliseconds; every visibility sample was found
    assert _positive(r["visibility_p99_ms"])
    assert r["latency"]["visibility_missed"] == 0
    assert _positive(r["latency"]["ack_ms"]["p50"])
    assert r["latency"]["recall_ms_during_ingest"]["count"] > 0
    stages = r["latency"]["recall_stages_ms_during_ingest"]
    assert set(stages) == {"consistency_wait", "queued", "hnsw", "fresh", "outside_recall_thread"}
    assert stages["fresh"]["count"] == r["latency"]["recall_ms_during_ingest"]["count"]
    assert _positive(stages["outside_recall_thread"]["p50"])
    # where the CPU went: the shards' named threads, by name
    shard_threads = r["processes"]["shard-0"]["threads_cpu_pct_timed"]
    assert "index-builder" in shard_threads, shard_threads
    assert all(0 < pct < 100 * r["machine"]["cores"] + 1 for pct in shard_threads.values())

    # quality and indexing: whatever the speed, the backlog drained and recall is exact-ish
    assert r["backlog"]["drained"] is True
    assert 0.0 <= r["recall_at_10"] <= 1.0
    assert r["recall_quality"]["queries"] > 0
    assert _positive(r["index_rate_ratio_to_hnswlib"])
    assert _positive(r["shard_rss_gb_per_million"])

    # recall@10 was also asked with the backlog at its peak, before the drain, on the same
    # queries; a fixed-rate run has no SLO search
    assert r["slo_sustained_obs_per_s"] is None and r["find_max"] is None
    assert 0.0 <= r["recall_at_10_during_backlog"] <= 1.0
    during = r["recall_quality_during_backlog"]
    assert during["queries"] == r["recall_quality"]["queries"]
    assert during["asked_at_s"] >= r["throughput"]["timed_seconds"] - 1
    assert during["backlog_before"] is not None
    _check_cost(r)
    # what the service gave up at this offered rate: every part present and consistent
    g = r["gave_up"]
    assert g["offered_obs_per_s"] == 5000 and g["acked_obs_per_s"] == r["acked_obs_per_s"]
    assert g["rejections"]["batches_rejected_per_client"] >= 0
    assert g["metrics_errors"] == {}, g["metrics_errors"]  # the metrics of every process read
    assert g["levels"]["pushes"] >= 0
    assert len(g["levels"]["max_level_per_second"]) == len(r["series"]["t"])
    assert set(g["bounds"]) >= {"recall_held", "visibility_held", "acked_within_tolerance"}
    assert g["bounds"]["visibility_p99_ms"] == r["visibility_p99_ms"]

    # limits were measured in the same run
    for limit in ("hnswlib", "wal", "grpc"):
        assert _positive(r["limits"][limit]["obs_per_s"]), limit

    # every target has a verdict field and a measured figure (or an explicit null)
    keys = {t["key"] for t in r["targets"]}
    assert {k for k in TOP_LEVEL[:6]} <= keys
    for t in r["targets"]:
        assert t["met"] in (True, False, None)
    memory = next(t for t in r["targets"] if t["key"] == "shard_rss_gb_per_million")
    assert memory["met"] in (True, False)  # drained: a verdict (none when rows are un-indexed)
    # peers were skipped on purpose; ours is still measured the peer way
    assert "engram-stream" in r["peers"]["results"]
    assert "skipped" not in r["peers"]["results"]["engram-stream"]

    # the results directory holds the JSON and the summary
    runs = list((tmp_path / "results").iterdir())
    assert len(runs) == 1
    assert (runs[0] / "results.json").exists() and (runs[0] / "summary.md").exists()
    assert "recall during ingest, fresh tier" in (runs[0] / "summary.md").read_text()
    assert "CPU by thread" in (runs[0] / "summary.md").read_text()
    assert "What the service gave up" in (runs[0] / "summary.md").read_text()
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the bench extra is not installed: the report says so
        assert any("plots skipped" in n for n in r["notes"])
    else:
        for name in ("throughput.png", "latency.png", "backlog.png", "cpu.png", "peers.png"):
            assert (runs[0] / name).stat().st_size > 1000, name


def _tiny_run(tmp_path: Path, timeout: float, *options: str) -> tuple[str, dict[str, Any]]:
    """``engram bench`` with everything a few seconds long (1 shard, dim 16, 2 spaces) and
    ``options``; its stdout and the JSON it wrote."""
    out = tmp_path / "bench.json"
    argv = [
        *_engram(), "bench", *options, "--dim", "16", "--batch", "200",
        "--spaces", "2", "--writers", "1", "--shards", "1", "--no-peers", "--no-plots",
        "--compare-count", "1000", "--compare-samples", "2", "--limit-seconds", "0.3",
        "--pool", "2000", "--drain-timeout", "30", "--drain-recall-seconds", "0.5",
        "--recall-queries", "5", "--recall-spaces", "1",
        "--json", str(out), "--out", str(tmp_path / "results"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, (
        f"engram bench failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    return proc.stdout, json.loads(out.read_text())


def _check_cost(r: dict[str, Any]) -> None:
    """Core-seconds per million: positive, of the gateway and shards only, and not beyond what
    the cores could have given in the measured interval."""
    c, cores = r["cost"], r["machine"]["cores"]
    gateways = ["gateway", *(f"gateway-{i}" for i in range(1, r["config"]["gateways"]))]
    service = [*gateways, "shard-0", "shard-1"][: len(c["processes_counted"])]
    assert c["processes_counted"] == service, "every gateway process, then the shards"
    assert set(gateways) <= set(c["processes_counted"]) and "redis" in c["excluded"]
    for key in ("core_seconds_per_million_acked", "core_seconds_per_million_indexed"):
        assert _positive(r[key]) and r[key] == c[key], key
    acked = c["acked"]
    assert 0 < acked["core_seconds"] <= acked["seconds"] * cores + 1
    assert r["core_seconds_per_million_acked"] == pytest.approx(
        acked["core_seconds"] / acked["observations"] * 1e6, rel=0.01
    )
    assert 0 < c["indexed"]["rows"] and c["indexed"]["core_seconds"] > 0
    assert _positive(r["raw_hnswlib_core_seconds_per_million"])
    assert _positive(r["limits"]["hnswlib"]["core_seconds"])


@pytest.mark.timeout(150)
def test_bench_find_max_searches_the_slo(tmp_path: Path) -> None:
    """--find-max with steps of a few seconds: the steps go up by the factor until one fails
    the SLO (an unreachable 0.001 ms recall bound fails every step with a recall), each step
    is judged on acked share, recall and visibility P99, and the report names the criteria."""
    stdout, r = _tiny_run(
        tmp_path, 140,
        "--find-max", "--start-rate", "1000", "--step-factor", "2", "--step-seconds", "3",
        "--max-steps", "3", "--slo-recall-p99-ms", "0.001", "--recall-rate", "20",
    )  # fmt: skip
    assert "step 1: offered 1,000/s" in stdout  # progress printed per step
    fm = r["find_max"]
    assert "recall P99 <= 0.001 ms" in fm["criteria"] and fm["recall_rate"] == 20
    steps = fm["steps"]
    # the first step fails on recall alone, then the search bisects below it: 1000, 500, 250
    assert [s["offered"] for s in steps] == [1000, 500, 250]
    for s in steps:
        assert s["recalls"] > 0 and s["held"]["recall"] is False and s["keeps_up"] is False
        assert s["acked"] > 0 and s["seconds_judged"] > 0
    assert r["slo_sustained_obs_per_s"] is None and fm["slo_sustained_obs_per_s"] is None
    slo = next(t for t in r["targets"] if t["key"] == "slo_sustained_obs_per_s")
    assert slo["met"] is None and slo["measured"] is None
    assert "holds the SLO" in (next((tmp_path / "results").iterdir()) / "summary.md").read_text()


@pytest.mark.timeout(120)
def test_bench_smoke_with_auth_and_tls(tmp_path: Path) -> None:
    """The benchmark's own cluster asks for a key and serves TLS; every client of the run (the
    load, the recalls, the side-by-side, recall@10) gets through, and the key stays out of the
    report. A few seconds of everything."""
    stdout, r = _tiny_run(
        tmp_path, 110, "--auth", "--tls", "--seconds", "3", "--rate", "2000"
    )  # fmt: skip
    assert "auth and tls on" in stdout
    text = (tmp_path / "bench.json").read_text()
    assert r["auth"] is True and r["tls"] is True
    # every client got through the key check over TLS: writes acked, recalls and samples answered
    assert _positive(r["acked_obs_per_s"]) and r["throughput"]["batches_failed"] == 0
    assert r["latency"]["recall_ms_during_ingest"]["count"] > 0
    assert r["latency"]["visibility_missed"] == 0
    assert r["peers"]["results"]["engram-stream"]["searchable"] is True
    assert r["recall_quality"]["queries"] > 0
    assert r["gave_up"]["metrics_errors"] == {}  # the gateway's /metrics read over TLS too
    assert "ek_" not in text and r["config"]["api_key"] == ""  # the key is never written
