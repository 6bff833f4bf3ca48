"""Every panel query and alert expression reads metrics a live cluster exports, and the
metrics added for them move with what they describe.

* each metric name (histograms through their ``_bucket``/``_sum``/``_count``, counters through
  ``_total``) is on the ``/metrics`` page of every process of the job its selector names;
* a move: ``engram_shard_moves_total{result="committed"}`` and the pause histogram rise on the
  target, no move stays in progress, the space's per-space gauges leave the source and its
  checkpoint age shows on the target; the WAL's fsync histogram counts the writes;
* ``engram_control_store_up`` goes to 0 on every process while Redis is down, back to 1 after.
"""

from __future__ import annotations

import json
from types import ModuleType

import numpy as np
import yaml
from engram_dashboards import build, promql

from engram.control.assignment import default_shard
from engram.control.moves import move_space
from engram.launcher.cluster import LocalCluster
from engram_client import EngramClient

CLUSTER_ENV = {"ENGRAM_CANARY_INTERVAL_S": "0.2"}


def _expressions() -> dict[str, str]:
    """where -> PromQL, for every panel query and alert expression."""
    found = {}
    for name in build.DASHBOARDS:
        board = json.loads((build.DASHBOARDS_DIR / name).read_text())
        for panel in board["panels"]:
            for target in panel.get("targets", []):
                found[f"{name}: {panel['title']} {target['refId']}"] = target["expr"]
    for group in yaml.safe_load(build.ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            found[f"alert {rule['alert']}"] = rule["expr"]
    return found


def test_every_query_reads_exported_metrics(shared_cluster: LocalCluster, dash: ModuleType) -> None:
    scrapes = dash.cluster_scrapes(shared_cluster)
    assert len(scrapes["engram-shard"]) == 2 and len(scrapes["engram-gateway"]) == 1
    missing = []
    checked = set()
    for where, expr in _expressions().items():
        for sel in promql.selectors(expr):
            if sel.metric in promql.SYNTHETIC:
                continue
            for job in sel.jobs or tuple(scrapes):
                if any(sel.metric not in names for names in scrapes[job]):
                    missing.append(f"{where}: {sel.metric} (job {job})")
            checked.add(sel.metric)
    assert not missing, "\n".join(missing)
    assert len(checked) >= 25  # the tokenizer found the queries' metrics


async def test_a_move_moves_the_move_metrics(
    shared_cluster: LocalCluster, dash: ModuleType, space_id: str
) -> None:
    source = default_shard(space_id, 2)
    target = 1 - source
    http = {i: f"127.0.0.1:{shared_cluster.shard_http_port(i)}" for i in range(2)}
    before = dash.scrape(http[target])
    committed = dash.value(before, "engram_shard_moves_total", result="committed")
    pauses = dash.value(before, "engram_shard_move_pause_seconds_count") or 0.0
    fsyncs = dash.value(dash.scrape(http[source]), "engram_shard_wal_fsync_seconds_count")
    async with EngramClient(shared_cluster.gateway_address) as client:
        stream = await client.open_stream(space_id)
        rng = np.random.default_rng(7)
        for n in range(5):
            ack = await stream.send(
                rng.standard_normal((20, 16)), ids=[f"{n}-{i}" for i in range(20)]
            )
            await ack
        await stream.close()
    page = dash.wait_for(  # per-space gauges are published with the heartbeat
        lambda: (
            (p := dash.scrape(http[source]))
            and dash.value(p, "engram_shard_rows", memory_space=space_id) == 100
            and p
        ),
        10,
        "the space's rows on its shard",
    )
    assert dash.value(page, "engram_shard_wal_fsync_seconds_count") >= (fsyncs or 0) + 5

    addresses = {i: shared_cluster.shard_address(i) for i in range(2)}
    await move_space(addresses, space_id, target)

    after = dash.scrape(http[target])
    assert dash.value(after, "engram_shard_moves_total", result="committed") == committed + 1
    assert dash.value(after, "engram_shard_move_pause_seconds_count") == pauses + 1

    def settled() -> bool:  # the heartbeat publishes the per-space gauges and move ages
        src, tgt = dash.scrape(http[source]), dash.scrape(http[target])
        return (
            dash.value(src, "engram_shard_rows", memory_space=space_id) is None
            and dash.value(tgt, "engram_shard_rows", memory_space=space_id) == 100
            and dash.value(tgt, "engram_shard_checkpoint_age_seconds", memory_space=space_id)
            is not None
            and dash.value(src, "engram_shard_move_oldest_seconds") == 0
            and dash.value(tgt, "engram_shard_move_oldest_seconds") == 0
        )

    dash.wait_for(settled, 10, "the moved space's gauges on its new shard only")


def test_control_store_up_follows_redis(shared_cluster: LocalCluster, dash: ModuleType) -> None:
    addresses = [
        a for t in dash.prometheus.cluster_targets(shared_cluster.endpoints()).values() for a in t
    ]

    def all_up(want: float) -> bool:
        return all(dash.value(dash.scrape(a), "engram_control_store_up") == want for a in addresses)

    dash.wait_for(lambda: all_up(1), 10, "every process reaching Redis")
    shared_cluster.stop_process("redis")
    try:
        dash.wait_for(lambda: all_up(0), 20, "every process noticing Redis is down")
    finally:
        shared_cluster.start_process("redis")
    dash.wait_for(lambda: all_up(1), 20, "every process reaching Redis again")
