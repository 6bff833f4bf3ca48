"""The shard's recall port: ``Shard.Recall`` served by threads, off the shard's event loop.

On a real cluster (the launcher gives every shard a recall port): the port answers as the main
port does (same rows, same errors), serves nothing else, is published in the shard registry
and used by the gateway; a cluster started without it recalls through the main port. In this
process: a recall on a port thread that must wait for its consistency level hands the wait to
the event loop and answers once the loop has the snapshot.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from types import SimpleNamespace
from typing import Any

import grpc
import numpy as np
import pytest

from engram.common.settings import LimitSettings, RecallFirstSettings
from engram.control.store import ControlStore
from engram.internal.v1 import shard_pb2 as ipb
from engram.internal.v1 import shard_pb2_grpc
from engram.shard.recall_first import RecallLoad
from engram.shard.recall_rpc import RecallRpcs
from engram.v1 import streaming_pb2 as pb
from engram_client import EngramClient

DIM, ROWS = 16, 600
ENV = {"ENGRAM_CANARY_INTERVAL_S": "0"}


async def _fill(gateway: str, space: str) -> np.ndarray:
    vectors = np.random.default_rng(3).standard_normal((ROWS, DIM)).astype(np.float32)
    async with EngramClient(gateway) as client:
        stream = await client.open_stream(space)
        acks = [
            await stream.send(vectors[lo : lo + 100], ids=[f"r{i}" for i in range(lo, lo + 100)])
            for lo in range(0, ROWS, 100)
        ]
        await asyncio.gather(*acks)
        await stream.close()
    return vectors


async def _recall(address: str, space: str, cue: np.ndarray, **kw: Any) -> list[pb.RecallResponse]:
    req = ipb.ShardRecallRequest(
        memory_space_id=space,
        recall=pb.RecallRequest(cue=cue.tolist(), k=10, consistency=pb.STRONG, **kw),
    )
    async with grpc.aio.insecure_channel(address) as channel:
        return [c async for c in shard_pb2_grpc.ShardStub(channel).Recall(req, timeout=30)]


@pytest.mark.cluster
async def test_the_recall_port_answers_as_the_main_port_and_serves_nothing_else(
    make_cluster: Any, space_id: str
) -> None:
    cluster = make_cluster(shards=1, env=ENV)
    main, port = cluster.shard_address(0), cluster.shard_recall_address(0)
    vectors = await _fill(cluster.gateway_address, space_id)

    # published for the gateways
    store = ControlStore(cluster.redis_url, shard_count=1)
    try:
        assert (await store.shards())[0].recall_address == port
    finally:
        await store.close()

    for row in (0, 123, 599):
        on_main = await _recall(main, space_id, vectors[row])
        on_port = await _recall(port, space_id, vectors[row], chunk_size=4)
        assert [len(c.results) for c in on_port] == [4, 4, 2]
        assert [c.more_results for c in on_port] == [True, True, False]
        ids = [m.id for c in on_port for m in c.results]
        assert ids == [m.id for m in on_main[0].results]
        assert ids[0] == f"r{row}"
        assert on_port[-1].snapshot_sequence == ROWS
    async with EngramClient(cluster.gateway_address) as client:
        got = await client.recall(space_id, vectors[42], k=3, consistency="STRONG")
        assert got.hits[0].id == "r42"

    # a space the shard does not hold: an empty answer; bad input: the main port's errors
    assert [len(c.results) for c in await _recall(port, "no-such-space", vectors[0])] == [0]
    with pytest.raises(grpc.aio.AioRpcError) as wrong:
        await _recall(port, space_id, np.ones(DIM + 1, dtype=np.float32))
    assert wrong.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "WRONG_DIMENSION" in (wrong.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as session:
        req = ipb.ShardRecallRequest(
            memory_space_id=space_id,
            session_id="s-nobody",
            recall=pb.RecallRequest(cue=vectors[0].tolist(), k=3, consistency=pb.SESSION),
        )
        async with grpc.aio.insecure_channel(port) as channel:
            [c async for c in shard_pb2_grpc.ShardStub(channel).Recall(req, timeout=30)]
    assert "s-nobody" in (session.value.details() or "")
    # every other method: not here
    with pytest.raises(grpc.aio.AioRpcError) as other:
        async with grpc.aio.insecure_channel(port) as channel:
            await shard_pb2_grpc.ShardStub(channel).Stats(ipb.StatsRequest(), timeout=10)
    assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.cluster
async def test_without_a_recall_port_the_gateway_recalls_through_the_main_port(
    make_cluster: Any, space_id: str
) -> None:
    cluster = make_cluster(shards=1, env={**ENV, "ENGRAM_SHARD_RECALL_LISTEN": ""})
    vectors = await _fill(cluster.gateway_address, space_id)
    store = ControlStore(cluster.redis_url, shard_count=1)
    try:
        assert (await store.shards())[0].recall_address == ""
    finally:
        await store.close()
    async with EngramClient(cluster.gateway_address) as client:
        got = await client.recall(space_id, vectors[7], k=3, consistency="STRONG")
        assert got.hits[0].id == "r7"


class _Space:
    """A space whose snapshot must wait for the loop (visible below the target)."""

    name = "waiting"
    visible = 5

    def __init__(self) -> None:
        self.waited_on: list[threading.Thread] = []

    def snapshot_target(self, level: int, session_id: str = "") -> int:
        return 9

    async def consistent_snapshot(self, level: int, session_id: str, deadline_s: float) -> str:
        self.waited_on.append(threading.current_thread())
        await asyncio.sleep(0.01)
        return "snapshot-at-9"

    def recall(self, snap: str, cue: np.ndarray, k: int, filters: Any, timeline: Any) -> Any:
        out = pb.RecallResponse(snapshot_sequence=9)
        out.results.add(id=snap)
        return out


async def test_a_port_thread_hands_the_wait_for_consistency_to_the_loop() -> None:
    space = _Space()
    rpcs = RecallRpcs()
    rpcs.node = SimpleNamespace(  # type: ignore[assignment]
        settings=SimpleNamespace(limits=LimitSettings(), shard=SimpleNamespace(slow_recall_ms=0)),
        space=lambda name, create: space,
        recalls=RecallLoad(RecallFirstSettings()),
    )
    rpcs._loop = asyncio.get_running_loop()
    rpcs._recall_pool = concurrent.futures.ThreadPoolExecutor(1)
    rpcs._recall_slots = threading.BoundedSemaphore(1)
    rpcs._recalls, rpcs._last_slow_log = {}, 0.0
    req = ipb.ShardRecallRequest(
        memory_space_id="waiting",
        recall=pb.RecallRequest(cue=[1.0, 0.0], k=1, consistency=pb.STRONG, request_id="q1"),
    )
    try:
        chunks = await asyncio.to_thread(rpcs.recall_blocking, req, ())
    finally:
        rpcs._recall_pool.shutdown()
    assert [m.id for m in chunks[0].results] == ["snapshot-at-9"]
    assert chunks[0].request_id == "q1"
    assert space.waited_on == [threading.main_thread()]  # the loop's thread
    assert rpcs.node.recalls.queued == 0
    assert rpcs._recalls == {"waiting": 1}
