"""``python -m engram.bench.forget``: what forgetting costs, measured on a cluster of its own.

    python -m engram.bench.forget                      # 200,000 rows of dim 384
    python -m engram.bench.forget --rows 20000 --dim 64 --recall-seconds 5

1. A local cluster of one shard; ``--rows`` observations (ids ``r<n>``, one millisecond of
   ``when`` apart, in the past) written into one space, then indexed and checkpointed.
2. Recall latency with no delete going on (``--recall-seconds``), then the same recalls while
   ``--delete-share`` of the space is deleted by id, in batches of ``--delete-batch`` ids sent
   one after another with the client's ``delete`` (the delete throughput, ids/s), then one
   time-range delete of the newest ``--range-share`` of the rows (rows/s).
3. The deletes are checked: the space's live count drops by exactly the deleted rows, and a
   recall with a deleted row's own vector never returns it.
4. The shard's memory (its RSS, and the space's figures in Stats and the shard's metrics)
   before the deletes, after them, and after compaction (waited for up to
   ``--compact-timeout`` s, until the shard's figures stop changing).
5. A backup of the space (:mod:`engram.control.backups`) and ``cp -r`` of the same files on
   the same disk, then ``sync``, both in MB/s; then a restore into a fresh cluster (MB/s),
   whose live count must be the space's.

Prints a markdown report and writes ``forget-<timestamp>.json`` to ``--out`` (and ``--json``).
The machine is shared and noisy: compare the figures of one run with each other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import psutil

from engram.bench.stats import ratio, rounded, summary_ms
from engram.control import backups
from engram.control.moves import shard_stats
from engram.internal.v1 import shard_pb2 as ipb
from engram.launcher.cluster import LocalCluster
from engram_client import EngramClient

SPACE = "forget-bench"
BATCH = 1000
STEP_US = 1000  # the rows' 'when' are this far apart
# Checkpoints soon after indexing at any size (what is measured is forgetting, not the default
# checkpoint cadence); no canary rows in the space's shard.
CLUSTER_ENV = {"ENGRAM_CANARY_INTERVAL_S": "0", "ENGRAM_CHECKPOINT_INTERVAL_S": "5"}


def cluster_env(delete_share: float) -> dict[str, str]:
    """The benchmark's cluster settings: compaction starts once half of what the run deletes is
    deleted (the default share, 0.2, is above the 10 % this run deletes by default)."""
    share = max(0.01, min(0.99, delete_share / 2))
    return {**CLUSTER_ENV, "ENGRAM_COMPACT_DELETED_SHARE": f"{share:g}"}


_SAMPLE = re.compile(r"^(engram_shard_\w+)(?:\{([^}]*)\})? ([0-9.eE+-]+)$")
# The shard metrics the report keeps: what memory and deletes look like (not ages, latencies).
_KEPT = re.compile(r"bytes|rows|delet|tombstone|compact|index")


class Recaller:
    """Recalls one after another with cues near stored rows; keeps (start, latency)."""

    def __init__(self, client: EngramClient, vectors: np.ndarray, seed: int) -> None:
        self.client = client
        self.vectors = vectors
        self.rng = np.random.default_rng(seed)
        self.samples: list[tuple[float, float]] = []
        self.failed = 0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            cue = self.vectors[self.rng.integers(len(self.vectors))]
            cue = cue + self.rng.normal(0, 0.1, cue.shape).astype(np.float32)
            started = time.perf_counter()
            try:
                await self.client.recall(SPACE, cue, k=10)
            except Exception:
                self.failed += 1
                await asyncio.sleep(0.1)  # not a tight loop against a shard that is down
                continue
            self.samples.append((started, time.perf_counter() - started))

    def between(self, lo: float, hi: float) -> list[float]:
        return [lat for at, lat in self.samples if lo <= at < hi]


def _vectors(dim: int) -> np.ndarray:
    """Row n's vector is block n % 8 of these (the filler cycles them, as move_bench does)."""
    return np.random.default_rng(2).standard_normal((BATCH * 8, dim)).astype("<f4")


