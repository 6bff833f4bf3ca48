"""Fuzzing the gRPC request decoder (``gateway.service.parse``, also the WebSocket's binary
frames) and what the gateway does with a parsed request before it reaches a shard: the
validation calls, then a whole ``ClientStream`` over an in-memory shard. The only outcomes
allowed are an answer or an in-band EngramError (see tests/fuzz/gateway_path.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from tests.fuzz.bounds import FUZZ, bounded
from tests.fuzz.gateway_path import drive_stream, validate_like_gateway
from tests.fuzz.strategies import batches, mutated, request_bytes, requests

from engram.gateway.service import parse
from engram.v1 import streaming_pb2 as pb


@FUZZ
@given(data=request_bytes(), space_dim=st.sampled_from([0, 3, 4]))
def test_parse_then_validate(data: bytes, space_dim: int) -> None:
    # upb keeps a parsed message in arenas tracemalloc does not see; numpy's work it does
    with bounded(len(data), factor=8, what="parse and validation"):
        incoming = parse(data)
        assert incoming.size == len(data)
        if incoming.message is not None:
            validate_like_gateway(incoming.message, space_dim)
    if incoming.message is not None:  # what parsed serialises and parses back the same
        again = pb.ObservationRequest.FromString(incoming.message.SerializeToString())
        assert again == incoming.message


@FUZZ
@given(data=st.binary(max_size=4096))
def test_parse_any_bytes(data: bytes) -> None:
    with bounded(len(data), factor=8, what="parse"):
        incoming = parse(data)
    assert incoming.size == len(data)


def _init(space: str = "alpha") -> bytes:
    return pb.ObservationRequest(memory_space_id=space, init=pb.StreamInit()).SerializeToString()


@st.composite
def scripts(draw: st.DrawFn) -> list[bytes]:
    """An init (sometimes mutated), then valid batches numbered in order mixed with any
    requests, mutated requests and garbage."""
    init = _init()
    out = [draw(st.one_of(st.just(init), mutated(init)))]
    seq = 1
    for _ in range(draw(st.integers(0, 8))):
        if draw(st.booleans()):
            b = draw(batches())
            req = pb.ObservationRequest(sequence_number=seq, batch=b).SerializeToString()
            seq += 1
            out.append(draw(st.one_of(st.just(req), mutated(req, max_steps=2))))
        else:
            out.append(draw(st.one_of(request_bytes(), requests().map(_serialised))))
    return out


def _serialised(req: pb.ObservationRequest) -> bytes:
    return req.SerializeToString()


@FUZZ
@given(script=scripts())
def test_client_stream_answers_every_message(script: list[bytes]) -> None:
    total = sum(len(data) for data in script)
    with bounded(total, factor=64, what="the client stream"):
        drive_stream([parse(data) for data in script])
