"""``promtool check rules`` on the rule file and its chart copy, and ``promtool test rules``
on ``dashboards/tests/*.yaml`` (every alert both firing and not firing)."""

from __future__ import annotations

import subprocess
from types import ModuleType

import pytest
import yaml
from engram_dashboards import build

pytestmark = pytest.mark.cluster  # runs promtool


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def test_rule_files_are_valid(dash: ModuleType) -> None:
    dash.require("promtool")
    run = _promtool("check", "rules", str(build.ALERTS), str(build.CHART_ALERTS))
    assert run.returncode == 0, run.stdout + run.stderr


def test_rule_unit_tests_pass_and_cover_every_alert(dash: ModuleType) -> None:
    dash.require("promtool")
    files = sorted((build.DASHBOARDS_DIR / "tests").glob("*.yaml"))
    run = _promtool("test", "rules", *map(str, files))
    assert run.returncode == 0, run.stdout + run.stderr
    groups = yaml.safe_load(build.ALERTS.read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"]}
    firing, quiet = set(), set()
    for path in files:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert alerts <= firing, f"alerts never tested firing: {alerts - firing}"
    assert alerts <= quiet, f"alerts never tested quiet: {alerts - quiet}"
