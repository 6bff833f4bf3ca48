"""WebSocket benchmark of Engram Stream: one-connection ingest throughput per frame encoding, and
many concurrent connections held open with heartbeats.

    .venv/bin/python bench/ws_bench.py                    # starts a local cluster of its own
    .venv/bin/python bench/ws_bench.py --url ws://127.0.0.1:7432/v1/stream   # a running one

Scenarios (each on one connection, for --seconds, pipelined up to the server's credits):

* ``json_lists``   JSON ``batch`` frames, vectors as lists of lists (--json-batch per frame)
* ``json_b64``     JSON ``batch`` frames, vectors as base64 of packed float32
* ``json_episode`` the original Engram ``observation`` frame, one observation per frame
* ``binary``       binary frames: serialized ObservationRequest batches (--binary-batch)
* ``grpc_reference`` the same batches over gRPC with the Python client (its own cluster only,
  or --grpc): what the shards sustain at the moment, for comparison with ``binary``
* ``connections``  --connections WebSockets opened, initialised and held for --hold-s with
  heartbeats both ways (server interval --heartbeat-s when the cluster is ours), then one
  batch on each and a clean close

Frames are encoded before the clock starts (only the sequence number changes), so the figures
are the server's, not the benchmark's JSON encoder's. Acks are counted when durable (WAL
fsynced); REJECTED acks (admission control) are resent after their retry-after. Results are
printed and written to bench/results/ws-<timestamp>.json. The machine is shared and noisy:
compare figures of one run with each other rather than across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "services"))
# gRPC's fork handlers can abort a child between fork and exec (grpc/grpc#43055); this process
# starts the cluster's processes, so it keeps them off (read when grpc is first imported).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from engram.launcher.cluster import LocalCluster  # noqa: E402
from engram.v1 import streaming_pb2 as pb  # noqa: E402

Frame = str | bytes


def _vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype("<f4")
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return float(np.percentile(np.asarray(values), q))


# ------------------------------------------------------------------------------ frame makers


def json_lists_frames(dim: int, n: int, variants: int = 8) -> Callable[[int], Frame]:
    bodies = [
        json.dumps({"vectors": _vectors(n, dim, s).tolist()}, separators=(",", ":"))[1:]
        for s in range(variants)
    ]
    return lambda seq: f'{{"type":"batch","sequence_number":{seq},' + bodies[seq % variants]


def json_b64_frames(dim: int, n: int, variants: int = 8) -> Callable[[int], Frame]:
    bodies = [
        json.dumps(
            {"dim": dim, "vectors_b64": base64.b64encode(_vectors(n, dim, s).tobytes()).decode()},
            separators=(",", ":"),
        )[1:]
        for s in range(variants)
    ]
    return lambda seq: f'{{"type":"batch","sequence_number":{seq},' + bodies[seq % variants]


def json_episode_frames(dim: int, variants: int = 64) -> Callable[[int], Frame]:
    vecs = _vectors(variants, dim, 1)
    bodies = [
        json.dumps(
            {"episode": {"what": f"observation {s}", "embedding": vecs[s].tolist()}},
            separators=(",", ":"),
        )[1:]
        for s in range(variants)
    ]
    return lambda seq: f'{{"type":"observation","sequence_number":{seq},' + bodies[seq % variants]


def binary_frames(dim: int, n: int, variants: int = 4) -> Callable[[int], Frame]:
    # serialized messages concatenate (merge): the batch part is encoded once
    parts = [
        pb.ObservationRequest(
            batch=pb.ObservationBatch(dim=dim, vectors=_vectors(n, dim, s).tobytes())
        ).SerializeToString()
        for s in range(variants)
    ]
    return lambda seq: (
        pb.ObservationRequest(sequence_number=seq).SerializeToString() + parts[seq % variants]
    )


# ------------------------------------------------------------------------------ one stream


async def _recv_json(ws: ClientConnection, kind: str) -> dict[str, Any]:
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] == kind:
            return frame
        if frame["type"] == "error":
            raise RuntimeError(f"server error: {frame}")


async def stream_throughput(
    url: str, space: str, make: Callable[[int], Frame], per_frame: int, seconds: float
) -> dict[str, Any]:
    """Sends frames for ``seconds`` within the server's credits; waits for every ack."""
    async with connect(url, max_size=None, compression=None, open_timeout=20) as ws:
        await ws.send(json.dumps({"type": "init", "memory_space_id": space}))
        init = await _recv_json(ws, "init_ack")
        window = int(init["max_in_flight_batches"])
        credits = asyncio.Semaphore(window)
        pending: dict[int, tuple[float, Frame]] = {}
        latencies: list[float] = []
        counts = {"acked": 0, "rejected": 0, "statuses": 0, "bytes": 0}
        drained = asyncio.Event()
        sending = True
        loop = asyncio.get_running_loop()

        def resend(seq: int) -> None:
            if seq in pending:
                loop.create_task(ws.send(pending[seq][1]))

        async def reader() -> None:
            async for raw in ws:
                frame = json.loads(raw)
                kind = frame["type"]
                if kind == "ack":
                    seq = frame["sequence_number"]
                    if frame["status"] == "rejected":
                        counts["rejected"] += 1
                        loop.call_later(frame["retry_after_ms"] / 1000, resend, seq)
                        continue
                    sent = pending.pop(seq, None)
                    if sent is not None:
                        latencies.append(time.perf_counter() - sent[0])
                        counts["acked"] += 1
                        credits.release()
                    if not sending and not pending:
                        drained.set()
                elif kind == "status":
                    counts["statuses"] += 1
                elif kind == "error":
                    raise RuntimeError(f"server error: {frame}")

        read_task = asyncio.create_task(reader())
        started = time.perf_counter()
        deadline = started + seconds
        seq = 0
        while time.perf_counter() < deadline:
            await credits.acquire()
            if read_task.done():
                read_task.result()
            seq += 1
            frame = make(seq)
            counts["bytes"] += len(frame)
            pending[seq] = (time.perf_counter(), frame)
            await ws.send(frame)
        sending = False
        if pending:
            async with asyncio.timeout(120):
                await asyncio.wait(
                    [read_task, asyncio.create_task(drained.wait())],
                    return_when=asyncio.FIRST_COMPLETED,
                )
            if read_task.done():
                read_task.result()
        elapsed = time.perf_counter() - started
        read_task.cancel()
        await asyncio.gather(read_task, return_exceptions=True)
    obs = counts["acked"] * per_frame
    return {
        "frames": counts["acked"],
        "observations": obs,
        "seconds": round(elapsed, 3),
        "obs_per_s": round(obs / elapsed, 1),
        "frames_per_s": round(counts["acked"] / elapsed, 1),
        "mb_per_s": round(counts["bytes"] / elapsed / 1e6, 2),
        "obs_per_frame": per_frame,
        "credits": window,
        "ack_latency_ms_p50": round(_percentile(latencies, 50) * 1000, 2),
        "ack_latency_ms_p99": round(_percentile(latencies, 99) * 1000, 2),
        "rejected_acks": counts["rejected"],
    }


