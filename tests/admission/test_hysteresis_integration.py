"""Pressure levels do not flap under oscillating load (hysteresis and minimum dwell).

One stream writes small batches in bursts into a shard with a small budget and a slow index
builder, and pauses whenever the shard pushes a level above NORMAL, resuming when it pushes
NORMAL again: a client that follows backpressure, so the pressure keeps hovering around the
WARNING threshold for ~10 s, the worst case for flapping. Every level change is pushed to the
stream as a StreamStatus carrying the pressure at that moment. Checked:

* there are level changes (the load does cross the threshold, repeatedly), but far fewer than
  batches (fewer than one per five batches);
* each step down happened only with the pressure below ``hysteresis`` x the threshold left,
  each step up at or above the threshold entered;
* no level was left sooner than (about) ``ENGRAM_PRESSURE_MIN_DWELL_S`` after it was entered.

The dwell is set to 1 s here so that leaving a level early stands out from scheduling delays.
Checked against a shard without them: with ENGRAM_PRESSURE_HYSTERESIS=1.0 and
ENGRAM_PRESSURE_MIN_DWELL_S=0 the same load gives ~140 changes for ~1000 batches, many a few
ms apart, stepping down at 0.4995; with the dwell alone set to 0, levels are left after ~0.2 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

from engram.corpus import Corpus
from engram.v1 import streaming_pb2 as pb
from engram_client import EngramClient, StreamEvent
from engram_client.client import Ack, make_batch

DIM = 384
N = 20  # small batches: many admissions, each moving the pressure a little
RUN_S = 10.0
MAX_PHASE_S = 3.0
DWELL_S = 1.0
HYSTERESIS = 0.9
THRESHOLDS = (0.0, 0.5, 0.8, 0.95)  # NORMAL, WARNING, CRITICAL, OVERLOADED
ENV = {
    "ENGRAM_MEMORY_BUDGET": "8MB",
    "ENGRAM_INDEX_BUILD_CHUNK": "16",
    "ENGRAM_INDEX_BUILD_THREADS": "1",
    "ENGRAM_HNSW_EF_CONSTRUCTION": "200",
    "ENGRAM_PRESSURE_MIN_DWELL_S": str(DWELL_S),
    "ENGRAM_PRESSURE_HYSTERESIS": str(HYSTERESIS),
}
# Pushes of consecutive changes travel the same path (shard -> gateway -> client) in order, so
# their spacing at the client is the shard's, give or take scheduling delays on a busy machine.
DWELL_SLACK_S = 0.4


@dataclass(frozen=True)
class Push:
    at: float
    level: int
    pressure: float


async def test_levels_do_not_flap_under_bursts_and_pauses(make_cluster, scrape) -> None:
    cluster = make_cluster(shards=1, env=ENV)
    pool = Corpus(DIM).vectors(0, 40_000)
    pushes: list[Push] = []
    level = [pb.LEVEL_NORMAL]
    calm = asyncio.Event()  # set while the last pushed level is NORMAL
    calm.set()
    rejections = 0

    def on_event(ev: StreamEvent) -> None:
        nonlocal rejections
        if ev.kind == "status" and ev.status is not None:
            pushes.append(Push(time.monotonic(), ev.status.level, ev.status.pressure))
            level[0] = ev.status.level
            if ev.status.level == pb.LEVEL_NORMAL:
                calm.set()
            else:
                calm.clear()
        elif ev.kind == "rejected":
            rejections += 1

    futures: list[asyncio.Future[Ack]] = []
    bursts = 0
    async with EngramClient(cluster.gateway_address) as client:
        stream = await client.open_stream("hysteresis", on_event=on_event)
        started = time.monotonic()
        n = 0
        while time.monotonic() - started < RUN_S:
            bursts += 1
            until = time.monotonic() + MAX_PHASE_S
            while level[0] == pb.LEVEL_NORMAL and time.monotonic() < until:
                ids = [f"h-{n}-{i}" for i in range(N)]
                lo = (n * N) % (len(pool) - N)
                futures.append(await stream.send_batch(make_batch(pool[lo : lo + N], ids=ids)))
                n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(calm.wait(), MAX_PHASE_S)
        await asyncio.wait_for(stream.flush(), 60)
        await stream.close()
    shard = await scrape(cluster.shard_http_port(0))
    activations = shard.total("engram_streaming_backpressure_activations_total")

    timeline = " ".join(f"{p.at - started:.2f}s:{p.level}({p.pressure:.3f})" for p in pushes)
    print(
        f"\n{n} batches in {bursts} bursts, {len(pushes)} status pushes, {rejections} "
        f"rejections, {activations:.0f} activations; pushes {timeline}"
    )
    assert all(f.done() and f.exception() is None for f in futures)

    # The load crossed the threshold both ways, more than once.
    ups = [b for a, b in zip(pushes, pushes[1:], strict=False) if b.level > a.level]
    downs = [b for a, b in zip(pushes, pushes[1:], strict=False) if b.level < a.level]
    assert pushes and pushes[0].level >= pb.LEVEL_WARNING, "the load must have raised the level"
    assert len(downs) >= 2 and len(ups) >= 1, "the level must have gone down and up again"

    # Far fewer changes than batches.
    assert len(pushes) < n / 5, f"{len(pushes)} level changes for {n} batches: the level flaps"

    # Every push is a change, up at the threshold, down only well below it, after the dwell.
    prev = Push(started, pb.LEVEL_NORMAL, 0.0)
    for p in pushes:
        assert p.level != prev.level, f"a push without a change: {prev} -> {p}"
        if p.level > prev.level:
            assert p.pressure >= THRESHOLDS[p.level] - 1e-3, f"stepped up too early: {p}"
        else:
            bound = THRESHOLDS[p.level + 1] * HYSTERESIS
            assert p.pressure < bound + 1e-3, f"stepped down without hysteresis: {prev} -> {p}"
            lasted = p.at - prev.at
            assert lasted >= DWELL_S - DWELL_SLACK_S, (
                f"level {prev.level} left after {lasted:.3f} s (min dwell {DWELL_S} s)"
            )
        prev = p
