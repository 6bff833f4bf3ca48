"""The JSON frame codec on its own (no cluster): decoding client frames into requests and
encoding responses into frames."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from engram.gateway import ws_frames
from engram.gateway.ws import close_reason
from engram.v1 import streaming_pb2 as pb


@pytest.fixture(autouse=True, params=["json", "orjson"])
def parser(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the standard library's parser and, when installed, with orjson."""
    if request.param == "json":
        monkeypatch.setattr(ws_frames, "orjson", None)
    elif ws_frames.orjson is None:
        pytest.skip("orjson is not installed (the optional 'websocket' extra)")
    return request.param


def decode(frame: dict) -> pb.ObservationRequest:
    kind, req = ws_frames.decode_text(json.dumps(frame))
    assert kind == frame["type"] and req is not None
    return req


@pytest.mark.parametrize(
    ("text", "us"),
    [
        ("1970-01-01T00:00:00Z", 0),
        ("2026-01-02T03:04:05.123456Z", 1767323045123456),
        ("2026-01-02T04:04:05.123456+01:00", 1767323045123456),
        ("2026-01-02T03:04:05", 1767323045000000),
        ("1969-12-31T23:59:59.999999Z", -1),
    ],
)
def test_rfc3339_both_ways(text, us):
    assert ws_frames.parse_rfc3339_us(text) == us
    back = ws_frames.rfc3339_us(us)
    assert back.endswith("Z")
    assert ws_frames.parse_rfc3339_us(back) == us


def test_batch_with_lists_b64_and_metadata():
    v = np.arange(1, 7, dtype="<f4").reshape(2, 3)
    req = decode(
        {
            "type": "batch",
            "sequence_number": "7",  # proto JSON writes 64-bit integers as strings
            "vectors": v.tolist(),
            "ids": ["a", "b"],
            "contents": ["x", "y"],
            "confidences": [0.5, 1],
            "timestamps_us": [1, 2],
            "priority": "LOW",
        }
    )
    assert req.sequence_number == 7
    b = req.batch
    assert b.dim == 3 and np.frombuffer(b.vectors, "<f4").tolist() == v.ravel().tolist()
    assert list(b.ids) == ["a", "b"] and list(b.contents) == ["x", "y"]
    assert np.frombuffer(b.confidences, "<f4").tolist() == [0.5, 1.0]
    assert np.frombuffer(b.timestamps_us, "<i8").tolist() == [1, 2]
    assert b.priority == pb.PRIORITY_LOW
    flat = decode({"type": "batch", "sequence_number": 1, "dim": 3, "vectors": v.ravel().tolist()})
    assert flat.batch.vectors == b.vectors
    b64 = base64.b64encode(v.tobytes()).decode()
    req = decode({"type": "batch", "sequence_number": 1, "dim": 3, "vectors_b64": b64})
    assert req.batch.vectors == b.vectors


def test_episode_recall_flow_close_and_init():
    ep = decode(
        {
            "type": "observation",
            "sequence_number": 1,
            "observation": {"id": "e", "what": "w", "embedding": [1, 2], "who": ["ada"]},
        }
    ).observation
    assert ep.id == "e" and list(ep.embedding) == [1.0, 2.0] and list(ep.who) == ["ada"]
    r = decode(
        {
            "type": "recall",
            "request_id": "q",
            "cue": [1, 0],
            "k": 3,
            "consistency": "STRONG",
            "min_score": 0.5,
            "since_us": -5,
        }
    ).recall
    assert (r.request_id, r.k, r.consistency) == ("q", 3, pb.STRONG)
    assert r.HasField("min_score") and not r.HasField("min_confidence") and r.since_us == -5
    assert decode({"type": "flow_control", "action": 5}).flow.action == pb.FlowControl.BUFFER_STATUS
    flow = decode({"type": "flow_control", "action": "action_unspecified"}).flow
    assert flow.action == pb.FlowControl.ACTION_UNSPECIFIED
    high = decode({"type": "batch", "sequence_number": 1, "vectors": [[1]], "priority": "high"})
    assert high.batch.priority == pb.PRIORITY_HIGH
    assert decode({"type": "close", "drain_queue": True}).close.drain_queue is True
    init = decode({"type": "init", "session_id": "s-1", "enable_backpressure": True})
    assert init.session_id == "s-1" and init.init.enable_backpressure is True
    assert ws_frames.decode_text('{"type":"heartbeat"}') == ("heartbeat", None)


