"""The load generator's processes: writers, the recall process and the visibility sampler.

Each runs in its own process (multiprocessing, spawn) with its own :class:`EngramClient`, and
reports to the parent through one telemetry queue, in chunks every half second:

* ``("acks", wid, [(space, k, t_send, t_written, t_ack, n, ok, in_flight), ...])`` per batch
  (``t_written``: ``send_batch`` returned, i.e. the client's window let the batch go);
* ``("recalls", "recall", [(t_issue, latency_s, server_us, fresh, indexed, space, ok,
  stages), ...])``, ``stages``: the shard's (waited, queued, HNSW, fresh) microseconds;
* ``("vis", [(space, t_send, t_ack, t_received, t_found | None, polls, t_last_poll), ...])``;
* ``("pushes", wid, [(t, space, kind, level, state, preferred_rate, pressure, detail), ...])``:
  what the service pushed to a writer's stream, ``kind`` "status" (a StreamStatus: its
  backpressure level, state, SLOW_DOWN rate, pressure) or "rejected" (a REJECTED ack, whose
  message says why; the client resends the batch after retry-after);
* ``("event", who, space, kind, detail, t)``, ``("ready", who)``, ``("done", who, summary)``,
  ``("failed", who, message)``.

Times are ``time.monotonic()``, one clock for every process on Linux. Writers pace each stream
with a token bucket at ``rate / streams`` (the rate is a shared value the parent may change,
for ``--find-max``); a stream never has more batches in flight than the server's credits allow
(the client waits for a credit in ``send_batch``). Vectors come from pools generated before the
timed phase (:mod:`engram.bench.workload`).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engram.bench.access import Access
from engram.bench.workload import (
    ArraySource,
    SpaceData,
    SpacePlan,
    SyntheticSource,
    VectorSource,
    queries,
)

FLUSH_S = 0.5
RECALL_K = 10
VIS_DEADLINE_S = 10.0
VIS_MAX_POLL_GAP_S = 0.05
MAX_POLLING = 16  # visibility samples being polled at once
MAX_OUTSTANDING_RECALLS = 64


@dataclass(frozen=True)
class SourceSpec:
    kind: str  # "synthetic" or "array"
    dim: int
    path: str = ""
    name: str = "synthetic"

    def build(self) -> VectorSource:
        if self.kind == "array":
            return ArraySource(self.path, self.name)
        return SyntheticSource(self.dim)


@dataclass(frozen=True)
class WorkerSpec:
    """What one load process does; ``plans`` are all spaces, ``mine`` the indexes it writes."""

    who: str
    target: str
    source: SourceSpec
    plans: list[SpacePlan]
    mine: list[int] = field(default_factory=list)
    batch: int = 1000
    streams_total: int = 1
    vis_interval_s: float = 0.0  # writers: sample one acked batch per stream this often
    recall_rate: float = 10.0  # recall process: recalls per second
    client_target_latency_ms: float | None = None  # None: the client's default
    access: Access = field(default_factory=Access)  # API key and TLS of its client
    query_start: int = 0  # first corpus row of the held-out query rows
    flush_timeout_s: float = 120.0


@dataclass
class Channels:
    """Shared objects between the parent and the load processes (from one spawn context)."""

    telemetry: Any  # multiprocessing Queue
    samples: Any  # multiprocessing Queue: writers -> sampler
    rate: Any  # multiprocessing RawValue('d'): offered obs/s over all streams
    t0: Any  # RawValue('d'): monotonic start of the timed phase
    go: Any  # Event: the timed phase starts at t0
    stop_writes: Any  # Event
    stop_reads: Any  # Event


class _Reporter:
    """Buffers records and sends them to the parent every FLUSH_S."""

    def __init__(self, ch: Channels, kind: str, who: str) -> None:
        self.ch, self.kind, self.who = ch, kind, who
        self.items: list[tuple[Any, ...]] = []

    def flush(self) -> None:
        if self.items:
            items, self.items = self.items, []
            self.ch.telemetry.put((self.kind, self.who, items))

    async def run(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            self.flush()


async def _wait_go(ch: Channels) -> float:
    await asyncio.get_running_loop().run_in_executor(None, ch.go.wait)
    t0 = float(ch.t0.value)
    delay = t0 - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)
    return t0


def _guard(kind: str, spec: WorkerSpec, ch: Channels, coro_fn: Any, *args: Any) -> None:
    try:
        asyncio.run(coro_fn(spec, ch, *args))
    except BaseException as exc:  # tell the parent, which reports it
        ch.telemetry.put(("failed", spec.who, f"{kind} failed: {exc!r}\n{traceback.format_exc()}"))
        raise


# ---------------------------------------------------------------------------------- writers


def writer_main(spec: WorkerSpec, ch: Channels) -> None:
    source = spec.source.build()
    datas = {i: SpaceData(spec.plans[i], source, spec.batch) for i in spec.mine}
    _guard("writer", spec, ch, _writer, datas)


async def _writer(spec: WorkerSpec, ch: Channels, datas: dict[int, SpaceData]) -> None:
    from engram_client import StreamEvent

    rep = _Reporter(ch, "acks", spec.who)
    pushes = _Reporter(ch, "pushes", spec.who)
    async with spec.access.client(spec.target) as client:
        streams = {}
        for i, data in datas.items():

            def on_event(ev: StreamEvent, space: str = data.plan.name, si: int = i) -> None:
                if ev.kind in ("disconnected", "resumed", "error"):
                    ch.telemetry.put(
                        ("event", spec.who, space, ev.kind, ev.detail, time.monotonic())
                    )
                elif ev.kind == "status" and ev.status is not None:
                    st = ev.status
                    pushes.items.append(
                        (time.monotonic(), si, "status", int(st.level), int(st.state),
                         int(st.preferred_rate), float(st.pressure), st.message)
                    )  # fmt: skip
                elif ev.kind == "rejected":
                    pushes.items.append((time.monotonic(), si, "rejected", 0, 0, 0, 0.0, ev.detail))

            kwargs: dict[str, Any] = {}
            if spec.client_target_latency_ms is not None:
                kwargs["target_latency_ms"] = spec.client_target_latency_ms
            streams[i] = await client.open_stream(data.plan.name, on_event=on_event, **kwargs)
        ch.telemetry.put(("ready", spec.who))
        t0 = await _wait_go(ch)
        flusher = asyncio.create_task(rep.run())
        push_flusher = asyncio.create_task(pushes.run())
        sent: dict[int, int] = {}
        failed: dict[int, list[int]] = {i: [] for i in datas}
        await asyncio.gather(
            *[
                _pace(spec, ch, i, streams[i], datas[i], rep, sent, failed, t0 + 0.05 * n)
                for n, i in enumerate(datas)
            ]
        )
        for stream in streams.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.flush(), spec.flush_timeout_s)
        for stream in streams.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.close(), 10)
        flusher.cancel()
        push_flusher.cancel()
        rep.flush()
        pushes.flush()
        reconnects = {datas[i].plan.name: s.reconnects for i, s in streams.items()}
    ch.telemetry.put(
        (
            "done",
            spec.who,
            {"sent": sent, "failed": failed, "reconnects": reconnects},
        )
    )


async def _pace(
    spec: WorkerSpec,
    ch: Channels,
    si: int,
    stream: Any,
    data: SpaceData,
    rep: _Reporter,
    sent: dict[int, int],
    failed: dict[int, list[int]],
    first_sample: float,
) -> None:
    """Sends batches 0, 1, 2 ... of one space at rate / streams_total until told to stop."""
    from engram.v1 import streaming_pb2 as pb

    b, dim = spec.batch, data.dim
    buf = np.empty((b, dim), np.float32)
    burst = 2.0 * b
    tokens = 0.0
    last = time.monotonic()
    next_sample = first_sample if spec.vis_interval_s > 0 else float("inf")
    k = 0
    name = data.plan.name
    while not ch.stop_writes.is_set():
        rate = float(ch.rate.value) / spec.streams_total
        now = time.monotonic()
        if rate <= 0:
            last = now
            await asyncio.sleep(0.05)
            continue
        tokens = min(tokens + (now - last) * rate, burst)
        last = now
        if tokens < b:
            await asyncio.sleep(min(0.1, (b - tokens) / rate))
            continue
        tokens -= b
        data.fill_batch(k, buf)
        batch = pb.ObservationBatch(dim=dim, vectors=buf.tobytes())
        batch.ids.extend(data.ids(k))
        batch.contents.extend(data.batch_contents(k))
        t_send = time.monotonic()
        # send_batch waits while the client's window (credits, latency target) is full
        fut = await stream.send_batch(batch)
        t_written = time.monotonic()
        depth = stream.in_flight
        probe: tuple[bytes, str] | None = None
        if t_send >= next_sample:
            next_sample = max(next_sample + spec.vis_interval_s, t_send)
            g = k * b + b // 2
            probe = (data.row(g).astype("<f4").tobytes(), f"{name}/{g}")

        def on_ack(
            f: asyncio.Future[Any],
            k: int = k,
            t_send: float = t_send,
            t_written: float = t_written,
            depth: int = depth,
            probe: tuple[bytes, str] | None = probe,
        ) -> None:
            t_ack = time.monotonic()
            ok = not f.cancelled() and f.exception() is None
            rep.items.append((si, k, t_send, t_written, t_ack, b, ok, depth))
            if not ok:
                failed[si].append(k)
            elif probe is not None:
                ch.samples.put_nowait((si, probe[0], probe[1], t_send, t_ack))

        fut.add_done_callback(on_ack)
        k += 1
        sent[si] = k


# ----------------------------------------------------------------------------- recall helper


async def recall_once(
    stub: Any, space: str, cue: np.ndarray, consistency: int, deadline_s: float = 30.0
) -> tuple[list[str], Any]:
    """One standalone recall (RecallStream); returns (hit ids, last chunk's metadata)."""
    from engram.v1 import streaming_pb2 as pb

    req = pb.StreamingRecallRequest(
        memory_space_id=space,
        cue=cue.tolist(),
        max_results=RECALL_K,
        consistency=consistency,
    )
    ids: list[str] = []
    meta = None
    async for chunk in stub.RecallStream(req, timeout=deadline_s):
        ids.extend(m.id for m in chunk.results)
        meta = chunk.metadata
    return ids, meta


# ---------------------------------------------------------------------------- recall process


def recaller_main(spec: WorkerSpec, ch: Channels) -> None:
    source = spec.source.build()
    cues = {
        i: queries(source, spec.query_start + 4096 * i, 128, seed=i, cycles=1, plan_seed=p.seed)
        for i, p in enumerate(spec.plans)
    }
    _guard("recall process", spec, ch, _recaller, cues)


async def _recaller(spec: WorkerSpec, ch: Channels, cues: dict[int, np.ndarray]) -> None:
    from engram.v1 import streaming_pb2 as pb

    rep = _Reporter(ch, "recalls", spec.who)
    outstanding: set[asyncio.Task[None]] = set()
    skipped = 0

    async def one(stub: Any, si: int, cue: np.ndarray) -> None:
        t = time.monotonic()
        try:
            _, meta = await recall_once(stub, spec.plans[si].name, cue, pb.BOUNDED)
        except Exception:
            rep.items.append((t, time.monotonic() - t, 0, 0, 0, si, False, None))
            return
        server_us = meta.latency_us if meta is not None else 0
        fresh = meta.fresh_count if meta is not None else 0
        indexed = meta.indexed_count if meta is not None else 0
        stages = None
        if meta is not None:
            stages = (meta.waited_us, meta.queued_us, meta.index_us, meta.fresh_us)
        rep.items.append((t, time.monotonic() - t, server_us, fresh, indexed, si, True, stages))

    async with spec.access.client(spec.target) as client:
        ch.telemetry.put(("ready", spec.who))
        t0 = await _wait_go(ch)
        flusher = asyncio.create_task(rep.run())
        interval = 1.0 / spec.recall_rate if spec.recall_rate > 0 else 0.0
        n = 0
        next_t = t0
        while interval and not ch.stop_reads.is_set():
            delay = next_t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            next_t += interval
            si = n % len(spec.plans)
            cue = cues[si][(n // len(spec.plans)) % len(cues[si])]
            n += 1
            if len(outstanding) >= MAX_OUTSTANDING_RECALLS:
                skipped += 1
                continue
            task = asyncio.create_task(one(client.stub, si, cue))
            outstanding.add(task)
            task.add_done_callback(outstanding.discard)
        if outstanding:
            await asyncio.wait(outstanding, timeout=30)
        flusher.cancel()
        rep.flush()
    ch.telemetry.put(("done", spec.who, {"issued": n, "skipped": skipped}))


# ------------------------------------------------------------------------ visibility sampler


def sampler_main(spec: WorkerSpec, ch: Channels) -> None:
    _guard("visibility sampler", spec, ch, _sampler)


async def _sampler(spec: WorkerSpec, ch: Channels) -> None:
    """Polls recall (EVENTUAL, k=10) for a vector of each sampled batch until it is returned."""
    from engram.v1 import streaming_pb2 as pb

    loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
    rep = _Reporter(ch, "vis", spec.who)
    closing = threading.Event()

    def bridge() -> None:
        while not closing.is_set():
            try:
                item = ch.samples.get(timeout=0.1)
            except queue.Empty:
                continue
            loop.call_soon_threadsafe(inbox.put_nowait, (*item, time.monotonic()))

    async def poll(stub: Any, item: tuple[Any, ...]) -> None:
        si, vec, oid, t_send, t_ack, t_recv = item
        cue = np.frombuffer(vec, "<f4")
        polls = 0
        found: float | None = None
        issued = 0.0
        while time.monotonic() - t_ack < VIS_DEADLINE_S:
            polls += 1
            issued = time.monotonic()
            try:
                ids, _ = await recall_once(stub, spec.plans[si].name, cue, pb.EVENTUAL)
            except Exception:
                ids = []
            if oid in ids:
                found = time.monotonic()
                break
            # back off (2, 4, 8 ... 50 ms): the polls must not become a recall load of their own
            await asyncio.sleep(min(VIS_MAX_POLL_GAP_S, 0.002 * 2 ** min(polls - 1, 8)))
        rep.items.append((si, t_send, t_ack, t_recv, found, polls, issued))

    thread = threading.Thread(target=bridge, name="sample-bridge", daemon=True)
    thread.start()
    tasks: set[asyncio.Task[None]] = set()
    skipped = 0
    async with spec.access.client(spec.target) as client:
        ch.telemetry.put(("ready", spec.who))
        await _wait_go(ch)
        flusher = asyncio.create_task(rep.run())
        while not (ch.stop_reads.is_set() and inbox.empty()):
            try:
                item = await asyncio.wait_for(inbox.get(), 0.2)
            except TimeoutError:
                continue
            if len(tasks) >= MAX_POLLING:
                skipped += 1  # the sampler is behind: drop this sample rather than pile up
                continue
            task = asyncio.create_task(poll(client.stub, item))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.wait(tasks, timeout=VIS_DEADLINE_S + 5)
        flusher.cancel()
        rep.flush()
    closing.set()
    thread.join(1)
    ch.telemetry.put(("done", spec.who, {"skipped": skipped}))