async def grpc_throughput(
    address: str, space: str, dim: int, n: int, seconds: float
) -> dict[str, Any]:
    """The binary scenario's batches over gRPC (Python client, every credit in use)."""
    from engram_client.client import EngramClient

    batches = [
        pb.ObservationBatch(dim=dim, vectors=_vectors(n, dim, s).tobytes()) for s in range(4)
    ]
    latencies: list[float] = []
    async with EngramClient(address) as client:
        stream = await client.open_stream(space, target_latency_ms=0)
        futures = []
        started = time.perf_counter()
        i = 0
        while time.perf_counter() - started < seconds:
            sent = time.perf_counter()
            fut = await stream.send_batch(batches[i % len(batches)])
            fut.add_done_callback(lambda _f, t=sent: latencies.append(time.perf_counter() - t))
            futures.append(fut)
            i += 1
        await asyncio.gather(*futures)
        elapsed = time.perf_counter() - started
        await stream.close()
    obs = len(futures) * n
    return {
        "frames": len(futures),
        "observations": obs,
        "seconds": round(elapsed, 3),
        "obs_per_s": round(obs / elapsed, 1),
        "frames_per_s": round(len(futures) / elapsed, 1),
        "mb_per_s": round(len(futures) * n * dim * 4 / elapsed / 1e6, 2),
        "obs_per_frame": n,
        "ack_latency_ms_p50": round(_percentile(latencies, 50) * 1000, 2),
        "ack_latency_ms_p99": round(_percentile(latencies, 99) * 1000, 2),
        "rejected_acks": stream.rejections,
    }


# ------------------------------------------------------------------------------ many streams


