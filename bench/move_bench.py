"""Live-move benchmark of Engram Stream: the write pause a move causes, and how fast it copies.

    .venv/bin/python bench/move_bench.py                       # 1 M rows, 20 moves at 20 K obs/s
    .venv/bin/python bench/move_bench.py --rows 100000 --moves 4   # a short run

1. The disk's sequential copy rate, measured first in the same run: a --disk-mb file written and
   fsynced, then copied to a new file (read, write, fsync), as a move's checkpoint copy does.
2. A local cluster of 2 shards; --rows observations (dim --dim) written into one space, then
   the index built and a checkpoint written (what a move copies as files).
3. --moves moves of that space back and forth while a stream writes into it: --idle-rate
   observations/s while the checkpoint is copied, --rate from the moment the copy is done
   (the target catches up on the WAL, held there --load-s seconds so that the fence always
   comes under full load) through the fence, the commit and the release. (At --rate all the
   time, two cores cannot index as fast as they take writes: the shards' memory budget fills
   within minutes and admission control refuses writes, which would be measured instead of
   the move.) For each move: its time, the bytes it copied (checkpoint files and WAL
   records), the rate of the files' copy (to the first catch-up round), the source's write
   pause (fence to commit, as the target reports it) and what the writing client saw at
   --rate: its slowest ack and its P99, against the median ack before the moves.

Prints a table and writes bench/results/moves-<timestamp>.json. The machine is shared and
noisy: compare the figures of one run with each other (the copy rate with the disk's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "services"))
sys.path.insert(0, str(ROOT / "clients" / "python"))
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from engram.control.moves import P, move_space, shard_stats, spaces_of  # noqa: E402
from engram.internal.v1 import shard_pb2 as ipb  # noqa: E402
from engram.launcher.cluster import LocalCluster  # noqa: E402
from engram_client import EngramClient  # noqa: E402

SPACE = "move-bench"
BATCH = 1000


def disk_copy_rate(directory: Path, mb: int) -> dict[str, float]:
    """Sequential write and copy rates (MB/s) of ``mb`` MB on ``directory``'s disk."""
    src, dst = directory / "disk-src.bin", directory / "disk-dst.bin"
    block = np.random.default_rng(0).bytes(1 << 20)
    started = time.perf_counter()
    with open(src, "wb") as f:
        for _ in range(mb):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    write_s = time.perf_counter() - started
    os.posix_fadvise(os.open(src, os.O_RDONLY), 0, 0, os.POSIX_FADV_DONTNEED)
    started = time.perf_counter()
    with open(src, "rb") as r, open(dst, "wb") as w:
        while chunk := r.read(1 << 20):
            w.write(chunk)
        w.flush()
        os.fsync(w.fileno())
    copy_s = time.perf_counter() - started
    src.unlink()
    dst.unlink()
    return {"write_mb_s": mb / write_s, "copy_mb_s": mb / copy_s}


class Writer:
    """Writes at ``rate`` observations/s (changeable) into SPACE; records each batch's ack
    latency with the time it was sent."""

    def __init__(self, client: EngramClient, dim: int, rate: float) -> None:
        self.client = client
        self.dim = dim
        self.rate = rate
        self.acks: list[tuple[float, float]] = []  # (sent at, latency)
        self.failed = 0
        self._stop = asyncio.Event()
        self._changed = asyncio.Event()
        self._vectors = np.random.default_rng(1).standard_normal((BATCH * 4, dim)).astype("<f4")

    async def run(self) -> None:
        stream = await self.client.open_stream(SPACE)
        pending: list[asyncio.Task[None]] = []
        n = 0
        due = time.perf_counter()
        while not self._stop.is_set():
            delay = due - time.perf_counter()
            if delay > 0:
                self._changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), delay)
                if self._changed.is_set():
                    due = time.perf_counter()  # a new rate: start over at it
                    continue
            due = max(due, time.perf_counter() - 0.5) + BATCH / self.rate
            sent = time.perf_counter()
            lo = (n % 4) * BATCH
            fut = await stream.send(self._vectors[lo : lo + BATCH])
            pending.append(asyncio.create_task(self._settle(fut, sent)))
            n += 1
        await asyncio.gather(*pending)
        await stream.close()

    async def _settle(self, fut: asyncio.Future[Any], sent: float) -> None:
        try:
            await fut
        except Exception:
            self.failed += 1
            return
        self.acks.append((sent, time.perf_counter() - sent))

    def set_rate(self, rate: float) -> None:
        self.rate = rate
        self._changed.set()

    def stop(self) -> None:
        self._stop.set()
        self._changed.set()

    def window(self, lo: float, hi: float) -> list[float]:
        """Ack latencies of the batches sent between ``lo`` and ``hi``."""
        return [lat for at, lat in self.acks if lo <= at <= hi]


