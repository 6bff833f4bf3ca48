"""The limits the service is measured against, taken in the same run on the same machine.

* :func:`hnswlib_rate`: raw ``add_items`` throughput with the shard's index parameters
  (M, ef_construction, threads) on the benchmark's corpus;
* :func:`wal_rate`: fsync'd append throughput of :class:`engram.shard.wal.Wal` in the
  benchmark's data directory, with records the size of one batch's WAL record, from several
  concurrent appenders (group commit);
* :func:`grpc_rate`: loopback gRPC throughput of the very ``ObservationRequest`` messages the
  client sends, into a trivial grpc.aio sink in its own process that parses each one and acks it.

Each returns a JSON-ready dict; ``obs_per_s`` is the comparable figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from engram.bench.workload import VectorSource, normalise

SINK_SERVICE = "engram.v1.EngramStream"


def hnswlib_rate(
    source: VectorSource, start: int, count: int, m: int, ef_construction: int, threads: int
) -> dict[str, Any]:
    """Adds ``count`` corpus rows to a fresh hnswlib index in chunks of 5,000 rows.

    Also the CPU it took: this process's user + system seconds (every thread, hnswlib's
    workers included) around the ``add_items`` calls alone, per million vectors: the raw cost
    of indexing that ``core_seconds_per_million_indexed`` of the service is compared with."""
    import hnswlib
    import psutil

    data = normalise(source.vectors(start, count))
    rss_before = psutil.Process().memory_info().rss
    index = hnswlib.Index(space="ip", dim=source.dim)
    index.init_index(max_elements=count, M=m, ef_construction=ef_construction)
    index.set_num_threads(threads)
    chunk = 5_000
    rates = []
    cpu_s = 0.0
    t_all = time.perf_counter()
    for lo in range(0, count, chunk):
        hi = min(count, lo + chunk)
        t, c = time.perf_counter(), time.process_time()
        index.add_items(data[lo:hi], np.arange(lo, hi), num_threads=threads)
        cpu_s += time.process_time() - c
        rates.append((hi, (hi - lo) / (time.perf_counter() - t)))
    elapsed = time.perf_counter() - t_all
    rss_per_vector = (psutil.Process().memory_info().rss - rss_before) / count
    del index
    return {
        "what": "hnswlib add_items, fresh index",
        "count": count,
        "dim": source.dim,
        "M": m,
        "ef_construction": ef_construction,
        "threads": threads,
        "seconds": round(elapsed, 3),
        "vectors_per_s": round(count / elapsed, 1),
        "last_chunk_vectors_per_s": round(rates[-1][1], 1),
        "by_size": [[n, round(r, 1)] for n, r in rates],
        "rss_bytes_per_vector": round(rss_per_vector, 1),
        "core_seconds": round(cpu_s, 3),
        "core_seconds_per_million": round(cpu_s / count * 1e6, 1),
        "obs_per_s": round(count / elapsed, 1),
    }


def wal_rate(
    directory: Path, record_bytes: int, batch: int, seconds: float, appenders: int = 4
) -> dict[str, Any]:
    """``appenders`` tasks append ``record_bytes`` records to one Wal for ``seconds``."""
    from engram.shard.wal import Wal

    if directory.exists():
        shutil.rmtree(directory)
    payload = os.urandom(record_bytes)
    latencies: list[float] = []

    async def run() -> tuple[int, float, int]:
        wal = Wal(directory)
        for _ in wal.replay():
            pass
        wal.start(asyncio.get_running_loop())
        lsn = 0
        done = 0
        stop = time.monotonic() + seconds

        async def appender() -> None:
            nonlocal lsn, done
            while time.monotonic() < stop:
                lsn += batch
                t = time.perf_counter()
                await wal.append(payload, lsn)
                latencies.append(time.perf_counter() - t)
                done += 1

        t0 = time.perf_counter()
        await asyncio.gather(*[appender() for _ in range(appenders)])
        elapsed = time.perf_counter() - t0
        fsyncs = wal.fsync_count
        await wal.close()
        return done, elapsed, fsyncs

    try:
        records, elapsed, fsyncs = asyncio.run(run())
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    lat = np.asarray(latencies) * 1000
    return {
        "what": f"engram Wal.append, {appenders} concurrent appenders, group commit + fdatasync",
        "directory": str(directory.parent),
        "record_bytes": record_bytes,
        "records": records,
        "seconds": round(elapsed, 3),
        "records_per_s": round(records / elapsed, 1),
        "mb_per_s": round(records * record_bytes / elapsed / 1e6, 1),
        "fsyncs": fsyncs,
        "append_ms_p50": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
        "append_ms_p99": round(float(np.percentile(lat, 99)), 3) if lat.size else None,
        "obs_per_s": round(records * batch / elapsed, 1),
    }


# --------------------------------------------------------------------------------- gRPC sink


async def _serve_sink(port: int) -> None:
    import grpc

    from engram.v1 import streaming_pb2 as pb

    async def observe(requests: Any, context: Any) -> Any:
        async for req in requests:
            ack = pb.ObservationAck(status=pb.ObservationAck.ACCEPTED, count=len(req.batch.ids))
            yield pb.ObservationResponse(ack=ack, sequence_number=req.sequence_number)

    handler = grpc.method_handlers_generic_handler(
        SINK_SERVICE,
        {
            "ObserveStream": grpc.stream_stream_rpc_method_handler(
                observe,
                request_deserializer=pb.ObservationRequest.FromString,
                response_serializer=pb.ObservationResponse.SerializeToString,
            )
        },
    )
    opts = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ]
    server = grpc.aio.server(options=opts)
    server.add_generic_rpc_handlers([handler])
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print("ready", flush=True)
    await server.wait_for_termination()


def grpc_rate(
    request: bytes, batch: int, seconds: float, streams: int = 2, window: int = 8
) -> dict[str, Any]:
    """Streams the serialized ``request`` to a sink process; ``window`` unacked per stream."""
    from engram.launcher.procs import free_port

    port = free_port("127.0.0.1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "engram.bench.limits", "sink", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        if line != "ready":
            raise RuntimeError(f"gRPC sink did not start: {line!r}")
        return asyncio.run(_grpc_client(port, request, batch, seconds, streams, window))
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _grpc_client(
    port: int, request: bytes, batch: int, seconds: float, streams: int, window: int
) -> dict[str, Any]:
    import grpc

    opts = [
        ("grpc.max_receive_message_length", 64 << 20),
        ("grpc.max_send_message_length", 64 << 20),
    ]
    latencies: list[float] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as channel:
        method = channel.stream_stream(
            f"/{SINK_SERVICE}/ObserveStream",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        acked = 0
        stop = time.monotonic() + seconds

        async def one() -> None:
            nonlocal acked
            call = method()
            sent: list[float] = []
            credits = asyncio.Semaphore(window)

            async def reader() -> None:
                nonlocal acked
                async for _ in call:
                    latencies.append(time.perf_counter() - sent.pop(0))
                    acked += batch
                    credits.release()

            task = asyncio.create_task(reader())
            while time.monotonic() < stop:
                await credits.acquire()
                sent.append(time.perf_counter())
                await call.write(request)
            await call.done_writing()
            await task

        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(streams)])
        elapsed = time.perf_counter() - t0
    lat = np.asarray(latencies) * 1000
    return {
        "what": f"grpc.aio loopback, {streams} streams x {window} in flight, "
        "ObservationRequest parsed and acked by a sink process",
        "message_bytes": len(request),
        "seconds": round(elapsed, 3),
        "messages_per_s": round(acked / batch / elapsed, 1),
        "mb_per_s": round(acked / batch * len(request) / elapsed / 1e6, 1),
        "ack_ms_p50": round(float(np.percentile(lat, 50)), 3) if lat.size else None,
        "ack_ms_p99": round(float(np.percentile(lat, 99)), 3) if lat.size else None,
        "obs_per_s": round(acked / elapsed, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m engram.bench.limits")
    sub = p.add_subparsers(dest="cmd", required=True)
    sink = sub.add_parser("sink", help="serve the trivial gRPC sink until terminated")
    sink.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    if args.cmd == "sink":
        asyncio.run(_serve_sink(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