async def hold_connections(url: str, n: int, hold_s: float, dim: int) -> dict[str, Any]:
    """Opens ``n`` connections, holds them with heartbeats both ways, writes once on each."""
    started = time.perf_counter()

    async def open_one(i: int) -> tuple[ClientConnection, dict[str, Any]]:
        ws = await connect(url, max_size=None, compression=None, open_timeout=60)
        await ws.send(json.dumps({"type": "init", "memory_space_id": f"bench-conn-{i % 10}"}))
        return ws, await _recv_json(ws, "init_ack")

    sem = asyncio.Semaphore(25)

    async def open_limited(i: int) -> tuple[ClientConnection, dict[str, Any]]:
        async with sem:
            return await open_one(i)

    opened = await asyncio.gather(*(open_limited(i) for i in range(n)))
    open_s = time.perf_counter() - started
    heartbeat_s = float(opened[0][1]["heartbeat_s"])
    beats = [0] * n
    acks: list[asyncio.Future[float]] = [asyncio.get_running_loop().create_future() for _ in opened]
    sent_at = [0.0] * n
    closes: list[int | None] = [None] * n

    async def serve(i: int, ws: ClientConnection) -> None:
        async def client_heartbeats() -> None:
            while True:
                await asyncio.sleep(heartbeat_s)
                await ws.send('{"type":"heartbeat"}')

        beater = asyncio.create_task(client_heartbeats())
        try:
            async for raw in ws:
                frame = json.loads(raw)
                if frame["type"] == "heartbeat":
                    beats[i] += 1
                elif frame["type"] == "ack" and not acks[i].done():
                    acks[i].set_result(time.perf_counter() - sent_at[i])
        except ConnectionClosed:
            pass
        finally:
            beater.cancel()
            closes[i] = ws.close_code

    tasks = [asyncio.create_task(serve(i, ws)) for i, (ws, _) in enumerate(opened)]
    await asyncio.sleep(hold_s)
    alive = sum(1 for ws, _ in opened if ws.close_code is None)
    vec = _vectors(1, dim, 0).tolist()
    for i, (ws, _) in enumerate(opened):
        sent_at[i] = time.perf_counter()
        await ws.send(json.dumps({"type": "batch", "sequence_number": 1, "vectors": vec}))
    async with asyncio.timeout(60):
        latencies = await asyncio.gather(*acks)
    for ws, _ in opened:
        await ws.send('{"type":"close"}')
    async with asyncio.timeout(60):
        await asyncio.gather(*tasks)
    return {
        "connections": n,
        "open_all_s": round(open_s, 3),
        "held_s": hold_s,
        "server_heartbeat_s": heartbeat_s,
        "alive_after_hold": alive,
        "heartbeats_per_connection_min": min(beats),
        "heartbeats_per_connection_median": statistics.median(beats),
        "acked_after_hold": len(latencies),
        "ack_latency_ms_p50": round(_percentile(list(latencies), 50) * 1000, 2),
        "ack_latency_ms_p99": round(_percentile(list(latencies), 99) * 1000, 2),
        "closed_normally": sum(1 for c in closes if c == 1000),
    }


# ------------------------------------------------------------------------------ main


def _print_rate(name: str, r: dict[str, Any], cpu: str) -> None:
    print(
        f"  {name:<14} {r['obs_per_s']:>9,.0f} obs/s  {r['frames_per_s']:>8,.0f} frames/s  "
        f"{r['mb_per_s']:>7.1f} MB/s  ack p50 {r['ack_latency_ms_p50']:.1f} ms "
        f"p99 {r['ack_latency_ms_p99']:.1f} ms  rejected {r['rejected_acks']}{cpu}",
        flush=True,
    )


def _gateway_usage(cluster: LocalCluster | None) -> Callable[[], dict[str, float]]:
    """A probe of the gateway process's CPU seconds and RSS (local clusters only)."""
    if cluster is None:
        return dict
    proc = psutil.Process(cluster.pid("gateway"))

    def probe() -> dict[str, float]:
        t = proc.cpu_times()
        return {"cpu_s": t.user + t.system, "rss_mb": proc.memory_info().rss / 1e6}

    return probe


