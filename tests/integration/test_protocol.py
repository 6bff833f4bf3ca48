"""The public streaming protocol, message by message, against a live cluster.

Init, sequenced batches and their acks, duplicates, gaps, recall on the stream, the single
Episode path, close with drain, session resume, flow control; then the operational surface:
gRPC health, reflection, and the HTTP /healthz and /metrics endpoints. The tests speak raw
gRPC through the generated stub (``EngramStreamStub``), except one end-to-end test through the
Python client. All share one two-shard cluster; each writes to a memory space of its own.
"""

from __future__ import annotations

import asyncio
import re
import urllib.error
import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from engram.launcher.cluster import LocalCluster
from engram.v1 import streaming_pb2 as pb
from engram.v1 import streaming_pb2_grpc
from engram_client import EngramClient

READ_TIMEOUT_S = 10.0
DIM = 8


# ------------------------------------------------------------------------------ helpers


def vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype("<f4")


def make_batch(
    vecs: np.ndarray, ids: list[str] | None = None, contents: list[str] | None = None
) -> pb.ObservationBatch:
    b = pb.ObservationBatch(dim=vecs.shape[1], vectors=np.ascontiguousarray(vecs, "<f4").tobytes())
    b.ids.extend(ids or [])
    b.contents.extend(contents or [])
    return b


async def read(call: grpc.aio.StreamStreamCall) -> pb.ObservationResponse:
    """The next response; fails (instead of hanging) if none comes or the stream ended."""
    resp = await asyncio.wait_for(call.read(), READ_TIMEOUT_S)
    assert resp is not grpc.aio.EOF, "the gateway ended the stream"
    assert isinstance(resp, pb.ObservationResponse)
    return resp


async def open_session(
    stub: streaming_pb2_grpc.EngramStreamStub, space: str, session_id: str = ""
) -> tuple[grpc.aio.StreamStreamCall, pb.StreamInitAck]:
    call = stub.ObserveStream()
    await call.write(
        pb.ObservationRequest(memory_space_id=space, session_id=session_id, init=pb.StreamInit())
    )
    resp = await read(call)
    assert resp.WhichOneof("result") == "init_ack", resp
    return call, resp.init_ack


async def send(
    call: grpc.aio.StreamStreamCall, seq: int, batch: pb.ObservationBatch
) -> pb.ObservationResponse:
    await call.write(pb.ObservationRequest(sequence_number=seq, batch=batch))
    return await read(call)


def acked(resp: pb.ObservationResponse, seq: int) -> pb.ObservationAck:
    assert resp.WhichOneof("result") == "ack", resp
    assert resp.sequence_number == seq
    assert resp.ack.status == pb.ObservationAck.ACCEPTED
    return resp.ack


async def stored(stub: streaming_pb2_grpc.EngramStreamStub, space: str) -> list[tuple[str, int]]:
    """(id, lsn) of every observation of ``space``, via ListObservations."""
    out: list[tuple[str, int]] = []
    async for chunk in stub.ListObservations(
        pb.ListObservationsRequest(memory_space_id=space, chunk_size=7), timeout=READ_TIMEOUT_S
    ):
        out.extend(zip(chunk.ids, chunk.lsns, strict=True))
    return out


async def recall(
    call: grpc.aio.StreamStreamCall, rid: str, cue: np.ndarray, k: int, **kw: float
) -> pb.RecallResponse:
    await call.write(
        pb.ObservationRequest(recall=pb.RecallRequest(request_id=rid, cue=cue.tolist(), k=k, **kw))
    )
    resp = await read(call)
    assert resp.WhichOneof("result") == "recall", resp
    return resp.recall


@pytest.fixture
def stub(gateway_channel: grpc.aio.Channel) -> streaming_pb2_grpc.EngramStreamStub:
    return streaming_pb2_grpc.EngramStreamStub(gateway_channel)


# --------------------------------------------------------------------------- sessions


