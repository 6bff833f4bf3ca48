"""The operator in a real kopf runtime against kmock, with fake shards: create, update,
invalid input, a crashed shard, peering and delete. The test is the kubelet and the shards:
a pod is Ready when the test says so, and a Ready shard heartbeats in a real Redis."""

from __future__ import annotations

from typing import Any

import pytest
from tests.operator.conftest import (
    APPS,
    EC,
    NS,
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

from engram.control.store import ControlStore

pytestmark = pytest.mark.timeout(120)


def fake_shards(store: ControlStore, crash: set[int] | None = None) -> Any:
    """Pods that are Ready and heartbeat, except those in ``crash`` on their first pod,
    which crash-loop silently."""

    async def state(ordinal: int, incarnation: int) -> dict[str, Any]:
        if crash and ordinal in crash and incarnation == 1:
            return pod_status(False, restarts=3, waiting="CrashLoopBackOff")
        await store.heartbeat(ordinal, f"127.0.0.1:{1 + ordinal}", ttl_s=5)
        return pod_status(True)

    return state


async def test_create_update_invalid_delete(api: Api, redis_url: str) -> None:
    store = ControlStore(redis_url, "engram")
    await install_workloads(api, replicas=2)
    await api.create(
        f"/apis/kopf.dev/v1/namespaces/{NS}/kopfpeerings",
        {"metadata": {"name": "engram-stream", "namespace": NS}},
    )
    await api.create(EC, cluster_resource(redis_url, 2))
    try:
        async with Kubelet(api, fake_shards(store)), operator(peering="engram-stream"):
            obj = await api.wait(lambda o: is_true(o, "Ready"), "Ready")
            status = obj["status"]
            assert status["phase"] == "Running"
            assert status["readyShards"] == "2/2"
            assert status["observedGeneration"] == 1
            assert [s["phase"] for s in status["shards"]] == ["Serving", "Serving"]
            assert not is_true(obj, "Degraded")
            assert "engramstream.io/operator" in obj["metadata"]["finalizers"]
            peering = await api.get(f"/apis/kopf.dev/v1/namespaces/{NS}/kopfpeerings/engram-stream")
            assert peering.get("status"), "the operator did not announce itself in the peering"

            # An update: paused (the test bumps the generation, as the API server would).
            await api.patch(
                f"{EC}/engram", {"metadata": {"generation": 2}, "spec": {"paused": True}}
            )
            obj = await api.wait(
                lambda o: (
                    o["status"].get("phase") == "Paused" and o["status"]["observedGeneration"] == 2
                ),
                "phase Paused at generation 2",
            )
            assert condition(obj, "Progressing")["reason"] == "Paused"

            # What the schema of every API server cannot refuse is reported in a condition.
            bad = {"paused": False, "rebalance": {"trigger": 1.1, "target": 1.5}}
            await api.patch(f"{EC}/engram", {"metadata": {"generation": 3}, "spec": bad})
            obj = await api.wait(lambda o: is_true(o, "Degraded", "InvalidSpec"), "InvalidSpec")
            assert obj["status"]["phase"] == "Invalid"
            assert not is_true(obj, "Ready")
            assert "target" in condition(obj, "Degraded")["message"]
            await api.wait_event("InvalidSpec")

            await api.delete(f"{EC}/engram")
            await api.wait_gone()
            # The operator deletes nothing the chart installed.
            assert await api.get(f"{APPS}/statefulsets/{STS}") is not None
            await api.wait_event("Released")
    finally:
        await store.close()


async def test_crashed_shard_is_reported_and_its_pod_deleted(api: Api, redis_url: str) -> None:
    store = ControlStore(redis_url, "engram")
    await install_workloads(api, replicas=2)
    await api.create(EC, cluster_resource(redis_url, 2, restart={"heartbeatTimeoutSeconds": 2}))
    kubelet = Kubelet(api, fake_shards(store, crash={1}))
    try:
        async with kubelet, operator():
            obj = await api.wait(
                lambda o: is_true(o, "Degraded", "CrashLoop"), "Degraded CrashLoop"
            )
            assert obj["status"]["phase"] == "Degraded"
            assert not is_true(obj, "Ready")
            assert "crash-looping" in condition(obj, "Degraded")["message"]
            # The stuck pod is deleted (after one backoff delay), a new one serves.
            obj = await api.wait(lambda o: is_true(o, "Ready"), "Ready after the restart")
            assert kubelet.incarnations[1] == 2 and kubelet.incarnations[0] == 1
            shard = obj["status"]["shards"][1]
            assert shard["restarts"] == 1 and shard["phase"] == "Serving"
            await api.wait_event("RestartedShard")
    finally:
        await store.close()
