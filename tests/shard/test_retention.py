"""Retention of a memory space (engram.shard.retention), in process on a Space.

The setting is durable (a WAL record, then the checkpoint manifest once the WAL holding it is
trimmed) and enforcement deletes through the space's tombstone path: by age (rows older than
``max_age_s`` by their time) and by count (the oldest rows beyond ``max_rows``), a bounded
number of rows per step.
"""

from __future__ import annotations

import asyncio
from types import ModuleType
from typing import Any

import numpy as np

from engram.shard import retention
from engram.shard.retention import Enforcer
from engram.shard.space import Space
from engram.v1 import streaming_pb2 as pb


class _Node:
    """What the enforcer reads of a shard node: its spaces."""

    def __init__(self, *spaces: Space) -> None:
        self.spaces = {s.name: s for s in spaces}


async def _fill(kit: ModuleType, space: Space, n: int, times_us: list[int] | None = None) -> None:
    await space.open_session("s", True)
    batch = kit.make_batch(kit.corpus_vectors(0, n), ids=[f"id-{i}" for i in range(n)])
    if times_us is not None:
        batch.timestamps_us = np.asarray(times_us, "<i8").tobytes()
    await space.begin_append("s", 1, batch)


def _live_ids(space: Space) -> list[str]:
    return [i for ids, _ in space.scan_ids(10_000) for i in ids]


async def test_retention_is_durable_through_restart_and_checkpoint(harness: Any, kit: Any) -> None:
    space = harness.space()
    await _fill(kit, space, 50)
    await retention.set_retention(space, pb.Retention(max_rows=30))
    assert space.retention.max_rows == 30
    space = await harness.restart(space)  # from the WAL record
    assert space.retention == pb.Retention(max_rows=30)
    await retention.set_retention(space, pb.Retention(max_age_s=3600, max_rows=40))
    await asyncio.to_thread(space.index_step, 1000)
    assert await asyncio.to_thread(space.checkpoint) == 50  # the WAL it covers is trimmed
    space = await harness.restart(space)  # from the manifest
    assert space.retention == pb.Retention(max_age_s=3600, max_rows=40)


async def test_max_rows_deletes_the_oldest_rows(harness: Any, kit: Any) -> None:
    space = harness.space()
    await _fill(kit, space, 100)
    await retention.set_retention(space, pb.Retention(max_rows=60))
    enforcer = Enforcer(_Node(space))  # type: ignore[arg-type]
    assert await enforcer.enforce(space) == 40
    assert space.live_count == 60
    assert _live_ids(space) == [f"id-{i}" for i in range(40, 100)]
    assert await enforcer.enforce(space) == 0  # nothing beyond the bound any more
    space = await harness.restart(space)  # the deletes and the setting are durable
    assert _live_ids(space) == [f"id-{i}" for i in range(40, 100)]
    assert space.retention.max_rows == 60


async def test_max_rows_catches_up_over_bounded_steps(
    harness: Any, kit: Any, monkeypatch: Any
) -> None:
    monkeypatch.setattr(retention, "MAX_ROWS_PER_TICK", 16)
    space = harness.space()
    await _fill(kit, space, 100)
    await space.begin_delete(np.arange(50, 60, dtype=np.uint64))  # a user's delete in between
    await retention.set_retention(space, pb.Retention(max_rows=30))
    enforcer = Enforcer(_Node(space))  # type: ignore[arg-type]
    steps = 0
    while space.live_count > 30:
        assert await enforcer.enforce(space) <= 16
        steps += 1
        assert steps < 20
    assert steps > 1
    assert space.live_count == 30
    assert _live_ids(space) == [f"id-{i}" for i in range(70, 100)]


async def test_max_age_deletes_rows_older_than_the_bound(harness: Any, kit: Any) -> None:
    now_us = 1_700_000_000_000_000
    times = [now_us - (100 - i) * 60_000_000 for i in range(100)]  # one a minute, up to now
    space = harness.space()
    await _fill(kit, space, 100, times)
    await retention.set_retention(space, pb.Retention(max_age_s=30 * 60))
    enforcer = Enforcer(_Node(space))  # type: ignore[arg-type]
    assert await enforcer.enforce(space, now_us=now_us) == 70
    assert _live_ids(space) == [f"id-{i}" for i in range(70, 100)]
    assert await enforcer.enforce(space, now_us=now_us) == 0


async def test_enforcer_task_applies_retention_within_a_few_ticks(
    harness: Any, kit: Any, monkeypatch: Any
) -> None:
    monkeypatch.setattr(retention, "TICK_S", 0.05)
    space = harness.space()
    await _fill(kit, space, 64)
    task = asyncio.create_task(Enforcer(_Node(space)).run())  # type: ignore[arg-type]
    try:
        await asyncio.sleep(0.2)
        assert space.live_count == 64  # no retention: nothing deleted
        await retention.set_retention(space, pb.Retention(max_rows=10))
        for _ in range(100):
            if space.live_count == 10:
                break
            await asyncio.sleep(0.05)
        assert _live_ids(space) == [f"id-{i}" for i in range(54, 64)]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
