"""The shard's per-space metrics move with what they describe.

* ``engram_shard_wal_failures_total`` counts each time a space's WAL fails and it starts
  refusing writes (once per failure, not once per batch refused while it recovers);
* ``engram_shard_checkpoint_age_seconds`` (through ``Space.checkpoint_age``): positive while
  rows wait for a checkpoint, 0 once a checkpoint covers every row.
"""

from __future__ import annotations

import asyncio
import time
from types import ModuleType
from typing import Any

import pytest
from prometheus_client import REGISTRY

from engram.common.settings import IndexSettings
from engram.contract.errors import StorageError
from engram.shard.wal import WalFaults

FAST_INDEX = IndexSettings(m=8, ef_construction=40, build_threads=1)


def _failures(space: str) -> float:
    value = REGISTRY.get_sample_value("engram_shard_wal_failures_total", {"memory_space": space})
    return value or 0.0


async def test_a_wal_failure_is_counted_once(harness: Any, ledger: Any, kit: ModuleType) -> None:
    faults = WalFaults()
    space = harness.space("metrics-wal-failure", faults=faults)
    await space.open_session("a", create=True)
    ledger.open("a")
    await ledger.append(space, "a", 1, 4)
    before = _failures(space.name)

    faults.fail_fsync = 1
    with pytest.raises(StorageError):
        await space.begin_append("a", 2, ledger.batch("a", 2, 3).batch)
    retry = ledger.batch("a", 2, 3)
    ledger.record(retry, await kit.retry_append(space, "a", 2, retry.batch))

    assert _failures(space.name) == before + 1
    ledger.check(space)


async def test_checkpoint_age_rises_until_a_checkpoint_covers_every_row(
    harness: Any, ledger: Any
) -> None:
    space = harness.space("metrics-checkpoint-age", index=FAST_INDEX)
    assert space.checkpoint_age(time.time()) == 0.0  # nothing to cover yet
    await space.open_session("a", create=True)
    ledger.open("a")
    await ledger.append(space, "a", 1, 20)

    later = time.time() + 30
    assert space.checkpoint_age(later) >= 30
    space.index_step(100_000)
    await asyncio.to_thread(space.checkpoint)
    assert space.checkpoint_age(later) == 0.0

    await ledger.append(space, "a", 2, 5)  # new rows wait for the next checkpoint
    age = space.checkpoint_age(later)
    assert 0 < age <= 30 + 1
