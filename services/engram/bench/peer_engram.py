"""Engram Stream measured exactly like the peers (``bench/peers/_common.py``), for the
side-by-side.

``python -m engram.bench.peer_engram --target ADDR --space NAME --vectors F.npy --count N ...``

1. ingest until searchable: stream ``--count`` rows in batches of ``--batch`` through one
   client stream (as the client is meant to be used: up to the server's credits in flight),
   then poll a recall (EVENTUAL) for the last row until it is returned; throughput = rows /
   (time from the first send to that recall's answer), so it covers "acked and visible";
2. freshness: ``--samples`` times, send one more batch, wait for its ack, and poll a recall
   for its last row; freshness = time from the ack to the answer of the first recall that
   returns it.

Prints one JSON object (the peers' schema) on stdout. The API key and the CA of the gateway's
certificate, when the benchmark uses them, come as ``ENGRAM_API_KEY`` / ``ENGRAM_CA_FILE``
(:meth:`engram.bench.access.Access.exported`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

import numpy as np

from engram.bench.access import from_env
from engram.bench.workers import recall_once

POLL_SLEEP_S = 0.001


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 3) if values else None


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from engram.v1 import streaming_pb2 as pb

    vectors = np.load(args.vectors)
    b, space = args.batch, args.space

    def ids(lo: int, hi: int) -> list[str]:
        return [f"{space}/{i}" for i in range(lo, hi)]

    async with from_env().client(args.target) as client:

        async def wait_found(vec: np.ndarray, want: str) -> tuple[float | None, int]:
            polls = 0
            deadline = time.monotonic() + args.poll_timeout
            while time.monotonic() < deadline:
                polls += 1
                found, _ = await recall_once(client.stub, space, vec, pb.EVENTUAL)
                if want in found:
                    return time.monotonic(), polls
                await asyncio.sleep(POLL_SLEEP_S)
            return None, polls

        stream = await client.open_stream(space)
        t0 = time.monotonic()
        futures = []
        for lo in range(0, args.count, b):
            hi = min(args.count, lo + b)
            futures.append(await stream.send(vectors[lo:hi], ids=ids(lo, hi)))
        await asyncio.gather(*futures)
        t_acked = time.monotonic()
        found, polls = await wait_found(vectors[args.count - 1], f"{space}/{args.count - 1}")
        searchable_s = (found or time.monotonic()) - t0
        fresh: list[float] = []
        poll_counts: list[int] = []
        misses = 0
        for i in range(args.samples):
            lo = args.count + i * b
            await (await stream.send(vectors[lo : lo + b], ids=ids(lo, lo + b)))
            t_ret = time.monotonic()
            t_found, n = await wait_found(vectors[lo + b - 1], f"{space}/{lo + b - 1}")
            poll_counts.append(n)
            if t_found is None:
                misses += 1
            else:
                fresh.append(t_found - t_ret)
        in_flight = stream.max_in_flight
        await stream.close()
    return {
        "peer": "engram-stream",
        "version": "this tree",
        "settings": {
            "client": "EngramClient, one stream",
            "in_flight_batches": in_flight,
            "recall_consistency": "EVENTUAL",
        },
        "count": args.count,
        "batch": b,
        "dim": int(vectors.shape[1]),
        "insert_s": round(t_acked - t0, 3),
        "insert_obs_per_s": round(args.count / (t_acked - t0), 1),
        "searchable": found is not None,
        "ingest_until_searchable_s": round(searchable_s, 3),
        "ingest_until_searchable_obs_per_s": round(args.count / searchable_s, 1),
        "last_batch_polls": polls,
        "freshness_ms": {
            "count": len(fresh),
            "misses": misses,
            "p50": _pct(fresh, 50),
            "p99": _pct(fresh, 99),
            "max": round(max(fresh) * 1000, 3) if fresh else None,
            "mean_polls": round(float(np.mean(poll_counts)), 2) if poll_counts else None,
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engram.bench.peer_engram")
    p.add_argument("--target", required=True)
    p.add_argument("--space", required=True)
    p.add_argument("--vectors", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--samples", type=int, default=30)
    p.add_argument("--poll-timeout", type=float, default=60.0)
    args = p.parse_args(argv)
    print(json.dumps(asyncio.run(run(args))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
