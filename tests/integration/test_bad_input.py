"""Bad input on a live stream: refused in-band with a precise code, and nothing else breaks.

For every case the test checks the error code and that its message helps (names the offending
value or limit), then that the stream is still usable (a valid batch with the expected sequence
number is acked) and that nothing acked before is lost. Requests travel as raw bytes through a
generic stream call, so malformed bytes can be sent too. The module's cluster runs with small
limits: 100 observations and 64 KiB per batch, 256 KiB per gRPC message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
import pytest

from engram.contract.errors import EngramError
from engram.launcher.cluster import LocalCluster
from engram.v1 import streaming_pb2 as pb
from engram_client import EngramClient, StreamEvent

CLUSTER_ENV = {
    "ENGRAM_MAX_BATCH_OBSERVATIONS": "100",
    "ENGRAM_MAX_BATCH_BYTES": "65536",
    "ENGRAM_GRPC_MAX_MESSAGE_BYTES": "262144",
}
MAX_OBS = 100
MAX_BATCH_BYTES = 65_536
MAX_MESSAGE_BYTES = 262_144
DIM = 8
READ_TIMEOUT_S = 10.0
METHOD = "/engram.v1.EngramStream/ObserveStream"


# ------------------------------------------------------------------------------ helpers


def vectors(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype("<f4")


def batch_of(vecs: np.ndarray, **fields: object) -> pb.ObservationBatch:
    return pb.ObservationBatch(dim=vecs.shape[1], vectors=vecs.astype("<f4").tobytes(), **fields)


def batch_request(seq: int, batch: pb.ObservationBatch, space: str = "") -> pb.ObservationRequest:
    return pb.ObservationRequest(memory_space_id=space, sequence_number=seq, batch=batch)


def _raw(data: bytes) -> bytes:
    return data


class Wire:
    """One ObserveStream call whose requests are raw bytes (so garbage can be sent)."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        method = channel.stream_stream(
            METHOD,
            request_serializer=_raw,
            response_deserializer=pb.ObservationResponse.FromString,
        )
        self.call = method()

    async def write(self, msg: bytes | pb.ObservationRequest) -> None:
        await self.call.write(msg if isinstance(msg, bytes) else msg.SerializeToString())

    async def read(self) -> pb.ObservationResponse:
        resp = await asyncio.wait_for(self.call.read(), READ_TIMEOUT_S)
        assert resp is not grpc.aio.EOF, "the gateway ended the stream"
        assert isinstance(resp, pb.ObservationResponse)
        return resp

    async def ask(self, msg: bytes | pb.ObservationRequest) -> pb.ObservationResponse:
        await self.write(msg)
        return await self.read()

    async def init(self, space: str) -> pb.StreamInitAck:
        resp = await self.ask(pb.ObservationRequest(memory_space_id=space, init=pb.StreamInit()))
        assert resp.WhichOneof("result") == "init_ack", resp
        return resp.init_ack

    async def batch(self, seq: int, batch: pb.ObservationBatch) -> pb.ObservationAck:
        resp = await self.ask(batch_request(seq, batch))
        assert resp.WhichOneof("result") == "ack", resp
        assert resp.sequence_number == seq and resp.ack.status == pb.ObservationAck.ACCEPTED
        return resp.ack


def error_of(resp: pb.ObservationResponse) -> pb.StreamError:
    assert resp.WhichOneof("result") == "error", f"expected an error, got {resp}"
    return resp.error


async def stored_ids(channel: grpc.aio.Channel, space: str) -> list[str]:
    method = channel.unary_stream(
        "/engram.v1.EngramStream/ListObservations",
        request_serializer=pb.ListObservationsRequest.SerializeToString,
        response_deserializer=pb.ListObservationsResponse.FromString,
    )
    ids: list[str] = []
    lsns: list[int] = []
    async for chunk in method(pb.ListObservationsRequest(memory_space_id=space), timeout=10):
        ids.extend(chunk.ids)
        lsns.extend(chunk.lsns)
    assert lsns == list(range(1, len(lsns) + 1)), "LSNs are 1..n without gaps"
    return ids


# ----------------------------------------------------------------- bad batches (table)