async def fill(client: EngramClient, rows: int, dim: int, base_us: int) -> float:
    """Writes ``rows`` observations as fast as acks come back; returns the seconds it took."""
    vectors = _vectors(dim)
    started = time.perf_counter()
    stream = await client.open_stream(SPACE, target_latency_ms=0)
    futures = []
    for lo in range(0, rows, BATCH):
        n = min(BATCH, rows - lo)
        block = (lo // BATCH % 8) * BATCH
        futures.append(
            await stream.send(
                vectors[block : block + n],
                ids=[f"r{k}" for k in range(lo, lo + n)],
                timestamps_us=base_us + STEP_US * np.arange(lo, lo + n, dtype=np.int64),
            )
        )
    await asyncio.gather(*futures)
    await stream.close()
    return time.perf_counter() - started


def row_vector(vectors: np.ndarray, n: int) -> np.ndarray:
    return vectors[(n // BATCH % 8) * BATCH + n % BATCH]


async def space_stats(cluster: LocalCluster) -> Any:
    """The space's ``SpaceStats`` on shard 0 (None if it does not answer)."""
    reply = (await shard_stats({0: cluster.shard_address(0)})).get(0, ipb.StatsResponse())
    for s in reply.spaces:
        if s.memory_space_id == SPACE:
            return s
    return None


async def wait_for(what: str, check: Any, timeout_s: float, every_s: float = 1.0) -> float:
    """Polls the coroutine function ``check`` until it is true; returns the seconds waited."""
    started = time.perf_counter()
    while not await check():
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"{what}: not within {timeout_s:.0f} s")
        await asyncio.sleep(every_s)
    return time.perf_counter() - started


def shard_metrics(cluster: LocalCluster) -> dict[str, float]:
    """The shard's memory and delete figures, its own and the space's (``engram_shard_*``
    samples of :data:`_KEPT` names), from its /metrics."""
    url = f"http://127.0.0.1:{cluster.shard_http_port(0)}/metrics"
    out: dict[str, float] = {}
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (a loopback URL)
        text = resp.read().decode()
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if (
            m is None
            or not _KEPT.search(m.group(1))
            or m.group(1).endswith(("_bucket", "_created"))
        ):
            continue
        labels = m.group(2) or ""
        if "memory_space" in labels and f'"{SPACE}"' not in labels:
            continue
        out[m.group(1) + (f"{{{labels}}}" if labels and "memory_space" not in labels else "")] = (
            float(m.group(3))
        )
    return out


async def memory(cluster: LocalCluster) -> dict[str, Any]:
    """RSS of the shard process, the space's Stats and the shard's metrics, now."""
    s = await space_stats(cluster)
    return {
        "rss_mb": round(psutil.Process(cluster.pid("shard-0")).memory_info().rss / 1e6, 1),
        "live_rows": s.count if s else None,
        "indexed": s.indexed if s else None,
        "disk_mb": round(s.bytes / 1e6, 1) if s else None,
        "metrics": await asyncio.to_thread(shard_metrics, cluster),
    }


async def delete_by_id(client: EngramClient, ids: list[str], batch: int) -> dict[str, Any]:
    """Deletes ``ids`` in requests of ``batch`` ids, one after another."""
    deleted = 0
    latencies = []
    started = time.perf_counter()
    for k in range(0, len(ids), batch):
        t = time.perf_counter()
        resp = await client.delete(SPACE, ids[k : k + batch], request_id=f"b{k}", timeout=60)
        latencies.append(time.perf_counter() - t)
        deleted += resp.deleted
    seconds = time.perf_counter() - started
    return {
        "ids": len(ids),
        "deleted": deleted,
        "batch": batch,
        "seconds": round(seconds, 3),
        "ids_per_s": round(len(ids) / seconds) if seconds else None,
        "request_ms": summary_ms(latencies),
    }


async def measure_recalls(recaller: Recaller, seconds: float, during: Any = None) -> Any:
    """Runs ``recaller`` for ``seconds`` (or while the coroutine ``during`` runs); returns
    (its latencies in that time, ``during``'s result)."""
    stop = asyncio.Event()
    task = asyncio.create_task(recaller.run(stop))
    lo = time.perf_counter()
    result = None
    try:
        if during is None:
            await asyncio.sleep(seconds)
        else:
            result = await during
    finally:
        hi = time.perf_counter()
        stop.set()
        await task
    return summary_ms(recaller.between(lo, hi)), result


async def check_gone(
    client: EngramClient, vectors: np.ndarray, deleted: list[int], samples: int
) -> int:
    """Recalls with deleted rows' own vectors (each would be its own best hit); returns how
    many deleted rows came back."""
    rng = random.Random(3)
    gone = set(deleted)
    returned = 0
    for n in rng.sample(deleted, min(samples, len(deleted))):
        hits = (await client.recall(SPACE, row_vector(vectors, n), k=10)).hits
        returned += sum(1 for h in hits if h.id.startswith("r") and int(h.id[1:]) in gone)
    return returned


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cp_rate(source: Path, work: Path) -> dict[str, Any]:
    """``cp -r`` of ``source`` on the same disk, then ``sync``: the disk's own copy rate."""
    target = work / "cp-copy"
    size = dir_bytes(source)
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)  # noqa: S603,S607
    subprocess.run(["sync", "-f", str(target)], check=True)  # noqa: S603,S607
    seconds = time.perf_counter() - started
    shutil.rmtree(target, ignore_errors=True)
    return {
        "mb": round(size / 1e6, 1),
        "seconds": round(seconds, 3),
        "mb_s": rounded(size / 1e6 / seconds),
    }


async def backup_and_restore(cluster: LocalCluster, work: Path, live: int) -> dict[str, Any]:
    """Backup (MB/s), ``cp -r`` of the same files, restore into a fresh cluster (MB/s)."""
    target = work / "backup"
    backup = await backups.backup_space({0: cluster.shard_address(0)}, SPACE, target)
    cp = await asyncio.to_thread(cp_rate, backup.directory, work)
    fresh = LocalCluster(work / "restored", shards=1, env=CLUSTER_ENV)
    await asyncio.to_thread(fresh.start)
    try:
        restore = await backups.restore_space({0: fresh.shard_address(0)}, backup.directory)
        restored = await space_stats(fresh)
    finally:
        await asyncio.to_thread(fresh.stop)
    mb = backup.bytes / 1e6
    rows = restored.count if restored else None
    return {
        "mb": round(mb, 1),
        "lsn": backup.lsn,
        "backup_s": round(backup.seconds, 3),
        "backup_mb_s": rounded(mb / backup.seconds),
        "restore_s": round(restore.seconds, 3),
        "restore_mb_s": rounded(mb / restore.seconds),
        "cp": cp,
        "backup_vs_cp": ratio(mb / backup.seconds, cp["mb_s"]),
        "restore_vs_cp": ratio(mb / restore.seconds, cp["mb_s"]),
        "restored_rows": rows,
        "restored_rows_match": rows == live,
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="engram-forget-bench-", dir=args.data_root))
    cluster = LocalCluster(work / "cluster", shards=1, env=cluster_env(args.delete_share))
    await asyncio.to_thread(cluster.start)
    rows = args.rows
    base_us = int(time.time() * 1e6) - STEP_US * rows - 3_600_000_000
    vectors = _vectors(args.dim)
    result: dict[str, Any] = {"rows": rows, "dim": args.dim, "space": SPACE}
    try:
        async with EngramClient(cluster.gateway_address) as client:
            _say(f"fill: {rows:,} observations of dim {args.dim}")
            fill_s = await fill(client, rows, args.dim, base_us)
            result["fill_obs_s"] = round(rows / fill_s)

            async def settled() -> bool:
                s = await space_stats(cluster)
                return bool(
                    s
                    and s.count == rows
                    and s.indexed == s.count
                    and s.checkpoint_lsn >= 0.9 * rows
                )

            _say("waiting for the index and a checkpoint")
            result["index_s"] = round(await wait_for("index", settled, args.index_timeout), 1)
            result["memory_before"] = await memory(cluster)
            recaller = Recaller(client, vectors, 1)
            _say(f"recalls without deletes for {args.recall_seconds:g} s")
            result["recall_without_deletes_ms"], _ = await measure_recalls(
                recaller, args.recall_seconds
            )
            # the newest rows go by time range, a random share of the others by id
            in_range = max(1, int(rows * args.range_share))
            rng = random.Random(7)
            by_id = sorted(rng.sample(range(rows - in_range), int(rows * args.delete_share)))
            _say(f"deleting {len(by_id):,} rows by id, {args.delete_batch:,} a request")
            result["recall_during_deletes_ms"], result["delete_by_id"] = await measure_recalls(
                recaller, 0, delete_by_id(client, [f"r{n}" for n in by_id], args.delete_batch)
            )
            since = base_us + STEP_US * (rows - in_range)
            started = time.perf_counter()
            resp = await client.delete(SPACE, since_us=since, request_id="range", timeout=120)
            range_s = time.perf_counter() - started
            result["delete_by_range"] = {
                "rows": in_range,
                "deleted": resp.deleted,
                "seconds": round(range_s, 3),
                "rows_per_s": round(resp.deleted / range_s) if range_s else None,
            }
            live = rows - len(by_id) - in_range
            result["deleted_rows"] = result["delete_by_id"]["deleted"] + resp.deleted
            result["expected_live"] = live
            result["recall_p99_ratio_during_deletes"] = ratio(
                result["recall_during_deletes_ms"]["p99"],
                result["recall_without_deletes_ms"]["p99"],
            )
            deleted = by_id + list(range(rows - in_range, rows))
            result["deleted_returned_by_recall"] = await check_gone(
                client, vectors, deleted, args.check_samples
            )
            result["recall_failures"] = recaller.failed
            result["memory_after_deletes"] = await memory(cluster)
            result["live_rows_match"] = result["memory_after_deletes"]["live_rows"] == live
            _say(f"waiting up to {args.compact_timeout:g} s for compaction")
            result["compaction"] = await wait_compacted(cluster, args.compact_timeout)
            result["memory_after_compaction"] = await memory(cluster)
        _say("backup, cp and restore")
        result["backup"] = await backup_and_restore(cluster, work, live)
    finally:
        await asyncio.to_thread(cluster.stop)
        if not args.keep_data:
            shutil.rmtree(work, ignore_errors=True)
        else:
            result["data_dir"] = str(work)
    return result


