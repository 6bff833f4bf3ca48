"""The generated files and the rules' shape, without starting anything.

* every ``dashboards/*.json`` and the chart's ``files/alerts.yaml`` is what the code produces
  now (``make dashboards`` rewrites them);
* each dashboard has the datasource and instance variables, and every panel a title, a unit,
  a legend and queries on the ``$datasource`` variable;
* every alert the operations guide promises exists, with a severity, a summary, a
  description and a runbook link to a section of ``docs/operations.md`` that exists.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml
from engram_dashboards import build

OPERATIONS = build.REPO / "docs" / "operations.md"
REQUIRED_ALERTS = {
    "EngramShardDown",
    "EngramAckLatencyHigh",
    "EngramVisibilityAboveBound",
    "EngramWalFailures",
    "EngramWalFsyncSlow",
    "EngramIndexFallingBehind",
    "EngramMemoryBudgetNearFull",
    "EngramRejectionsSustained",
    "EngramRedisUnreachable",
    "EngramMoveStuck",
    "EngramCanaryFailing",
}


def _rules() -> list[dict[str, object]]:
    groups = yaml.safe_load(build.ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _anchors(markdown: Path) -> set[str]:
    """GitHub's anchors of the headings of ``markdown``."""
    anchors = set()
    for line in markdown.read_text().splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return anchors


def test_generated_files_are_fresh() -> None:
    stale = [str(p.relative_to(build.REPO)) for p in build.stale()]
    assert not stale, f"stale generated files (run `make dashboards`): {stale}"


def test_the_chart_embeds_the_rule_file_as_is() -> None:
    copy = yaml.safe_load(build.CHART_ALERTS.read_text())
    assert copy == yaml.safe_load(build.ALERTS.read_text())


def test_dashboards_have_variables_units_and_legends() -> None:
    for name in build.DASHBOARDS:
        board = json.loads((build.DASHBOARDS_DIR / name).read_text())
        variables = {v["name"]: v for v in board["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert variables["instance"]["type"] == "query"
        assert variables["instance"]["includeAll"] and variables["instance"]["multi"]
        panels = [p for p in board["panels"] if p["type"] != "row"]
        assert len(panels) >= 6, name
        assert len({p["id"] for p in board["panels"]}) == len(board["panels"]), name
        for panel in panels:
            where = f"{name}: {panel['title']}"
            assert panel["fieldConfig"]["defaults"]["unit"], where
            assert panel["options"]["legend"]["showLegend"], where
            assert panel["datasource"]["uid"] == "${datasource}", where
            assert panel["targets"], where
            for target in panel["targets"]:
                assert target["expr"] and target["legendFormat"], where


def test_every_promised_alert_exists_with_its_runbook() -> None:
    rules = _rules()
    names = {r["alert"] for r in rules}
    assert REQUIRED_ALERTS <= names, REQUIRED_ALERTS - names
    anchors = _anchors(OPERATIONS)
    for rule in rules:
        labels, annotations = rule["labels"], rule["annotations"]
        assert labels["severity"] in ("warning", "critical"), rule["alert"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        path, _, anchor = annotations["runbook_url"].partition("#")
        assert path == "docs/operations.md", rule["alert"]
        assert anchor == rule["alert"].lower() and anchor in anchors, rule["alert"]
