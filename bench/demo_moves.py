"""``engram demo --verify`` while one of its spaces moves back and forth between two shards.

    .venv/bin/python bench/demo_moves.py                # 10 moves of demo-0, 3 x 300,000 obs
    .venv/bin/python bench/demo_moves.py --moves 4 --count 300000

Starts a local cluster of its own, runs the demo (as a user runs it: ``engram demo``, a process
of its own) and, while the demo streams, moves ``demo-0`` with ``engram move`` as often as
--moves says, one move after the other. Prints each move's line and the demo's verdict (lost,
duplicated), and exits 1 unless the demo verified and every move was made.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "services"))
sys.path.insert(0, str(ROOT / "clients" / "python"))
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from engram.control.moves import shard_stats, spaces_of  # noqa: E402
from engram.launcher.cluster import LocalCluster  # noqa: E402


async def _cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engram.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def run(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="engram-demo-moves-"))
    cluster = LocalCluster(work, shards=2, env={"ENGRAM_CANARY_INTERVAL_S": "0"})
    await asyncio.to_thread(cluster.start)
    moved, pauses = 0, []
    demo: asyncio.subprocess.Process | None = None
    try:
        addresses = {i: cluster.shard_address(i) for i in range(2)}
        demo = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "engram.cli", "demo", "--target", cluster.gateway_address,
            "--spaces", "3", "--count", str(args.count), "--dim", str(args.dim), "--verify",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output = asyncio.create_task(demo.communicate())
        while "demo-0" not in spaces_of(await shard_stats(addresses)):  # noqa: ASYNC110 (polls the shards)
            await asyncio.sleep(0.1)
        for k in range(args.moves):
            owner = spaces_of(await shard_stats(addresses))["demo-0"].owner
            code, out = await _cli(
                "move", "demo-0", "--to", f"shard-{1 - owner}", "--quiet",
                "--data-dir", str(work),
            )  # fmt: skip
            print(f"  move {k + 1:>2}: {out.strip()}", flush=True)
            if code == 0:
                moved += 1
                found = re.search(r"write pause (\d+) ms", out)
                pauses.append(int(found.group(1)) if found else -1)
            if output.done():
                print("  (the demo finished before this move)")
        stdout, _ = await output
        text = stdout.decode()
        print(text[-1500:])
    finally:
        if demo is not None and demo.returncode is None:
            demo.kill()  # by its PID; this script failed before the demo ended
            await demo.wait()
        await asyncio.to_thread(cluster.stop)
    verdict = re.search(r"verify (OK|FAILED): lost (\d+), duplicated (\d+)", text)
    result = {
        "moves": moved,
        "wanted": args.moves,
        "pauses_ms": pauses,
        "verify": verdict.group(1) if verdict else "missing",
        "lost": int(verdict.group(2)) if verdict else None,
        "duplicated": int(verdict.group(3)) if verdict else None,
    }
    print(json.dumps(result))
    ok = verdict is not None and verdict.group(1) == "OK" and moved == args.moves
    return 0 if ok and demo is not None and demo.returncode == 0 else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--moves", type=int, default=10)
    p.add_argument("--count", type=int, default=900_000, help="observations in all (3 spaces)")
    p.add_argument("--dim", type=int, default=384)
    args = p.parse_args(argv)
    started = time.perf_counter()
    code = asyncio.run(run(args))
    print(f"({time.perf_counter() - started:.0f} s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
