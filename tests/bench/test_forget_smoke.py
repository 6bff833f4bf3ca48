"""A few-second run of ``python -m engram.bench.forget`` on a cluster of its own: the forgetting
benchmark works end to end and its JSON says what the deletes did. Figures of speed are only
checked to be present; what the deletes must have done (counts, nothing deleted recalled, the
restored space's rows) is checked exactly."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.cluster  # the benchmark starts its own clusters

ROWS = 3000
DELETE_SHARE = 0.1
RANGE_SHARE = 0.05


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.timeout(300)
def test_forget_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "forget.json"
    argv = [
        sys.executable, "-m", "engram.bench.forget",
        "--rows", str(ROWS),
        "--dim", "16",
        "--delete-share", str(DELETE_SHARE),
        "--range-share", str(RANGE_SHARE),
        "--delete-batch", "100",
        "--recall-seconds", "1",
        "--check-samples", "20",
        "--compact-timeout", "6",
        "--data-root", str(tmp_path),
        "--out", str(tmp_path / "results"),
        "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=280)
    output = f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert out.exists(), output
    r = json.loads(out.read_text())

    by_id, in_range = int(ROWS * DELETE_SHARE), int(ROWS * RANGE_SHARE)
    assert r["delete_by_id"]["deleted"] == by_id, output
    assert r["delete_by_range"]["deleted"] == in_range, output
    assert r["expected_live"] == ROWS - by_id - in_range
    assert r["live_rows_match"], r["memory_after_deletes"]
    assert r["deleted_returned_by_recall"] == 0
    assert _positive(r["delete_by_id"]["ids_per_s"])
    for phase in ("recall_without_deletes_ms", "recall_during_deletes_ms"):
        assert r[phase]["count"] > 0 and _positive(r[phase]["p99"]), phase
    for phase in ("memory_before", "memory_after_deletes", "memory_after_compaction"):
        assert _positive(r[phase]["rss_mb"]), phase
    assert r["memory_before"]["live_rows"] == ROWS
    assert r["backup"]["restored_rows"] == r["expected_live"]
    assert _positive(r["backup"]["backup_mb_s"]) and _positive(r["backup"]["restore_mb_s"])
    assert _positive(r["backup"]["cp"]["mb_s"])
    assert "# Forgetting" in proc.stdout
    assert proc.returncode == 0, output
