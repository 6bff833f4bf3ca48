"""A real Prometheus scraping a local cluster: it scrapes every gateway and shard, runs every
dashboard query and alert expression without an error, and sees a shard killed with
``kill -9`` go pending, then firing, in its own ``/api/v1/alerts``, and resolve once the
shard is back. The rules are a test copy whose ``for:`` is 2 s (the shipped file keeps its
real durations); scrapes and rule evaluations run every second.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import ModuleType
from typing import Any

import yaml
from engram_dashboards import build
from engram_dashboards.prometheus import Prometheus, cluster_targets, rules_with_for

ENV = {"ENGRAM_CANARY_INTERVAL_S": "0.2"}


def _alert(prom: Prometheus, name: str, instance: str) -> dict[str, Any] | None:
    for alert in prom.alerts():
        if alert["labels"]["alertname"] == name and alert["labels"].get("instance") == instance:
            return alert
    return None


def _queries() -> list[str]:
    exprs = [
        target["expr"]
        for name in build.DASHBOARDS
        for panel in json.loads((build.DASHBOARDS_DIR / name).read_text())["panels"]
        for target in panel.get("targets", [])
    ]
    groups = yaml.safe_load(build.ALERTS.read_text())["groups"]
    return exprs + [rule["expr"] for group in groups for rule in group["rules"]]


def test_prometheus_scrapes_the_cluster_and_alerts_on_a_dead_shard(
    make_cluster: Any, tmp_path: Path, dash: ModuleType
) -> None:
    dash.require("prometheus")
    cluster = make_cluster(shards=2, env=ENV, supervise=False)
    targets = cluster_targets(cluster.endpoints())
    rules = rules_with_for(build.ALERTS, tmp_path / "alerts-test.yaml", "2s")
    with Prometheus(tmp_path / "prometheus", targets, rule_files=[rules]) as prom:
        expected = {(job, a) for job, addresses in targets.items() for a in addresses}
        assert len(expected) == 3

        def all_up() -> bool:
            seen = {
                (t["labels"]["job"], t["labels"]["instance"])
                for t in prom.active_targets()
                if t["health"] == "up"
            }
            return seen == expected

        dash.wait_for(all_up, 30, "every gateway and shard scraped")
        for expr in _queries():  # Prometheus parses and runs each (raises on an error)
            prom.query(expr.replace("$__rate_interval", "5s").replace("$instance", ".*"))

        victim = targets["engram-shard"][0]
        os.kill(cluster.pid("shard-0"), signal.SIGKILL)
        states = []

        def state(want: str) -> bool:
            alert = _alert(prom, "EngramShardDown", victim)
            current = alert["state"] if alert else "inactive"
            if not states or states[-1] != current:
                states.append(current)
            return current == want

        dash.wait_for(lambda: state("firing"), 30, "EngramShardDown firing")
        assert "pending" in states and states.index("pending") < states.index("firing"), states
        assert _alert(prom, "EngramShardDown", targets["engram-shard"][1]) is None

        cluster.start_process("shard-0")
        dash.wait_for(
            lambda: _alert(prom, "EngramShardDown", victim) is None, 30, "the alert resolved"
        )
        assert all_up()
