"""recall@10 of the service against an exact numpy search over a space's whole content.

The content of a benchmark space is known row by row (:mod:`engram.bench.workload`): the
batches whose acks the writers received. For a sample of held-out queries the exact cosine top
10 is computed over all of them and compared with what the gateway returns (EVENTUAL recall).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from engram.bench.access import NO_ACCESS, Access
from engram.bench.workers import recall_once
from engram.bench.workload import SpaceData, SpacePlan, VectorSource, exact_top_k, queries, row_of

K = 10


def acked_batches(acks: list[tuple[Any, ...]], space_index: int) -> list[int]:
    return sorted({a[1] for a in acks if a[0] == space_index and a[6]})


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


def recall_at_10(
    target: str,
    plans: list[SpacePlan],
    chosen: list[int],
    acks: list[tuple[Any, ...]],
    source: VectorSource,
    batch: int,
    query_start: int,
    n_queries: int,
    access: Access = NO_ACCESS,
) -> dict[str, Any]:
    per_space = []
    scores: list[float] = []
    latencies: list[float] = []
    for i in chosen:
        plan = plans[i]
        batches = acked_batches(acks, i)
        if not batches:
            per_space.append({"space": plan.name, "skipped": "no acknowledged batch"})
            continue
        data = SpaceData(plan, source, batch)
        cycles = (batches[-1] + 1) * batch // plan.pool_rows + 1
        cues = queries(source, query_start + 4096 * i, n_queries, 100 + i, cycles, plan.seed)
        t = time.monotonic()
        exact, _ = exact_top_k(data, batches, cues, K)
        exact_s = time.monotonic() - t
        got, lat = asyncio.run(_ask(target, access, plan.name, cues))
        hits = [len(set(g[:K]) & set(e.tolist())) / K for g, e in zip(got, exact, strict=True)]
        scores.extend(hits)
        latencies.extend(lat)
        per_space.append(
            {
                "space": plan.name,
                "rows": len(batches) * batch,
                "queries": len(hits),
                "recall_at_10": round(float(np.mean(hits)), 4),
                "exact_search_s": round(exact_s, 2),
            }
        )
        print(
            f"  recall@10 {plan.name}: {np.mean(hits):.4f} over {len(batches) * batch:,} rows "
            f"({len(hits)} queries)",
            flush=True,
        )
    return {
        "k": K,
        "recall_at_10": round(float(np.mean(scores)), 4) if scores else None,
        "queries": len(scores),
        "spaces": per_space,
        "latency_s": latencies,
    }
