"""``engram demo``: stream observations into a running cluster, recall some, verify all.

Streams ``--count`` observations, spread over ``--spaces`` memory spaces (one stream each, in
batches), through the Python client; prints progress and throughput, a few recalls, and with
``--verify`` reads every space back and checks that each acknowledged observation is there
exactly once. Exit status 1 on any loss or duplicate. ``--api-key`` (default
``$ENGRAM_API_KEY``) and ``--ca FILE`` / ``--target grpcs://...`` reach a gateway that asks
for a key and serves TLS (:mod:`engram.client_options`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from collections.abc import Callable

import numpy as np

from engram import client_options
from engram.corpus import Corpus
from engram.v1 import streaming_pb2 as pb
from engram_client import EngramClient, StreamEvent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="engram demo", description=__doc__.splitlines()[0])
    client_options.add_arguments(p)
    p.add_argument("--spaces", type=int, default=3, help="memory spaces to write (default 3)")
    p.add_argument("--count", type=int, default=100_000, help="observations in all")
    p.add_argument("--dim", type=int, default=384, help="vector dimension (default 384)")
    p.add_argument("--batch", type=int, default=1000, help="observations per batch (default 1000)")
    p.add_argument("--prefix", default="demo", help="space name prefix (default 'demo')")
    p.add_argument("--verify", action="store_true", help="read every space back and check it")
    return p.parse_args(argv)


async def _stream_space(
    client: EngramClient,
    space: str,
    corpus: Corpus,
    start: int,
    n: int,
    batch: int,
    acked: list[str],
    progress: list[int],
    events: Counter[str],
    run: str,
    visibility: list[float],
) -> int:
    last_state = [pb.StreamStatus.ACTIVE]

    def on_event(ev: StreamEvent) -> None:
        events[ev.kind] += 1
        if ev.kind in ("disconnected", "resumed", "error"):
            print(f"  [{space}] {ev.kind}: {ev.detail}", flush=True)
        elif ev.kind == "status" and ev.status is not None and ev.status.state != last_state[0]:
            last_state[0] = ev.status.state
            state = pb.StreamStatus.State.Name(ev.status.state)
            print(f"  [{space}] status {state}: {ev.detail}", flush=True)
        elif ev.kind == "rejected" and events["rejected"] % 50 == 1:
            print(f"  [{space}] rejected (#{events['rejected']}): {ev.detail}", flush=True)

    try:
        return await _send_all(
            client, space, corpus, start, n, batch, acked, progress, on_event, run, visibility
        )
    except Exception as exc:  # report and let the other spaces finish
        print(f"  [{space}] stream failed: {exc}", flush=True)
        return -1


async def _send_all(
    client: EngramClient,
    space: str,
    corpus: Corpus,
    start: int,
    n: int,
    batch: int,
    acked: list[str],
    progress: list[int],
    on_event: Callable[[StreamEvent], None],
    run: str,
    visibility: list[float],
) -> int:
    stream = await client.open_stream(space, on_event=on_event)
    futures = []
    probes: list[asyncio.Task[None]] = []
    for number, lo in enumerate(range(start, start + n, batch)):
        hi = min(lo + batch, start + n)
        ids = [f"{run}:{i}" for i in range(lo, hi)]
        contents = [f"observation {i}" for i in range(lo, hi)]
        vectors = corpus.vectors(lo, hi - lo)
        fut = await stream.send(vectors, ids=ids, contents=contents)
        sent_at = time.perf_counter()  # written to the stream (after waiting for a credit)
        if number % PROBE_EVERY == 0:
            probes.append(
                asyncio.create_task(
                    _probe(client, space, vectors[-1], ids[-1], sent_at, visibility)
                )
            )

        def done(f: asyncio.Future[object], ids: list[str] = ids) -> None:
            if not f.cancelled() and f.exception() is None:
                acked.extend(ids)
                progress[0] += len(ids)

        fut.add_done_callback(done)
        futures.append(fut)
    await asyncio.gather(*futures, return_exceptions=True)
    failed = sum(1 for f in futures if f.exception() is not None)
    await asyncio.gather(*probes, return_exceptions=True)
    await stream.close()
    return failed


PROBE_EVERY = 10  # every tenth batch is probed for visibility


async def _probe(
    client: EngramClient, space: str, vector: object, oid: str, sent_at: float, out: list[float]
) -> None:
    """Write -> first recall that returns it (EVENTUAL: no server-side waiting)."""
    deadline = sent_at + 30
    while time.perf_counter() < deadline:
        try:
            r = await client.recall(space, vector, k=10, consistency="EVENTUAL")  # type: ignore[arg-type]
        except Exception:  # noqa: BLE001 (a fault in the cluster: keep probing)
            await asyncio.sleep(0.05)
            continue
        if any(h.id == oid for h in r.hits):  # an earlier run may hold the same vector
            out.append(time.perf_counter() - sent_at)
            return
        await asyncio.sleep(0.002)


async def run(args: argparse.Namespace) -> int:
    corpus = Corpus(args.dim)
    spaces = [f"{args.prefix}-{i}" for i in range(args.spaces)]
    per = [
        args.count // args.spaces + (1 if i < args.count % args.spaces else 0)
        for i in range(args.spaces)
    ]
    starts = [sum(per[:i]) for i in range(args.spaces)]
    acked: dict[str, list[str]] = {s: [] for s in spaces}
    progress = [0]
    events: Counter[str] = Counter()
    run = f"run{int(time.time() * 1000) % 100_000_000}"  # ids are unique to this run
    visibility: list[float] = []
    print(
        f"streaming {args.count} observations (dim {args.dim}, batches of {args.batch}) "
        f"into {args.spaces} spaces via {args.target}",
        flush=True,
    )
    try:
        client = client_options.connect(args)
    except ValueError as exc:  # a bad target, an unreadable CA file
        print(f"error: {exc}", file=sys.stderr)
        return 2
    async with client:
        t0 = time.perf_counter()

        async def report() -> None:
            last, last_t = 0, t0
            while True:
                await asyncio.sleep(1.0)
                now = time.perf_counter()
                done = progress[0]
                print(
                    f"  {done:>10,} acked  {(done - last) / (now - last_t):>10,.0f} obs/s",
                    flush=True,
                )
                last, last_t = done, now

        reporter = asyncio.create_task(report())
        failed = await asyncio.gather(
            *[
                _stream_space(
                    client,
                    s,
                    corpus,
                    starts[i],
                    per[i],
                    args.batch,
                    acked[s],
                    progress,
                    events,
                    run,
                    visibility,
                )
                for i, s in enumerate(spaces)
            ]
        )
        elapsed = time.perf_counter() - t0
        reporter.cancel()
        total = sum(len(v) for v in acked.values())
        broken = sum(1 for f in failed if f < 0)
        failed_batches = sum(f for f in failed if f > 0)
        print(
            f"acked {total:,} observations in {elapsed:.2f} s: {total / elapsed:,.0f} obs/s "
            f"(durable: WAL fsync before every ack); failed batches: {failed_batches}; "
            f"failed streams: {broken}; reconnects: {events['disconnected']}; "
            f"status changes: {events['status']}; rejected and resent: {events['rejected']}"
        )
        if visibility:
            v = np.sort(np.array(visibility)) * 1000
            print(
                f"visibility (write -> first recall that returns it, {len(v)} probes): "
                f"P50 {np.percentile(v, 50):.1f} ms, P99 {np.percentile(v, 99):.1f} ms, "
                f"max {v[-1]:.1f} ms"
            )
        for i, space in enumerate(spaces[:3]):
            probe = corpus.vectors(starts[i], 1)[0]
            r = await client.recall(space, probe, k=3)
            top = ", ".join(f"{h.id} ({h.score:.3f})" for h in r.hits)
            print(
                f"recall in {space} for observation {starts[i]}: {top}  "
                f"[snapshot {r.snapshot_sequence}, {r.latency_us / 1000:.1f} ms]"
            )
        if not args.verify:
            return 0 if failed_batches == 0 and broken == 0 else 1
        status = await verify(client, acked)
        return status or (1 if broken else 0)


async def verify(client: EngramClient, acked: dict[str, list[str]]) -> int:
    print("verifying: reading every space back ...", flush=True)
    lost_total = dup_total = 0
    for space, ids in acked.items():
        run = ids[0].split(":", 1)[0] + ":" if ids else ""
        found: Counter[str] = Counter()
        lsns: list[int] = []
        async for chunk_ids, chunk_lsns in client.list_observations(space):
            found.update(i for i in chunk_ids if i.startswith(run))
            lsns.extend(chunk_lsns)
        lost = len(set(ids) - set(found))
        dups = sum(c - 1 for c in found.values() if c > 1)
        ordered = all(a < b for a, b in zip(lsns, lsns[1:], strict=False))
        lost_total += lost
        dup_total += dups
        print(
            f"  {space}: acked {len(ids):,}, stored {sum(found.values()):,} of this run, "
            f"lost {lost}, "
            f"duplicated {dups}, LSNs increasing: {ordered}"
        )
    ok = lost_total == 0 and dup_total == 0
    print(f"verify {'OK' if ok else 'FAILED'}: lost {lost_total}, duplicated {dup_total}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
