"""Bad input on /v1/stream: each bad frame gets an ``error`` frame (code, message, the frame's
sequence number or request id when it could be read) and the connection stays usable; frames
beyond the size limit close it with 1009."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from engram.v1 import streaming_pb2 as pb

DIM = 8
# In-band limit 64 KiB, transport limit 128 KiB (small, so the tests send small frames).
CLUSTER_ENV = {"ENGRAM_MAX_BATCH_BYTES": "65536", "ENGRAM_GRPC_MAX_MESSAGE_BYTES": "131072"}
CLUSTER_SHARDS = 1


def vecs(n: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype("<f4")
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def batch(seq: Any, **fields: Any) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "batch", "sequence_number": seq}
    frame.update(fields)
    return frame


GOOD = vecs(2).tolist()

# Every case runs after batch 1 was acked (which fixes the space's dimension at 8), so a
# batch frame here is number 2. (id, frame, code, echoed sequence_number, words in the message)
BAD_FRAMES: list[tuple[str, Any, str, int, str]] = [
    ("invalid-json", '{"type": "batch", ', "malformed_message", 0, "not valid JSON"),
    ("json-not-object", "[1, 2, 3]", "malformed_message", 0, "JSON object"),
    ("no-type", {"sequence_number": 2}, "missing_operation", 0, "'type'"),
    ("unknown-type", {"type": "subscribe"}, "invalid_argument", 0, "unknown frame type"),
    ("batch-no-vectors", batch(2), "invalid_argument", 2, "'vectors'"),
    ("batch-no-sequence", {"type": "batch", "vectors": GOOD}, "invalid_argument", 0, "sequence"),
    ("sequence-not-int", batch("two", vectors=GOOD), "invalid_argument", 0, "integer"),
    (
        "ragged-rows",
        batch(2, vectors=[[1.0] * DIM, [1.0] * (DIM - 1)]),
        "wrong_dimension",
        2,
        "different lengths",
    ),
    ("wrong-dimension", batch(2, vectors=vecs(2, DIM + 3).tolist()), "wrong_dimension", 2, "8"),
    ("dim-disagrees", batch(2, dim=4, vectors=GOOD), "wrong_dimension", 2, "'dim'"),
    ("b64-without-dim", batch(2, vectors_b64="AAAAAA=="), "invalid_argument", 2, "'dim'"),
    ("b64-garbage", batch(2, dim=DIM, vectors_b64="***"), "bad_vector_blob", 2, "base64"),
    ("b64-short", batch(2, dim=DIM, vectors_b64="AAAAAA=="), "bad_vector_blob", 2, "multiple"),
    ("strings-in-vectors", batch(2, vectors=[["a"] * DIM]), "invalid_argument", 2, "numbers"),
    (
        "nan-is-not-json",
        '{"type":"batch","sequence_number":2,"vectors":[[NaN,1,1,1,1,1,1,1]]}',
        "malformed_message",
        0,
        "NaN is not valid JSON",
    ),
    (
        "double-overflow",
        '{"type":"batch","sequence_number":2,"vectors":[[1e400,1,1,1,1,1,1,1]]}',
        "non_finite_value",
        2,
        "infinity",
    ),
    (
        "float32-overflow",
        '{"type":"batch","sequence_number":2,"vectors":[[1e39,1,1,1,1,1,1,1]]}',
        "non_finite_value",
        2,
        "infinity",
    ),
    ("zero-vector", batch(2, vectors=[[0.0] * DIM]), "zero_vector", 2, "zero"),
    (
        "huge-number",
        '{"type":"batch","sequence_number":2,"vectors":[[' + "9" * 400 + ",1,1,1,1,1,1,1]]}",
        "non_finite_value",
        2,
        "float range",
    ),
    (
        "deeply-nested",
        '{"type":"batch","sequence_number":2,"vectors":' + "[" * 50_000 + "]" * 50_000 + "}",
        "malformed_message",
        0,
        "not valid JSON",
    ),
    ("ids-mismatch", batch(2, vectors=GOOD, ids=["only-one"]), "length_mismatch", 2, "ids"),
    ("ids-not-strings", batch(2, vectors=GOOD, ids=[1, 2]), "invalid_argument", 2, "'ids'"),
    ("bad-priority", batch(2, vectors=GOOD, priority="urgent"), "invalid_argument", 2, "priority"),
    (
        "observation-no-episode",
        {"type": "observation", "sequence_number": 2},
        "invalid_argument",
        2,
        "'episode'",
    ),
    (
        "episode-bad-when",
        {
            "type": "observation",
            "sequence_number": 2,
            "episode": {"embedding": GOOD[0], "when": "yesterday"},
        },
        "invalid_argument",
        2,
        "RFC 3339",
    ),
    (
        "flow-unknown-action",
        {"type": "flow_control", "action": "faster"},
        "invalid_argument",
        0,
        "action",
    ),
    ("flow-no-action", {"type": "flow_control"}, "invalid_argument", 0, "'action'"),
    ("sequence-gap", batch(5, vectors=GOOD), "sequence_gap", 5, "expected 2"),
    ("second-init", {"type": "init", "memory_space_id": "other"}, "already_initialized", 0, ""),
    (
        "space-mismatch",
        batch(2, vectors=GOOD, memory_space_id="elsewhere"),
        "space_mismatch",
        2,
        "elsewhere",
    ),
]


@pytest.mark.parametrize(
    ("frame", "code", "seq", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_FRAMES],
)
async def test_a_bad_frame_gets_an_error_and_the_connection_stays_usable(
    shared_cluster, ws_connect, space_id, frame, code, seq, words
):
    ws = await ws_connect(shared_cluster)
    await ws.init(space_id)
    await ws.batch(1, vecs(1, seed=1))
    await ws.expect("ack", sequence_number=1)
    await ws.send(frame)
    err = await ws.expect("error", code=code)
    assert err["sequence_number"] == seq, err
    assert words in err["message"], err
    assert err["retryable"] is False
    # the connection still works, and the bad frame consumed no sequence number
    await ws.batch(2, vecs(2, seed=2))
    ack = await ws.expect("ack", sequence_number=2)
    assert ack["count"] == 2


async def test_recall_errors_name_the_request(shared_cluster, ws_connect, space_id):
    ws = await ws_connect(shared_cluster)
    await ws.init(space_id)
    huge = "9" * 400
    await ws.send(f'{{"type":"recall","request_id":"big","cue":[1],"k":1,"min_score":{huge}}}')
    err = await ws.expect("error", code="invalid_argument", request_id="big")
    assert "cannot be read" in err["message"]
    await ws.send({"type": "recall", "request_id": "nocue", "k": 3})
    err = await ws.expect("error", code="invalid_argument", request_id="nocue")
    assert "'cue'" in err["message"]
    await ws.send({"type": "recall", "request_id": "nok", "cue": [1.0, 0.0]})
    await ws.expect("error", code="k_out_of_range", request_id="nok")
    await ws.send({"type": "recall", "request_id": "zero", "cue": [0.0, 0.0], "k": 1})
    await ws.expect("error", code="zero_vector", request_id="zero")


async def test_work_before_init_is_refused(shared_cluster, ws_connect):
    ws = await ws_connect(shared_cluster)
    await ws.batch(1, vecs(1))
    await ws.expect("error", code="not_initialized")
    await ws.send({"type": "init"})
    await ws.expect("error", code="invalid_space_id")
    await ws.send({"type": "init", "memory_space_id": "NO SPACES"})
    await ws.expect("error", code="invalid_space_id")
    await ws.send({"type": "init", "session_id": "s-unknown"})
    await ws.expect("error", code="unknown_session")
    await ws.init("ws-late-init")  # the connection is still usable


async def test_binary_garbage_is_malformed_and_harmless(shared_cluster, ws_connect, space_id):
    ws = await ws_connect(shared_cluster)
    await ws.init(space_id)
    await ws.send(b"\xff\xfe\xfd garbage \x00\x01")
    err = await ws.expect("error", code="malformed_message")
    assert "not an ObservationRequest" in err["message"]
    await ws.binary_batch(1, vecs(1))
    await ws.expect("ack", sequence_number=1)


async def test_a_batch_over_the_in_band_limit_is_refused_in_band(
    shared_cluster, ws_connect, space_id
):
    ws = await ws_connect(shared_cluster)
    await ws.init(space_id)
    big = vecs(3000, seed=3)  # 96 KB of vectors: over 64 KiB, under the 128 KiB frame limit
    await ws.binary_batch(1, big)
    err = await ws.expect("error", code="batch_too_large", sequence_number=1)
    assert "65536" in err["message"]
    await ws.binary_batch(1, vecs(2))
    await ws.expect("ack", sequence_number=1)


@pytest.mark.parametrize("kind", ["binary", "text"])
async def test_a_frame_beyond_the_transport_limit_closes_with_1009(
    shared_cluster, ws_connect, space_id, kind
):
    ws = await ws_connect(shared_cluster)
    await ws.init(space_id)
    if kind == "binary":
        await ws.binary_batch(1, vecs(5000, seed=4))  # 160 KB > 128 KiB
    else:
        await ws.send(json.dumps(dict(batch(1, vectors=vecs(2000, seed=4).tolist()))))
    code, reason = await ws.closed()
    assert code == 1009, reason


async def test_invalid_utf8_in_a_text_frame_closes_with_1007(shared_cluster, ws_connect, space_id):
    ws = await ws_connect(shared_cluster)
    await ws.init(space_id)
    await ws.conn.send(b'{"type": "\xff"}', text=True)
    code, _ = await ws.closed()
    assert code == 1007


def test_every_error_code_named_here_exists():
    names = {n.lower() for n in pb.ErrorCode.keys()}
    for case in BAD_FRAMES:
        assert case[2] in names, case
