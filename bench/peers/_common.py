"""The measurement every peer script shares (the peer venvs do not have the engram package).

A peer script supplies ``insert(first_id, vectors)`` (returns when the peer's insert call
returns) and ``search(vector) -> ids`` (top 10); :func:`measure` then runs, on the vectors in
``--vectors`` (float32 .npy):

1. ingest until searchable: insert ``--count`` rows in batches of ``--batch``, then poll a
   search for the last inserted row until it is returned; throughput = rows / (time from the
   first insert to that search's answer);
2. freshness: ``--samples`` times, insert one more batch and poll a search for its last row
   until it is returned; freshness = time from the insert call returning to the answer of the
   first search that returns it.

Prints one JSON object on stdout; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

POLL_SLEEP_S = 0.001


def parse_args(name: str) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=f"{name}_peer.py")
    p.add_argument("--vectors", required=True, help="float32 .npy file (rows x dim)")
    p.add_argument("--count", type=int, required=True, help="rows to ingest before freshness")
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--samples", type=int, default=30, help="freshness samples (one batch each)")
    p.add_argument("--dir", required=True, help="an empty directory for the peer's data")
    p.add_argument("--poll-timeout", type=float, default=60.0)
    return p.parse_args()


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)) * 1000, 3) if len(values) else None


def _wait_found(
    search: Callable[[np.ndarray], list[Any]], vec: np.ndarray, want: Any, timeout: float
) -> tuple[float | None, int]:
    polls = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        polls += 1
        if want in search(vec):
            return time.monotonic(), polls
        time.sleep(POLL_SLEEP_S)
    return None, polls


def measure(
    args: argparse.Namespace,
    peer: dict[str, Any],
    insert: Callable[[int, np.ndarray], None],
    search: Callable[[np.ndarray], list[Any]],
    key: Callable[[int], Any],
) -> dict[str, Any]:
    vectors = np.load(args.vectors)
    need = args.count + args.samples * args.batch
    if len(vectors) < need:
        raise SystemExit(f"{args.vectors} has {len(vectors)} rows; {need} needed")
    b = args.batch
    t0 = time.monotonic()
    last_report = t0
    for lo in range(0, args.count, b):
        hi = min(args.count, lo + b)
        insert(lo, vectors[lo:hi])
        now = time.monotonic()
        if now - last_report >= 5:
            print(
                f"    {peer['peer']}: {hi:,} inserted ({hi / (now - t0):,.0f}/s)", file=sys.stderr
            )
            last_report = now
    t_inserted = time.monotonic()
    found, polls = _wait_found(
        search, vectors[args.count - 1], key(args.count - 1), args.poll_timeout
    )
    searchable_s = (found or time.monotonic()) - t0
    fresh: list[float] = []
    misses = 0
    poll_counts = []
    for i in range(args.samples):
        lo = args.count + i * b
        insert(lo, vectors[lo : lo + b])
        t_ret = time.monotonic()
        t_found, n = _wait_found(search, vectors[lo + b - 1], key(lo + b - 1), args.poll_timeout)
        poll_counts.append(n)
        if t_found is None:
            misses += 1
        else:
            fresh.append(t_found - t_ret)
    return {
        **peer,
        "count": args.count,
        "batch": b,
        "dim": int(vectors.shape[1]),
        "insert_s": round(t_inserted - t0, 3),
        "insert_obs_per_s": round(args.count / (t_inserted - t0), 1),
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


def emit(result: dict[str, Any]) -> None:
    print(json.dumps(result), flush=True)
