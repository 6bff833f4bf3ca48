"""Failures under a WebSocket stream: a shard lost mid-stream ends it with an error frame and
close code 1013 (try again later), and the session resumes afterwards with nothing lost; a
gateway restart ends it too, and the session resumes on the restarted gateway."""

from __future__ import annotations

import asyncio
import signal

import numpy as np

from engram.launcher.cluster import LocalCluster
from engram_client.client import EngramClient

DIM = 8


def vecs(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype("<f4")
    return v / np.linalg.norm(v, axis=1, keepdims=True)


async def list_ids(cluster: LocalCluster, space: str) -> list[str]:
    async with EngramClient(cluster.gateway_address) as client:
        return await client.list_ids(space)


async def test_shard_loss_closes_with_1013_and_the_session_resumes(make_cluster, ws_connect):
    cluster = await asyncio.to_thread(make_cluster, shards=1)
    space = "ws-shard-loss"
    ws = await ws_connect(cluster)
    session = (await ws.init(space))["session_id"]
    for seq in (1, 2, 3):
        await ws.binary_batch(seq, vecs(10, seq), ids=[f"s{seq}-{i}" for i in range(10)])
        await ws.expect("ack", sequence_number=seq)

    cluster.kill("shard-0", signal.SIGKILL)
    err = await ws.expect("error", code="shard_unavailable")
    assert err["retryable"] is True
    assert "resume" in err["message"]
    code, _ = await ws.closed()
    assert code == 1013

    await asyncio.to_thread(cluster.wait_healthy, "shard-0", 60)
    again = await ws_connect(cluster)
    init = await again.init(space, session)
    assert init["initial_sequence"] == 3
    await again.binary_batch(4, vecs(10, 4), ids=[f"s4-{i}" for i in range(10)])
    await again.expect("ack", sequence_number=4)
    ids = await list_ids(cluster, space)
    assert len(ids) == 40 and len(set(ids)) == 40


async def test_gateway_restart_ends_the_connection_and_the_session_resumes(
    make_cluster, ws_connect
):
    cluster = await asyncio.to_thread(make_cluster, shards=1)
    space = "ws-gateway-restart"
    ws = await ws_connect(cluster)
    session = (await ws.init(space))["session_id"]
    await ws.binary_batch(1, vecs(3, 1), ids=["a", "b", "c"])
    await ws.expect("ack", sequence_number=1)

    cluster.kill("gateway", signal.SIGTERM)  # a clean stop: the server closes with 1001
    code, _ = await ws.closed()
    assert code == 1001
    await asyncio.to_thread(cluster.wait_healthy, "gateway", 60)

    again = await ws_connect(cluster)
    init = await again.init(space, session)
    assert init["resumed"] is True and init["initial_sequence"] == 1
    await again.binary_batch(2, vecs(1, 2), ids=["d"])
    await again.expect("ack", sequence_number=2)
    assert sorted(await list_ids(cluster, space)) == ["a", "b", "c", "d"]
