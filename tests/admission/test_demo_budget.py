"""Acceptance: ``engram demo`` through a cluster whose shards have a 64 MB memory budget.

The scenario of ``engram up --memory-budget 64MB`` followed by
``engram demo --spaces 3 --count 60000 --dim 384 --verify``: 92 MB of vectors, more than a
shard may hold un-indexed, so the demo must go through backpressure (pushed statuses, batches
refused and resent) and still finish with every acknowledged observation stored exactly once.
The shards' memory gauges are sampled meanwhile and must stay within the budget.
"""

from __future__ import annotations

import asyncio
import re
import sys

BUDGET = 64 << 20
TIMEOUT_S = 240


async def test_demo_goes_through_backpressure_and_verifies(make_cluster, scrape) -> None:
    cluster = make_cluster(shards=2, env={"ENGRAM_MEMORY_BUDGET": "64MB"})
    ports = [cluster.shard_http_port(i) for i in range(2)]
    peak = [0.0, 0.0]
    budgets: set[float] = set()
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            for i, port in enumerate(ports):
                m = await scrape(port)
                peak[i] = max(peak[i], m.total("engram_shard_memory_bytes"))
                budgets.add(m.total("engram_shard_memory_budget_bytes"))
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engram.cli",
        "demo",
        "--spaces",
        "3",
        "--count",
        "60000",
        "--dim",
        "384",
        "--verify",
        "--target",
        cluster.gateway_address,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out_bytes, _ = await asyncio.wait_for(proc.communicate(), TIMEOUT_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        done.set()
        await sampler
    out = out_bytes.decode(errors="replace")
    print(out)
    print(f"peak un-indexed memory per shard: {[f'{p / 2**20:.1f} MiB' for p in peak]}")

    assert proc.returncode == 0, out
    assert "verify OK" in out, out
    assert re.search(r"verify OK: lost 0, duplicated 0", out), out
    for space in ("demo-0", "demo-1", "demo-2"):
        assert re.search(rf"{space}: acked 20,000, stored 20,000 of this run, lost 0", out), out

    pressured = re.findall(r"status (BACKPRESSURE|OVERLOADED)", out)
    resent = re.search(r"rejected and resent: (\d+)", out)
    assert resent is not None, out
    assert pressured or int(resent.group(1)) > 0, "the demo never met backpressure"
    assert re.search(r"failed batches: 0; failed streams: 0", out), out

    assert budgets == {float(BUDGET)}
    assert max(peak) <= BUDGET
