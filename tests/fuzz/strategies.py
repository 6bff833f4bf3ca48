"""Hypothesis strategies for the decoders' inputs: valid messages, then the same mutated.

* :func:`requests`: ``ObservationRequest`` messages of every operation, with values from the
  ordinary to the extreme (NaN and huge floats, u32/u64 limits, unknown enum numbers, times
  outside any calendar), most of them shaped to get past the first checks.
* :func:`mutated`: bytes of a valid message with bits flipped, bytes replaced, slices cut,
  repeated or inserted, a huge length prefix or garbage appended.
* :func:`frames`: WebSocket JSON frames as dicts, valid, then with values replaced by
  :data:`NASTY` JSON values (wrong types, huge numbers, deep nesting, giant base64, unicode
  including lone surrogates) or keys dropped; :func:`texts` serialises them and mutates the text.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import numpy as np
from hypothesis import strategies as st

from engram.v1 import streaming_pb2 as pb

U32 = (1 << 32) - 1
U64 = (1 << 64) - 1
I64 = (1 << 63) - 1

f32 = st.floats(width=32)  # NaN, infinities, subnormals and the extremes included
small_f32 = st.floats(-1e3, 1e3, width=32, allow_nan=False)
# finite, but their squares overflow float32 (and tiny ones whose squares vanish)
big_f32 = st.floats(2.0**60, 2.0**127, width=32).flatmap(lambda x: st.sampled_from([x, -x]))
tiny_f32 = st.floats(-(2.0**-70), 2.0**-70, width=32, allow_nan=False)
vector_values = st.one_of(small_f32, f32, big_f32, tiny_f32)
u32 = st.one_of(st.integers(0, 10), st.integers(0, U32), st.sampled_from([U32, U32 - 1]))
u64 = st.one_of(st.integers(0, 10), st.integers(0, U64), st.just(U64))
i64 = st.one_of(st.integers(-10, 10), st.integers(-I64 - 1, I64), st.sampled_from([I64, -I64 - 1]))
i32 = st.integers(-(1 << 31), (1 << 31) - 1)
names = st.one_of(
    st.sampled_from(["alpha", "beta-1", "a_b", "ab", "x" * 65, " alpha ", "ALPHA", ""]),
    st.text(max_size=70),
)
strings = st.one_of(st.text(max_size=40), st.sampled_from(["", "é", "😀", "\x00", "a" * 300]))


def _vectors(n: int, dim: int, values: st.SearchStrategy[float]) -> st.SearchStrategy[bytes]:
    return st.lists(values, min_size=n * dim, max_size=n * dim).map(
        lambda xs: np.asarray(xs, dtype="<f4").tobytes()
    )


@st.composite
def batches(draw: st.DrawFn) -> pb.ObservationBatch:
    """Mostly consistent batches (n rows of dim floats and matching columns), sometimes not."""
    dim = draw(st.one_of(st.integers(1, 8), st.sampled_from([0, 4, U32])))
    n = draw(st.integers(0, 6))
    real_dim = dim if dim <= 8 else draw(st.integers(1, 8))
    blob = draw(
        st.one_of(
            _vectors(n, real_dim, small_f32),
            _vectors(n, real_dim, vector_values),
            st.binary(max_size=96),
        )
    )
    count = draw(st.one_of(st.just(n), st.integers(0, 8)))
    b = pb.ObservationBatch(dim=dim, vectors=blob, priority=draw(st.sampled_from([0, 1, 2, 3, 99])))
    if draw(st.booleans()):
        b.ids.extend(draw(st.lists(strings, min_size=count, max_size=count)))
    if draw(st.booleans()):
        b.contents.extend(draw(st.lists(strings, min_size=count, max_size=count)))
    if draw(st.booleans()):
        b.confidences = draw(st.one_of(_vectors(count, 1, f32), st.binary(max_size=40)))
    if draw(st.booleans()):
        b.timestamps_us = draw(
            st.one_of(
                st.lists(i64, min_size=count, max_size=count).map(
                    lambda xs: np.asarray(xs, dtype="<i8").tobytes()
                ),
                st.binary(max_size=70),
            )
        )
    return b


@st.composite
def episodes(draw: st.DrawFn) -> pb.Episode:
    ep = pb.Episode(
        id=draw(strings),
        what=draw(strings),
        encoding_confidence=draw(f32),
        where_location=draw(strings),
        why=draw(strings),
        how=draw(strings),
    )
    ep.embedding.extend(draw(st.lists(vector_values, max_size=10)))
    ep.who.extend(draw(st.lists(strings, max_size=3)))
    if draw(st.booleans()):
        ep.when.seconds = draw(st.one_of(st.integers(0, 2_000_000_000), i64))
        ep.when.nanos = draw(st.one_of(st.integers(0, 999_999_999), i32))
    return ep


@st.composite
def recalls(draw: st.DrawFn) -> pb.RecallRequest:
    r = pb.RecallRequest(
        request_id=draw(strings),
        k=draw(st.one_of(st.integers(0, 20), u32)),
        consistency=draw(st.sampled_from([0, 1, 2, 3, 4, 77])),
        deadline_ms=draw(st.one_of(st.integers(0, 100), u32)),
        chunk_size=draw(u32),
    )
    r.cue.extend(draw(st.lists(vector_values, max_size=10)))
    for name, values in (
        ("min_score", f32),
        ("min_confidence", f32),
        ("since_us", i64),
        ("until_us", i64),
    ):
        if draw(st.booleans()):
            setattr(r, name, draw(values))
    return r


@st.composite
def requests(draw: st.DrawFn, *, seq: int | None = None) -> pb.ObservationRequest:
    """Any ObservationRequest; ``seq`` fixes the sequence number (else drawn)."""
    op = draw(st.sampled_from(["init", "batch", "observation", "recall", "flow", "close", None]))
    req = pb.ObservationRequest(
        memory_space_id=draw(st.one_of(st.just(""), names)),
        session_id=draw(st.one_of(st.just(""), st.just("s-unknown"), strings)),
        sequence_number=seq if seq is not None else draw(u64),
    )
    if op == "init":
        req.init.CopyFrom(
            pb.StreamInit(
                client_buffer_size=draw(u32),
                enable_backpressure=draw(st.booleans()),
                max_batch_size=draw(u32),
                api_key=draw(strings),
            )
        )
    elif op == "batch":
        req.batch.CopyFrom(draw(batches()))
    elif op == "observation":
        req.observation.CopyFrom(draw(episodes()))
    elif op == "recall":
        req.recall.CopyFrom(draw(recalls()))
    elif op == "flow":
        req.flow.CopyFrom(
            pb.FlowControl(
                action=draw(st.sampled_from([0, 1, 2, 3, 4, 5, 6, 1000])),
                buffer_remaining=draw(u32),
                preferred_rate=draw(st.one_of(st.integers(0, 10), u32)),
                reason=draw(strings),
            )
        )
    elif op == "close":
        req.close.CopyFrom(pb.StreamClose(drain_queue=draw(st.booleans()), last_sequence=draw(u64)))
    return req


# ------------------------------------------------------------------------------ byte mutation


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


@st.composite
def mutated(draw: st.DrawFn, data: bytes, max_steps: int = 4) -> bytes:
    """``data`` after 1..max_steps random edits."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, max_steps))):
        kind = draw(
            st.sampled_from(["flip", "set", "cut", "truncate", "insert", "repeat", "huge", "tail"])
        )
        at = draw(st.integers(0, max(len(buf) - 1, 0)))
        if kind == "flip" and buf:
            buf[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set" and buf:
            buf[at] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, draw(st.integers(0, 255))]))
        elif kind == "cut" and buf:
            del buf[at : at + draw(st.integers(1, 16))]
        elif kind == "truncate":
            del buf[at:]
        elif kind == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "repeat" and buf:
            buf[at:at] = buf[at : at + draw(st.integers(1, 32))] * draw(st.integers(1, 4))
        elif kind == "huge":  # a field whose length prefix claims far more than follows
            tag = draw(st.sampled_from([0x0A, 0x12, 0x1A, 0x32, 0x3A, 0x52]))
            buf[at:at] = bytes([tag]) + _varint(draw(st.sampled_from([U32, 1 << 31, U64 >> 1])))
        elif kind == "tail":
            buf += draw(st.binary(min_size=1, max_size=32))
    return bytes(buf)