async def test_init_creates_a_session(
    stub: streaming_pb2_grpc.EngramStreamStub, space_id: str
) -> None:
    call, ack = await open_session(stub, space_id)
    other, other_ack = await open_session(stub, space_id)
    assert ack.session_id.startswith("s-") and len(ack.session_id) > 10
    assert other_ack.session_id != ack.session_id, "every new session gets its own id"
    assert ack.initial_sequence == 0
    assert ack.resumed is False
    assert ack.max_in_flight_batches == 8  # ENGRAM_MAX_IN_FLIGHT_BATCHES default
    assert ack.max_batch_size == 10_000  # ENGRAM_MAX_BATCH_OBSERVATIONS default
    assert ack.dim == 0, "a new space has no dimension yet"
    assert ack.capabilities.supports_backpressure
    assert ack.capabilities.queue_capacity == ack.max_in_flight_batches
    call.cancel()
    other.cancel()


async def test_batches_are_acked_in_sequence_with_lsns(
    stub: streaming_pb2_grpc.EngramStreamStub, space_id: str
) -> None:
    call, init = await open_session(stub, space_id)
    first = await send(call, 1, make_batch(vectors(5), ids=[f"a{i}" for i in range(5)]))
    ack1 = acked(first, 1)
    assert first.session_id == init.session_id
    assert (ack1.first_lsn, ack1.count, ack1.memory_id, ack1.duplicate) == (1, 5, "a0", False)
    assert ack1.committed_at.ToMicroseconds() > 0
    ack2 = acked(await send(call, 2, make_batch(vectors(3, seed=1))), 2)
    assert (ack2.first_lsn, ack2.count, ack2.duplicate) == (6, 3, False)
    # Ids left out are derived from the session and the sequence number.
    assert ack2.memory_id == f"{init.session_id}/2/0"
    rows = await stored(stub, space_id)
    assert [lsn for _, lsn in rows] == list(range(1, 9))
    assert [i for i, _ in rows][:5] == [f"a{i}" for i in range(5)]
    call.cancel()


async def test_duplicate_sequence_is_acked_but_not_stored_again(
    stub: streaming_pb2_grpc.EngramStreamStub, space_id: str
) -> None:
    call, _ = await open_session(stub, space_id)
    acked(await send(call, 1, make_batch(vectors(4), ids=["x0", "x1", "x2", "x3"])), 1)
    acked(await send(call, 2, make_batch(vectors(2, seed=2), ids=["y0", "y1"])), 2)
    # A retry of seq 1 (even with other content) is answered as a duplicate.
    dup = acked(await send(call, 1, make_batch(vectors(4, seed=9), ids=list("abcd"))), 1)
    assert dup.duplicate is True
    assert dup.count == 0
    rows = await stored(stub, space_id)
    assert [i for i, _ in rows] == ["x0", "x1", "x2", "x3", "y0", "y1"]
    snapshot = await recall(call, "after-dup", vectors(1)[0], k=1)
    assert snapshot.snapshot_sequence == 6
    # The duplicate consumed no number: seq 3 is next.
    assert acked(await send(call, 3, make_batch(vectors(1, seed=3))), 3).first_lsn == 7
    call.cancel()


async def test_sequence_gap_is_an_in_band_error_and_the_stream_stays_usable(
    stub: streaming_pb2_grpc.EngramStreamStub, space_id: str
) -> None:
    call, _ = await open_session(stub, space_id)
    acked(await send(call, 1, make_batch(vectors(2))), 1)
    acked(await send(call, 2, make_batch(vectors(2, seed=1))), 2)
    resp = await send(call, 5, make_batch(vectors(2, seed=5)))
    assert resp.WhichOneof("result") == "error", resp
    assert resp.sequence_number == 5
    assert resp.error.code == pb.SEQUENCE_GAP
    assert resp.error.expected_sequence == 3
    assert "expected 3" in resp.error.message
    assert resp.error.retryable is False
    ack3 = acked(await send(call, 3, make_batch(vectors(2, seed=3))), 3)
    assert (ack3.first_lsn, ack3.count, ack3.duplicate) == (5, 2, False)
    assert len(await stored(stub, space_id)) == 6, "the batch with the gap was not stored"
    call.cancel()


