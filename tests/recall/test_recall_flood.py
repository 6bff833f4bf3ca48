"""A flood of recalls beside a writing stream: refused explicitly, never at the writes' cost.

A one-shard cluster holds at most 2 recalls for its workers (``ENGRAM_RECALL_QUEUE=2``).
Several clients fire recalls in concurrent bursts, standalone and on a stream, while another
stream writes. Every recall is answered or refused OVERLOADED with a retry-after (the flood
must cause refusals); every batch is acknowledged and every row is listed afterwards.
"""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from engram.contract.errors import OverloadedError
from engram.launcher.cluster import LocalCluster
from engram_client import EngramClient

CLUSTER_SHARDS = 1
CLUSTER_ENV = {"ENGRAM_RECALL_QUEUE": "2"}
DIM = 32
BATCHES, ROWS = 40, 250
FLOODERS, BURST = 4, 24


class Tally:
    def __init__(self) -> None:
        self.answered = 0
        self.refused: list[OverloadedError] = []


async def _flood(client: EngramClient, space: str, done: asyncio.Event, tally: Tally) -> None:
    """Bursts of concurrent standalone recalls until the writer is done."""
    rng = np.random.default_rng()

    async def one() -> None:
        try:
            await client.recall(space, rng.standard_normal(DIM), 5, consistency="EVENTUAL")
            tally.answered += 1
        except OverloadedError as exc:
            tally.refused.append(exc)

    while not done.is_set():
        await asyncio.gather(*(one() for _ in range(BURST)))


async def _flood_on_stream(client: EngramClient, space: str, done: asyncio.Event, tally: Tally):
    """The same on a stream's in-band recalls."""
    stream = await client.open_stream(space)
    rng = np.random.default_rng()

    async def one() -> None:
        try:
            await stream.recall(rng.standard_normal(DIM), 5, consistency="EVENTUAL")
            tally.answered += 1
        except OverloadedError as exc:
            tally.refused.append(exc)

    try:
        while not done.is_set():
            await asyncio.gather(*(one() for _ in range(BURST)))
    finally:
        await stream.close()


@pytest.mark.timeout(300)
async def test_recall_flood_is_refused_with_retry_after_and_loses_no_write(
    shared_cluster: LocalCluster, space_id: str
) -> None:
    rng = np.random.default_rng(7)
    address = shared_cluster.gateway_address
    async with EngramClient(address) as writer_client:
        writer = await writer_client.open_stream(space_id)
        first = await writer.send(
            rng.standard_normal((ROWS, DIM)), ids=[f"w0-{i}" for i in range(ROWS)]
        )
        await first  # the space exists before the flood starts
        done = asyncio.Event()
        tally = Tally()
        clients = [EngramClient(address) for _ in range(FLOODERS)]
        try:
            floods = [asyncio.create_task(_flood(c, space_id, done, tally)) for c in clients[:-1]]
            floods.append(asyncio.create_task(_flood_on_stream(clients[-1], space_id, done, tally)))
            acks = []
            for b in range(1, BATCHES):
                ids = [f"w{b}-{i}" for i in range(ROWS)]
                acks.append(await writer.send(rng.standard_normal((ROWS, DIM)), ids=ids))
            settled = await asyncio.gather(*acks, return_exceptions=True)
            done.set()
            await asyncio.gather(*floods)
        finally:
            done.set()
            for c in clients:
                await c.close()
        await writer.close()
        failed = [a for a in settled if isinstance(a, BaseException)]
        assert not failed, f"{len(failed)} batches failed, e.g. {failed[0]!r}"
        listed = set(await writer_client.list_ids(space_id))
    assert len(listed) == BATCHES * ROWS  # every acknowledged row is there
    assert tally.refused, f"{tally.answered} recalls answered and none refused"
    assert tally.answered > 0
    for exc in tally.refused:
        assert exc.retry_after_ms > 0, exc
        assert "ENGRAM_RECALL_QUEUE" in exc.message, exc
