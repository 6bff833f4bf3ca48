"""Helpers of the move suites, reached through the ``mv`` fixture (this module).

* :class:`Writer`: streams batches of unique ids into a space through the real client and
  records what was acknowledged; ``await writer.stop()`` returns the acknowledged ids.
* :func:`owners`: what every shard reports of a space (claims, moves in progress).
* :func:`settled`: waits until exactly one shard claims the space and no move is in progress.
* :func:`check_space`: every acknowledged id is readable, exactly once, and nothing else is.
* :func:`hold`: holds moves into a shard at a phase (the shard's fault file).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from engram.control.moves import shard_stats
from engram.launcher.cluster import LocalCluster
from engram.shard.faults import SETTLE_S
from engram_client import EngramClient

DIM = 16
BATCH = 50


class Writer:
    """One stream writing batches of unique ids as fast as acks come back (a short pause
    between batches keeps the CPU for the rest of the test)."""

    def __init__(self, client: EngramClient, space: str, tag: str, pause_s: float = 0.01) -> None:
        self.client = client
        self.space = space
        self.tag = tag
        self.pause_s = pause_s
        self.sent: list[str] = []
        self.acked: list[str] = []
        self.failed: list[BaseException] = []
        self.ack_latency: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> Writer:
        self.stream = await self.client.open_stream(self.space)
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        rng = np.random.default_rng(abs(hash(self.tag)) % (1 << 32))
        pending: list[asyncio.Task[None]] = []
        n = 0
        while not self._stop.is_set():
            ids = [f"{self.tag}-{n}-{i}" for i in range(BATCH)]
            n += 1
            self.sent += ids
            started = time.perf_counter()
            fut = await self.stream.send(rng.standard_normal((BATCH, DIM)), ids=ids)
            pending.append(asyncio.create_task(self._settle(fut, ids, started)))
            await asyncio.sleep(self.pause_s)
        await asyncio.gather(*pending)

    async def _settle(self, fut: asyncio.Future[Any], ids: list[str], started: float) -> None:
        try:
            await fut
        except Exception as exc:
            self.failed.append(exc)
            return
        self.ack_latency.append(time.perf_counter() - started)
        self.acked += ids

    async def stop(self) -> list[str]:
        self._stop.set()
        assert self._task is not None
        await self._task
        await self.stream.close()
        return self.acked


def addresses(cluster: LocalCluster) -> dict[int, str]:
    return {i: cluster.shard_address(i) for i in range(cluster.shards)}


async def owners(cluster: LocalCluster, space: str) -> dict[str, list[tuple[int, Any]]]:
    """{"claims": [(shard, epoch, state)], "moving": [(shard, phase)]} for ``space``."""
    stats = await shard_stats(addresses(cluster))
    claims, moving = [], []
    for shard, reply in stats.items():
        for s in reply.spaces:
            if s.memory_space_id != space:
                continue
            if s.state == "incoming":
                moving.append((shard, s.move_phase))
            else:
                claims.append((shard, s.epoch, s.state))
    return {"claims": claims, "moving": moving, "up": sorted(stats)}


async def settled(cluster: LocalCluster, space: str, within_s: float = 60.0) -> tuple[int, int]:
    """Waits until every shard answers, exactly one claims ``space`` (owned, not fenced) and
    no move is in progress; returns (owner, epoch)."""
    deadline = time.monotonic() + within_s
    seen: Any = None
    while time.monotonic() < deadline:
        seen = await owners(cluster, space)
        claims = seen["claims"]
        if (
            len(seen["up"]) == cluster.shards
            and not seen["moving"]
            and len(claims) == 1
            and claims[0][2] == "owned"
        ):
            return claims[0][0], claims[0][1]
        await asyncio.sleep(0.2)
    raise AssertionError(f"{space} did not settle on one owner within {within_s} s: {seen}")


async def wait_phase(cluster: LocalCluster, space: str, phase: str, within_s: float = 60.0) -> int:
    """Waits until a move of ``space`` is at ``phase`` on its target; returns the target."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        seen = await owners(cluster, space)
        for shard, at in seen["moving"]:
            if at == phase:
                return shard
        await asyncio.sleep(0.02)
    raise AssertionError(f"no move of {space} reached {phase} within {within_s} s")


async def check_space(client: EngramClient, space: str, acked: list[str], sent: list[str]) -> None:
    """Every acknowledged id is stored exactly once; nothing stored was never sent."""
    ids = await client.list_ids(space)
    dups = len(ids) - len(set(ids))
    lost = set(acked) - set(ids)
    phantom = set(ids) - set(sent)
    assert (dups, len(lost), len(phantom)) == (0, 0, 0), (
        f"duplicated {dups}, lost {sorted(lost)[:5]}.. ({len(lost)}), phantom {len(phantom)}"
    )


def fault_files(root: Path, shards: int) -> dict[int, Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = {i: root / f"shard-{i}.json" for i in range(shards)}
    for path in files.values():
        path.write_text("{}")
    return files


def hold(path: Path, phase: str) -> None:
    """Moves into the shard of this fault file wait at ``phase`` ("": none); the file is
    replaced, so the shard sees the change (give it ``SETTLE_S``, see :func:`held`)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"hold_move_at": phase} if phase else {}))
    os.replace(tmp, path)


async def held(path: Path, phase: str) -> None:
    """:func:`hold`, then waits until the shard has surely applied it."""
    hold(path, phase)
    await asyncio.sleep(SETTLE_S)


@pytest.fixture
def mv() -> ModuleType:
    return sys.modules[__name__]
