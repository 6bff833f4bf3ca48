"""The gRPC implementation of the gateway's ``Shards`` interface against a shard servicer in this
process (routed through the in-memory control plane): the requests it sends, and how each kind
of failure comes back as an ``engram.contract.errors`` type."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from engram.common.settings import load
from engram.contract.errors import (
    NotOwnerError,
    SessionError,
    UnavailableError,
    abort_details,
    grpc_status,
)
from engram.control.memory import MemoryControlStore
from engram.gateway.router import Router
from engram.gateway.shards import GrpcShards, OpenedSession
from engram.internal.v1 import shard_pb2 as ipb
from engram.internal.v1 import shard_pb2_grpc
from engram.v1 import streaming_pb2 as pb


class _Shard(shard_pb2_grpc.ShardServicer):
    def __init__(self) -> None:
        self.appended: list[ipb.AppendRequest] = []

    async def OpenSession(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        if request.session_id == "s-unknown":
            return ipb.OpenSessionResponse(error=pb.StreamError(code=pb.UNKNOWN_SESSION))
        return ipb.OpenSessionResponse(last_sequence=7, dim=4)

    async def Append(self, request_iterator, context):  # type: ignore[no-untyped-def]  # noqa: N802
        async for req in request_iterator:
            self.appended.append(req)
            if req.sequence_number == 99:
                await context.abort(grpc.StatusCode.INTERNAL, "boom")
            yield ipb.AppendResponse(sequence_number=req.sequence_number, count=1)

    async def Recall(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        if request.memory_space_id == "moved":
            err = NotOwnerError("moved to shard 1")
            await context.abort(grpc_status(err), abort_details(err))
        yield pb.RecallResponse(request_id=request.recall.request_id, more_results=True)
        yield pb.RecallResponse(request_id=request.session_id)

    async def Scan(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        for n in range(3):
            yield pb.ListObservationsResponse(ids=[f"o{n}"], lsns=[n + 1])


@pytest.fixture
async def grpc_shards() -> AsyncIterator[tuple[GrpcShards, _Shard, MemoryControlStore]]:
    shard = _Shard()
    server = grpc.aio.server()
    shard_pb2_grpc.add_ShardServicer_to_server(shard, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    store = MemoryControlStore(shard_count=1)
    await store.heartbeat(0, f"127.0.0.1:{port}", ttl_s=30)
    settings = load({"ENGRAM_SHARD_COUNT": "1"})
    router = Router(settings, store)
    await router.refresh()
    try:
        yield GrpcShards(router, settings), shard, store
    finally:
        await router.close()
        await server.stop(None)


async def test_open_session(grpc_shards: tuple[GrpcShards, _Shard, MemoryControlStore]) -> None:
    shards, _, _ = grpc_shards
    assert await shards.open_session("alpha", "s-1", create=True) == OpenedSession(7, 4)
    with pytest.raises(SessionError) as raised:
        await shards.open_session("alpha", "s-unknown", create=False)
    assert raised.value.code == pb.UNKNOWN_SESSION


async def test_append_sends_the_batch_with_the_spaces_epoch(
    grpc_shards: tuple[GrpcShards, _Shard, MemoryControlStore],
) -> None:
    shards, shard, store = grpc_shards
    await store.publish_owners(0, {"alpha": 3})
    await shards.router.refresh()
    batch = pb.ObservationBatch(dim=2, vectors=bytes(range(8)), ids=["a"], contents=["x"])
    stream = await shards.open_append("alpha", "s-1")
    answers = stream.responses()
    for seq in (1, 2):
        await stream.write(seq, batch)
        assert (await anext(answers)).sequence_number == seq
    assert shard.appended == [
        ipb.AppendRequest(
            memory_space_id="alpha", session_id="s-1", sequence_number=seq, batch=batch, epoch=3
        )
        for seq in (1, 2)
    ]

    await stream.write(99, batch)  # the shard fails the stream
    with pytest.raises(UnavailableError, match="the shard stream failed: INTERNAL boom"):
        await anext(answers)
    with pytest.raises(UnavailableError, match="writing to the shard failed"):
        await stream.write(100, batch)


async def test_a_cancelled_append_stream_just_ends(
    grpc_shards: tuple[GrpcShards, _Shard, MemoryControlStore],
) -> None:
    shards, _, _ = grpc_shards
    stream = await shards.open_append("alpha", "s-1")
    reader = asyncio.create_task(anext(stream.responses(), None))
    await asyncio.sleep(0.05)
    stream.cancel()
    assert await asyncio.wait_for(reader, 5) is None


async def test_recall_and_scan(grpc_shards: tuple[GrpcShards, _Shard, MemoryControlStore]) -> None:
    shards, _, _ = grpc_shards
    req = pb.RecallRequest(request_id="r1", cue=[1.0], k=1)
    chunks = [c async for c in shards.recall("alpha", req, session_id="s-1")]
    assert [(c.request_id, c.more_results) for c in chunks] == [("r1", True), ("s-1", False)]
    shards.moved_wait_s = 0.1  # a NOT_OWNER is followed for a while, then raised
    with pytest.raises(NotOwnerError, match="moved to shard 1"):
        _ = [c async for c in shards.recall("moved", req)]
    listed = [c async for c in shards.scan("alpha", chunk_size=1)]
    assert [list(c.ids) for c in listed] == [["o0"], ["o1"], ["o2"]]


class _RecallPort(shard_pb2_grpc.ShardServicer):
    """A shard's recall port: serves Recall only."""

    async def Recall(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        yield pb.RecallResponse(request_id="from-the-recall-port")


async def test_recalls_go_to_the_shards_recall_port_when_it_has_one(
    grpc_shards: tuple[GrpcShards, _Shard, MemoryControlStore],
) -> None:
    shards, _, store = grpc_shards
    port = grpc.aio.server()
    shard_pb2_grpc.add_ShardServicer_to_server(_RecallPort(), port)
    recall_address = f"127.0.0.1:{port.add_insecure_port('127.0.0.1:0')}"
    await port.start()
    try:
        main = (await store.shards())[0].address
        await store.heartbeat(0, main, ttl_s=30, recall_address=recall_address)
        await shards.router.refresh()
        req = pb.RecallRequest(request_id="r1", cue=[1.0], k=1)
        chunks = [c async for c in shards.recall("alpha", req)]
        assert [c.request_id for c in chunks] == ["from-the-recall-port"]
        listed = [c async for c in shards.scan("alpha")]  # everything else: the main port
        assert [list(c.ids) for c in listed] == [["o0"], ["o1"], ["o2"]]
        await store.heartbeat(0, main, ttl_s=30)  # restarted without one: the main port
        await shards.router.refresh()
        chunks = [c async for c in shards.recall("alpha", req, session_id="s-1")]
        assert [c.request_id for c in chunks] == ["r1", "s-1"]
    finally:
        await port.stop(None)


async def test_an_unreachable_shard_is_unavailable(
    grpc_shards: tuple[GrpcShards, _Shard, MemoryControlStore],
) -> None:
    shards, _, store = grpc_shards
    await store.heartbeat(0, "127.0.0.1:1", ttl_s=30)  # nothing listens there
    await shards.router.refresh()
    req = pb.RecallRequest(request_id="r1", cue=[1.0], k=1, deadline_ms=100)
    with pytest.raises(UnavailableError, match="the shard of memory space 'alpha' did not answer"):
        _ = [c async for c in shards.recall("alpha", req)]
    with pytest.raises(UnavailableError, match="did not answer: UNAVAILABLE"):
        await shards.open_session("alpha", "s-1", create=True, timeout_s=1)

    settings = load({"ENGRAM_SHARD_COUNT": "1"})
    unregistered = Router(settings, MemoryControlStore(shard_count=1))
    with pytest.raises(UnavailableError, match="shard 0 .* has not registered"):
        await GrpcShards(unregistered, settings).open_session("alpha", "s-1", create=True)
