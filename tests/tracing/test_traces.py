"""Traces of real batches and recalls, from a real gateway and shard to a real OTLP collector.

The collector is :class:`~engram.bench.otlp_sink.OtlpSink` (the OTLP ``TraceService`` over
gRPC) in this test process; the cluster's services export to it with the SDK's OTLP exporter,
configured only by the standard ``OTEL_*`` variables. Checked: one batch gives one trace whose
shard spans are children of the gateway's (the context crossed the process boundary) with the
write path's steps under them; a recall's trace reaches the shard's tiers; a client's
``traceparent`` is continued; ratio 0 exports nothing the client did not ask for; a collector
that refuses or never answers neither stops acks nor goes uncounted.
"""

from __future__ import annotations

import asyncio
import socket
import urllib.request
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from engram.bench.otlp_sink import OtlpSink, ReceivedSpan
from engram.launcher.cluster import LocalCluster
from engram.v1 import streaming_pb2 as pb
from engram.v1 import streaming_pb2_grpc
from engram_client import EngramClient
from engram_client.client import make_batch

DIM = 8
WAIT_S = 20.0  # a deadline for spans to arrive, never a measured figure
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"


def _env(endpoint: str, ratio: str, **extra: str) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": ratio,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        **extra,
    }


@pytest.fixture
def sink() -> Iterator[OtlpSink]:
    s = OtlpSink().start()
    try:
        yield s
    finally:
        s.stop()


async def _wait_for(
    sink: OtlpSink, done: Callable[[list[ReceivedSpan]], bool]
) -> list[ReceivedSpan]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT_S
    while not done(spans := sink.spans) and loop.time() < deadline:  # noqa: ASYNC110 (a thread fills it)
        await asyncio.sleep(0.05)
    return spans


def _has(*names: str) -> Callable[[list[ReceivedSpan]], bool]:
    """Whether spans of each name have arrived (each process exports on its own schedule)."""
    return lambda spans: set(names) <= {s.name for s in spans}


