"""Fuzzing the WebSocket text frame parser (``ws_frames.decode_text``): random JSON, valid frames
mutated (wrong types, huge numbers, deep nesting, giant base64, unicode and lone surrogates)
and mutated text. The only outcomes allowed are a request (which then goes the gateway's way:
validation, a ClientStream) or a FrameError whose error frame can be sent. Binary frames are
``parse``, fuzzed in test_grpc_requests.py."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st
from tests.fuzz.bounds import FUZZ, bounded
from tests.fuzz.gateway_path import ERROR_CODES, drive_stream, validate_like_gateway
from tests.fuzz.strategies import frames, texts

from engram.gateway import ws_frames
from engram.gateway.stream import Incoming
from engram.v1 import streaming_pb2 as pb

# JSON numbers become Python objects: "1.5," (4 bytes) is a float and a list slot (32 bytes)
JSON_EXPANSION = 16


@contextlib.contextmanager
def parser(name: str) -> Iterator[None]:
    """Frames parsed by the standard library, or by orjson when installed (both must agree)."""
    saved = ws_frames.orjson
    if name == "json":
        ws_frames.orjson = None
    elif saved is None:
        pytest.skip("orjson is not installed (the optional 'websocket' extra)")
    try:
        yield
    finally:
        ws_frames.orjson = saved


def decode(text: str) -> tuple[str, pb.ObservationRequest | None] | ws_frames.FrameError:
    """decode_text's outcome; a FrameError is checked to make a frame the gateway can send."""
    try:
        return ws_frames.decode_text(text)
    except ws_frames.FrameError as exc:
        assert exc.code in ERROR_CODES, exc.code
        assert exc.message
        frame = ws_frames.error_frame(
            exc.code, exc.message, sequence_number=exc.sequence_number, request_id=exc.request_id
        )
        frame.encode("utf-8")  # what the WebSocket library does with a text frame
        return exc


def check_request(kind: str, req: pb.ObservationRequest | None) -> None:
    if req is None:
        assert kind == "heartbeat"
        return
    assert req.WhichOneof("operation") is not None
    data = req.SerializeToString()
    assert pb.ObservationRequest.FromString(data) == req
    validate_like_gateway(req)


@pytest.mark.parametrize("name", ["json", "orjson"])
@FUZZ
@given(text=texts())
def test_decode_text(name: str, text: str) -> None:
    size = len(text.encode("utf-8", "surrogatepass"))
    with parser(name), bounded(size, factor=JSON_EXPANSION, what="decode_text"):
        result = decode(text)
        if not isinstance(result, ws_frames.FrameError):
            check_request(*result)


@FUZZ
@given(text=texts())
def test_parsers_agree(text: str) -> None:
    """The answer to a frame does not depend on whether orjson is installed."""
    if ws_frames.orjson is None:
        pytest.skip("orjson is not installed (the optional 'websocket' extra)")
    with parser("json"):
        plain = decode(text)
    with parser("orjson"):
        fast = decode(text)
    if isinstance(plain, ws_frames.FrameError) or isinstance(fast, ws_frames.FrameError):
        assert type(plain) is type(fast), (plain, fast)
        assert isinstance(plain, ws_frames.FrameError) and isinstance(fast, ws_frames.FrameError)
        assert plain.code == fast.code
    else:
        assert plain == fast


@FUZZ
@given(script=st.lists(frames(), max_size=8))
def test_client_stream_over_text_frames(script: list[object]) -> None:
    """An init then fuzzed frames through decode_text into one ClientStream, as the WebSocket
    endpoint does (frames it refuses are answered there and never reach the stream)."""
    texts_ = [json.dumps({"type": "init", "memory_space_id": "alpha"})]
    texts_ += [json.dumps(frame) for frame in script]
    incoming = []
    for text in texts_:
        result = decode(text)
        if not isinstance(result, ws_frames.FrameError) and result[1] is not None:
            incoming.append(Incoming(result[1], result[1].ByteSize()))
    size = sum(len(text) for text in texts_)
    with bounded(size, factor=JSON_EXPANSION * 4, what="the client stream"):
        drive_stream(incoming)
