"""Live moves on a real local cluster: writes go on, nothing is lost or stored twice.

* a space moved back and forth while two streams write to it keeps every acknowledged
  observation exactly once, and its epoch rises by one a move;
* ``engram move`` and ``engram status --json`` (owner, epoch, the move in progress);
* bad requests (unknown space or shard, the shard that already owns it, a second move at
  once) change nothing; a cancelled move leaves the space where it was, writable;
* after Redis lost everything, the shards rebuild the routing table: the space's old shard,
  its default by hash, does not take it back.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from types import ModuleType

import pytest

from engram.contract.errors import EngramError
from engram.control.assignment import default_shard
from engram.control.moves import MoveRefused, cancel_move, move_space
from engram.control.store import ControlStore
from engram_client import EngramClient

ENV = {"ENGRAM_CHECKPOINT_EVERY": "2000", "ENGRAM_CHECKPOINT_INTERVAL_S": "1"}


async def test_moves_back_and_forth_under_writes(make_cluster, mv: ModuleType) -> None:
    cluster = make_cluster(shards=2, env=ENV)
    space = "moving-space"
    async with EngramClient(cluster.gateway_address) as client:
        writers = [await mv.Writer(client, space, f"w{i}").start() for i in range(2)]
        await asyncio.sleep(1.0)
        epochs, pauses = [], []
        for _ in range(6):
            owner, epoch = await mv.settled(cluster, space)
            result = await move_space(mv.addresses(cluster), space, 1 - owner)
            assert (result.source, result.target) == (owner, 1 - owner)
            epochs.append(result.epoch)
            pauses.append(result.pause_ms)
            await asyncio.sleep(0.3)
        acked = [i for w in writers for i in await w.stop()]
        assert not [e for w in writers for e in w.failed]
        await mv.check_space(client, space, acked, [i for w in writers for i in w.sent])
    assert epochs == [1, 2, 3, 4, 5, 6]
    assert len(acked) > 0 and max(pauses) < 5000
    print(f"\n{len(acked)} observations acked; write pauses (ms): {[round(p) for p in pauses]}")


async def test_cli_move_and_status(make_cluster, mv: ModuleType) -> None:
    cluster = make_cluster(shards=2, env=ENV)
    space = "cli-space"
    async with EngramClient(cluster.gateway_address) as client:
        writer = await mv.Writer(client, space, "c").start()
        await asyncio.sleep(0.5)
        owner, _ = await mv.settled(cluster, space)
        target = 1 - owner
        run = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "engram.cli", "move", space, "--to", f"shard-{target}",
             "--data-dir", str(cluster.data_dir)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        assert f"moved {space} from shard-{owner} to shard-{target}" in run.stdout
        assert "write pause" in run.stdout
        status = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "engram.cli", "status", "--json", "--data-dir",
             str(cluster.data_dir)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        entry = json.loads(status.stdout)["spaces"][space]
        assert (entry["owner"], entry["epoch"], entry["state"]) == (f"shard-{target}", 1, "owned")
        acked = await writer.stop()
        await mv.check_space(client, space, acked, writer.sent)


async def test_bad_requests_change_nothing(make_cluster, mv: ModuleType, tmp_path) -> None:
    faults = mv.fault_files(tmp_path / "faults", 2)
    cluster = make_cluster(
        shards=2, env=ENV, shard_env={i: {"ENGRAM_FAULT_FILE": str(p)} for i, p in faults.items()}
    )
    addresses = mv.addresses(cluster)
    space = "stay-space"
    async with EngramClient(cluster.gateway_address) as client:
        writer = await mv.Writer(client, space, "s").start()
        await asyncio.sleep(0.5)
        owner, epoch = await mv.settled(cluster, space)
        with pytest.raises(MoveRefused, match="no shard holds a memory space 'no-such-space'"):
            await move_space(addresses, "no-such-space", 1 - owner)
        with pytest.raises(MoveRefused, match="there is no shard-7"):
            await move_space(addresses, space, 7)
        with pytest.raises(MoveRefused, match=f"already on shard-{owner}"):
            await move_space(addresses, space, owner)
        with pytest.raises(MoveRefused, match="is not moving"):
            await cancel_move(addresses, space)

        await mv.held(faults[1 - owner], "catching_up")
        first = asyncio.create_task(move_space(addresses, space, 1 - owner))
        await mv.wait_phase(cluster, space, "catching_up")
        with pytest.raises(MoveRefused, match="already moving"):
            await move_space(addresses, space, 1 - owner)
        assert await cancel_move(addresses, space) == 1 - owner
        mv.hold(faults[1 - owner], "")
        with pytest.raises(EngramError, match="cancelled"):
            await first
        assert await mv.settled(cluster, space) == (owner, epoch)
        await asyncio.sleep(0.5)  # writes go on where they were
        acked = await writer.stop()
        await mv.check_space(client, space, acked, writer.sent)


async def test_redis_loss_keeps_one_owner(make_cluster, mv: ModuleType) -> None:
    cluster = make_cluster(shards=2, env=ENV)
    space = next(f"r-{i}" for i in range(100) if default_shard(f"r-{i}", 2) == 0)
    async with EngramClient(cluster.gateway_address) as client:
        writer = await mv.Writer(client, space, "r").start()
        await asyncio.sleep(0.5)
        await move_space(mv.addresses(cluster), space, 1)  # off its default shard
        cluster.kill("redis")  # restarts empty: routing would fall back to the hash (shard 0)
        await asyncio.to_thread(cluster.wait_healthy, "redis", 30)
        store = ControlStore(cluster.redis_url, shard_count=2)
        try:
            for _ in range(100):
                table = await store.assignment()
                if table.complete:
                    break
                await asyncio.sleep(0.1)
            assert (table.owner(space), table.space_epoch(space)) == (1, 1)
        finally:
            await store.close()
        assert await mv.settled(cluster, space) == (1, 1)
        await asyncio.sleep(1.0)
        acked = await writer.stop()
        await mv.check_space(client, space, acked, writer.sent)
        # the old shard keeps a tombstone: it never serves the space again
        seen = await mv.owners(cluster, space)
        assert [c[0] for c in seen["claims"]] == [1]


async def test_a_move_outlives_its_caller(make_cluster, mv: ModuleType, tmp_path) -> None:
    faults = mv.fault_files(tmp_path / "faults", 2)
    cluster = make_cluster(
        shards=2, env=ENV, shard_env={i: {"ENGRAM_FAULT_FILE": str(p)} for i, p in faults.items()}
    )
    space = "orphan-space"
    async with EngramClient(cluster.gateway_address) as client:
        writer = await mv.Writer(client, space, "o").start()
        await asyncio.sleep(0.5)
        owner, epoch = await mv.settled(cluster, space)
        await mv.held(faults[1 - owner], "catching_up")
        caller = asyncio.create_task(move_space(mv.addresses(cluster), space, 1 - owner))
        await mv.wait_phase(cluster, space, "catching_up")
        caller.cancel()  # the caller goes away (Ctrl-C on engram move)
        await asyncio.gather(caller, return_exceptions=True)
        mv.hold(faults[1 - owner], "")
        assert await mv.settled(cluster, space) == (1 - owner, epoch + 1)
        acked = await writer.stop()
        await mv.check_space(client, space, acked, writer.sent)