@st.composite
def request_bytes(draw: st.DrawFn) -> bytes:
    """Wire bytes: a valid request, a mutated one, or any bytes at all."""
    valid = draw(requests()).SerializeToString()
    pick = draw(st.integers(0, 3))
    if pick == 0:
        return valid
    if pick == 3:
        return draw(st.binary(max_size=256))
    return draw(mutated(valid))


# ------------------------------------------------------------------------------ JSON frames

LONE_SURROGATES = st.sampled_from(["\ud800", "\udfff", "a\ud83d", "\udc00b"])


def _nested(depth: int) -> list[Any]:
    value: list[Any] = [1.0]
    for _ in range(depth):
        value = [value]
    return value


# Nesting json.dumps can still write from inside a test; deeper nesting comes as text (texts()).
_DEEP = st.integers(1, 200).map(_nested)
NASTY: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([-1, 0, U32 + 1, U64 + 1, -(1 << 64), 10**30, 10**400 // 10**380, 2**63]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([1e308, -1e308, 5e-324, 1e39, -0.0, 0.5, 1.0]),
    st.text(max_size=20),
    LONE_SURROGATES,
    st.sampled_from(["1", "-1", "١٢", "²", "99999999999999999999999", "1e5", " 7 ", "--5"]),
    st.lists(st.integers(-5, 5), max_size=5),
    st.lists(st.lists(st.floats(width=32, allow_nan=False), max_size=4), max_size=4),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    _DEEP,
)
_B64_GIANT = st.integers(1, 1 << 18).map(lambda n: "AAAA" * n)


def _b64(values: list[float]) -> str:
    return base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()


@st.composite
def valid_frames(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["init", "batch", "observation", "recall", "flow_control"]))
    kind = draw(st.one_of(st.just(kind), st.sampled_from(["close", "heartbeat", "nope"])))
    frame: dict[str, Any] = {"type": kind, "memory_space_id": "alpha"}
    dim = draw(st.integers(1, 6))
    values = vector_values if draw(st.integers(0, 2)) == 0 else small_f32
    rows = draw(st.lists(st.lists(values, min_size=dim, max_size=dim), min_size=1, max_size=4))
    if kind == "init":
        frame.update(client_buffer_size=10, enable_backpressure=True, max_batch_size=100)
    elif kind == "batch":
        frame["sequence_number"] = draw(st.integers(1, 5))
        if draw(st.booleans()):
            frame.update(dim=dim, vectors_b64=_b64([x for r in rows for x in r]))
        else:
            frame["vectors"] = rows
        frame["ids"] = [f"m{i}" for i in range(len(rows))]
        frame["confidences"] = [0.5] * len(rows)
        frame["timestamps_us"] = [1_700_000_000_000_000] * len(rows)
        frame["priority"] = draw(st.sampled_from(["high", "normal", "LOW", 2]))
    elif kind == "observation":
        frame["sequence_number"] = 1
        frame["episode"] = {
            "id": "e1",
            "what": "text",
            "embedding": rows[0],
            "when": draw(st.sampled_from(["2026-01-02T03:04:05Z", "0001-01-01T00:00:00+01:00"])),
            "who": ["a"],
            "encoding_confidence": 0.9,
        }
    elif kind == "recall":
        frame.update(request_id="r1", k=draw(st.integers(1, 10)), consistency="bounded")
        if draw(st.booleans()):
            frame["cue_b64"] = _b64(rows[0])
        else:
            frame["cue"] = rows[0]
        frame.update(min_score=0.1, since_us=0, until_us=I64, deadline_ms=100)
    elif kind == "flow_control":
        frame.update(action=draw(st.sampled_from(["pause", "RESUME", 3, "slow_down"])))
        frame.update(preferred_rate=10)
    elif kind == "close":
        frame.update(drain_queue=True, last_sequence=3)
    return frame


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key/index path inside a JSON value (containers first)."""
    out = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            out += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value[:4]):
            out += _paths(item, (*prefix, index))
    return out


def _at(value: Any, path: tuple[Any, ...]) -> Any:
    for step in path:
        value = value[step]
    return value


def _set(value: Any, path: tuple[Any, ...], new: Any) -> None:
    _at(value, path[:-1])[path[-1]] = new


@st.composite
def frames(draw: st.DrawFn) -> Any:
    """A valid frame, then 0..3 values replaced by nasty ones, keys dropped or added."""
    frame = draw(valid_frames())
    for _ in range(draw(st.integers(0, 3))):
        paths = [p for p in _paths(frame) if p]
        action = draw(st.sampled_from(["replace", "drop", "add", "giant_b64", "unicode"]))
        if action == "unicode":  # a string the client sent, often quoted back in an error
            texts_at = [p for p in paths if isinstance(_at(frame, p), str)]
            if texts_at:
                path = draw(st.sampled_from(texts_at))
                _set(frame, path, draw(st.one_of(LONE_SURROGATES, st.text(max_size=8))))
            continue
        if action == "add" or not paths:
            key = draw(st.sampled_from(["dim", "cue", "k", "vectors_b64", "when", "type", "x"]))
            frame[key] = draw(NASTY)
            continue
        path = draw(st.sampled_from(paths))
        if action == "replace":
            _set(frame, path, draw(NASTY))
        elif action == "drop":
            del _at(frame, path[:-1])[path[-1]]
        else:
            _set(frame, path, draw(_B64_GIANT))
    return frame if draw(st.integers(0, 9)) else draw(NASTY)


@st.composite
def texts(draw: st.DrawFn) -> str:
    """Text frames: a (mutated) frame serialised, then perhaps edited as text; or any text."""
    value = draw(frames())
    text = json.dumps(value, ensure_ascii=draw(st.booleans()))
    if draw(st.integers(0, 3)) == 0:
        raw = draw(mutated(text.encode("utf-8", "surrogatepass"), max_steps=3))
        text = raw.decode("utf-8", "replace")
    if draw(st.integers(0, 9)):
        return text
    return draw(
        st.one_of(
            st.text(max_size=80),
            st.sampled_from(["NaN", "[NaN]", '{"type":"recall","cue":[Infinity],"k":1}', "{}"]),
            st.integers(1, 200_000).map(lambda d: '{"type":"batch","vectors":' + "[" * d),
            st.integers(1, 5000).map(lambda d: "[" * d + "]" * d),
        )
    )
