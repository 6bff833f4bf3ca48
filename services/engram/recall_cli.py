"""``engram recall``: one recall against a running cluster, at a chosen consistency level.

The cue is given as numbers (``--vector 0.1,0.2,...``), as a row of the demo corpus
(``--corpus-row N --dim D``: the vectors ``engram demo`` writes), or drawn at random
(``--random --dim D``). Prints the hits and the snapshot LSN, staleness and wait time the
server reports, so each level's behaviour can be seen from any process. ``--api-key``
(default ``$ENGRAM_API_KEY``) and ``--ca FILE`` / ``--target grpcs://...`` reach a gateway
that asks for a key and serves TLS (:mod:`engram.client_options`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import numpy as np

from engram import client_options
from engram.contract.errors import EngramError
from engram.corpus import Corpus

LEVELS = ("EVENTUAL", "BOUNDED", "SESSION", "STRONG")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="engram recall", description=__doc__.splitlines()[0])
    client_options.add_arguments(p)
    p.add_argument("--space", required=True, help="memory space id")
    cue = p.add_mutually_exclusive_group(required=True)
    cue.add_argument("--vector", help="comma-separated cue values")
    cue.add_argument("--corpus-row", type=int, help="use row N of the demo corpus as the cue")
    cue.add_argument("--random", action="store_true", help="a random cue")
    p.add_argument("--dim", type=int, default=384, help="dimension for --corpus-row / --random")
    p.add_argument("--k", type=int, default=5, help="results (1..1000, default 5)")
    p.add_argument("--consistency", default="BOUNDED", type=str.upper, choices=LEVELS)
    p.add_argument("--session", default="", help="session id (for SESSION consistency)")
    p.add_argument("--min-score", type=float, default=None)
    p.add_argument("--deadline-ms", type=int, default=0, help="give up after this (default 5000)")
    return p.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    if args.vector:
        cue = np.array([float(x) for x in args.vector.split(",")], dtype=np.float32)
    elif args.corpus_row is not None:
        cue = Corpus(args.dim).vectors(args.corpus_row, 1)[0]
    else:
        cue = np.random.default_rng().standard_normal(args.dim).astype(np.float32)
    try:
        client = client_options.connect(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    async with client:
        try:
            r = await client.recall(
                args.space,
                cue,
                k=args.k,
                min_score=args.min_score,
                consistency=args.consistency,
                session_id=args.session,
                deadline_ms=args.deadline_ms,
            )
        except EngramError as exc:
            print(f"recall failed: {exc}", file=sys.stderr)
            return 1
    print(
        f"{args.consistency} recall in {args.space}: snapshot LSN {r.snapshot_sequence}, "
        f"staleness {r.staleness_us / 1000:.1f} ms, waited {r.waited_us / 1000:.1f} ms, "
        f"server time {r.latency_us / 1000:.1f} ms"
    )
    for rank, h in enumerate(r.hits, 1):
        print(f"  {rank:>3}. {h.score:.4f}  {h.id}  lsn {h.lsn}  {h.content[:60]!r}")
    if not r.hits:
        print("  (no results)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))