@dataclass(frozen=True)
class Case:
    # Builds the bad message for the stream's next sequence number (2) and its space.
    build: Callable[[int, str], bytes | pb.ObservationRequest]
    code: int
    # Fragments the error message must contain, so the client learns what to fix.
    says: tuple[str, ...]
    # Whether the error answers a sequenced message (and so echoes its sequence number).
    sequenced: bool = True


def _nan() -> np.ndarray:
    v = vectors(4, seed=7)
    v[1, 3] = np.nan
    return v


def _inf(sign: float) -> np.ndarray:
    v = vectors(4, seed=7)
    v[2, 0] = sign * np.inf
    return v


def _zero_row() -> np.ndarray:
    v = vectors(4, seed=7)
    v[2] = 0.0
    return v


def _episode(seq: int, embedding: list[float]) -> pb.ObservationRequest:
    ep = pb.Episode(id="ep", what="x", embedding=embedding)
    return pb.ObservationRequest(sequence_number=seq, observation=ep)


def _truncated(seq: int) -> bytes:
    whole = batch_request(seq, batch_of(vectors(4, seed=7))).SerializeToString()
    return whole[: len(whole) - 17]  # cut inside the vectors field


BAD_BATCHES = [
    pytest.param(
        Case(
            lambda s, _: batch_request(s, batch_of(vectors(4, dim=16))),
            pb.WRONG_DIMENSION,
            ("dimension 8", "has 16"),
        ),
        id="wrong-dimension",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(s, pb.ObservationBatch(dim=0, vectors=b"\0" * 32)),
            pb.WRONG_DIMENSION,
            ("got 0",),
        ),
        id="dimension-zero",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(s, batch_of(vectors(1, dim=5000))),
            pb.WRONG_DIMENSION,
            ("1..4096", "5000"),
        ),
        id="dimension-above-max",
    ),
    pytest.param(
        Case(lambda s, _: batch_request(s, batch_of(_nan())), pb.NON_FINITE_VALUE, ("NaN",)),
        id="nan",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(s, batch_of(_inf(1.0))), pb.NON_FINITE_VALUE, ("infinity",)
        ),
        id="plus-inf",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(s, batch_of(_inf(-1.0))),
            pb.NON_FINITE_VALUE,
            ("infinity",),
        ),
        id="minus-inf",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(
                s,
                batch_of(
                    vectors(4, seed=7),
                    confidences=np.array([0.5, np.nan, 0.5, 0.5], "<f4").tobytes(),
                ),
            ),
            pb.NON_FINITE_VALUE,
            ("confidence",),
        ),
        id="nan-confidence",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(s, pb.ObservationBatch(dim=DIM)),
            pb.EMPTY_BATCH,
            ("no observation",),
        ),
        id="empty-batch",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(s, pb.ObservationBatch(dim=DIM, vectors=b"\1" * 35)),
            pb.BAD_VECTOR_BLOB,
            ("35 bytes", "4 * dim = 32"),
        ),
        id="blob-not-a-multiple-of-4-dim",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(s, batch_of(vectors(4, seed=7), ids=["a", "b", "c"])),
            pb.LENGTH_MISMATCH,
            ("ids has 3", "4 vectors"),
        ),
        id="ids-length",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(s, batch_of(vectors(4, seed=7), contents=["c"] * 5)),
            pb.LENGTH_MISMATCH,
            ("contents has 5", "4 vectors"),
        ),
        id="contents-length",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(
                s, batch_of(vectors(4, seed=7), confidences=np.ones(3, "<f4").tobytes())
            ),
            pb.LENGTH_MISMATCH,
            ("confidences has 3", "4 vectors"),
        ),
        id="confidences-length",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(s, batch_of(vectors(4, seed=7), confidences=b"\0" * 10)),
            pb.LENGTH_MISMATCH,
            ("confidences", "not a whole number"),
        ),
        id="confidences-ragged-bytes",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(
                s, batch_of(vectors(4, seed=7), timestamps_us=np.ones(2, "<i8").tobytes())
            ),
            pb.LENGTH_MISMATCH,
            ("timestamps_us has 2",),
        ),
        id="timestamps-length",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(s, batch_of(vectors(MAX_OBS + 1, seed=7))),
            pb.BATCH_TOO_LARGE,
            ("101 observations", "limit of 100"),
        ),
        id="too-many-observations",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(
                s, batch_of(vectors(10, seed=7), contents=["x" * 7000] * 10)
            ),
            pb.BATCH_TOO_LARGE,
            ("limit of 65536 bytes",),
        ),
        id="too-many-bytes",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(s, batch_of(_zero_row())),
            pb.ZERO_VECTOR,
            ("observation 2", "zero vector"),
        ),
        id="zero-vector",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(s, batch_of(vectors(4, seed=7)), space="some-other-space"),
            pb.SPACE_MISMATCH,
            ("some-other-space",),
        ),
        id="space-mismatch",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(s + 2, batch_of(vectors(4, seed=7))),
            pb.SEQUENCE_GAP,
            ("expected 2",),
            sequenced=False,  # it echoes the (wrong) number it was sent: checked separately
        ),
        id="sequence-gap",
    ),
    pytest.param(
        Case(
            lambda s, _: batch_request(0, batch_of(vectors(4, seed=7))),
            pb.INVALID_ARGUMENT,
            ("sequence_number",),
            sequenced=False,
        ),
        id="sequence-zero",
    ),
    pytest.param(
        Case(lambda s, _: _episode(s, []), pb.WRONG_DIMENSION, ("got 0",)),
        id="episode-without-embedding",
    ),
    pytest.param(
        Case(lambda s, _: _episode(s, [1.0] * 4), pb.WRONG_DIMENSION, ("dimension 8", "has 4")),
        id="episode-wrong-dimension",
    ),
    pytest.param(
        Case(lambda s, _: _episode(s, [1.0, float("nan")] * 4), pb.NON_FINITE_VALUE, ("NaN",)),
        id="episode-nan",
    ),
    pytest.param(
        Case(
            lambda s, _: pb.ObservationRequest(sequence_number=s),
            pb.MISSING_OPERATION,
            ("no operation",),
            sequenced=False,
        ),
        id="missing-operation",
    ),
    pytest.param(
        Case(
            lambda s, space: pb.ObservationRequest(memory_space_id=space, init=pb.StreamInit()),
            pb.ALREADY_INITIALIZED,
            ("already initialised",),
            sequenced=False,
        ),
        id="second-init",
    ),
    pytest.param(
        Case(
            lambda s, _: b"\xff\xff\xff garbage",
            pb.MALFORMED_MESSAGE,
            ("11 bytes", "not an ObservationRequest"),
            sequenced=False,
        ),
        id="garbage-bytes",
    ),
    pytest.param(
        Case(
            lambda s, _: _truncated(s),
            pb.MALFORMED_MESSAGE,
            ("not an ObservationRequest",),
            sequenced=False,
        ),
        id="truncated-message",
    ),
]


