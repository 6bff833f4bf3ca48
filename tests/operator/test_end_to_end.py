"""The operator under kmock driving a local cluster of real shard and gateway processes.

The pods in kmock are made from the real processes' state (Ready when the shard answers its
gRPC health check, restarts as the local supervisor counts them), so the operator sees what a
kubelet would report, and reaches the shards as it does in a cluster: their heartbeats and
addresses in Redis, their Stats and moves over gRPC.

* A hot space: ``engram demo --verify`` writes two spaces that both live on shard 0 while
  shard 1 idles; the operator moves one of them while the demo streams. Lost 0, duplicated 0.
* A kill -9 of a shard is reported in the status (Degraded) and the shard serves again.
* Scaling down drains the leaving shard before the StatefulSet shrinks.
* Scaling up (spec.shards 2 -> 3) starts shard 2 as an extra shard (its pod keeps
  ENGRAM_SHARD_COUNT=2) and moves spaces onto it while a demo streams.
"""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from typing import Any

import pytest
from tests.operator.conftest import (
    APPS,
    EC,
    STS,
    Api,
    Kubelet,
    cluster_resource,
    condition,
    install_workloads,
    is_true,
    operator,
    pod_status,
)

from engram.control.assignment import default_shard
from engram.control.moves import shard_stats
from engram.launcher.cluster import LocalCluster

pytestmark = pytest.mark.timeout(180)

FAST = {
    "rebalance": {"intervalSeconds": 1, "cooldownSeconds": 0, "spaceCooldownSeconds": 3600},
    "restart": {"heartbeatTimeoutSeconds": 3, "moveSpacesAfterSeconds": 0},
}


def shard_pods(cluster: LocalCluster) -> Any:
    """Pod statuses from the real shard processes."""

    async def state(ordinal: int, incarnation: int) -> dict[str, Any]:
        name = f"shard-{ordinal}"
        ready = await asyncio.to_thread(cluster.healthy, name, 0.5)
        return pod_status(ready, restarts=cluster.restarts(name))

    return state


def prefix_on(shard: int, shards: int, spaces: int) -> str:
    """A demo prefix whose spaces (prefix-0..) all hash to ``shard``."""
    for n in range(10_000):
        prefix = f"hot{n}"
        if all(default_shard(f"{prefix}-{i}", shards) == shard for i in range(spaces)):
            return prefix
    raise AssertionError("no prefix found")


