"""Dropping a memory space on a live cluster: the streams on it, what remains, a new start.

A writer pipelines batches on a stream while the space is dropped through the public
``DropSpace``: it gets SPACE_DROPPED in-band naming the space, the stream stays open and a new
init on the same name starts an empty space (of another dimension); nothing acknowledged
before the drop is listed afterwards; Redis holds no key naming the space or its sessions; a
resume of the old session is refused with SPACE_DROPPED. Then, per-test clusters: a drop a
crash interrupted (its marker on disk) is finished at the shard's next start, and a drop is
refused while the space is moving.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import numpy as np
import redis.asyncio as aioredis

from engram.launcher.cluster import LocalCluster
from engram.v1 import streaming_pb2 as pb
from engram.v1 import streaming_pb2_grpc

CLUSTER_SHARDS = 1
READ_TIMEOUT_S = 10.0


def _batch(n: int, dim: int, prefix: str) -> pb.ObservationBatch:
    vecs = np.random.default_rng(len(prefix) + n).standard_normal((n, dim)).astype("<f4")
    b = pb.ObservationBatch(dim=dim, vectors=vecs.tobytes())
    b.ids.extend(f"{prefix}-{i}" for i in range(n))
    return b


async def _read(call: grpc.aio.StreamStreamCall) -> pb.ObservationResponse:
    resp = await asyncio.wait_for(call.read(), READ_TIMEOUT_S)
    assert resp is not grpc.aio.EOF, "the gateway ended the stream"
    assert isinstance(resp, pb.ObservationResponse)
    return resp


async def _init(
    call: grpc.aio.StreamStreamCall, space: str, session: str = ""
) -> pb.ObservationResponse:
    await call.write(
        pb.ObservationRequest(memory_space_id=space, session_id=session, init=pb.StreamInit())
    )
    while (resp := await _read(call)).WhichOneof("result") == "status":
        pass
    return resp


async def _listed(stub: streaming_pb2_grpc.EngramStreamStub, space: str) -> list[str]:
    ids: list[str] = []
    async for chunk in stub.ListObservations(pb.ListObservationsRequest(memory_space_id=space)):
        ids.extend(chunk.ids)
    return ids


async def _keys_naming(redis_url: str, *names: str) -> list[str]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        return [k async for k in client.scan_iter(count=1000) if any(n in k for n in names)]
    finally:
        await client.aclose()


async def test_drop_while_a_stream_writes(shared_cluster: LocalCluster, space_id: str) -> None:
    async with grpc.aio.insecure_channel(shared_cluster.gateway_address) as channel:
        stub = streaming_pb2_grpc.EngramStreamStub(channel)
        call = stub.ObserveStream()
        init = await _init(call, space_id)
        session = init.init_ack.session_id
        acked: list[str] = []
        dropped: list[pb.StreamError] = []
        answered = asyncio.Event()

        async def write() -> None:
            seq = 0
            while not dropped:  # pipelined: up to 4 batches in flight
                for _ in range(4):
                    seq += 1
                    await call.write(
                        pb.ObservationRequest(sequence_number=seq, batch=_batch(8, 8, f"a{seq}"))
                    )
                for _ in range(4):
                    resp = await _read(call)
                    while resp.WhichOneof("result") == "status":
                        resp = await _read(call)
                    if resp.WhichOneof("result") == "ack":
                        acked.extend(f"a{resp.sequence_number}-{i}" for i in range(8))
                        answered.set()
                    else:
                        assert resp.WhichOneof("result") == "error", resp
                        dropped.append(resp.error)
                        break

        writer = asyncio.create_task(write())
        await asyncio.wait_for(answered.wait(), READ_TIMEOUT_S)
        await asyncio.sleep(0.2)
        answer = await stub.DropSpace(pb.DropSpaceRequest(memory_space_id=space_id))
        await asyncio.wait_for(writer, 3 * READ_TIMEOUT_S)
        assert answer.observations >= len(acked) > 0  # acks still in flight were stored too
        err = dropped[0]
        assert err.code == pb.SPACE_DROPPED, err
        assert space_id in err.message

        # nothing of it remains: no listing, no key in Redis
        assert await _listed(stub, space_id) == []
        assert await _keys_naming(shared_cluster.redis_url, space_id, session) == []

        # the old session cannot be resumed; a new init on this very stream starts afresh
        other = stub.ObserveStream()
        resumed = await _init(other, space_id, session)
        assert resumed.error.code == pb.SPACE_DROPPED, resumed
        other.cancel()
        # answers to batches sent behind the dropped one may still be unread: all SPACE_DROPPED
        fresh = await _init(call, space_id)
        while fresh.WhichOneof("result") != "init_ack":
            assert fresh.error.code == pb.SPACE_DROPPED, fresh
            fresh = await _read(call)
        assert fresh.init_ack.session_id != session
        assert fresh.init_ack.dim == 0
        await call.write(pb.ObservationRequest(sequence_number=1, batch=_batch(3, 4, "b")))
        resp = await _read(call)
        assert resp.WhichOneof("result") == "ack", resp
        assert resp.ack.first_lsn == 1
        assert sorted(await _listed(stub, space_id)) == ["b-0", "b-1", "b-2"]
        await call.done_writing()

        # dropping an unknown space answers 0
        unknown = await stub.DropSpace(pb.DropSpaceRequest(memory_space_id=space_id + "-none"))
        assert unknown.observations == 0


async def _write_some(cluster: LocalCluster, space: str, n: int) -> str:
    """Writes ``n`` observations into ``space`` on a new session; returns the session."""
    async with grpc.aio.insecure_channel(cluster.gateway_address) as channel:
        call = streaming_pb2_grpc.EngramStreamStub(channel).ObserveStream()
        init = await _init(call, space)
        await call.write(pb.ObservationRequest(sequence_number=1, batch=_batch(n, 8, "c")))
        while (resp := await _read(call)).WhichOneof("result") != "ack":
            assert resp.WhichOneof("result") == "status", resp
        await call.done_writing()
        return init.init_ack.session_id


async def test_a_drop_interrupted_by_a_crash_is_finished_at_start(
    make_cluster: Any, space_id: str
) -> None:
    cluster = make_cluster(shards=1)
    session = await _write_some(cluster, space_id, 20)
    shard_dir = cluster.shard_data_dir(0)
    assert (shard_dir / "spaces" / space_id).is_dir()
    cluster.stop()
    # what a crash right after the marker leaves: the marker, every file still there
    marker = {"space": space_id, "epoch": 0, "keep_route": False, "sessions": [session]}
    (shard_dir / "drops").mkdir(exist_ok=True)
    (shard_dir / "drops" / f"{space_id}.json").write_text(json.dumps(marker))
    cluster.start()
    assert not (shard_dir / "spaces" / space_id).exists()
    async with grpc.aio.insecure_channel(cluster.gateway_address) as channel:
        stub = streaming_pb2_grpc.EngramStreamStub(channel)
        assert await _listed(stub, space_id) == []
        # (Redis restarted empty with the cluster: the marker's removal shows it was told)
        for _ in range(100):  # the control plane is told from the shard's background task
            if not await _keys_naming(cluster.redis_url, space_id, session):
                break
            await asyncio.sleep(0.1)
        assert await _keys_naming(cluster.redis_url, space_id, session) == []
        assert not await asyncio.to_thread(lambda: list((shard_dir / "drops").glob("*.json")))
        call = stub.ObserveStream()
        fresh = await _init(call, space_id)
        assert fresh.init_ack.dim == 0, fresh
        call.cancel()