def _vectors(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype("<f4")


async def _write(cluster: LocalCluster, space: str, batches: int, n: int = 50) -> list[int]:
    """Writes through the Python client; the first LSN of each acked batch."""
    async with EngramClient(cluster.gateway_address) as client:
        stream = await client.open_stream(space)
        futures = [await stream.send_batch(make_batch(_vectors(n, seed=i))) for i in range(batches)]
        acks = await asyncio.wait_for(asyncio.gather(*futures), 60)
        await stream.close()
    return [a.first_lsn for a in acks]


async def _raw_batch(cluster: LocalCluster, space: str, metadata: tuple[tuple[str, str], ...]):
    """One batch on a raw ObserveStream opened with ``metadata``; returns its ack."""
    async with grpc.aio.insecure_channel(cluster.gateway_address) as channel:
        call = streaming_pb2_grpc.EngramStreamStub(channel).ObserveStream(metadata=metadata)
        await call.write(pb.ObservationRequest(memory_space_id=space, init=pb.StreamInit()))
        assert (await asyncio.wait_for(call.read(), 10)).HasField("init_ack")
        await call.write(pb.ObservationRequest(sequence_number=1, batch=make_batch(_vectors(5))))
        resp = await asyncio.wait_for(call.read(), 10)
        while resp.HasField("status"):
            resp = await asyncio.wait_for(call.read(), 10)
        call.cancel()
    assert resp.ack.status == pb.ObservationAck.ACCEPTED, resp
    return resp.ack


def _dropped(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "engram_tracing_spans_dropped":
            return sum(s.value for s in family.samples if s.name.endswith("_total"))
    raise AssertionError("engram_tracing_spans_dropped_total is not exported")


def _one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


# ------------------------------------------------------------------------------- tests


async def test_batch_and_recall_traces_cross_processes(make_cluster, sink, space_id) -> None:
    cluster = make_cluster(shards=1, env=_env(sink.endpoint, "1"))
    [first_lsn] = await _write(cluster, space_id, 1)

    step_names = [f"engram.shard.{step}" for step in ("admit", "wal_commit", "publish")]
    spans = await _wait_for(
        sink,
        _has("engram.gateway.batch", "engram.gateway.forward", "engram.shard.append", *step_names),
    )
    batch = _one(spans, "engram.gateway.batch")
    trace = [s for s in spans if s.trace_id == batch.trace_id]
    assert {s.trace_id for s in spans} == {batch.trace_id}, "one batch, one trace"
    assert batch.service == "engram-gateway" and batch.parent_id == ""
    assert batch.attributes["engram.memory_space"] == space_id
    assert batch.attributes["engram.batch.size"] == 50
    assert batch.attributes["engram.lsn.first"] == first_lsn

    forward = _one(trace, "engram.gateway.forward")
    append = _one(trace, "engram.shard.append")
    assert forward.parent_id == batch.span_id
    assert append.service == "engram-shard" and append.instance == "shard-0"
    assert append.parent_id == batch.span_id, "the shard's span is the gateway's child"
    assert append.attributes["engram.lsn.first"] == first_lsn
    assert append.attributes["engram.pressure_level"] == 0  # NORMAL
    steps = [_one(trace, name) for name in step_names]
    assert all(s.parent_id == append.span_id for s in steps)
    assert [s.start_ns for s in steps] == sorted(s.start_ns for s in steps)
    assert batch.start_ns <= append.start_ns <= append.end_ns <= batch.end_ns

    async with EngramClient(cluster.gateway_address) as client:
        result = await client.recall(space_id, _vectors(1)[0], k=3)
    assert len(result.hits) == 3
    tier_names = [
        f"engram.shard.recall.{t}" for t in ("snapshot", "queued", "index", "fresh", "merge")
    ]
    spans = await _wait_for(sink, _has("engram.gateway.recall", "engram.shard.recall", *tier_names))
    recall = _one(spans, "engram.gateway.recall")
    on_shard = _one(spans, "engram.shard.recall")
    assert on_shard.parent_id == recall.span_id and on_shard.trace_id == recall.trace_id
    tiers = {s.name: s for s in spans if s.parent_id == on_shard.span_id}
    assert set(tier_names) <= set(tiers)
    assert on_shard.attributes["engram.recall.results"] == 3


async def test_a_client_traceparent_is_continued(make_cluster, sink, space_id) -> None:
    # ratio 0: only the client's sampled context can make this batch traced
    cluster = make_cluster(shards=1, env=_env(sink.endpoint, "0"))
    await _write(cluster, space_id, 5)  # not traced: the gateway samples none of them
    traceparent = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
    ack = await _raw_batch(cluster, space_id, (("traceparent", traceparent),))

    spans = await _wait_for(
        sink, _has("engram.gateway.batch", "engram.shard.append", "engram.shard.publish")
    )
    assert {s.trace_id for s in spans} == {CLIENT_TRACE}, "ratio 0 exported other traces"
    batch = _one(spans, "engram.gateway.batch")
    assert batch.parent_id == CLIENT_SPAN
    assert batch.attributes["engram.lsn.first"] == ack.first_lsn
    assert _one(spans, "engram.shard.append").parent_id == batch.span_id


async def test_ratio_zero_exports_nothing(make_cluster, sink, space_id) -> None:
    cluster = make_cluster(shards=1, env=_env(sink.endpoint, "0"))
    await _write(cluster, space_id, 20)
    async with EngramClient(cluster.gateway_address) as client:
        await client.recall(space_id, _vectors(1)[0], k=3)
    # the exporters are live: an unsampled client context is honoured too (nothing), and a
    # sampled one is exported, so an empty collector below is the sampler's doing
    unsampled = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"
    await _raw_batch(cluster, f"{space_id}-b", (("traceparent", unsampled),))
    sampled = f"00-{'ab' * 16}-{CLIENT_SPAN}-01"
    await _raw_batch(cluster, f"{space_id}-c", (("traceparent", sampled),))
    spans = await _wait_for(sink, _has("engram.gateway.batch", "engram.shard.publish"))
    assert spans and {s.trace_id for s in spans} == {"ab" * 16}


async def test_a_client_context_can_be_ignored(make_cluster, sink, space_id) -> None:
    env = _env(sink.endpoint, "1", ENGRAM_OTEL_CLIENT_CONTEXT="0")
    cluster = make_cluster(shards=1, env=env)
    # honoured, this unsampled context would keep the batch out of every trace
    unsampled = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"
    await _raw_batch(cluster, space_id, (("traceparent", unsampled),))
    spans = await _wait_for(sink, _has("engram.gateway.batch", "engram.shard.publish"))
    batch = _one(spans, "engram.gateway.batch")
    assert batch.parent_id == "" and batch.trace_id != CLIENT_TRACE


def _blackhole() -> socket.socket:
    """A port that accepts connections and never answers (no HTTP/2 handshake)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s


@pytest.mark.parametrize("collector", ["closed port", "blackhole"])
async def test_a_bad_endpoint_drops_counted_and_never_blocks_acks(
    make_cluster, space_id, collector: str
) -> None:
    hole = _blackhole()
    if collector == "closed port":
        port = hole.getsockname()[1]
        hole.close()  # nothing listens there any more: connections are refused
    try:
        endpoint = f"http://127.0.0.1:{hole.getsockname()[1] if collector == 'blackhole' else port}"
        env = _env(endpoint, "1", OTEL_BSP_MAX_QUEUE_SIZE="4", OTEL_EXPORTER_OTLP_TIMEOUT="2")
        cluster = make_cluster(shards=1, env=env)
        lsns = await _write(cluster, space_id, 40)
        assert len(lsns) == 40 and lsns == sorted(lsns), "every batch acked, in order"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT_S
        while (dropped := await asyncio.to_thread(_dropped, cluster.http_port)) == 0:
            if loop.time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert dropped > 0, "the gateway dropped spans without counting them"
        assert await asyncio.to_thread(_dropped, cluster.shard_http_port(0)) > 0
        log = cluster.log_tail("gateway", 200)
        assert log.count("spans dropped since") == 1, "at most one drop report a minute"
    finally:
        hole.close()