@pytest.mark.parametrize("case", BAD_BATCHES)
async def test_bad_message_is_refused_in_band_and_the_stream_stays_usable(
    gateway_channel: grpc.aio.Channel, space_id: str, case: Case
) -> None:
    wire = Wire(gateway_channel)
    init = await wire.init(space_id)
    first = await wire.batch(1, batch_of(vectors(4, seed=1), ids=["p0", "p1", "p2", "p3"]))
    assert first.first_lsn == 1

    resp = await wire.ask(case.build(2, space_id))
    err = error_of(resp)
    assert pb.ErrorCode.Name(err.code) == pb.ErrorCode.Name(case.code), err.message
    for fragment in case.says:
        assert fragment in err.message, f"{fragment!r} not in {err.message!r}"
    assert err.retryable is False, "resending the same bad message cannot succeed"
    assert resp.session_id == init.session_id
    if case.sequenced:
        assert resp.sequence_number == 2
    if case.code == pb.SEQUENCE_GAP:
        assert (resp.sequence_number, err.expected_sequence) == (4, 2)

    # The refused message consumed no sequence number: 2 is still next, and it is acked.
    ack = await wire.batch(2, batch_of(vectors(4, seed=2), ids=["q0", "q1", "q2", "q3"]))
    assert (ack.first_lsn, ack.count, ack.duplicate) == (5, 4, False)
    assert await stored_ids(gateway_channel, space_id) == [
        "p0",
        "p1",
        "p2",
        "p3",
        "q0",
        "q1",
        "q2",
        "q3",
    ]
    wire.call.cancel()


