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
    try:
        import matplotlib  # noqa: F401
    except ImportError:  # the bench extra is not installed: the report says so
        assert any("plots skipped" in n for n in r["notes"])
    else:
        for name in ("throughput.png", "latency.png", "backlog.png", "cpu.png", "peers.png"):
            assert (runs[0] / name).stat().st_size > 1000, name


@pytest.mark.timeout(120)
def test_bench_smoke_with_auth_and_tls(tmp_path: Path) -> None:
    """The benchmark's own cluster asks for a key and serves TLS; every client of the run (the
    load, the recalls, the side-by-side, recall@10) gets through, and the key stays out of the
    report. A few seconds of everything."""
    out = tmp_path / "bench.json"
    argv = [
        *_engram(), "bench", "--auth", "--tls",
        "--seconds", "3", "--rate", "2000", "--dim", "16", "--batch", "200",
        "--spaces", "2", "--writers", "1", "--shards", "1", "--no-peers", "--no-plots",
        "--compare-count", "1000", "--compare-samples", "2", "--limit-seconds", "0.3",
        "--pool", "2000", "--drain-timeout", "30", "--drain-recall-seconds", "0.5",
        "--recall-queries", "5", "--recall-spaces", "1",
        "--json", str(out), "--out", str(tmp_path / "results"),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=110, env=env)
    assert proc.returncode == 0, (
        f"engram bench failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    )
    assert "auth and tls on" in proc.stdout
    text = out.read_text()
    r = json.loads(text)
    assert r["auth"] is True and r["tls"] is True
    # every client got through the key check over TLS: writes acked, recalls and samples answered
    assert _positive(r["acked_obs_per_s"]) and r["throughput"]["batches_failed"] == 0
    assert r["latency"]["recall_ms_during_ingest"]["count"] > 0
    assert r["latency"]["visibility_missed"] == 0
    assert r["peers"]["results"]["engram-stream"]["searchable"] is True
    assert r["recall_quality"]["queries"] > 0
    assert "ek_" not in text and r["config"]["api_key"] == ""  # the key is never written