async def test_recall_on_the_stream(
    stub: streaming_pb2_grpc.EngramStreamStub, space_id: str
) -> None:
    vecs = vectors(50, dim=16, seed=4)
    ids = [f"m{i}" for i in range(50)]
    call, _ = await open_session(stub, space_id)
    batch = make_batch(vecs, ids=ids, contents=[f"memory {i}" for i in range(50)])
    acked(await send(call, 1, batch), 1)

    result = await recall(call, "q-17", vecs[17], k=5)
    assert result.request_id == "q-17"
    assert len(result.results) == 5
    top = result.results[0]
    assert (top.id, top.content, top.lsn) == ("m17", "memory 17", 18)
    assert top.score == pytest.approx(1.0, abs=1e-4)
    assert top.confidence == pytest.approx(0.7)
    scores = [m.score for m in result.results]
    assert scores == sorted(scores, reverse=True)
    assert result.snapshot_sequence == 50
    assert result.metadata.indexed_count + result.metadata.fresh_count == 50

    # min_score cuts the tail: only the exact match scores above 0.999.
    only = await recall(call, "q-min", vecs[3], k=10, min_score=0.999)
    assert [m.id for m in only.results] == ["m3"]

    # Concurrent recalls are answered each under its own request id.
    for i in (5, 6, 7):
        await call.write(
            pb.ObservationRequest(recall=pb.RecallRequest(request_id=f"c{i}", cue=vecs[i], k=1))
        )
    answers = {}
    for _ in range(3):
        resp = await read(call)
        answers[resp.recall.request_id] = resp.recall.results[0].id
    assert answers == {"c5": "m5", "c6": "m6", "c7": "m7"}
    call.cancel()


async def test_single_episode_observation_path(
    stub: streaming_pb2_grpc.EngramStreamStub, space_id: str
) -> None:
    call, init = await open_session(stub, space_id)
    ep = pb.Episode(
        id="ep-1", what="met Ada at the lab", embedding=[1.0, 2.0, 3.0, 4.0], where_location="lab"
    )
    ep.when.FromMicroseconds(1_700_000_000_123_456)
    await call.write(pb.ObservationRequest(sequence_number=1, observation=ep))
    ack = acked(await read(call), 1)
    assert (ack.memory_id, ack.first_lsn, ack.count) == ("ep-1", 1, 1)

    # An episode without id gets a derived one; a confidence above 1 is clamped.
    anon = pb.Episode(what="second", embedding=[-4.0, 1.0, 0.5, 2.0], encoding_confidence=1.5)
    await call.write(pb.ObservationRequest(sequence_number=2, observation=anon))
    ack2 = acked(await read(call), 2)
    assert ack2.memory_id == f"{init.session_id}/2/0"

    first = (await recall(call, "ep", np.array([1.0, 2.0, 3.0, 4.0]), k=2)).results[0]
    assert (first.id, first.content) == ("ep-1", "met Ada at the lab")
    assert first.score == pytest.approx(1.0, abs=1e-5)
    assert first.confidence == pytest.approx(0.7), "0 means the default confidence 0.7"
    assert first.when.ToMicroseconds() == 1_700_000_000_123_456
    second = (await recall(call, "anon", np.array([-4.0, 1.0, 0.5, 2.0]), k=1)).results[0]
    assert (second.id, second.content, second.lsn) == (ack2.memory_id, "second", 2)
    assert second.confidence == pytest.approx(1.0)
    call.cancel()