def _request_of_size(seq: int, size: int) -> pb.ObservationRequest:
    """A valid batch request of MAX_OBS observations whose serialised size is ``size``."""
    contents = [""] * MAX_OBS
    request = batch_request(seq, batch_of(vectors(MAX_OBS, seed=4), contents=contents))
    base = request.ByteSize()
    for extra in range(size - base, size - base - 8, -1):  # the length prefix grows too
        request.batch.contents[0] = "y" * extra
        if request.ByteSize() == size:
            return request
    raise AssertionError(f"cannot build a request of exactly {size} bytes")


async def test_batch_at_the_limits_is_accepted(
    gateway_channel: grpc.aio.Channel, space_id: str
) -> None:
    wire = Wire(gateway_channel)
    await wire.init(space_id)
    ack = await wire.batch(1, batch_of(vectors(MAX_OBS, seed=3)))
    assert (ack.first_lsn, ack.count) == (1, MAX_OBS)
    # The byte limit counts the whole request message: exactly the limit is accepted, one
    # byte more is not.
    exact = _request_of_size(2, MAX_BATCH_BYTES)
    over = _request_of_size(2, MAX_BATCH_BYTES + 1)
    err = error_of(await wire.ask(over))
    assert err.code == pb.BATCH_TOO_LARGE and f"{MAX_BATCH_BYTES + 1} bytes" in err.message
    resp = await wire.ask(exact)
    assert resp.WhichOneof("result") == "ack", resp
    assert resp.ack.first_lsn == MAX_OBS + 1
    assert len(await stored_ids(gateway_channel, space_id)) == 2 * MAX_OBS
    wire.call.cancel()


# ---------------------------------------------------------------------- bad recalls


BAD_RECALLS = [
    pytest.param(pb.RecallRequest(cue=[1.0] * DIM, k=0), pb.K_OUT_OF_RANGE, "got 0", id="k-0"),
    pytest.param(
        pb.RecallRequest(cue=[1.0] * DIM, k=1001), pb.K_OUT_OF_RANGE, "1..1000", id="k-1001"
    ),
    pytest.param(pb.RecallRequest(cue=[0.0] * DIM, k=3), pb.ZERO_VECTOR, "zero", id="zero-cue"),
    pytest.param(
        pb.RecallRequest(cue=[1.0, float("nan")] * 4, k=3), pb.NON_FINITE_VALUE, "NaN", id="nan"
    ),
    pytest.param(pb.RecallRequest(cue=[], k=3), pb.WRONG_DIMENSION, "got 0", id="empty-cue"),
    pytest.param(
        pb.RecallRequest(cue=[1.0] * 16, k=3),
        pb.WRONG_DIMENSION,
        "dimension 8",
        id="cue-of-another-dimension",
    ),
    pytest.param(
        pb.RecallRequest(cue=[1.0] * DIM, k=3, min_score=1.5),
        pb.INVALID_ARGUMENT,
        "min_score",
        id="min-score-out-of-range",
    ),
]


@pytest.mark.parametrize(("recall", "code", "says"), BAD_RECALLS)
async def test_bad_recall_is_refused_with_its_request_id(
    gateway_channel: grpc.aio.Channel,
    space_id: str,
    recall: pb.RecallRequest,
    code: int,
    says: str,
) -> None:
    wire = Wire(gateway_channel)
    await wire.init(space_id)
    vecs = vectors(20, seed=5)
    await wire.batch(1, batch_of(vecs, ids=[f"r{i}" for i in range(20)]))

    recall.request_id = "bad-1"
    resp = await wire.ask(pb.ObservationRequest(recall=recall))
    err = error_of(resp)
    assert pb.ErrorCode.Name(err.code) == pb.ErrorCode.Name(code), err.message
    assert says in err.message
    assert err.request_id == "bad-1"

    good = await wire.ask(
        pb.ObservationRequest(recall=pb.RecallRequest(request_id="ok", cue=vecs[9], k=1000))
    )
    assert good.recall.request_id == "ok"
    assert len(good.recall.results) == 20, "k=1000 is allowed and returns everything"
    assert good.recall.results[0].id == "r9"
    assert (await wire.batch(2, batch_of(vectors(1, seed=6)))).first_lsn == 21
    wire.call.cancel()


