"""A move killed at each of its steps: 0 lost, 0 duplicated, exactly one owner afterwards.

The target is held at a step (its fault file: ``hold_move_at``) while a stream writes to the
space; then one process is killed with SIGKILL (the source, the target, the gateway) or Redis
is (it restarts empty), the hold is lifted, and the cluster must settle on exactly one owner
with every acknowledged observation readable once. Before the commit the space stays on the
source; from the commit on it is the target's.

``make test-moves`` runs every step against every victim (16 cases, a few minutes);
``make test`` runs four of them, each step and each victim once.
"""

from __future__ import annotations

import asyncio
import os
import signal
from types import ModuleType

import pytest

from engram.contract.errors import EngramError
from engram.control.moves import MoveResult, move_space
from engram_client import EngramClient

STEPS = ("copying", "catching_up", "fenced", "committed")
VICTIMS = ("source", "target", "gateway", "redis")
FULL = os.environ.get("ENGRAM_MOVE_MATRIX") == "full"
CASES = (
    [(s, v) for s in STEPS for v in VICTIMS]
    if FULL
    else [("copying", "target"), ("catching_up", "gateway"), ("fenced", "source"),
          ("committed", "redis")]
)  # fmt: skip
ENV = {"ENGRAM_CHECKPOINT_EVERY": "2000", "ENGRAM_CHECKPOINT_INTERVAL_S": "1"}


@pytest.mark.parametrize(("step", "victim"), CASES)
async def test_kill_during_a_move(
    make_cluster, mv: ModuleType, tmp_path, step: str, victim: str
) -> None:
    faults = mv.fault_files(tmp_path / "faults", 2)
    cluster = make_cluster(
        shards=2, env=ENV, shard_env={i: {"ENGRAM_FAULT_FILE": str(p)} for i, p in faults.items()}
    )
    space = f"kill-{step.replace('_', '-')}-{victim}"
    async with EngramClient(cluster.gateway_address) as client:
        writer = await mv.Writer(client, space, "k").start()
        await asyncio.sleep(1.0)
        source, epoch = await mv.settled(cluster, space)
        target = 1 - source
        await mv.held(faults[target], step)
        move = asyncio.create_task(move_space(mv.addresses(cluster), space, target))
        try:
            await mv.wait_phase(cluster, space, step)
        except AssertionError:
            if move.done():
                raise AssertionError(f"the move ended before {step}: {move.result()}") from None
            raise
        name = {"source": f"shard-{source}", "target": f"shard-{target}"}.get(victim, victim)
        old_pid = cluster.kill(name, signal.SIGKILL)
        mv.hold(faults[target], "")
        try:
            outcome: MoveResult | EngramError = await asyncio.wait_for(move, 120)
        except EngramError as exc:
            outcome = exc
        await asyncio.to_thread(cluster.wait_healthy, name, 60)
        assert cluster.pid(name) != old_pid
        owner, new_epoch = await mv.settled(cluster, space, within_s=90)
        await asyncio.sleep(1.0)  # writes go on at the owner
        acked = await writer.stop()
        assert not writer.failed, writer.failed[:3]
        await mv.check_space(client, space, acked, writer.sent)
    committed = step == "committed" or victim in ("gateway", "redis")
    expected = (target, epoch + 1) if committed else (source, epoch)
    print(f"\n{step:>12} / {victim:<7}: move -> {type(outcome).__name__}; owner shard-{owner} "
          f"epoch {new_epoch}; {len(acked)} acked, 0 lost, 0 duplicated")  # fmt: skip
    assert (owner, new_epoch) == expected, outcome
