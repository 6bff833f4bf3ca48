"""An extra shard: a shard whose id is beyond ENGRAM_SHARD_COUNT (2 home shards, shard 2).

It starts and registers like any shard and owns no space by default; ``engram move`` moves a
space onto it while a client writes (nothing acknowledged is lost or stored twice), the
gateway routes that space's writes and reads there, and after a restart of the extra shard
the space is still served there.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from types import ModuleType

from engram.control.store import ControlStore
from engram_client import EngramClient

ENV = {"ENGRAM_CHECKPOINT_EVERY": "2000", "ENGRAM_CHECKPOINT_INTERVAL_S": "1"}


async def test_a_space_moved_to_an_extra_shard_is_served_there(
    make_cluster, mv: ModuleType
) -> None:
    cluster = make_cluster(shards=3, home_shards=2, env=ENV)
    assert "shard 2 is beyond ENGRAM_SHARD_COUNT=2: it serves only spaces moved to it" in (
        cluster.log_tail("shard-2", 200)
    )
    store = ControlStore(cluster.redis_url, shard_count=2)
    try:
        registered = await store.shards()
    finally:
        await store.close()
    assert registered[2].address == cluster.shard_address(2)

    space = "to-the-extra-shard"
    async with EngramClient(cluster.gateway_address) as client:
        writer = await mv.Writer(client, space, "a").start()
        await asyncio.sleep(0.5)
        owner, epoch = await mv.settled(cluster, space)
        assert (owner, epoch) != (2, 0) and owner in (0, 1)
        run = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "engram.cli", "move", space, "--to", "shard-2",
             "--data-dir", str(cluster.data_dir)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert f"moved {space} from shard-{owner} to shard-2" in run.stdout
        await asyncio.sleep(0.5)  # the writes go on, now to shard 2
        acked, sent = await writer.stop(), list(writer.sent)
        assert not writer.failed
        assert await mv.settled(cluster, space) == (2, 1)
        await mv.check_space(client, space, acked, sent)  # reads from shard 2

        # a restart of the extra shard: the space is still its own
        await asyncio.to_thread(cluster.stop_process, "shard-2")
        await asyncio.to_thread(cluster.start_process, "shard-2")
        again = await mv.Writer(client, space, "b").start()
        await asyncio.sleep(0.5)
        acked += await again.stop()
        sent += again.sent
        assert not again.failed
        assert await mv.settled(cluster, space) == (2, 1)
        await mv.check_space(client, space, acked, sent)
        assert len(again.acked) > 0
