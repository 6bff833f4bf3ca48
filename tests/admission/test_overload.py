"""Sustained overload of one shard by three producers of different priorities.

A one-shard cluster gets a tiny memory budget (4 MB) and a deliberately slow index builder, and
three Python-client streams write one space each for 30 s: NORMAL and LOW as fast as they are
admitted, HIGH as a steady stream of its own (below the indexing rate, as priority traffic
usually is); together they offer several times what indexing drains. While they run, the
shard's ``/metrics`` and its process RSS are sampled. Afterwards:

* the shard never held more un-indexed data than its budget (and its RSS stayed bounded);
* every batch ended acked (after the client resent whatever was refused) and is stored exactly
  once; nothing else is stored (a refused attempt leaves no trace);
* shedding went LOW first, then NORMAL, HIGH last: refusals counted by the client's 'rejected'
  events and by the gateway's ``engram_streaming_observations_rejected_total`` are ordered
  LOW > NORMAL >= HIGH, LOW's reasons include ``shed_low``, HIGH's are only "does not fit"
  reasons, and LOW was refused no later than NORMAL;
* the shard pushed its pressure levels (the client saw BACKPRESSURE / OVERLOADED statuses, the
  ``engram_streaming_backpressure_state`` gauge reached CRITICAL or worse).

Why HIGH is paced: a refusal's retry-after does not depend on the lane (it is the time to get
back below CRITICAL), so a HIGH producer that also saturates waits after each refusal about as
long as NORMAL does, and refusal counts of the two come out nearly equal whatever the order of
shedding (observed 6 vs 6, 3 vs 3 with a saturating HIGH).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

import psutil

from engram.corpus import Corpus
from engram.v1 import streaming_pb2 as pb
from engram_client import EngramClient, StreamEvent
from engram_client.client import Ack, make_batch

DIM = 128
BUDGET = 4 << 20
BATCH = 250
RUN_S = 30.0
FLUSH_TIMEOUT_S = 60.0
SAMPLE_EVERY_S = 0.2
ENV = {
    "ENGRAM_MEMORY_BUDGET": "4MB",
    # A slow builder: small add_items calls on one thread with a wide construction beam.
    "ENGRAM_INDEX_BUILD_CHUNK": "16",
    "ENGRAM_INDEX_BUILD_THREADS": "1",
    "ENGRAM_HNSW_EF_CONSTRUCTION": "200",
}
# HIGH is steady traffic below the indexing rate; NORMAL and LOW send as fast as admitted.
PACE_S = {"high": 0.25, "normal": 0.0, "low": 0.0}
LANES = {
    "high": pb.PRIORITY_HIGH,
    "normal": pb.PRIORITY_NORMAL,
    "low": pb.PRIORITY_LOW,
}


@dataclass
class Producer:
    lane: str
    space: str
    sent: dict[int, list[str]] = field(default_factory=dict)  # batch number -> ids
    futures: dict[int, asyncio.Future[Ack]] = field(default_factory=dict)
    rejections: int = 0
    first_rejection: float | None = None
    statuses: list[tuple[float, int, int]] = field(default_factory=list)  # (t, state, level)

    def on_event(self, ev: StreamEvent) -> None:
        now = time.monotonic()
        if ev.kind == "rejected":
            self.rejections += 1
            if self.first_rejection is None:
                self.first_rejection = now
        elif ev.kind == "status" and ev.status is not None:
            self.statuses.append((now, ev.status.state, ev.status.level))


async def produce(client: EngramClient, p: Producer, corpus: Corpus, stop: float) -> int:
    stream = await client.open_stream(p.space, on_event=p.on_event)
    offset = LANES[p.lane] * 10_000_000  # each lane its own corpus rows
    n = 0
    pace = PACE_S[p.lane]
    while time.monotonic() < stop:
        if pace:
            await asyncio.sleep(pace)
        ids = [f"{p.lane}-{n}-{i}" for i in range(BATCH)]
        vectors = corpus.vectors(offset + n * BATCH, BATCH)
        batch = make_batch(vectors, ids=ids, priority=LANES[p.lane])
        p.futures[n] = await stream.send_batch(batch)
        p.sent[n] = ids
        n += 1
    try:
        await asyncio.wait_for(stream.flush(), FLUSH_TIMEOUT_S)
    finally:
        reconnects = stream.reconnects
        await stream.close()
    return reconnects


async def test_memory_budget_holds_and_lanes_are_shed_in_priority_order(
    make_cluster, scrape
) -> None:
    cluster = make_cluster(shards=1, env=ENV)
    shard_port, gateway_port = cluster.shard_http_port(0), cluster.http_port
    shard_proc = psutil.Process(cluster.pid("shard-0"))
    corpus = Corpus(DIM)
    producers = [Producer(lane, f"overload-{lane}") for lane in LANES]
    memory: list[float] = []
    budgets: set[float] = set()
    rss: list[int] = []
    states: list[float] = []
    done = asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            m = await scrape(shard_port)
            memory.append(m.total("engram_shard_memory_bytes"))
            budgets.add(m.total("engram_shard_memory_budget_bytes"))
            states.extend(
                m.by_label("engram_streaming_backpressure_state", "memory_space").values()
            )
            rss.append(shard_proc.memory_info().rss)
            await asyncio.sleep(SAMPLE_EVERY_S)

    sampler = asyncio.create_task(sample())
    started = time.monotonic()
    async with EngramClient(cluster.gateway_address) as client:
        reconnects = await asyncio.gather(
            *(produce(client, p, corpus, started + RUN_S) for p in producers)
        )
        elapsed = time.monotonic() - started
        done.set()
        await sampler
        gw = await scrape(gateway_port)
        sh = await scrape(shard_port)
        stored: dict[str, Counter[str]] = {}
        for p in producers:
            found: Counter[str] = Counter()
            async for ids, _lsns in client.list_observations(p.space):
                found.update(ids)
            stored[p.space] = found

    rejected_metric = {
        p.lane: gw.total("engram_streaming_observations_rejected_total", memory_space=p.space)
        for p in producers
    }
    reasons: dict[str, dict[str, float]] = {p.lane: {} for p in producers}
    lane_of_space = {p.space: p.lane for p in producers}
    for (name, labels), value in gw.items():
        lab = dict(labels)
        if name == "engram_streaming_observations_rejected_total" and value > 0:
            reasons[lane_of_space[lab["memory_space"]]][lab["reason"]] = value
    rejected_events = {p.lane: p.rejections for p in producers}
    indexed = sh.total("engram_shard_indexed_total")
    acked_total = sum(len(ids) for p in producers for ids in p.sent.values())
    print(
        f"\n{elapsed:.1f} s; acked {acked_total} obs ({acked_total / elapsed:,.0f}/s), "
        f"indexed {indexed:.0f} ({indexed / elapsed:,.0f}/s); "
        f"memory max {max(memory) / 2**20:.1f} MiB of {BUDGET / 2**20:.0f} MiB "
        f"({len(memory)} samples); shard RSS max {max(rss) / 2**20:.0f} MiB; "
        f"rejection events {rejected_events}; rejected observations (gateway) "
        f"{rejected_metric}, by reason {reasons}; max backpressure_state {max(states, default=0)}; "
        f"statuses seen {[len(p.statuses) for p in producers]}; acked per lane "
        f"{ {p.lane: sum(len(i) for i in p.sent.values()) for p in producers} }"
    )

    # The budget holds: never more un-indexed data than the budget (as the shard reports it),
    # and the process stays within a generous bound (interpreter and HNSW are outside it).
    assert budgets == {float(BUDGET)}
    assert len(memory) >= RUN_S / 1.0, "the sampler must have covered the whole run"
    assert max(memory) <= BUDGET
    assert max(memory) >= 0.8 * BUDGET, "the load must have driven the shard near its budget"
    assert max(rss) < BUDGET + (400 << 20)

    # Every batch ended acked, once; nothing else was stored.
    assert reconnects == [0, 0, 0], "the streams must not have needed to resume"
    for p in producers:
        for n, fut in p.futures.items():
            assert fut.done() and fut.exception() is None, f"{p.lane} batch {n} not acked"
            assert not fut.result().duplicate, f"{p.lane} batch {n} was acked as a duplicate"
        expected = [i for ids in p.sent.values() for i in ids]
        found = stored[p.space]
        dups = {i: c for i, c in found.items() if c > 1}
        assert not dups, f"{p.space}: {len(dups)} ids stored more than once"
        missing = set(expected) - set(found)
        assert not missing, f"{p.space}: {len(missing)} acked ids are not stored"
        extra = set(found) - set(expected)
        assert not extra, f"{p.space}: {len(extra)} ids of batches never acked are stored"

    # Shedding order: LOW first and most, HIGH last and least. Compared as the share of each
    # lane's offered observations that was refused (a lane that is let back in sooner retries
    # more often, so raw refusal counts would not say who was shed first).
    acked = {p.lane: sum(len(i) for i in p.sent.values()) for p in producers}
    share = {
        lane: rejected_metric[lane] / max(1.0, rejected_metric[lane] + acked[lane])
        for lane in acked
    }
    print(f"refused share of offered observations per lane: {share}")
    assert rejected_events["low"] > 0
    assert share["low"] > share["normal"] >= share["high"], share
    assert acked["normal"] > acked["low"], acked
    # ... for the reasons of their lane: LOW shed from CRITICAL on, HIGH never shed (refused only
    # when it would not fit in the budget or its lane is full).
    assert reasons["low"].get("shed_low", 0) > 0, reasons
    assert set(reasons["high"]) <= {"memory_budget", "lane_full"}, reasons
    low_first, normal_first = (
        producers[2].first_rejection,
        producers[1].first_rejection,
    )
    assert low_first is not None
    if normal_first is not None:
        assert low_first <= normal_first

    # The pressure was pushed to the streams and exported.
    pushed = {state for p in producers for _, state, _ in p.statuses}
    assert pushed & {pb.StreamStatus.BACKPRESSURE, pb.StreamStatus.OVERLOADED}, pushed
    assert max(states) >= 2
