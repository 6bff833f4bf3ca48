"""recall@10 of the service against an exact numpy search over a space's whole content.

The content of a benchmark space is known row by row (:mod:`engram.bench.workload`): the
batches whose acks the writers received. For a sample of held-out queries the exact cosine top
10 is computed over all of them and compared with what the gateway returns (EVENTUAL recall:
every acknowledged row is visible from its ack, so EVENTUAL sees all of them).

It is measured twice on the same queries (:func:`ask` the service, then :func:`score`):

* **during the backlog** (``recall_at_10_during_backlog``), once every writer's acks are in
  and before the drain, with the un-indexed backlog at its peak: the fresh tier answers for
  most rows then;
* **after the drain** (``recall_at_10``), when the HNSW index answers for most or all of them.

The writes have stopped before either, so both are scored against the same exact top 10,
computed once (after the load, so the exact search takes no CPU from the service meanwhile).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from engram.bench.access import NO_ACCESS, Access
from engram.bench.workers import recall_once
from engram.bench.workload import SpaceData, SpacePlan, VectorSource, exact_top_k, queries, row_of

K = 10


def acked_batches(acks: list[tuple[Any, ...]], space_index: int) -> list[int]:
    return sorted({a[1] for a in acks if a[0] == space_index and a[6]})


@dataclass
class Asked:
    """The service's answers for one space's held-out queries."""

    space_index: int
    batches: list[int]  # the acknowledged batches: the rows the exact search runs over
    cues: np.ndarray
    got: list[list[int]]  # the rows the service returned, per query
    latency_s: list[float]


async def _ask(
    target: str, access: Access, space: str, cues: np.ndarray
) -> tuple[list[list[int]], list[float]]:
    from engram.v1 import streaming_pb2 as pb

    rows: list[list[int]] = []
    lat: list[float] = []
    async with access.client(target) as client:
        for cue in cues:
            t = time.monotonic()
            ids, _ = await recall_once(client.stub, space, cue, pb.EVENTUAL, deadline_s=60)
            lat.append(time.monotonic() - t)
            rows.append([row_of(i) for i in ids])
    return rows, lat


def ask(
    target: str,
    plans: list[SpacePlan],
    chosen: list[int],
    acks: list[tuple[Any, ...]],
    source: VectorSource,
    batch: int,
    query_start: int,
    n_queries: int,
    access: Access = NO_ACCESS,
) -> list[Asked]:
    """Asks the service ``n_queries`` held-out queries in each chosen space (one at a time)."""
    out = []
    for i in chosen:
        plan = plans[i]
        batches = acked_batches(acks, i)
        if not batches:
            out.append(Asked(i, [], np.empty((0, source.dim), np.float32), [], []))
            continue
        cycles = (batches[-1] + 1) * batch // plan.pool_rows + 1
        cues = queries(source, query_start + 4096 * i, n_queries, 100 + i, cycles, plan.seed)
        got, lat = asyncio.run(_ask(target, access, plan.name, cues))
        out.append(Asked(i, batches, cues, got, lat))
    return out


def score(
    asked: list[Asked],
    plans: list[SpacePlan],
    source: VectorSource,
    batch: int,
    exact_cache: dict[int, np.ndarray] | None = None,
    label: str = "",
) -> dict[str, Any]:
    """recall@10 of the answers against the exact top 10; ``exact_cache`` (space index ->
    exact rows) is filled and reused, so a second scoring of the same queries is free."""
    cache = {} if exact_cache is None else exact_cache
    per_space = []
    scores: list[float] = []
    latencies: list[float] = []
    for a in asked:
        plan = plans[a.space_index]
        if not a.batches:
            per_space.append({"space": plan.name, "skipped": "no acknowledged batch"})
            continue
        t = time.monotonic()
        if a.space_index not in cache:
            data = SpaceData(plan, source, batch)
            cache[a.space_index], _ = exact_top_k(data, a.batches, a.cues, K)
        exact_s = time.monotonic() - t
        exact = cache[a.space_index]
        hits = [len(set(g[:K]) & set(e.tolist())) / K for g, e in zip(a.got, exact, strict=True)]
        scores.extend(hits)
        latencies.extend(a.latency_s)
        per_space.append(
            {
                "space": plan.name,
                "rows": len(a.batches) * batch,
                "queries": len(hits),
                "recall_at_10": round(float(np.mean(hits)), 4),
                "exact_search_s": round(exact_s, 2),
            }
        )
        print(
            f"  recall@10{label} {plan.name}: {np.mean(hits):.4f} over "
            f"{len(a.batches) * batch:,} rows ({len(hits)} queries)",
            flush=True,
        )
    return {
        "k": K,
        "recall_at_10": round(float(np.mean(scores)), 4) if scores else None,
        "queries": len(scores),
        "spaces": per_space,
        "latency_s": latencies,
    }
