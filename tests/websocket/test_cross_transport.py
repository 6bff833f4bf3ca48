"""One session, two transports: a session opened over gRPC resumes over WebSocket and the other
way round, with the same sequence numbers (the shard's durable mark decides)."""

from __future__ import annotations

import numpy as np

from engram.launcher.cluster import LocalCluster
from engram_client.client import EngramClient

DIM = 12


def vecs(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype("<f4")
    return v / np.linalg.norm(v, axis=1, keepdims=True)


async def list_ids(cluster: LocalCluster, space: str) -> list[str]:
    async with EngramClient(cluster.gateway_address) as client:
        return await client.list_ids(space)


async def test_grpc_session_resumes_over_websocket(shared_cluster, ws_connect, space_id):
    async with EngramClient(shared_cluster.gateway_address) as client:
        stream = await client.open_stream(space_id)
        for b in range(3):
            ack = await (await stream.send(vecs(4, b), ids=[f"g{b}-{i}" for i in range(4)]))
            assert ack.sequence_number == b + 1
        session = stream.session_id
        await stream.close()

    ws = await ws_connect(shared_cluster)
    init = await ws.init(space_id, session)
    assert init["session_id"] == session
    assert init["resumed"] is True
    assert init["initial_sequence"] == 3
    assert init["dim"] == DIM
    # a resend of the last gRPC batch is a duplicate; the next number is new
    await ws.batch(3, vecs(4, 2), ids=[f"g2-{i}" for i in range(4)])
    assert (await ws.expect("ack", sequence_number=3))["duplicate"] is True
    await ws.batch(4, vecs(4, 3), ids=[f"w3-{i}" for i in range(4)])
    ack = await ws.expect("ack", sequence_number=4)
    assert ack["duplicate"] is False and ack["first_lsn"] == 13

    ids = await list_ids(shared_cluster, space_id)
    assert len(ids) == 16 and len(set(ids)) == 16


async def test_websocket_session_resumes_over_grpc(shared_cluster, ws_connect, space_id):
    ws = await ws_connect(shared_cluster)
    session = (await ws.init(space_id))["session_id"]
    for seq in (1, 2):
        await ws.binary_batch(seq, vecs(5, seq), ids=[f"w{seq}-{i}" for i in range(5)])
        await ws.expect("ack", sequence_number=seq)
    await ws.conn.close()

    async with EngramClient(shared_cluster.gateway_address) as client:
        events = []
        stream = await client.open_stream(space_id, session_id=session, on_event=events.append)
        assert events[0].kind == "resumed"
        assert "durable up to 2" in events[0].detail
        ack = await (await stream.send(vecs(5, 9), ids=[f"g9-{i}" for i in range(5)]))
        assert ack.sequence_number == 3
        assert ack.duplicate is False
        await stream.close()

    # and back to WebSocket once more
    again = await ws_connect(shared_cluster)
    assert (await again.init("", session))["initial_sequence"] == 3  # found by session id alone

    ids = await list_ids(shared_cluster, space_id)
    assert sorted(ids) == sorted(f"{b}-{i}" for b in ("w1", "w2", "g9") for i in range(5))


async def test_resume_names_the_session_space(shared_cluster, ws_connect, space_id):
    ws = await ws_connect(shared_cluster)
    session = (await ws.init(space_id))["session_id"]
    other = await ws_connect(shared_cluster)
    await other.send({"type": "init", "memory_space_id": "another-space", "session_id": session})
    err = await other.expect("error", code="space_mismatch")
    assert space_id in err["message"]
