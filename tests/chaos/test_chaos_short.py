"""The short chaos run (CI): 90 s of faults of every kind against a local cluster.

Runs ``chaos/local/run.py`` from this checkout in a child process (its own event loop, its own
cluster under ``tmp_path``) with a fixed seed, then reads its report. The run must inject every
fault kind at least once, acknowledge deletes, and find nothing lost, duplicated, reordered,
half-stored or resurrected (a row read after its delete was acknowledged); the harness's exit
status must agree. On failure the run's summary and the path of the kept
cluster logs are in the assertion message.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from engram.chaos.faults import KINDS

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "chaos" / "local" / "run.py"
SECONDS = 90
SEED = 20261125
HARNESS_TIMEOUT_S = 240  # a run that hangs fails; the bounded waits keep a failing one ~210 s
# Report figures that must all be 0.
VIOLATIONS = (
    "lost",
    "duplicated",
    "reordered",
    "partial",
    "rejected_stored",
    "phantom",
    "invalid_acked",
    "blinked",
    "resurrected",
)

pytestmark = [pytest.mark.chaos, pytest.mark.cluster, pytest.mark.timeout(300)]


def test_short_chaos_run_loses_nothing(tmp_path: Path) -> None:
    results = tmp_path / "results"
    cmd = [
        sys.executable,
        str(RUN),
        "--seconds",
        str(SECONDS),
        "--seed",
        str(SEED),
        "--results",
        str(results),
        "--data-dir",
        str(tmp_path / "cluster"),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = proc.communicate(timeout=HARNESS_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # the harness stops its cluster and undoes its faults
        try:
            stdout, stderr = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        stderr += f"\n(the harness did not finish within {HARNESS_TIMEOUT_S} s)"
    output = f"--- chaos run output (exit {proc.returncode}) ---\n{stdout}\n{stderr[-4000:]}"
    latest = results / "latest.json"
    assert latest.exists(), f"the chaos run wrote no report\n{output}"
    report = json.loads(latest.read_text())

    problems = [f"{key} = {report[key]}" for key in VIOLATIONS if report[key]]
    if not report["verified"]:
        problems.append(f"spaces that could not be read back: {report['unreadable_spaces']}")
    if report["unrecovered_faults"]:
        problems.append(f"faults the cluster did not recover from: {report['unrecovered_faults']}")
    missing = [kind for kind in KINDS if report["faults"].get(kind, 0) < 1]
    if missing:
        problems.append(f"fault kinds never injected: {missing}")
    if report["acked"] == 0:
        problems.append("nothing was acknowledged")
    if report["deleted_acked"] == 0:
        problems.append("no delete was acknowledged")
    if missed := report["deletes"]["not_found"]:
        problems.append(f"acknowledged rows a delete did not find: {missed}")
    if proc.returncode != 0:
        problems.append(f"the harness exited with {proc.returncode}")
    assert not problems, "\n".join(problems) + "\n" + output