async def wait_compacted(cluster: LocalCluster, timeout_s: float) -> dict[str, Any]:
    """Waits until a compaction ran (a shard metric named ``*compact*`` changed, when the
    shard has one) and the shard's figures (RSS, the space's metrics) are the same two looks
    in a row, 5 s apart; or until ``timeout_s`` passed."""
    started = time.perf_counter()
    first = last = await memory(cluster)
    compact = [k for k in first["metrics"] if "compact" in k]
    ran = not compact
    settled = False
    while time.perf_counter() - started < timeout_s:
        await asyncio.sleep(5.0)
        now = await memory(cluster)
        ran = ran or any(now["metrics"].get(k) != first["metrics"][k] for k in compact)
        settled = now["metrics"] == last["metrics"] and abs(now["rss_mb"] - last["rss_mb"]) < 1
        if ran and settled:
            break
        last = now
    return {
        "compaction_metrics": compact,
        "compaction_seen": ran if compact else None,
        "settled": ran and settled,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _n(x: float | None) -> str:
    """A figure for the tables: whole numbers with thousands separators."""
    if x is None:
        return ""
    return f"{int(x):,}" if float(x).is_integer() else f"{x:,}"


def _say(text: str) -> None:
    print(f"== {text}", flush=True)


def markdown(r: dict[str, Any]) -> str:
    """The report as markdown tables."""
    d, t = r["delete_by_id"], r["delete_by_range"]
    w, dur = r["recall_without_deletes_ms"], r["recall_during_deletes_ms"]
    out = [
        f"# Forgetting: {r['rows']:,} rows of dim {r['dim']}, one shard",
        "",
        "| figure | value |",
        "|---|---|",
        f"| delete by id ({d['batch']:,} ids a request) | {d['ids_per_s']:,} ids/s "
        f"({d['ids']:,} ids in {d['seconds']} s; request P50 {d['request_ms']['p50']} ms, "
        f"P99 {d['request_ms']['p99']} ms) |",
        f"| one time-range delete | {t['deleted']:,} rows in {t['seconds']} s "
        f"({t['rows_per_s']:,} rows/s) |",
        f"| recall without deletes | P50 {w['p50']} ms, P99 {w['p99']} ms ({w['count']}) |",
        f"| recall while {d['ids']:,} rows are deleted | P50 {dur['p50']} ms, P99 {dur['p99']} "
        f"ms ({dur['count']}) |",
        f"| deleted rows returned by a recall of their own vector | "
        f"{r['deleted_returned_by_recall']} |",
        f"| live rows as expected after the deletes | {r['live_rows_match']} |",
        "",
        "| shard memory | before deletes | after deletes | after compaction |",
        "|---|---|---|---|",
    ]
    phases = [r["memory_before"], r["memory_after_deletes"], r["memory_after_compaction"]]
    for key in ("rss_mb", "live_rows", "indexed", "disk_mb"):
        out.append(f"| {key} | " + " | ".join(_n(p[key]) for p in phases) + " |")
    for key in sorted(set().union(*(p["metrics"] for p in phases))):
        out.append(f"| {key} | " + " | ".join(_n(p["metrics"].get(key)) for p in phases) + " |")
    c = r["compaction"]
    out += [
        "",
        f"Compaction: figures {'settled' if c['settled'] else 'still changing'} "
        f"after {c['seconds']} s.",
        "",
    ]
    b = r["backup"]
    out += [
        "| copy of the space | MB | seconds | MB/s | vs cp |",
        "|---|---|---|---|---|",
        f"| backup | {b['mb']} | {b['backup_s']} | {b['backup_mb_s']} | {b['backup_vs_cp']} |",
        f"| restore (fresh cluster) | {b['mb']} | {b['restore_s']} | {b['restore_mb_s']} | "
        f"{b['restore_vs_cp']} |",
        f"| cp -r + sync, same files | {b['cp']['mb']} | {b['cp']['seconds']} | "
        f"{b['cp']['mb_s']} | 1 |",
        "",
        f"Restored rows: {b['restored_rows']} (as expected: {b['restored_rows_match']}).",
    ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000, help="observations written first")
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--delete-share", type=float, default=0.10, help="share deleted by id")
    p.add_argument("--delete-batch", type=int, default=1000, help="ids per delete request")
    p.add_argument("--range-share", type=float, default=0.01, help="newest share deleted by time")
    p.add_argument("--recall-seconds", type=float, default=20.0, help="recalls without deletes")
    p.add_argument("--check-samples", type=int, default=50, help="deleted rows recalled after")
    p.add_argument("--index-timeout", type=float, default=1800.0)
    p.add_argument("--compact-timeout", type=float, default=120.0)
    p.add_argument("--data-root", default=None, help="where the clusters' data goes (temp)")
    p.add_argument("--keep-data", action="store_true")
    p.add_argument("--out", default="bench/results", help="directory of forget-<time>.json")
    p.add_argument("--json", default=None, help="write the results here too")
    args = p.parse_args(argv)
    if not 0 < args.delete_share + args.range_share < 1:
        p.error("--delete-share + --range-share must be between 0 and 1")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    result = asyncio.run(run(args))
    report = {"started": started, "args": vars(args), **result}
    print()
    print(markdown(report))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"forget-{time.strftime('%Y%m%d-%H%M%S')}.json"
    text = json.dumps(report, indent=2, default=str) + "\n"
    path.write_text(text)
    if args.json:
        Path(args.json).write_text(text)
    print(f"written to {path}")
    ok = (
        report["live_rows_match"]
        and report["deleted_returned_by_recall"] == 0
        and report["backup"]["restored_rows_match"]
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
