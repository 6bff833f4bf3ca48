"""Connection hygiene: server heartbeats at ENGRAM_WS_HEARTBEAT_S, the idle timeout
(ENGRAM_WS_IDLE_TIMEOUT_S, close 1008), and client heartbeats keeping a quiet stream open."""

from __future__ import annotations

import asyncio
import time

import numpy as np

CLUSTER_ENV = {"ENGRAM_WS_HEARTBEAT_S": "0.2", "ENGRAM_WS_IDLE_TIMEOUT_S": "1.5"}
CLUSTER_SHARDS = 1


async def test_server_sends_heartbeats_at_the_configured_interval(
    shared_cluster, ws_connect, space_id
):
    ws = await ws_connect(shared_cluster)
    before_init = await ws.expect("heartbeat")
    assert before_init["session_id"] is None
    assert before_init["timestamp"].endswith("Z")
    ack = await ws.init(space_id)
    assert ack["heartbeat_s"] == 0.2
    assert ack["idle_timeout_s"] == 1.5
    await ws.batch(1, np.ones((1, 4), dtype="<f4"))
    await ws.expect("ack", sequence_number=1)
    started = time.monotonic()
    beats = [await ws.expect("heartbeat") for _ in range(4)]
    elapsed = time.monotonic() - started
    assert all(b["session_id"] == ack["session_id"] for b in beats)
    assert beats[-1]["last_acked_sequence"] == 1
    assert 0.4 < elapsed < 3.0, elapsed  # 4 beats 0.2 s apart (generous: a shared machine)


async def test_a_silent_client_is_closed_with_1008(shared_cluster, ws_connect, space_id):
    ws = await ws_connect(shared_cluster)
    await ws.init(space_id)
    started = time.monotonic()
    code, reason = await ws.closed(timeout=10)
    assert code == 1008
    assert "idle" in reason
    assert time.monotonic() - started >= 1.0
    assert len(ws.heartbeats) >= 3  # heartbeats alone do not keep the client alive


async def test_client_heartbeats_keep_a_quiet_stream_open(shared_cluster, ws_connect, space_id):
    ws = await ws_connect(shared_cluster)
    await ws.init(space_id)
    deadline = time.monotonic() + 3.5  # well past the 1.5 s idle timeout
    while time.monotonic() < deadline:
        await ws.send({"type": "heartbeat"})
        await asyncio.sleep(0.3)
    await ws.batch(1, np.ones((1, 4), dtype="<f4"))
    await ws.expect("ack", sequence_number=1)
    assert ws.conn.close_code is None