@pytest.mark.parametrize(
    ("frame", "code", "seq", "request_id"),
    [
        ({"type": "batch", "sequence_number": 3, "vectors": "no"}, pb.INVALID_ARGUMENT, 3, ""),
        ({"type": "batch", "sequence_number": True, "vectors": [[1]]}, pb.INVALID_ARGUMENT, 0, ""),
        ({"type": "recall", "request_id": "r9", "cue": [1]}, pb.K_OUT_OF_RANGE, 0, "r9"),
        (
            {"type": "recall", "request_id": "r8", "k": 1, "cue_b64": "AAA="},
            pb.BAD_VECTOR_BLOB,
            0,
            "r8",
        ),
        ({"type": "init", "memory_space_id": 5}, pb.INVALID_ARGUMENT, 0, ""),
        ({"type": "close", "drain_queue": "yes"}, pb.INVALID_ARGUMENT, 0, ""),
        ({"type": "flow_control", "action": 9}, pb.INVALID_ARGUMENT, 0, ""),
    ],
)
def test_frame_errors_name_what_they_can(frame, code, seq, request_id):
    with pytest.raises(ws_frames.FrameError) as info:
        ws_frames.decode_text(json.dumps(frame))
    assert info.value.code == code
    assert info.value.sequence_number == seq
    assert info.value.request_id == request_id


def test_responses_encode_every_field_with_lower_case_enums():
    resp = pb.ObservationResponse(
        ack=pb.ObservationAck(status=pb.ObservationAck.ACCEPTED, count=2, first_lsn=2**40),
        session_id="s",
        sequence_number=4,
    )
    resp.ack.committed_at.FromMicroseconds(1_500_000)
    resp.server_timestamp.FromMicroseconds(2_000_001)
    frame = json.loads(ws_frames.encode_response(resp))
    assert frame["type"] == "ack" and frame["status"] == "accepted"
    assert frame["first_lsn"] == 2**40 and frame["duplicate"] is False
    assert frame["committed_at"] == "1970-01-01T00:00:01.500000Z"
    assert frame["server_timestamp"] == "1970-01-01T00:00:02.000001Z"

    recall = pb.RecallResponse(request_id="r", snapshot_sequence=9)
    recall.results.add(id="m", score=0.123456789, lsn=3)
    frame = json.loads(ws_frames.encode_response(pb.ObservationResponse(recall=recall)))
    assert frame["type"] == "recall_result" and frame["results"][0]["score"] == 0.1234568
    assert "when" not in frame["results"][0] and "metadata" not in frame

    err = json.loads(ws_frames.error_frame(pb.SEQUENCE_GAP, "gap", sequence_number=5))
    assert (err["code"], err["sequence_number"], err["retryable"]) == ("sequence_gap", 5, False)


def test_close_reasons_fit_the_protocol_limit():
    assert close_reason("short") == "short"
    long = close_reason("é" * 200)
    assert len(long.encode()) <= 123 and long.endswith("...")


@pytest.mark.parametrize(
    ("text", "code", "seq"),
    [
        ('{"type":"batch","sequence_number":4,"vectors":[[NaN]]}', pb.MALFORMED_MESSAGE, 0),
        ('{"type":"batch","sequence_number":4,"vectors":[[Infinity]]}', pb.MALFORMED_MESSAGE, 0),
        (
            '{"type":"batch","sequence_number":4,"vectors":[[' + "9" * 400 + "]]}",
            pb.NON_FINITE_VALUE,
            4,
        ),  # noqa: E501
        ('{"type":"batch","sequence_number":4,"vectors":[[1,]]}', pb.MALFORMED_MESSAGE, 0),
        ("[" * 5000 + "]" * 5000, pb.MALFORMED_MESSAGE, 0),
    ],
)
def test_both_parsers_answer_bad_json_alike(text, code, seq):
    with pytest.raises(ws_frames.FrameError) as info:
        ws_frames.decode_text(text)
    assert (info.value.code, info.value.sequence_number) == (code, seq)


def test_numbers_beyond_double_range_become_infinity_for_validation():
    req = decode({"type": "batch", "sequence_number": 1, "vectors": [[1.0, 2.0]]})
    assert req.batch.dim == 2
    _, req = ws_frames.decode_text('{"type":"batch","sequence_number":1,"vectors":[[1e400,1]]}')
    assert req is not None and np.isinf(np.frombuffer(req.batch.vectors, "<f4")).any()
