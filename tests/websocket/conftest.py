"""Fixtures of the WebSocket suites: a small WebSocket test client.

Clusters come from the kit of ``tests/conftest.py``: ``shared_cluster`` (one per module,
configured by the module's ``CLUSTER_ENV`` / ``CLUSTER_SHARDS``; tests on it write to memory
spaces of their own, named by ``space_id``) and, for destructive tests, ``make_cluster``.

``ws_connect(cluster)`` opens a :class:`WsClient` on the cluster's ``/v1/stream``; every
connection a test opened is closed at teardown.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from engram.launcher.cluster import LocalCluster
from engram.v1 import streaming_pb2 as pb

RECV_TIMEOUT_S = 15.0


def ws_url(cluster: LocalCluster) -> str:
    return f"ws://127.0.0.1:{cluster.http_port}/v1/stream"


class WsClient:
    """A raw WebSocket connection speaking the JSON frames, for protocol tests."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.heartbeats: list[dict[str, Any]] = []

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        await self.conn.send(json.dumps(frame) if isinstance(frame, dict) else frame)

    async def recv(self, *, heartbeats: bool = False, timeout: float = RECV_TIMEOUT_S) -> dict:  # noqa: ASYNC109
        """The next frame (heartbeats are collected in ``self.heartbeats`` and skipped)."""
        async with asyncio.timeout(timeout):
            while True:
                data = await self.conn.recv()
                assert isinstance(data, str), f"the server sent a binary frame: {data!r}"
                frame = json.loads(data)
                if frame["type"] == "heartbeat" and not heartbeats:
                    self.heartbeats.append(frame)
                    continue
                return frame

    async def expect(self, kind: str, **fields: Any) -> dict[str, Any]:
        frame = await self.recv(heartbeats=kind == "heartbeat")
        assert frame["type"] == kind, f"expected a {kind} frame, got {frame}"
        for key, value in fields.items():
            assert frame.get(key) == value, f"{key}: expected {value!r} in {frame}"
        return frame

    async def init(self, space: str = "", session_id: str = "") -> dict[str, Any]:
        frame: dict[str, Any] = {"type": "init", "memory_space_id": space}
        if session_id:
            frame["session_id"] = session_id
        await self.send(frame)
        return await self.expect("init_ack")

    async def batch(self, seq: int, vectors: np.ndarray, **extra: Any) -> None:
        frame = {"type": "batch", "sequence_number": seq, "vectors": vectors.tolist(), **extra}
        await self.send(frame)

    async def binary_batch(self, seq: int, vectors: np.ndarray, **extra: Any) -> None:
        v = np.ascontiguousarray(vectors, dtype="<f4")
        batch = pb.ObservationBatch(dim=v.shape[1], vectors=v.tobytes(), **extra)
        await self.send(pb.ObservationRequest(sequence_number=seq, batch=batch).SerializeToString())

    async def closed(self, timeout: float = RECV_TIMEOUT_S) -> tuple[int | None, str | None]:  # noqa: ASYNC109
        """Reads until the server closes; returns (close code, reason)."""
        async with asyncio.timeout(timeout):
            try:
                while True:
                    data = await self.conn.recv()
                    if isinstance(data, str) and json.loads(data)["type"] == "heartbeat":
                        self.heartbeats.append(json.loads(data))
            except ConnectionClosed:
                pass
        return self.conn.close_code, self.conn.close_reason


WsConnect = Callable[..., Awaitable[WsClient]]


@pytest.fixture
async def ws_connect() -> AsyncIterator[WsConnect]:
    """Opens WebSocket clients on a cluster's /v1/stream; closes them all at teardown."""
    opened: list[ClientConnection] = []

    async def open_client(cluster: LocalCluster, path: str = "/v1/stream") -> WsClient:
        url = f"ws://127.0.0.1:{cluster.http_port}{path}"
        conn = await connect(url, max_size=None, open_timeout=10, compression=None)
        opened.append(conn)
        return WsClient(conn)

    try:
        yield open_client
    finally:
        for conn in opened:
            await conn.close()
