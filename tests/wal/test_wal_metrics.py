"""The WAL's group-commit metrics: one fsync time and one group size observed per round."""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client import REGISTRY

from engram.shard.wal import Wal


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_each_round_records_its_fsync_and_group_size(tmp_path: Path) -> None:
    fsyncs = _sample("engram_shard_wal_fsync_seconds_count")
    rounds = _sample("engram_shard_wal_group_records_count")
    records = _sample("engram_shard_wal_group_records_sum")
    wal = Wal(tmp_path)
    list(wal.replay())
    wal.start()
    try:
        await asyncio.gather(*(wal.append(b"x" * 100, lsn) for lsn in range(1, 51)))
        await wal.append(b"y", 51)
    finally:
        await wal.close()

    new_fsyncs = _sample("engram_shard_wal_fsync_seconds_count") - fsyncs
    assert new_fsyncs == wal.fsync_count >= 2  # the last append is a round of its own
    assert _sample("engram_shard_wal_group_records_count") - rounds == wal.fsync_count
    assert _sample("engram_shard_wal_group_records_sum") - records == 51
    assert _sample("engram_shard_wal_fsync_seconds_sum") > 0
