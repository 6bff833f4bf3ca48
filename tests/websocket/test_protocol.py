"""The WebSocket protocol on /v1/stream: init, batches in every encoding, the Engram-compatible
observation frame, recall, flow control, resume, close draining, and the /demo page."""

from __future__ import annotations

import asyncio
import base64
import urllib.request

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from engram.launcher.cluster import LocalCluster
from engram.v1 import streaming_pb2 as pb
from engram_client.client import EngramClient

DIM = 16


def vecs(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype("<f4")
    return v / np.linalg.norm(v, axis=1, keepdims=True)


async def list_ids(cluster: LocalCluster, space: str) -> list[str]:
    async with EngramClient(cluster.gateway_address) as client:
        return await client.list_ids(space)


async def test_init_ack_describes_the_session_and_the_connection(
    shared_cluster, ws_connect, space_id
):
    ws = await ws_connect(shared_cluster)
    ack = await ws.init(space_id)
    assert ack["session_id"].startswith("s-")
    assert ack["initial_sequence"] == 0
    assert ack["resumed"] is False
    assert ack["dim"] == 0
    assert ack["max_in_flight_batches"] >= 1
    assert ack["max_batch_size"] >= 1
    assert ack["capabilities"]["supports_backpressure"] is True
    assert ack["heartbeat_s"] == 30.0
    assert ack["idle_timeout_s"] == 120.0
    assert ack["max_frame_bytes"] == 64 * 1024 * 1024
    assert ack["server_timestamp"].endswith("Z")


async def test_every_batch_encoding_is_acked_in_order(shared_cluster, ws_connect, space_id):
    ws = await ws_connect(shared_cluster)
    session = (await ws.init(space_id))["session_id"]
    v = vecs(12, seed=1)
    # 1: JSON, vectors as a list of lists, with metadata
    await ws.batch(1, v[0:3], ids=["a", "b", "c"], contents=["x", "y", "z"], priority="high")
    # 2: JSON, vectors as base64 of packed float32
    await ws.send(
        {
            "type": "batch",
            "sequence_number": 2,
            "dim": DIM,
            "vectors_b64": base64.b64encode(v[3:6].tobytes()).decode(),
            "confidences": [0.1, 0.2, 0.3],
            "timestamps_us": [1, 2, 3],
        }
    )
    # 3: binary: the serialized ObservationRequest gRPC clients send
    await ws.binary_batch(3, v[6:9])
    # 4: the original Engram observation frame (one episode)
    await ws.send(
        {
            "type": "observation",
            "session_id": session,
            "sequence_number": 4,
            "episode": {
                "id": "ep-1",
                "when": "2026-01-02T03:04:05.123456Z",
                "what": "met Ada at the station",
                "embedding": v[9].tolist(),
                "encoding_confidence": 0.9,
            },
        }
    )
    acks = [await ws.expect("ack", sequence_number=seq) for seq in (1, 2, 3, 4)]
    assert [a["status"] for a in acks] == ["accepted"] * 4
    assert [a["count"] for a in acks] == [3, 3, 3, 1]
    assert [a["first_lsn"] for a in acks] == [1, 4, 7, 10]
    assert acks[0]["memory_id"] == "a"
    assert acks[3]["memory_id"] == "ep-1"
    assert all(a["session_id"] == session and not a["duplicate"] for a in acks)
    assert all(a["committed_at"].endswith("Z") for a in acks)
    ids = await list_ids(shared_cluster, space_id)
    assert len(ids) == 10 and len(set(ids)) == 10
    assert {"a", "b", "c", "ep-1"} <= set(ids)


async def test_recall_result_carries_request_id_consistency_and_filters(
    shared_cluster, ws_connect, space_id
):
    ws = await ws_connect(shared_cluster)
    await ws.init(space_id)
    v = vecs(20, seed=2)
    contents = [f"memory {i}" for i in range(20)]
    confidences = [0.2 if i % 2 else 0.9 for i in range(20)]
    await ws.batch(
        1, v, ids=[f"m{i}" for i in range(20)], contents=contents, confidences=confidences
    )
    await ws.expect("ack", sequence_number=1)
    await ws.send(
        {
            "type": "recall",
            "request_id": "q1",
            "cue": v[4].tolist(),
            "k": 3,
            "consistency": "session",
            "min_confidence": 0.5,
        }
    )
    result = await ws.expect("recall_result", request_id="q1")
    hits = result["results"]
    assert [h["id"] for h in hits][0] == "m4"
    assert hits[0]["content"] == "memory 4"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert all(h["confidence"] >= 0.5 for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert result["snapshot_sequence"] >= 20
    assert result["metadata"]["consistency"] == "session"
    # a cue as base64, and eventual consistency
    await ws.send(
        {
            "type": "recall",
            "request_id": "q2",
            "cue_b64": base64.b64encode(v[7].tobytes()).decode(),
            "k": 1,
            "consistency": "EVENTUAL",
        }
    )
    result = await ws.expect("recall_result", request_id="q2")
    assert result["results"][0]["id"] == "m7"
    # a refused recall answers with an error naming its request id
    await ws.send({"type": "recall", "request_id": "q3", "cue": v[0].tolist(), "k": 0})
    err = await ws.expect("error", request_id="q3", code="k_out_of_range")
    assert err["retryable"] is False


async def test_flow_control_pause_resume_and_status(shared_cluster, ws_connect, space_id):
    ws = await ws_connect(shared_cluster)
    await ws.init(space_id)
    await ws.send({"type": "flow_control", "action": "buffer_status"})
    status = await ws.expect("status", state="active")
    assert status["queue_capacity"] >= 1
    assert status["last_acked_sequence"] == 0
    await ws.send({"type": "flow_control", "action": "pause", "reason": "user"})
    await ws.expect("status", state="paused")
    await ws.batch(1, vecs(1))
    await ws.expect("error", code="stream_paused", sequence_number=1)
    await ws.send({"type": "flow_control", "action": "RESUME"})
    await ws.expect("status", state="active")
    await ws.batch(1, vecs(1))
    await ws.expect("ack", sequence_number=1)


async def test_resume_over_websocket_reports_the_durable_mark(shared_cluster, ws_connect, space_id):
    ws = await ws_connect(shared_cluster)
    session = (await ws.init(space_id))["session_id"]
    v = vecs(3, seed=3)
    for seq in (1, 2, 3):
        await ws.batch(seq, v[seq - 1 : seq], ids=[f"r{seq}"])
        await ws.expect("ack", sequence_number=seq)
    await ws.conn.close()

    again = await ws_connect(shared_cluster)
    ack = await again.init(space_id, session)
    assert ack["session_id"] == session
    assert ack["resumed"] is True
    assert ack["initial_sequence"] == 3
    assert ack["dim"] == DIM
    await again.batch(3, v[2:3], ids=["r3"])  # a resend of a durable batch
    dup = await again.expect("ack", sequence_number=3)
    assert dup["duplicate"] is True
    await again.batch(4, vecs(1, seed=4), ids=["r4"])
    assert (await again.expect("ack", sequence_number=4))["duplicate"] is False
    await again.batch(6, vecs(1, seed=5))
    gap = await again.expect("error", code="sequence_gap", sequence_number=6)
    assert gap["expected_sequence"] == 5
    assert sorted(await list_ids(shared_cluster, space_id)) == ["r1", "r2", "r3", "r4"]


async def test_close_answers_every_batch_then_closes_normally(shared_cluster, ws_connect, space_id):
    ws = await ws_connect(shared_cluster)
    init = await ws.init(space_id)
    credits = init["max_in_flight_batches"]
    v = vecs(credits * 50, seed=6)
    for seq in range(1, credits + 1):
        await ws.binary_batch(seq, v[(seq - 1) * 50 : seq * 50])
    await ws.send({"type": "close", "drain_queue": True})  # at once, acks still outstanding
    frames = []
    while True:
        frame = await ws.recv()
        frames.append(frame)
        if frame["type"] == "status":
            break
    assert [f["sequence_number"] for f in frames[:-1]] == list(range(1, credits + 1))
    assert all(f["type"] == "ack" for f in frames[:-1])
    assert frames[-1]["state"] == "closed"
    assert frames[-1]["last_acked_sequence"] == credits
    code, _ = await ws.closed()
    assert code == 1000
    assert len(await list_ids(shared_cluster, space_id)) == credits * 50


async def test_close_before_init_closes_at_once(shared_cluster, ws_connect):
    ws = await ws_connect(shared_cluster)
    await ws.send({"type": "close"})
    await ws.expect("status", state="closed")
    code, _ = await ws.closed()
    assert code == 1000


async def test_binary_frames_can_carry_init_and_recall(shared_cluster, ws_connect, space_id):
    ws = await ws_connect(shared_cluster)
    await ws.send(
        pb.ObservationRequest(memory_space_id=space_id, init=pb.StreamInit()).SerializeToString()
    )
    await ws.expect("init_ack", initial_sequence=0)
    v = vecs(4, seed=7)
    await ws.binary_batch(1, v, ids=["p", "q", "r", "s"])
    await ws.expect("ack", sequence_number=1)
    recall = pb.RecallRequest(request_id="b1", cue=v[2].tolist(), k=1)
    await ws.send(pb.ObservationRequest(recall=recall).SerializeToString())
    result = await ws.expect("recall_result", request_id="b1")
    assert result["results"][0]["id"] == "r"


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (loopback)
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read()


async def test_demo_page_and_its_files_are_served(shared_cluster):
    base = f"http://127.0.0.1:{shared_cluster.http_port}"
    status, ctype, body = await asyncio.to_thread(_get, base + "/demo")
    assert status == 200 and ctype.startswith("text/html")
    assert b"/demo/demo.js" in body
    status, ctype, body = await asyncio.to_thread(_get, base + "/demo/demo.js")
    assert status == 200 and ctype.startswith("text/javascript")
    assert b"engram-client.js" in body
    status, ctype, _ = await asyncio.to_thread(_get, base + "/demo/engram-client.js")
    assert status == 200 and ctype.startswith("text/javascript")
    for missing in ("/demo/nothing.js", "/demo/..%2Fws.py", "/demo/.hidden.js", "/nothing"):
        status, _, _ = await asyncio.to_thread(_get, base + missing)
        assert status == 404, missing


async def test_websocket_handshake_elsewhere_is_refused(shared_cluster):
    with pytest.raises(InvalidStatus) as info:
        await connect(f"ws://127.0.0.1:{shared_cluster.http_port}/v1/other", open_timeout=10)
    assert info.value.response.status_code == 404
