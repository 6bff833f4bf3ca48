"""Recalls first: the shard's recall isolation against its alternatives, and a recall flood.

    .venv/bin/python bench/recall_first.py modes                  # 2 rounds of 4 modes, 20 s
    .venv/bin/python bench/recall_first.py modes --rounds 3 -- --seconds 30 --no-peers \\
        --drain-timeout 5 --limit-seconds 1
    .venv/bin/python bench/recall_first.py flood                  # 20 s, 1,000 recalls/s

``modes`` runs ``engram bench ARGS`` once per mode and round, the modes alternating (today,
queued, latency, both; so a drift of the shared machine's load falls on all of them):

* today: ``ENGRAM_RECALL_ISOLATION=OFF``, no latency pressure, no recall queue bound;
* queued: background work yields while recalls are queued, no latency pressure;
* latency: it yields while the recent recall P99 is above its bound, no latency pressure;
* both: the defaults (either, and the latency pressure fed into admission).

It prints each run's acked obs/s, recall P99 during ingest, visibility P99, ack P99, and the
medians per mode; writes bench/results/recall-first-<timestamp>.json.

``flood`` starts a one-shard cluster (default settings), writes with one stream as fast as
its credits allow while 4 clients offer 1,000 recalls/s in all (open loop), and reports ack
P50/P99, recalls answered and refused (OVERLOADED, with their retry-after), and whether every
acknowledged row is listed afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
ENGRAM = Path(sys.executable).parent / "engram"
DEFAULT_ARGS = ["--seconds", "20", "--no-peers", "--drain-timeout", "5", "--limit-seconds", "1"]
MODES = {
    "today": {
        "ENGRAM_RECALL_ISOLATION": "OFF",
        "ENGRAM_LATENCY_PRESSURE": "0",
        "ENGRAM_RECALL_QUEUE": "100000",
    },
    "queued": {"ENGRAM_RECALL_ISOLATION": "QUEUED", "ENGRAM_LATENCY_PRESSURE": "0"},
    "latency": {"ENGRAM_RECALL_ISOLATION": "LATENCY", "ENGRAM_LATENCY_PRESSURE": "0"},
    "both": {},
}


def _figures(r: dict[str, Any]) -> dict[str, float | None]:
    lat = r.get("latency", {})
    return {
        "acked_obs_per_s": r.get("acked_obs_per_s"),
        "recall_p99_ms_during_ingest": lat.get("recall_ms_during_ingest", {}).get("p99"),
        "recall_p50_ms_during_ingest": lat.get("recall_ms_during_ingest", {}).get("p50"),
        "visibility_p99_ms": r.get("visibility_p99_ms"),
        "ack_p99_ms": lat.get("ack_ms", {}).get("p99"),
        "other_cpu_pct": r.get("machine", {}).get("other_processes_cpu_pct_during_timed_phase"),
    }


def modes(rounds: int, args: list[str]) -> None:
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            for mode, env in MODES.items():
                out = Path(tmp) / f"{mode}-{round_}.json"
                extra = [a for k, v in env.items() for a in ("--cluster-env", f"{k}={v}")]
                cmd = [str(ENGRAM), "bench", *args, *extra, "--json", str(out)]
                print(f"$ {' '.join(cmd)}", flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                run = {"mode": mode, "round": round_, **_figures(json.loads(out.read_text()))}
                print(f"  {run}", flush=True)
                runs.append(run)
    medians = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        medians[mode] = {
            k: statistics.median(r[k] for r in mine if r[k] is not None)
            for k in mine[0]
            if k not in ("mode", "round") and any(r[k] is not None for r in mine)
        }
        print(f"{mode:8} median {medians[mode]}")
    _write("recall-first", {"args": args, "runs": runs, "medians": medians})


def _write(name: str, result: dict[str, Any]) -> None:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"wrote {path}")


async def _flood(address: str, seconds: float, rate: float, dim: int) -> dict[str, Any]:
    from engram.contract.errors import EngramError, OverloadedError
    from engram_client import EngramClient

    space = "recall-flood"
    rng = np.random.default_rng(1)
    acks_ms: list[float] = []
    answered, refused, waits = 0, 0, []
    failed: dict[str, int] = {}  # any other error, by its text (none expected)
    async with EngramClient(address) as writer_client:
        stream = await writer_client.open_stream(space, target_latency_ms=0)
        done = asyncio.Event()

        async def write() -> int:
            pending = []
            sent = 0
            pool = rng.standard_normal((1000, dim)).astype(np.float32)
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t0 = time.perf_counter()
                fut = await stream.send(pool, ids=[f"{sent + i}" for i in range(1000)])
                fut.add_done_callback(
                    lambda _f, t0=t0: acks_ms.append(1e3 * (time.perf_counter() - t0))
                )
                pending.append(fut)
                sent += 1000
            await asyncio.gather(*pending)
            done.set()
            return sent

        async def recall_client(client: EngramClient, share: float) -> None:
            nonlocal answered, refused
            tasks = []

            async def one() -> None:
                nonlocal answered, refused
                try:
                    await client.recall(space, rng.standard_normal(dim), 10, consistency="EVENTUAL")
                    answered += 1
                except OverloadedError as exc:
                    refused += 1
                    waits.append(exc.retry_after_ms)
                except EngramError as exc:
                    failed[str(exc)[:120]] = failed.get(str(exc)[:120], 0) + 1

            while not done.is_set():
                tasks.append(asyncio.create_task(one()))
                await asyncio.sleep(1 / share)
            await asyncio.gather(*tasks)

        clients = [EngramClient(address) for _ in range(4)]
        writer = asyncio.create_task(write())
        await asyncio.sleep(0.5)
        await asyncio.gather(*(recall_client(c, rate / 4) for c in clients))
        sent = await writer
        for c in clients:
            await c.close()
        await stream.close()
        listed = len(await writer_client.list_ids(space))
    return {
        "seconds": seconds,
        "recall_rate_offered": rate,
        "acked_observations": sent,
        "listed_observations": listed,
        "ack_ms_p50": float(np.percentile(acks_ms, 50)),
        "ack_ms_p99": float(np.percentile(acks_ms, 99)),
        "recalls_answered": answered,
        "recalls_refused_overloaded": refused,
        "refusal_retry_after_ms_median": statistics.median(waits) if waits else None,
        "recalls_failed_otherwise": failed,
    }


def flood(seconds: float, rate: float, dim: int) -> None:
    from engram.launcher.cluster import LocalCluster

    with tempfile.TemporaryDirectory() as tmp, LocalCluster(tmp, shards=1) as cluster:
        result = asyncio.run(_flood(cluster.gateway_address, seconds, rate, dim))
    print(json.dumps(result, indent=2))
    _write("recall-flood", result)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("modes", help="alternating engram bench runs per isolation mode")
    m.add_argument("--rounds", type=int, default=2)
    m.add_argument("bench_args", nargs="*", help="engram bench arguments (after --)")
    f = sub.add_parser("flood", help="a recall flood beside a writing stream")
    f.add_argument("--seconds", type=float, default=20.0)
    f.add_argument("--recall-rate", type=float, default=1000.0)
    f.add_argument("--dim", type=int, default=384)
    a = p.parse_args()
    if a.what == "modes":
        modes(a.rounds, a.bench_args or DEFAULT_ARGS)
    else:
        flood(a.seconds, a.recall_rate, a.dim)


if __name__ == "__main__":
    main()