async def test_close_with_drain_ends_the_stream_after_all_acks(
    stub: streaming_pb2_grpc.EngramStreamStub, space_id: str
) -> None:
    call, _ = await open_session(stub, space_id)
    for seq in range(1, 5):
        batch = make_batch(vectors(100, seed=seq))
        await call.write(pb.ObservationRequest(sequence_number=seq, batch=batch))
    await call.write(pb.ObservationRequest(close=pb.StreamClose(drain_queue=True, last_sequence=4)))
    answered = []
    while True:
        resp = await asyncio.wait_for(call.read(), READ_TIMEOUT_S)
        if resp is grpc.aio.EOF:
            break
        answered.append(acked(resp, resp.sequence_number).first_lsn)
    assert answered == [1, 101, 201, 301], "every batch sent before close is acked, in order"
    assert await call.code() == grpc.StatusCode.OK
    assert len(await stored(stub, space_id)) == 400


async def test_flow_control_is_answered_with_a_status(
    stub: streaming_pb2_grpc.EngramStreamStub, space_id: str
) -> None:
    call, _ = await open_session(stub, space_id)
    acked(await send(call, 1, make_batch(vectors(2))), 1)
    acked(await send(call, 2, make_batch(vectors(2, seed=1))), 2)
    flow = pb.FlowControl(action=pb.FlowControl.BUFFER_STATUS, buffer_remaining=10)
    await call.write(pb.ObservationRequest(flow=flow))
    resp = await read(call)
    assert resp.WhichOneof("result") == "status", resp
    assert resp.status.state == pb.StreamStatus.ACTIVE
    assert resp.status.last_acked_sequence == 2
    assert resp.status.queue_depth == 0
    assert resp.status.queue_capacity == 8
    assert "BUFFER_STATUS" in resp.status.message
    call.cancel()


# ----------------------------------------------------------------------------- resume


async def test_resume_continues_the_session(
    stub: streaming_pb2_grpc.EngramStreamStub, space_id: str
) -> None:
    call, init = await open_session(stub, space_id)
    for seq in (1, 2, 3):
        acked(await send(call, seq, make_batch(vectors(10, seed=seq))), seq)
    call.cancel()  # the connection drops without a close

    again, ack = await open_session(stub, space_id, session_id=init.session_id)
    assert ack.session_id == init.session_id
    assert ack.resumed is True
    assert ack.initial_sequence == 3, "the last acked sequence number"
    assert ack.dim == DIM
    ack4 = acked(await send(again, 4, make_batch(vectors(10, seed=4))), 4)
    assert (ack4.first_lsn, ack4.duplicate) == (31, False)
    dup = acked(await send(again, 2, make_batch(vectors(10, seed=2))), 2)
    assert dup.duplicate is True
    assert len(await stored(stub, space_id)) == 40
    await again.write(pb.ObservationRequest(close=pb.StreamClose(drain_queue=True)))
    assert await asyncio.wait_for(again.read(), READ_TIMEOUT_S) is grpc.aio.EOF

    # A resume that names only the session (no space) finds it too.
    third = stub.ObserveStream()
    await third.write(pb.ObservationRequest(session_id=init.session_id, init=pb.StreamInit()))
    resp = await read(third)
    assert resp.init_ack.initial_sequence == 4 and resp.init_ack.resumed
    third.cancel()


@pytest.mark.parametrize("name_the_space", [True, False])
async def test_resuming_an_unknown_session_is_refused(
    stub: streaming_pb2_grpc.EngramStreamStub, space_id: str, name_the_space: bool
) -> None:
    # The space exists (another session wrote to it), the session does not.
    writer, _ = await open_session(stub, space_id)
    acked(await send(writer, 1, make_batch(vectors(2))), 1)
    writer.cancel()

    call = stub.ObserveStream()
    space = space_id if name_the_space else ""
    bogus = "s-00000000000000000000000000000000"
    await call.write(
        pb.ObservationRequest(memory_space_id=space, session_id=bogus, init=pb.StreamInit())
    )
    resp = await read(call)
    assert resp.WhichOneof("result") == "error", resp
    assert resp.error.code == pb.UNKNOWN_SESSION
    assert bogus in resp.error.message
    # The refused init left the stream open and uninitialised: a new session starts fine.
    await call.write(pb.ObservationRequest(memory_space_id=space_id, init=pb.StreamInit()))
    resp = await read(call)
    assert resp.init_ack.resumed is False and resp.init_ack.initial_sequence == 0
    call.cancel()