# ---------------------------------------------------------------------- before init


@pytest.mark.parametrize(
    "bad_id", ["ab", "ABC", "Upper-case", "a" * 65, "bad space", "bad/space", "sp@ce", ""]
)
async def test_invalid_space_id_is_refused_at_init(
    gateway_channel: grpc.aio.Channel, space_id: str, bad_id: str
) -> None:
    wire = Wire(gateway_channel)
    resp = await wire.ask(pb.ObservationRequest(memory_space_id=bad_id, init=pb.StreamInit()))
    err = error_of(resp)
    assert err.code == pb.INVALID_SPACE_ID
    assert repr(bad_id) in err.message and "3-64 characters of [a-z0-9_-]" in err.message
    assert resp.session_id == "", "no session was created"
    # The stream is still waiting for a valid init.
    init = await wire.init(space_id)
    assert init.initial_sequence == 0 and init.session_id
    wire.call.cancel()


@pytest.mark.parametrize("good_id", ["abc", "a" * 64, "under_score-and-dash-09"])
async def test_space_ids_at_the_edges_are_accepted(
    gateway_channel: grpc.aio.Channel, good_id: str
) -> None:
    wire = Wire(gateway_channel)
    init = await wire.init(good_id)
    assert init.session_id.startswith("s-")
    wire.call.cancel()


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(batch_request(1, batch_of(vectors(2))), id="batch"),
        pytest.param(_episode(1, [1.0] * DIM), id="episode"),
        pytest.param(
            pb.ObservationRequest(recall=pb.RecallRequest(request_id="r", cue=[1.0], k=1)),
            id="recall",
        ),
        pytest.param(
            pb.ObservationRequest(flow=pb.FlowControl(action=pb.FlowControl.PAUSE)), id="flow"
        ),
        pytest.param(pb.ObservationRequest(close=pb.StreamClose()), id="close"),
    ],
)
async def test_operations_before_init_are_refused(
    gateway_channel: grpc.aio.Channel, space_id: str, request_: pb.ObservationRequest
) -> None:
    wire = Wire(gateway_channel)
    err = error_of(await wire.ask(request_))
    assert err.code == pb.NOT_INITIALIZED
    assert "before init" in err.message
    init = await wire.init(space_id)
    assert (await wire.batch(1, batch_of(vectors(2)))).first_lsn == 1
    assert await stored_ids(gateway_channel, space_id) == [
        f"{init.session_id}/1/0",
        f"{init.session_id}/1/1",
    ]
    wire.call.cancel()


# -------------------------------------------------------------- transport size limit


