"""A closed space gives its share of the shard's memory budget back (a space moved away must
not leave its un-indexed rows counted, or the shard refuses writes it has room for)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from engram.common.settings import AdmissionSettings, IndexSettings, LimitSettings, WalSettings
from engram.shard.admission import AdmissionController
from engram.shard.space import Space
from engram.v1 import streaming_pb2 as pb


async def test_closing_a_space_releases_its_unindexed_bytes(tmp_path: Path) -> None:
    admission = AdmissionController(AdmissionSettings(memory_budget_bytes=1 << 30))
    space = Space(
        "moved-away",
        tmp_path / "moved-away",
        wal=WalSettings(),
        index=IndexSettings(),
        limits=LimitSettings(),
        admission=admission,
    )
    space.recover()
    space.start(asyncio.get_running_loop())
    try:
        await space.open_session("s", create=True)
        vectors = np.random.default_rng(0).standard_normal((100, 8)).astype("<f4")
        await space.begin_append("s", 1, pb.ObservationBatch(dim=8, vectors=vectors.tobytes()))
        assert admission.unindexed_bytes == 100 * 8 * 4
    finally:
        await space.close()
    assert admission.unindexed_bytes == 0