# --------------------------------------------------------------------- end to end


async def test_python_client_end_to_end(shared_cluster: LocalCluster, space_id: str) -> None:
    vecs = vectors(1200, dim=32, seed=11)
    async with EngramClient(shared_cluster.gateway_address) as client:
        stream = await client.open_stream(space_id)
        futures = [
            await stream.send(vecs[lo : lo + 300], ids=[f"e{i}" for i in range(lo, lo + 300)])
            for lo in range(0, 1200, 300)
        ]
        await stream.flush()
        acks = [f.result() for f in futures]
        assert [(a.sequence_number, a.first_lsn, a.count) for a in acks] == [
            (1, 1, 300),
            (2, 301, 300),
            (3, 601, 300),
            (4, 901, 300),
        ]
        on_stream = await stream.recall(vecs[777], k=3)
        assert on_stream.hits[0].id == "e777" and on_stream.snapshot_sequence == 1200
        await stream.close()
        standalone = await client.recall(space_id, vecs[5], k=3)
        assert standalone.hits[0].id == "e5"
        assert standalone.hits[0].score == pytest.approx(1.0, abs=1e-4)
        ids = await client.list_ids(space_id)
        assert ids == [f"e{i}" for i in range(1200)]


# ----------------------------------------------------------------------- operations


@pytest.mark.parametrize("target", ["gateway", "shard-0", "shard-1"])
async def test_grpc_health_reports_serving(shared_cluster: LocalCluster, target: str) -> None:
    address = (
        shared_cluster.gateway_address
        if target == "gateway"
        else shared_cluster.shard_address(int(target.split("-")[1]))
    )
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_the_public_service(gateway_channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(gateway_channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="engram.v1.EngramStream"),
    ]
    replies = [r async for r in stub.ServerReflectionInfo(iter(requests), timeout=5)]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"engram.v1.EngramStream", "grpc.health.v1.Health"} <= names
    files = replies[1].file_descriptor_response.file_descriptor_proto
    assert files, replies[1]
    assert any(b"ObserveStream" in f for f in files)


def _http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


async def test_http_healthz_and_metrics(
    shared_cluster: LocalCluster, stub: streaming_pb2_grpc.EngramStreamStub, space_id: str
) -> None:
    port = shared_cluster.http_port
    status, body = await asyncio.to_thread(_http_get, port, "/healthz")
    assert status == 200
    assert "gateway ok" in body and "redis reachable" in body
    assert (await asyncio.to_thread(_http_get, port, "/nowhere"))[0] == 404

    call, _ = await open_session(stub, space_id)
    acked(await send(call, 1, make_batch(vectors(7))), 1)
    acked(await send(call, 2, make_batch(vectors(5, seed=1))), 2)
    acked(await send(call, 1, make_batch(vectors(7))), 1)  # a duplicate: not counted
    call.cancel()

    status, text = await asyncio.to_thread(_http_get, port, "/metrics")
    assert status == 200
    line = re.search(
        rf'^engram_streaming_observations_total\{{memory_space="{space_id}",'
        rf'priority="normal"\}} (\S+)$',
        text,
        re.MULTILINE,
    )
    assert line is not None, "no engram_streaming_observations_total sample for the space"
    assert float(line.group(1)) == 12.0
    assert "engram_streaming_batches_processed_total" in text

    for i in range(shared_cluster.shards):
        status, body = await asyncio.to_thread(
            _http_get, shared_cluster.shard_http_port(i), "/healthz"
        )
        assert status == 200 and f"shard {i}" in body
