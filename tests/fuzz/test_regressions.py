"""The bugs the decoder fuzzing found, each as a plain example (they fail on the code before
the fix).

1. An episode whose ``when`` lies outside the Timestamp range (``seconds = 2**62``, sent as a
   gRPC message or a WebSocket binary frame) made ``validation.episode_to_batch`` raise
   OverflowError: the stream's worker died unobserved, the observation and every later message
   went unanswered. Now an in-band INVALID_ARGUMENT, and the stream goes on.
2. A vector (or cue) whose squared length overflows float32 (components near 1e20) passed
   validation with an infinite norm: the shard divided by it and stored a zero vector, an
   observation acked but never recalled; a cue raised numpy's overflow warning. Now both are
   refused with NON_FINITE_VALUE.
3. A WebSocket text frame whose ``request_id`` (or ``type`` with a bad field) held a lone
   surrogate escape (``"\\ud800"``) gave a FrameError quoting it: the error frame could not
   be encoded as UTF-8, the send failed and the connection ended. Now quoted as ``\\ud800``.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from tests.fuzz.gateway_path import LIMITS, drive_stream

from engram.common import validation
from engram.contract.errors import ValidationError
from engram.gateway import ws_frames
from engram.gateway.service import parse
from engram.gateway.stream import StreamAbort
from engram.v1 import streaming_pb2 as pb

# ------------------------------------------------------------------ 1: episode time range


def _episode(seconds: int, nanos: int = 0) -> pb.Episode:
    ep = pb.Episode(what="x", embedding=[1.0, 2.0])
    ep.when.seconds, ep.when.nanos = seconds, nanos
    return ep


@pytest.mark.parametrize(
    ("seconds", "nanos"),
    [(2**62, 0), (-(2**62), 0), (253_402_300_800, 0), (0, -1), (0, 1_000_000_000)],
)
def test_episode_time_out_of_range_is_refused(seconds: int, nanos: int) -> None:
    with pytest.raises(ValidationError) as caught:
        validation.episode_to_batch(_episode(seconds, nanos))
    assert caught.value.code == pb.INVALID_ARGUMENT
    assert "'when'" in caught.value.message and "1..9999" in caught.value.message


@pytest.mark.parametrize(
    ("seconds", "us"),
    [(253_402_300_799, 253_402_300_799_000_000), (-62_135_596_800, -62_135_596_800_000_000)],
)
def test_episode_times_at_the_ends_of_the_range_are_kept(seconds: int, us: int) -> None:
    batch = validation.episode_to_batch(_episode(seconds))
    assert np.frombuffer(batch.timestamps_us, "<i8").tolist() == [us]


def test_stream_answers_an_episode_out_of_time_and_goes_on() -> None:
    init = pb.ObservationRequest(memory_space_id="alpha", init=pb.StreamInit())
    bad = pb.ObservationRequest(sequence_number=1, observation=_episode(2**62))
    vectors = np.ones(4, "<f4").tobytes()
    good = pb.ObservationRequest(
        sequence_number=1, batch=pb.ObservationBatch(dim=4, vectors=vectors)
    )
    out = drive_stream([parse(m.SerializeToString()) for m in (init, bad, good)])
    assert not any(isinstance(item, StreamAbort) for item in out)
    kinds = [(item.WhichOneof("result"), item.sequence_number) for item in out]
    assert kinds == [("init_ack", 0), ("error", 1), ("ack", 1)]
    assert out[1].error.code == pb.INVALID_ARGUMENT
    assert out[2].ack.status == pb.ObservationAck.ACCEPTED


# ------------------------------------------------------------------ 2: float32 overflow


def test_vector_whose_squared_length_overflows_is_refused() -> None:
    rows = np.array([[1.0, 2.0, 3.0, 4.0], [1e20, 0.0, 0.0, 1.0]], dtype="<f4")
    batch = pb.ObservationBatch(dim=4, vectors=rows.tobytes())
    with pytest.raises(ValidationError) as caught:
        validation.batch(batch, LIMITS)
    assert caught.value.code == pb.NON_FINITE_VALUE
    assert caught.value.message.startswith("observation 1 ")


def test_long_vectors_that_fit_float32_are_kept() -> None:
    rows = np.full((1, 4), 1e18, dtype="<f4")  # squared length 4e36 < float32's 3.4e38
    checked = validation.batch(pb.ObservationBatch(dim=4, vectors=rows.tobytes()), LIMITS)
    assert np.isfinite(checked.sq_norms).all()


def test_cue_whose_squared_length_overflows_is_refused_without_a_warning() -> None:
    recall = pb.RecallRequest(k=1, cue=[1e30, 1e30])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ValidationError) as caught:
            validation.recall(recall, LIMITS)
    assert caught.value.code == pb.NON_FINITE_VALUE


# ------------------------------------------------------------------ 3: lone surrogates


@pytest.mark.parametrize("name", ["json", "orjson"])
@pytest.mark.parametrize(
    ("frame", "quoted"),
    [
        ({"type": "recall", "request_id": "\ud800", "cue": "x"}, "request_id"),
        ({"type": "recall", "request_id": "r\udfff", "cue": [1.0], "k": 1}, "request_id"),
        ({"type": "\ud800", "memory_space_id": "\ud800"}, "message"),
        ({"type": "batch", "sequence_number": 1, "ids": ["\ud800"], "vectors": [[1.0]]}, None),
    ],
)
def test_error_frames_quoting_lone_surrogates_can_be_sent(
    name: str, frame: dict[str, object], quoted: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if name == "json":
        monkeypatch.setattr(ws_frames, "orjson", None)
    elif ws_frames.orjson is None:
        pytest.skip("orjson is not installed (the optional 'websocket' extra)")
    text = json.dumps(frame)  # ensure_ascii: the surrogate travels as a \ud800 escape
    with pytest.raises(ws_frames.FrameError) as caught:
        ws_frames.decode_text(text)
    exc = caught.value
    sent = ws_frames.error_frame(
        exc.code, exc.message, sequence_number=exc.sequence_number, request_id=exc.request_id
    ).encode("utf-8")
    answer = json.loads(sent)
    assert answer["type"] == "error"
    if quoted == "request_id":
        assert answer["request_id"].endswith("\\ud800") or answer["request_id"] == "r\\udfff"
    elif quoted == "message":
        assert "\\ud800" in answer["message"]