async def test_message_beyond_the_grpc_limit_ends_the_stream_but_not_the_gateway(
    gateway_channel: grpc.aio.Channel, space_id: str
) -> None:
    wire = Wire(gateway_channel)
    init = await wire.init(space_id)
    await wire.batch(1, batch_of(vectors(3), ids=["k0", "k1", "k2"]))

    huge = batch_request(2, batch_of(vectors(2, seed=1), contents=["z" * 300_000, "z"]))
    assert huge.ByteSize() > MAX_MESSAGE_BYTES
    await wire.write(huge)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(wire.call.read(), READ_TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert str(MAX_MESSAGE_BYTES) in (info.value.details() or "")

    # The gateway keeps serving: the session resumes on a new stream, nothing was lost.
    again = Wire(gateway_channel)
    resp = await again.ask(
        pb.ObservationRequest(
            memory_space_id=space_id, session_id=init.session_id, init=pb.StreamInit()
        )
    )
    assert resp.init_ack.resumed and resp.init_ack.initial_sequence == 1
    assert (await again.batch(2, batch_of(vectors(1, seed=2), ids=["k3"]))).first_lsn == 4
    assert await stored_ids(gateway_channel, space_id) == ["k0", "k1", "k2", "k3"]
    again.call.cancel()


# ----------------------------------------------------------------- through the client


async def test_client_fails_only_the_refused_batch_and_renumbers_the_rest(
    shared_cluster: LocalCluster, space_id: str
) -> None:
    async with EngramClient(shared_cluster.gateway_address) as client:
        stream = await client.open_stream(space_id)
        good = [await stream.send(vectors(3, seed=1), ids=["a0", "a1", "a2"])]
        bad = await stream.send(vectors(2, dim=16))
        good.append(await stream.send(vectors(3, seed=2), ids=["b0", "b1", "b2"]))
        good.append(await stream.send(vectors(3, seed=3), ids=["c0", "c1", "c2"]))
        with pytest.raises(EngramError) as info:
            await asyncio.wait_for(bad, READ_TIMEOUT_S)
        assert info.value.code == pb.WRONG_DIMENSION
        acks = [await asyncio.wait_for(f, READ_TIMEOUT_S) for f in good]
        assert [a.sequence_number for a in acks] == [1, 2, 3], "no gap where the bad batch was"
        late = await stream.send(vectors(3, seed=4), ids=["d0", "d1", "d2"])
        assert (await asyncio.wait_for(late, READ_TIMEOUT_S)).sequence_number == 4
        await stream.close()
        ids = await client.list_ids(space_id)
    assert ids == ["a0", "a1", "a2", "b0", "b1", "b2", "c0", "c1", "c2", "d0", "d1", "d2"]


async def test_wrong_dimension_refused_by_the_shard_does_not_poison_the_stream(
    gateway_channel: grpc.aio.Channel, space_id: str
) -> None:
    # Both streams open while the space is empty (init_ack.dim == 0), so the gateway cannot
    # check A's first batch; the shard, which knows the space's dimension, refuses it.
    a, b = Wire(gateway_channel), Wire(gateway_channel)
    assert (await a.init(space_id)).dim == 0
    assert (await b.init(space_id)).dim == 0
    await b.batch(1, batch_of(vectors(2)))  # fixes the space's dimension at 8
    err = error_of(await a.ask(batch_request(1, batch_of(vectors(2, dim=16)))))
    assert err.code == pb.WRONG_DIMENSION
    assert "dimension 8" in err.message
    # A's next batch has the right dimension and must be accepted.
    resp = await a.ask(batch_request(1, batch_of(vectors(2, seed=3))))
    a.call.cancel()
    b.call.cancel()
    assert resp.WhichOneof("result") == "ack", resp.error.message
    assert resp.ack.first_lsn == 3


async def test_batches_before_a_refused_one_keep_their_real_acks(
    shared_cluster: LocalCluster, space_id: str
) -> None:
    # The refusal of batch 2 usually overtakes the (durable) ack of batch 1; with the bug the
    # ack of batch 1 is then lost. Ten tries make it all but certain to show.
    async with EngramClient(shared_cluster.gateway_address) as client:
        wrong: list[tuple[int, bool, int, int]] = []
        for attempt in range(10):
            stream = await client.open_stream(f"{space_id}-{attempt}")
            first = await stream.send(vectors(3, seed=attempt))
            refused = await stream.send(vectors(2, dim=16))
            ack = await asyncio.wait_for(first, READ_TIMEOUT_S)
            with pytest.raises(EngramError):
                await asyncio.wait_for(refused, READ_TIMEOUT_S)
            await stream.close()
            if (ack.duplicate, ack.first_lsn, ack.count) != (False, 1, 3):
                wrong.append((attempt, ack.duplicate, ack.first_lsn, ack.count))
    assert wrong == [], "acks of batches stored once, reported as duplicates without LSN"


async def test_client_batch_beyond_the_grpc_limit_fails_instead_of_looping(
    shared_cluster: LocalCluster, space_id: str
) -> None:
    events: list[StreamEvent] = []
    client = EngramClient(shared_cluster.gateway_address)
    try:
        stream = await client.open_stream(space_id, on_event=events.append)
        fut = await stream.send(vectors(2), contents=["z" * 300_000, "z"])
        done, _ = await asyncio.wait([fut], timeout=3)
        reconnects = stream.reconnects
    finally:
        await client.close()
    assert reconnects <= 1, f"{reconnects} reconnects in 3 s resending the same batch"
    assert done, "the oversized batch's future never resolved"
    exc = fut.exception()
    assert isinstance(exc, EngramError) and exc.code == pb.BATCH_TOO_LARGE