async def fill(cluster: LocalCluster, rows: int, dim: int) -> float:
    """Writes ``rows`` observations as fast as acks come back; returns the seconds it took."""
    vectors = np.random.default_rng(2).standard_normal((BATCH * 8, dim)).astype("<f4")
    started = time.perf_counter()
    async with EngramClient(cluster.gateway_address) as client:
        stream = await client.open_stream(SPACE, target_latency_ms=0)
        futures = []
        for n in range(rows // BATCH):
            lo = (n % 8) * BATCH
            futures.append(await stream.send(vectors[lo : lo + BATCH]))
            if n % 100 == 0:
                print(f"  filled {n * BATCH:,} of {rows:,}", end="\r", flush=True)
        await asyncio.gather(*futures)
        await stream.close()
    print()
    return time.perf_counter() - started


async def wait_indexed(addresses: dict[int, str], rows: int) -> float:
    """Waits until every row is indexed and a checkpoint holds nearly all of them."""
    started = time.perf_counter()
    while True:
        for reply in (await shard_stats(addresses)).values():
            for s in reply.spaces:
                if s.memory_space_id == SPACE:
                    print(
                        f"  indexed {s.indexed:,} of {s.count:,}, checkpoint {s.checkpoint_lsn:,}",
                        end="\r",
                        flush=True,
                    )
                    if s.indexed == s.count and s.checkpoint_lsn >= 0.9 * rows:
                        print()
                        return time.perf_counter() - started
        await asyncio.sleep(2.0)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="engram-move-bench-", dir=args.data_root))
    print(f"== disk: {args.disk_mb} MB written, then copied, on {work}")
    disk = disk_copy_rate(work, args.disk_mb)
    print(f"  write {disk['write_mb_s']:.0f} MB/s, copy {disk['copy_mb_s']:.0f} MB/s")
    env = {"ENGRAM_CANARY_INTERVAL_S": "0"}
    faults = {i: work / f"faults-{i}.json" for i in range(2)}
    for path in faults.values():
        path.write_text("{}")
    cluster = LocalCluster(
        work / "cluster",
        shards=2,
        env=env,
        shard_env={i: {"ENGRAM_FAULT_FILE": str(path)} for i, path in faults.items()},
    )
    await asyncio.to_thread(cluster.start)
    moves: list[dict[str, Any]] = []
    try:
        addresses = {i: cluster.shard_address(i) for i in range(2)}
        print(f"== fill: {args.rows:,} observations of dim {args.dim}")
        fill_s = await fill(cluster, args.rows, args.dim)
        print(f"  {args.rows / fill_s:,.0f} obs/s; waiting for the index and a checkpoint")
        index_s = await wait_indexed(addresses, args.rows)
        print(
            f"== {args.moves} moves under {args.rate:,.0f} obs/s "
            f"from the end of each copy ({args.idle_rate:,.0f} obs/s before)"
        )
        async with EngramClient(cluster.gateway_address) as client:
            writer = Writer(client, args.dim, args.idle_rate)
            writing = asyncio.create_task(writer.run())
            await asyncio.sleep(max(args.gap_s, 3.0))
            before = [lat for _, lat in writer.acks]
            for k in range(args.moves):
                where = spaces_of(await shard_stats(addresses))[SPACE]
                busy: list[float] = []

                target = 1 - where.owner
                _hold(faults[target], "catching_up")
                await asyncio.sleep(0.35)  # the shard polls its fault file every 0.1 s

                def on_progress(
                    p: ipb.MoveProgress, busy: list[float] = busy, target: int = target
                ) -> None:
                    if p.phase == P.CATCHING_UP and not busy:
                        writer.set_rate(args.rate)  # the copy is done: full load from here on,
                        busy.append(time.perf_counter())  # for --load-s before the fence
                        asyncio.get_running_loop().call_later(
                            args.load_s, _hold, faults[target], ""
                        )

                started = time.perf_counter()
                result = await move_space(
                    addresses, SPACE, 1 - where.owner, on_progress=on_progress
                )
                ended = time.perf_counter()
                writer.rate = args.idle_rate
                await asyncio.sleep(args.gap_s)
                loaded = writer.window(busy[0] if busy else started, ended)
                copied = result.copied_bytes + result.wal_bytes
                row = {
                    "move": k + 1,
                    "rows": result.rows,
                    "seconds": round(result.seconds, 3),
                    "loaded_seconds": round(ended - (busy[0] if busy else started), 3),
                    "copied_mb": round(copied / 1e6, 1),
                    "checkpoint_mb": round(result.copied_bytes / 1e6, 1),
                    "wal_mb": round(result.wal_bytes / 1e6, 1),
                    # the checkpoint files' copy: from the start to the first catch-up round
                    "copy_s": round((busy[0] if busy else ended) - started, 3),
                    "mb_s": round(
                        result.copied_bytes
                        / 1e6
                        / max(1e-3, (busy[0] if busy else ended) - started),
                        1,
                    ),
                    "pause_ms": round(result.pause_ms, 1),
                    "batches_at_rate": len(loaded),
                    "slowest_ack_ms": round(max(loaded, default=0.0) * 1000, 1),
                    "ack_p99_ms": round(_pct(loaded, 99) * 1000, 1),
                }
                moves.append(row)
                print(
                    f"  move {k + 1:>2}: {row['rows']:>9,} rows in {row['seconds']:6.2f} s, "
                    f"{row['copied_mb']:8.1f} MB (files {row['checkpoint_mb']:.0f} MB in "
                    f"{row['copy_s']:.1f} s: {row['mb_s']:6.1f} MB/s), pause "
                    f"{row['pause_ms']:6.1f} ms; at {args.rate:,.0f} obs/s for "
                    f"{row['loaded_seconds']:.1f} s: {row['batches_at_rate']} batches, ack P99 "
                    f"{row['ack_p99_ms']:.1f} ms, slowest {row['slowest_ack_ms']:.1f} ms",
                    flush=True,
                )
            writer.stop()
            await writing
    finally:
        await asyncio.to_thread(cluster.stop)
        if not args.keep_data:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    pauses = [m["pause_ms"] for m in moves]
    spikes = [m["slowest_ack_ms"] for m in moves]
    rates = [m["mb_s"] for m in moves]
    summary = {
        "rows_start": args.rows,
        "dim": args.dim,
        "rate": args.rate,
        "fill_obs_s": round(args.rows / fill_s),
        "index_and_checkpoint_s": round(index_s, 1),
        "disk_write_mb_s": round(disk["write_mb_s"], 1),
        "disk_copy_mb_s": round(disk["copy_mb_s"], 1),
        "ack_p50_before_ms": round(statistics.median(before) * 1000, 1) if before else None,
        "pause_ms_p50": round(_pct(pauses, 50), 1),
        "pause_ms_p99": round(_pct(pauses, 99), 1),
        "slowest_ack_ms_p50": round(_pct(spikes, 50), 1),
        "slowest_ack_ms_p99": round(_pct(spikes, 99), 1),
        "slowest_ack_ms_max": round(max(spikes, default=0.0), 1),
        "move_mb_s_median": round(statistics.median(rates), 1),
        "move_vs_disk_copy": round(statistics.median(rates) / disk["copy_mb_s"], 3),
        "failed_batches": writer.failed,
    }
    return {"summary": summary, "moves": moves}


def _hold(path: Path, phase: str) -> None:
    """Moves into the shard of this fault file wait at ``phase`` ("": none)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"hold_move_at": phase} if phase else {}))
    os.replace(tmp, path)  # a new file: the shard sees the change whatever the clock


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000, help="observations before the moves")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--rate", type=float, default=20_000, help="obs/s from the copy's end on")
    p.add_argument("--idle-rate", type=float, default=1_000, help="obs/s while files are copied")
    p.add_argument("--load-s", type=float, default=2.0, help="seconds at --rate before the fence")
    p.add_argument("--moves", type=int, default=20)
    p.add_argument("--gap-s", type=float, default=2.0, help="seconds between moves")
    p.add_argument("--disk-mb", type=int, default=1024, help="size of the disk copy probe")
    p.add_argument("--data-root", default=None, help="where the cluster's data goes (temp)")
    p.add_argument("--keep-data", action="store_true")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    report = asyncio.run(run(args))
    s = report["summary"]
    print("\n== summary")
    for key, value in s.items():
        print(f"  {key:<26} {value}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"moves-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"args": vars(args), **report}, indent=2) + "\n")
    print(f"  written to {path}")
    return 0 if s["failed_batches"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
