"""ENGRAM_WAL_DIR: each shard's WALs on a volume of their own, through restarts and moves."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from types import ModuleType

from engram.control.moves import move_space
from engram_client import EngramClient


async def test_wals_live_in_their_own_directory(make_cluster, mv: ModuleType, tmp_path) -> None:
    wal_dirs = {i: tmp_path / f"wal-{i}" for i in range(2)}
    cluster = make_cluster(
        shards=2, shard_env={i: {"ENGRAM_WAL_DIR": str(d)} for i, d in wal_dirs.items()}
    )
    space = "wal-dir-space"
    async with EngramClient(cluster.gateway_address) as client:
        writer = await mv.Writer(client, space, "w").start()
        await asyncio.sleep(0.5)
        owner, _ = await mv.settled(cluster, space)

        def segments(i: int) -> list[Path]:
            return sorted((wal_dirs[i] / space).glob("wal-*.log"))

        assert segments(owner), "the WAL is not in ENGRAM_WAL_DIR"
        data = cluster.shard_data_dir(owner) / "spaces" / space
        assert not (data / "wal").exists(), "a WAL was written under the data directory"

        pid = cluster.kill(f"shard-{owner}", signal.SIGKILL)  # recovery reads it from there
        await asyncio.to_thread(cluster.wait_healthy, f"shard-{owner}", 60)
        assert cluster.pid(f"shard-{owner}") != pid
        await move_space(mv.addresses(cluster), space, 1 - owner)
        assert segments(1 - owner) and not (wal_dirs[owner] / space).exists()
        await asyncio.sleep(0.5)
        acked = await writer.stop()
        await mv.check_space(client, space, acked, writer.sent)
