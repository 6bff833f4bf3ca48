"""checkov finds nothing left unexplained in what the chart renders.

checkov scans the rendered manifests offline (no helm binary: helm_python renders them). A
check the chart cannot meet is skipped in the chart itself, with its reason, by a
``checkov.io/skip<n>: CHECK=reason`` annotation; this test fails on any failed check and on a
skip without a reason. checkov lives in a venv of its own (``make chart-deps``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKOV = REPO / ".venv-checkov" / "bin" / "checkov"
# Everything the chart can render, in two installs: all features on (TLS on both sides), and
# the other branches (authentication and the internal secret off).
RENDERS = {
    "everything": {
        "ingress": {"grpc": {"enabled": True}, "websocket": {"enabled": True}},
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}},
        "gatewayApi": {"enabled": True, "parentRefs": [{"name": "public"}]},
        "tls": {"enabled": True, "secretName": "engram-gateway-tls"},
        "internalTls": {"enabled": True, "secretName": "engram-internal-tls"},
        "backup": {
            "enabled": True,
            "destination": "s3",
            "s3": {
                "bucket": "engram-backups",
                "existingSecret": "engram-s3",
                "region": "eu-west-1",
            },
        },
    },
    "external": {
        "redis": {"enabled": False, "external": {"url": "redis://r.example:6379/0"}},
        "gateways": {"autoscaling": {"enabled": False}},
        "auth": {"enabled": False},
        "internalAuth": {"enabled": False},
        "backup": {"enabled": True},
    },
}


def _scan(directory: Path) -> dict[str, Any]:
    if not CHECKOV.exists():
        pytest.skip(f"{CHECKOV} missing: run `make chart-deps`")
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE"}
    proc = subprocess.run(
        [str(CHECKOV), "-d", str(directory), "--framework", "kubernetes", "--skip-download"]
        + ["--compact", "-o", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.stdout.strip(), f"checkov printed nothing: {proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    return report[0] if isinstance(report, list) else report


@pytest.mark.cluster  # starts checkov
def test_checkov_passes(chart, tmp_path: Path) -> None:
    for name, values in RENDERS.items():
        for path, text in chart.render_files(values).items():
            if path.endswith(".yaml") and text.strip():
                target = tmp_path / name / path.replace("/", "_")
                target.parent.mkdir(exist_ok=True)
                target.write_text(text)
    report = _scan(tmp_path)
    results = report["results"]
    failed = [
        f"{c['check_id']} {c['resource']} ({c['check_name']})" for c in results["failed_checks"]
    ]
    assert not failed, "checkov failed checks:\n" + "\n".join(failed)
    assert report["summary"]["parsing_errors"] == 0, report["summary"]
    assert results["passed_checks"], "checkov passed nothing: did it scan the manifests?"
    unexplained = [
        f"{c['check_id']} {c['resource']}"
        for c in results["skipped_checks"]
        if len(c["check_result"].get("suppress_comment", "").split()) < 4
    ]
    assert not unexplained, f"skips without a reason: {unexplained}"
