"""The Python client's delete, drop_space, set_retention and stream.delete, over real gRPC to
the gateway's service in this process, which runs against the in-memory shard."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from engram.gateway.context import GatewayContext
from engram.gateway.service import EngramStreamService, handler
from engram_client import EngramClient, Retention
from engram_client.errors import ValidationError

from .conftest import FakeShard


@pytest.fixture
async def client(gateway: GatewayContext) -> AsyncIterator[EngramClient]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler(EngramStreamService(gateway)),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with EngramClient(f"127.0.0.1:{port}") as c:
        yield c
    await server.stop(None)


def _vectors(n: int) -> np.ndarray:
    return np.eye(n, 4, dtype=np.float32) + 0.1


async def test_a_stream_deletes_what_it_has_just_sent(client: EngramClient, fake_shard: FakeShard):
    stream = await client.open_stream("alpha")
    fake_shard.hold()
    ack = await stream.send(_vectors(2), ids=["keep", "gone"])  # sent, not yet durable
    deleting = asyncio.ensure_future(stream.delete(ids=["gone"]))
    await asyncio.sleep(0.05)
    assert not deleting.done() and fake_shard.deletes == []
    fake_shard.release()
    await ack
    result = await deleting
    assert (result.deleted, result.not_found, result.lsn) == (1, 0, 2)
    assert result.request_id.startswith("d") and result.committed_at_us > 0
    assert await client.list_ids("alpha") == ["keep"]
    await stream.close()


async def test_unary_delete_drop_and_retention(client: EngramClient, fake_shard: FakeShard):
    fake_shard.store("alpha", ["a", "b", "c"], [100, 200, 300])
    result = await client.delete("alpha", ["a", "x"], since_us=250, request_id="mine")
    assert (result.request_id, result.deleted, result.not_found) == ("mine", 2, 1)
    assert await client.list_ids("alpha") == ["b"]

    assert await client.set_retention("alpha", max_age_s=3600) == Retention(3600, 0)
    assert await client.set_retention("alpha") == Retention(0, 0)
    assert await client.drop_space("alpha") == 1
    assert await client.drop_space("alpha") == 0


async def test_refusals_are_typed(client: EngramClient, fake_shard: FakeShard):
    with pytest.raises(ValueError, match="names ids, or a time range"):
        await client.delete("alpha")
    with pytest.raises(TypeError, match="not one string"):
        await client.delete("alpha", "a")  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match="holds no time"):
        await client.delete("alpha", since_us=5, until_us=5)

    stream = await client.open_stream("alpha")
    with pytest.raises(ValidationError, match="ids\\[0\\] is empty"):
        await stream.delete(ids=[""])
    ack = await (await stream.send(_vectors(1), ids=["z"]))  # the stream goes on
    assert ack.count == 1
    assert (await stream.delete(ids=["z"])).deleted == 1
    await stream.close()