async def demo(
    cluster: LocalCluster, prefix: str, count: int, spaces: int = 2
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "engram.cli", "demo", "--target", cluster.gateway_address,
        "--spaces", str(spaces), "--count", str(count), "--dim", "64", "--batch", "500",
        "--prefix", prefix, "--verify",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


async def test_hot_space_moves_under_demo_kill_and_drain(api: Api, make_cluster: Any) -> None:
    cluster = make_cluster(shards=3, env={"ENGRAM_CANARY_INTERVAL_S": "0"})
    await install_workloads(api, replicas=3)
    await api.create(EC, cluster_resource(cluster.redis_url, 3, **FAST))
    prefix = prefix_on(0, 3, 2)
    async with Kubelet(api, shard_pods(cluster), interval=0.5), operator():
        await api.wait(lambda o: is_true(o, "Ready"), "Ready", seconds=60)

        # A hot shard: both demo spaces on shard 0. The operator moves one while it streams.
        proc = await demo(cluster, prefix, 300_000)
        try:
            obj = await api.wait(
                lambda o: any(
                    m.get("result") == "Done" and m["space"].startswith(prefix)
                    for m in o["status"].get("moves", {}).get("recent", ())
                ),
                "a demo space moved",
                seconds=90,
            )
        finally:
            out, _ = await proc.communicate()
        text = out.decode()
        verdict = re.search(r"verify (OK|FAILED): lost (\d+), duplicated (\d+)", text)
        assert verdict is not None, text[-2000:]
        assert verdict.groups() == ("OK", "0", "0"), text[-2000:]
        move = next(m for m in obj["status"]["moves"]["recent"] if m["result"] == "Done")
        assert move["source"] == 0 and move["reason"].startswith("balance")
        await api.wait_event("MovedSpace")

        # kill -9 of a shard: reported, and serving again (the local supervisor restarts it).
        await asyncio.to_thread(cluster.kill, "shard-1", signal.SIGKILL)
        obj = await api.wait(lambda o: is_true(o, "Degraded"), "Degraded after kill -9", 15)
        assert "shard-1" in condition(obj, "Degraded")["message"]
        assert not is_true(obj, "Ready")
        await api.wait(lambda o: is_true(o, "Ready"), "Ready after the restart", seconds=60)

        # Scale 3 -> 2: shard 2 (given two spaces first) is drained, then the StatefulSet
        # shrinks.
        leaving = prefix_on(2, 3, 2)
        small = await demo(cluster, leaving, 4_000)
        out, _ = await small.communicate()
        assert b"verify OK: lost 0, duplicated 0" in out, out.decode()[-2000:]
        await api.patch(f"{EC}/engram", {"metadata": {"generation": 2}, "spec": {"shards": 2}})
        await api.wait(
            lambda o: o["status"].get("shardCount") == 2 and is_true(o, "Ready"),
            "scaled to 2",
            seconds=60,
        )
        sts = await api.get(f"{APPS}/statefulsets/{STS}")
        assert sts["spec"]["replicas"] == 2
        # Nothing was left on shard 2 when the StatefulSet shrank (its process still runs).
        stats = await shard_stats({2: cluster.shard_address(2)})
        assert not [x.memory_space_id for x in stats[2].spaces if x.state == "owned"]
        obj = await api.cluster()
        off = {m["space"] for m in obj["status"]["moves"]["recent"] if m["source"] == 2}
        assert off == {f"{leaving}-0", f"{leaving}-1"}
        assert any(m["reason"].startswith("drain") for m in obj["status"]["moves"]["recent"])


async def test_scale_up_starts_an_extra_shard_and_fills_it(api: Api, make_cluster: Any) -> None:
    """spec.shards 2 -> 3 without a new pod template: the new pod keeps ENGRAM_SHARD_COUNT=2,
    so shard 2 starts as an extra shard; the operator moves spaces onto it while a demo
    streams to six spaces."""
    cluster = make_cluster(shards=3, home_shards=2, env={"ENGRAM_CANARY_INTERVAL_S": "0"})
    await asyncio.to_thread(cluster.stop_process, "shard-2")  # no pod 2 yet
    home_pods = shard_pods(cluster)

    async def state(ordinal: int, incarnation: int) -> dict[str, Any]:
        if ordinal == 2 and not await asyncio.to_thread(cluster.healthy, "shard-2", 0.5):
            await asyncio.to_thread(cluster.start_process, "shard-2")  # the kubelet starts it
        return await home_pods(ordinal, incarnation)

    await install_workloads(api, replicas=2)
    await api.create(EC, cluster_resource(cluster.redis_url, 2, **FAST))
    async with Kubelet(api, state, interval=0.5), operator():
        await api.wait(lambda o: is_true(o, "Ready"), "Ready", seconds=60)
        proc = await demo(cluster, "grow", 200_000, spaces=6)
        try:
            await asyncio.sleep(2.0)  # some load on the home shards first
            await api.patch(f"{EC}/engram", {"metadata": {"generation": 2}, "spec": {"shards": 3}})
            obj = await api.wait(
                lambda o: any(
                    m.get("result") == "Done" and m.get("target") == 2
                    for m in o["status"].get("moves", {}).get("recent", ())
                ),
                "a space moved onto shard 2",
                seconds=90,
            )
        finally:
            out, _ = await proc.communicate()
        assert b"verify OK: lost 0, duplicated 0" in out, out.decode()[-2000:]
    assert "beyond ENGRAM_SHARD_COUNT=2" in cluster.log_tail("shard-2", 200)
    move = next(m for m in obj["status"]["moves"]["recent"] if m.get("target") == 2)
    stats = await shard_stats({2: cluster.shard_address(2)})
    assert move["space"] in [x.memory_space_id for x in stats[2].spaces if x.state == "owned"]
    sts = await api.get(f"{APPS}/statefulsets/{STS}")
    assert sts["spec"]["replicas"] == 3
