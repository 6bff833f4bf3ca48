"""Command line of the chaos harness: ``python -m engram.chaos`` or ``chaos/local/run.py``.

Exit status: 0 when nothing was lost, duplicated, reordered, half-stored or read after its
delete was acknowledged (resurrected); 1 when a checker found a violation (or the final
read-back failed); 2 when the run itself could not be done.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from engram.chaos.config import ChaosConfig
from engram.chaos.harness import run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="engram-chaos",
        description="Run a workload (writes, deletes, recalls) against a local cluster while "
        "injecting faults; verify that nothing acknowledged is lost, duplicated or reordered "
        "and that nothing deleted is read again.",
    )
    p.add_argument(
        "--seconds",
        type=float,
        default=float(os.environ.get("CHAOS_SECONDS") or 600),
        help="length of the run (default: $CHAOS_SECONDS or 600)",
    )
    p.add_argument(
        "--seed",
        type=int,
        default=int(os.environ.get("CHAOS_SEED") or 1),
        help="seed of the fault schedule and workload (default: $CHAOS_SEED or 1)",
    )
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--spaces", type=int, default=4, help="memory spaces written (default 4)")
    p.add_argument("--writers-per-space", type=int, default=2)
    p.add_argument(
        "--results", type=Path, default=Path("chaos/results"), help="directory for the reports"
    )
    p.add_argument(
        "--data-dir", type=Path, default=None, help="cluster data and logs (default: temporary)"
    )
    p.add_argument("--keep-data", action="store_true", help="keep the data even when passing")
    p.add_argument("-v", "--verbose", action="store_true", help="log the harness's details")
    args = p.parse_args(argv)
    if args.seconds < 30:
        p.error("--seconds must be at least 30")
    if args.shards < 1 or args.spaces < args.shards:
        p.error("need at least one shard and at least as many spaces as shards")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:
        # restarts are the point of the exercise: do not log every one
        logging.getLogger("engram.launcher").setLevel(logging.ERROR)
        logging.getLogger("engram_client").setLevel(logging.ERROR)
    cfg = ChaosConfig(
        seconds=args.seconds,
        seed=args.seed,
        shards=args.shards,
        spaces=args.spaces,
        writers_per_space=args.writers_per_space,
        results_dir=args.results.resolve(),
        data_dir=args.data_dir.resolve() if args.data_dir else None,
        keep_data=args.keep_data,
    )
    return asyncio.run(_main(cfg))


async def _main(cfg: ChaosConfig) -> int:
    task = asyncio.create_task(run(cfg))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    try:
        report = await task
    except asyncio.CancelledError:
        print("interrupted: the cluster was stopped", file=sys.stderr)
        return 130
    if report is None:
        return 2
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
