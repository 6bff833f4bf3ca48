"""The local rebalancer on real clusters: a shard added to existing data is filled, a shard
taken away is drained, with every acknowledged observation still readable once."""

from __future__ import annotations

import asyncio
import threading
from types import ModuleType

from engram.control.rebalance import Policy
from engram.launcher.rebalancer import Rebalancer
from engram_client import EngramClient

SPACES = [f"rb-{i}" for i in range(6)]
FAST = Policy(cluster_cooldown_s=0.0, space_cooldown_s=0.0)


async def _fill(cluster, mv: ModuleType) -> dict[str, tuple[list[str], list[str]]]:
    written = {}
    async with EngramClient(cluster.gateway_address) as client:
        for space in SPACES:
            writer = await mv.Writer(client, space, space, pause_s=0.0).start()
            await asyncio.sleep(0.3)
            written[space] = (await writer.stop(), writer.sent)
    return written


async def _check(cluster, mv: ModuleType, written) -> None:
    async with EngramClient(cluster.gateway_address) as client:
        for space, (acked, sent) in written.items():
            await mv.check_space(client, space, acked, sent)


async def _spaces_per_shard(cluster, mv: ModuleType) -> dict[int, int]:
    counts = dict.fromkeys(range(cluster.shards), 0)
    for space in SPACES:
        owner, _ = await mv.settled(cluster, space)
        counts[owner] += 1
    return counts


async def test_a_shard_added_to_existing_data_is_filled(make_cluster, mv: ModuleType) -> None:
    first = make_cluster(shards=2)
    written = await _fill(first, mv)
    await asyncio.to_thread(first.stop)
    cluster = make_cluster(shards=3, data_dir=first.data_dir)
    assert (await _spaces_per_shard(cluster, mv))[2] == 0  # the spaces stayed where they were
    rebalancer = Rebalancer(
        addresses=lambda: mv.addresses(cluster),
        new={2},
        policy=FAST,
        interval_s=0.3,
        until_balanced=True,
    )
    await asyncio.wait_for(rebalancer.run(threading.Event()), 120)
    counts = await _spaces_per_shard(cluster, mv)
    assert counts[2] >= 1 and rebalancer.moves_done >= 1, counts
    await _check(cluster, mv, written)


async def test_a_draining_shard_is_emptied(make_cluster, mv: ModuleType) -> None:
    cluster = make_cluster(shards=3)
    written = await _fill(cluster, mv)
    before = await _spaces_per_shard(cluster, mv)
    assert before[2] >= 1, before
    rebalancer = Rebalancer(
        addresses=lambda: mv.addresses(cluster), draining={2}, policy=FAST, interval_s=0.3
    )
    for _ in range(40):
        await rebalancer.round()
        if (await _spaces_per_shard(cluster, mv))[2] == 0:
            break
    after = await _spaces_per_shard(cluster, mv)
    assert after[2] == 0 and sum(after.values()) == len(SPACES), after
    await _check(cluster, mv, written)