async def run(args: argparse.Namespace, url: str, cluster: LocalCluster | None) -> dict[str, Any]:
    usage = _gateway_usage(cluster)
    tag = time.strftime("%H%M%S")
    scenarios: list[tuple[str, Callable[[int], Frame], int]] = [
        ("json_lists", json_lists_frames(args.dim, args.json_batch), args.json_batch),
        ("json_b64", json_b64_frames(args.dim, args.json_batch), args.json_batch),
        ("json_episode", json_episode_frames(args.dim), 1),
        ("binary", binary_frames(args.dim, args.binary_batch), args.binary_batch),
    ]
    results: dict[str, Any] = {}
    for name, make, per_frame in scenarios:
        if args.only and name not in args.only:
            continue
        before = usage()
        r = await stream_throughput(url, f"bench-{name}-{tag}", make, per_frame, args.seconds)
        after = usage()
        cpu = ""
        if before:
            r["gateway_cpu_s"] = round(after["cpu_s"] - before["cpu_s"], 2)
            r["gateway_rss_mb"] = round(after["rss_mb"], 1)
            # what one gateway core sustains at this encoding (CPU-bound ceiling)
            r["obs_per_gateway_cpu_s"] = round(r["observations"] / max(r["gateway_cpu_s"], 1e-3))
            cpu = f"  gateway {r['obs_per_gateway_cpu_s']:>9,.0f} obs/CPU-s"
        results[name] = r
        _print_rate(name, r, cpu)
    grpc_address = args.grpc or (cluster.gateway_address if cluster is not None else "")
    if grpc_address and (not args.only or "grpc_reference" in args.only):
        before = usage()
        r = await grpc_throughput(
            grpc_address, f"bench-grpc-{tag}", args.dim, args.binary_batch, args.seconds
        )
        after = usage()
        cpu = ""
        if before:
            r["gateway_cpu_s"] = round(after["cpu_s"] - before["cpu_s"], 2)
            r["obs_per_gateway_cpu_s"] = round(r["observations"] / max(r["gateway_cpu_s"], 1e-3))
            cpu = f"  gateway {r['obs_per_gateway_cpu_s']:>9,.0f} obs/CPU-s"
        results["grpc_reference"] = r
        _print_rate("grpc_reference", r, cpu)
    if not args.only or "connections" in args.only:
        before = usage()
        r = await hold_connections(url, args.connections, args.hold_s, args.dim)
        after = usage()
        if before:
            r["gateway_cpu_s"] = round(after["cpu_s"] - before["cpu_s"], 2)
            r["gateway_rss_mb"] = round(after["rss_mb"], 1)
        results["connections"] = r
        print(
            f"  connections   {r['connections']} opened in {r['open_all_s']:.2f} s, "
            f"{r['alive_after_hold']} alive after {r['held_s']:g} s, heartbeats/conn min "
            f"{r['heartbeats_per_connection_min']} median "
            f"{r['heartbeats_per_connection_median']} (every {r['server_heartbeat_s']:g} s), "
            f"{r['acked_after_hold']} acked (p99 {r['ack_latency_ms_p99']:.1f} ms), "
            f"{r['closed_normally']} closed with 1000",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", help="a running gateway's ws://host:port/v1/stream (default: own)")
    p.add_argument("--shards", type=int, default=2)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--seconds", type=float, default=5.0, help="per throughput scenario")
    p.add_argument("--json-batch", type=int, default=100, help="observations per JSON frame")
    p.add_argument("--binary-batch", type=int, default=1000, help="observations per binary frame")
    p.add_argument("--connections", type=int, default=100)
    p.add_argument("--hold-s", type=float, default=10.0)
    p.add_argument("--heartbeat-s", type=float, default=1.0, help="server heartbeat (own cluster)")
    p.add_argument("--grpc", help="gateway gRPC address for grpc_reference (with --url)")
    p.add_argument("--only", nargs="*", help="scenarios to run (json_lists json_b64 ...)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)

    cluster: LocalCluster | None = None
    tmp = None
    if args.url:
        url = args.url
    else:
        tmp = tempfile.TemporaryDirectory(prefix="engram-ws-bench-")
        env = {
            "ENGRAM_WS_HEARTBEAT_S": str(args.heartbeat_s),
            "ENGRAM_WS_IDLE_TIMEOUT_S": str(max(60.0, args.heartbeat_s * 4)),
        }
        cluster = LocalCluster(tmp.name, shards=args.shards, env=env)
        print(f"starting a local cluster ({args.shards} shards) in {tmp.name}", flush=True)
        cluster.start()
        url = f"ws://127.0.0.1:{cluster.http_port}/v1/stream"
    print(
        f"WebSocket benchmark: {url}, dim {args.dim}, {args.seconds:g} s per scenario, "
        f"{os.cpu_count()} cores",
        flush=True,
    )
    try:
        results = asyncio.run(run(args, url, cluster))
    finally:
        if cluster is not None:
            cluster.stop()
        if tmp is not None:
            tmp.cleanup()

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = out_dir / f"ws-{stamp}.json"
    doc = {
        "benchmark": "websocket",
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "url": url if args.url else "local cluster",
        "machine": {
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "load_avg_1m": round(os.getloadavg()[0], 2),
        },
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "results": results,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
