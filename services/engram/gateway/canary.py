"""The visibility canary: measures, continuously, how soon an acknowledged write is recallable.

For every home shard (an extra shard owns no space by default, so it has no probe space), a
probe space it owns (``_canary-s<shard>-<n>``) receives one observation
every ``ENGRAM_CANARY_INTERVAL_S`` seconds through the same internal path client batches take
(OpenSession, Append, Recall); the canary then polls recall (EVENTUAL) until the probe comes
back. ``engram_recall_visibility_latency_seconds{shard}`` records write -> first recall that
returns it, ``engram_canary_ack_latency_seconds{shard}`` write -> durable ack. Off when the
interval is 0 (the default for services; ``engram up`` turns it on).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

import numpy as np
from prometheus_client import Counter, Histogram

from engram.control.assignment import default_shard
from engram.gateway.context import GatewayContext
from engram.v1 import streaming_pb2 as pb

log = logging.getLogger("engram.gateway.canary")

# 75 and 150 ms on either side of the 100 ms visibility bound, so a P99 near it is not a
# straight line drawn between 100 and 250 ms.
_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
visibility_latency = Histogram(
    "engram_recall_visibility_latency_seconds",
    "Canary: time from writing a probe to the first recall that returns it",
    ["shard"],
    buckets=_BUCKETS,
)
ack_latency = Histogram(
    "engram_canary_ack_latency_seconds",
    "Canary: time from writing a probe to its durable ack",
    ["shard"],
    buckets=_BUCKETS,
)
failures = Counter(
    "engram_canary_failures_total", "Canary probes that failed or never became visible", ["shard"]
)

DIM = 16
_POLL_S = 0.002
_GIVE_UP_S = 5.0


def canary_space(shard: int, shard_count: int) -> str:
    """The first ``_canary-s<shard>-<n>`` name the default assignment gives to ``shard``."""
    n = 0
    while True:
        name = f"_canary-s{shard}-{n}"
        if default_shard(name, shard_count) == shard:
            return name
        n += 1


class Canary:
    def __init__(self, gw: GatewayContext, interval_s: float) -> None:
        self.gw = gw
        self.interval_s = interval_s
        self._sessions: dict[int, tuple[str, int]] = {}  # shard -> (session id, last seq)
        self._rng = np.random.default_rng()

    async def run(self) -> None:
        count = self.gw.settings.cluster.shard_count
        for shard in range(count):  # exported at 0: an alert's increase() misses a series born at 1
            failures.labels(str(shard))
        while True:
            await asyncio.gather(
                *(self._probe(shard, canary_space(shard, count)) for shard in range(count))
            )
            await asyncio.sleep(self.interval_s)

    async def _probe(self, shard: int, space: str) -> None:
        label = str(shard)
        try:
            seen = await self._write_and_find(shard, space)
        except Exception as exc:  # noqa: BLE001 (a canary must never take the gateway down)
            failures.labels(label).inc()
            self._sessions.pop(shard, None)
            log.debug("canary probe on shard %d failed: %r", shard, exc)
            return
        if seen is None:
            failures.labels(label).inc()
            log.warning("canary probe on shard %d not visible after %.0f s", shard, _GIVE_UP_S)

    async def _write_and_find(self, shard: int, space: str) -> float | None:
        session, seq = self._sessions.get(shard, ("", 0))
        if not session:
            session = "canary-" + uuid.uuid4().hex
            opened = await self.gw.shards.open_session(space, session, create=True, timeout_s=5)
            seq = opened.last_sequence
        seq += 1
        vector = self._rng.standard_normal(DIM).astype("<f4")
        probe_id = f"probe-{uuid.uuid4().hex}"
        batch = pb.ObservationBatch(
            dim=DIM, vectors=vector.tobytes(), ids=[probe_id], priority=pb.PRIORITY_HIGH
        )
        started = time.perf_counter()
        append = await self.gw.shards.open_append(space, session, timeout_s=10)
        try:
            await append.write(seq, batch)
            answer = await anext(aiter(append.responses()), None)
        finally:
            append.cancel()
        if answer is None or answer.HasField("error") or answer.rejected:
            return None
        self._sessions[shard] = (session, seq)
        ack_latency.labels(str(shard)).observe(time.perf_counter() - started)
        recall = pb.RecallRequest(cue=vector.tolist(), k=1, consistency=pb.EVENTUAL)
        deadline = started + _GIVE_UP_S
        while time.perf_counter() < deadline:
            async for chunk in self.gw.shards.recall(space, recall):
                if any(m.id == probe_id for m in chunk.results):
                    seen = time.perf_counter() - started
                    visibility_latency.labels(str(shard)).observe(seen)
                    return seen
            await asyncio.sleep(_POLL_S)
        return None
