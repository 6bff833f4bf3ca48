"""control.moves.shard_stats asks every shard at once, so a hung shard costs one timeout per
look, not one per shard: each fake shard here answers only once all of them have been asked."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from engram.control import moves
from engram.internal.v1 import shard_pb2 as ipb
from engram.internal.v1 import shard_pb2_grpc


class _Barrier(shard_pb2_grpc.ShardServicer):
    def __init__(self, parties: int) -> None:
        self.parties = parties
        self.arrived = 0
        self.all_asked = asyncio.Event()

    async def Stats(self, request: ipb.StatsRequest, context: object) -> ipb.StatsResponse:
        self.arrived += 1
        if self.arrived == self.parties:
            self.all_asked.set()
        await self.all_asked.wait()
        return ipb.StatsResponse()


@contextlib.asynccontextmanager
async def _shard(parties: int) -> AsyncIterator[str]:
    """The address of a fake shard whose Stats answers once ``parties`` calls arrived."""
    server = grpc.aio.server()
    shard_pb2_grpc.add_ShardServicer_to_server(_Barrier(parties), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def test_every_shard_is_asked_before_any_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(moves, "STATS_TIMEOUT_S", 5.0)
    async with _shard(parties=3) as address:
        stats = await moves.shard_stats({2: address, 0: address, 1: address})
    assert sorted(stats) == [0, 1, 2]


async def test_a_shard_that_does_not_answer_is_left_out() -> None:
    async with _shard(parties=1) as address:
        stats = await moves.shard_stats({0: address, 1: "127.0.0.1:1"})
    assert list(stats) == [0]
