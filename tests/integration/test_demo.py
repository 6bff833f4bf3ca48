"""The ``engram`` command line against a live cluster: ``engram demo`` and ``engram status``.

Both run as subprocesses, the way a user runs them (``python -m engram.cli ...`` is what the
``engram`` script calls). The demo streams 20,000 observations into three spaces and verifies
them; status then reports the cluster's processes and what each shard holds.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from engram.launcher.cluster import LocalCluster

pytestmark = pytest.mark.cluster  # runs the engram command line

DEMO_COUNT = 20_000
DEMO_SPACES = 3
DEMO_DIM = 64


def engram(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engram.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        check=False,
    )


@pytest.fixture(scope="module")
def demo_run(
    shared_cluster: LocalCluster, tmp_path_factory: pytest.TempPathFactory
) -> subprocess.CompletedProcess[str]:
    """``engram demo ... --verify``, run once for the module."""
    return engram(
        "demo",
        "--target",
        shared_cluster.gateway_address,
        "--spaces",
        str(DEMO_SPACES),
        "--count",
        str(DEMO_COUNT),
        "--dim",
        str(DEMO_DIM),
        "--verify",
        cwd=tmp_path_factory.mktemp("demo-cwd"),
    )


def test_demo_streams_and_verifies(demo_run: subprocess.CompletedProcess[str]) -> None:
    out = demo_run.stdout
    assert demo_run.returncode == 0, f"stdout:\n{out}\nstderr:\n{demo_run.stderr}"
    assert f"acked {DEMO_COUNT:,} observations" in out
    assert "failed batches: 0; failed streams: 0" in out
    assert "verify OK: lost 0, duplicated 0" in out
    # 20,000 over 3 spaces: 6,667 + 6,667 + 6,666, each read back in LSN order.
    for i, n in enumerate([6_667, 6_667, 6_666]):
        assert f"demo-{i}: acked {n:,}, stored {n:,} of this run, lost 0, duplicated 0" in out
    assert out.count("LSNs increasing: True") == DEMO_SPACES
    # The recall probe of each space finds the probed observation itself first, score 1.
    probes = re.findall(
        r"^recall in (demo-\d+) for observation (\d+): run\d+:(\d+) \((\S+)\)", out, re.M
    )
    assert [(space, probe) for space, probe, _, _ in probes] == [
        ("demo-0", "0"),
        ("demo-1", "6667"),
        ("demo-2", "13334"),
    ]
    for _, probe, top, score in probes:
        assert (top, score) == (probe, "1.000")


def test_status_json_lists_processes_and_space_counts(
    shared_cluster: LocalCluster,
    demo_run: subprocess.CompletedProcess[str],
    tmp_path: Path,
) -> None:
    assert demo_run.returncode == 0
    result = engram("status", "--json", "--data-dir", str(shared_cluster.data_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    status: dict[str, Any] = json.loads(result.stdout)
    assert status["running"] is True and status["healthy"] is True
    assert status["gateway"] == shared_cluster.gateway_address
    assert status["shard_count"] == 2
    # The cluster's launcher is this test process.
    assert status["launcher"] == {"pid": os.getpid(), "alive": True}

    procs = {p["name"]: p for p in status["processes"]}
    assert set(procs) == {"redis", "shard-0", "shard-1", "gateway"}
    for name, p in procs.items():
        assert p["role"] == name.split("-")[0]
        assert p["pid"] == shared_cluster.pid(name)
        assert p["alive"] is True and p["up"] is True
        assert p["restarts"] == 0

    counts: dict[str, int] = {}
    for shard_id in (0, 1):
        shard = procs[f"shard-{shard_id}"]
        assert shard["shard_id"] == shard_id
        for space in shard["spaces"]:
            if space["memory_space_id"].startswith("demo-"):
                assert space["dim"] == DEMO_DIM
                assert 0 <= space["indexed"] <= space["count"]
                counts[space["memory_space_id"]] = space["count"]
    assert counts == {"demo-0": 6_667, "demo-1": 6_667, "demo-2": 6_666}


def test_status_text_report(
    shared_cluster: LocalCluster, demo_run: subprocess.CompletedProcess[str], tmp_path: Path
) -> None:
    result = engram("status", "--data-dir", str(shared_cluster.data_dir), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.startswith("cluster   healthy")
    for name in ("redis", "shard-0", "shard-1", "gateway"):
        assert str(shared_cluster.pid(name)) in out
    assert "demo-0" in out and "6667" in out


def test_status_without_a_cluster(tmp_path: Path) -> None:
    result = engram("status", "--json", "--data-dir", str(tmp_path), cwd=tmp_path)
    assert result.returncode == 1
    status = json.loads(result.stdout)
    assert status["running"] is False
    assert "no cluster is running" in status["error"]
