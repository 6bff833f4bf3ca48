"""JSON frames of the WebSocket endpoint: parsing client frames, encoding server frames.

Client text frames are JSON objects with a ``"type"``; :func:`decode_text` turns one into the
same :class:`~engram.v1.streaming_pb2.ObservationRequest` a gRPC client would send, or raises
:class:`FrameError` (an in-band ``error`` frame; the connection stays usable). Server frames are
encoded from ``ObservationResponse`` by :func:`encode_response`, generically from the message
descriptors, so fields added to the protocol appear in the JSON without code here.

JSON conventions (docs/websocket.md): field names are the proto's (snake_case); enum values are
the proto's names in lower case (``"accepted"``, ``"sequence_gap"``), and names in any case or
numbers are accepted on input; 64-bit integers are JSON numbers; timestamps are RFC 3339 strings
in UTC; vectors are lists of numbers or base64 of packed little-endian float32 (``*_b64``).

JSON is strict: ``NaN`` and ``Infinity`` are not JSON and are refused as malformed. Frames are
parsed with ``orjson`` when it is installed (the ``websocket`` extra; several times faster on
lists of numbers), else with the standard library; a frame orjson refuses is parsed again by
the standard library, so the answer to bad input does not depend on which is installed.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from engram.v1 import streaming_pb2 as pb

try:  # optional accelerator (pip install '.[websocket]')
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None  # type: ignore[assignment]

JSON_PARSER = "orjson" if orjson is not None else "json"

CLIENT_TYPES = (
    "init",
    "observation",
    "batch",
    "recall",
    "delete",
    "flow_control",
    "close",
    "heartbeat",
)

# ObservationResponse oneof field -> frame type
_RESPONSE_TYPES = {
    "init_ack": "init_ack",
    "ack": "ack",
    "status": "status",
    "recall": "recall_result",
    "error": "error",
    "deleted": "deleted",
}

_UTC = dt.UTC


class FrameError(Exception):
    """A frame that cannot become a request; answered with an ``error`` frame.

    ``message`` and ``request_id`` may quote the client's text, which JSON escapes can make
    unencodable (a lone surrogate such as ``"\\ud800"``); both are kept valid UTF-8 so the
    error frame itself can always be sent."""

    def __init__(
        self, code: int, message: str, *, sequence_number: int = 0, request_id: str = ""
    ) -> None:
        message = utf8_safe(message)
        super().__init__(message)
        self.code = code
        self.message = message
        self.sequence_number = sequence_number
        self.request_id = utf8_safe(request_id)


def utf8_safe(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates) written as ``\\udXXX``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


# ------------------------------------------------------------------------------ timestamps

_second_cache: tuple[int, str] = (-1, "")


def rfc3339_us(us: int) -> str:
    """Unix microseconds -> ``2026-11-25T12:00:00.123456Z``."""
    global _second_cache
    sec, frac = divmod(us, 1_000_000)
    cached_sec, prefix = _second_cache
    if sec != cached_sec:
        prefix = dt.datetime.fromtimestamp(sec, _UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _second_cache = (sec, prefix)
    return f"{prefix}.{frac:06d}Z"


def parse_rfc3339_us(text: str) -> int:
    """RFC 3339 (``Z`` or an offset; naive means UTC) -> unix microseconds; ValueError if not."""
    value = dt.datetime.fromisoformat(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=_UTC)
    delta = value - dt.datetime(1970, 1, 1, tzinfo=_UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


# ------------------------------------------------------------------------------- encoding

Encoder = Callable[[Any], Any]


def _f32(v: float) -> float | None:
    if not math.isfinite(v):
        return None
    return float(f"{v:.7g}")


def _enum_names(enum: EnumDescriptor) -> dict[int, str]:
    return {v.number: v.name.lower() for v in enum.values}


_PLANS: dict[str, list[tuple[str, Encoder, bool, bool]]] = {}


def _plan(desc: Descriptor) -> list[tuple[str, Encoder, bool, bool]]:
    """Per message type: (field name, value encoder, repeated, presence-tracked scalar/message)."""
    plan = _PLANS.get(desc.full_name)
    if plan is not None:
        return plan
    plan = []
    for f in desc.fields:
        enc: Encoder
        if f.message_type is not None:
            if f.message_type.full_name == "google.protobuf.Timestamp":

                def enc(m: Any) -> Any:
                    return rfc3339_us(m.seconds * 1_000_000 + m.nanos // 1000)
            else:
                sub = f.message_type

                def enc(m: Any, _sub: Descriptor = sub) -> Any:
                    return encode_message(m, _sub)
        elif f.enum_type is not None:
            names = _enum_names(f.enum_type)

            def enc(v: Any, _names: dict[int, str] = names) -> Any:
                return _names.get(v, v)
        elif f.type == FieldDescriptor.TYPE_BYTES:

            def enc(v: Any) -> Any:
                return base64.b64encode(v).decode("ascii")
        elif f.type == FieldDescriptor.TYPE_FLOAT:
            enc = _f32
        elif f.type == FieldDescriptor.TYPE_DOUBLE:

            def enc(v: Any) -> Any:
                return v if math.isfinite(v) else None
        else:

            def enc(v: Any) -> Any:
                return v

        presence = (f.message_type is not None or f.has_presence) and not f.is_repeated
        plan.append((f.name, enc, f.is_repeated, presence))
    _PLANS[desc.full_name] = plan
    return plan


def encode_message(msg: Message, desc: Descriptor | None = None) -> dict[str, Any]:
    """Every field of ``msg`` (defaults included; unset messages and optionals left out)."""
    out: dict[str, Any] = {}
    for name, enc, repeated, presence in _plan(desc or msg.DESCRIPTOR):
        if repeated:
            out[name] = [enc(v) for v in getattr(msg, name)]
        elif presence:
            if msg.HasField(name):
                out[name] = enc(getattr(msg, name))
        else:
            out[name] = enc(getattr(msg, name))
    return out


def response_dict(resp: pb.ObservationResponse) -> dict[str, Any]:
    """One server frame as a dict: type, the envelope fields, then the result's fields."""
    kind = resp.WhichOneof("result")
    if kind is None:
        raise ValueError("a response without a result")
    ts = resp.server_timestamp
    out: dict[str, Any] = {
        "type": _RESPONSE_TYPES[kind],
        "session_id": resp.session_id,
        "sequence_number": resp.sequence_number,
        "server_timestamp": rfc3339_us(ts.seconds * 1_000_000 + ts.nanos // 1000),
    }
    out.update(encode_message(getattr(resp, kind)))
    return out


def dumps(frame: dict[str, Any]) -> str:
    return json.dumps(frame, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_response(resp: pb.ObservationResponse, extra: dict[str, Any] | None = None) -> str:
    frame = response_dict(resp)
    if extra:
        frame.update(extra)
    return dumps(frame)


def error_frame(
    code: int,
    message: str,
    *,
    session_id: str = "",
    sequence_number: int = 0,
    request_id: str = "",
    retryable: bool = False,
) -> str:
    """An ``error`` frame produced by the WebSocket layer itself (same shape as the others)."""
    err = pb.StreamError(code=code, message=message, retryable=retryable, request_id=request_id)
    resp = pb.ObservationResponse(error=err, session_id=session_id, sequence_number=sequence_number)
    resp.server_timestamp.GetCurrentTime()
    return encode_response(resp)


def heartbeat_frame(session_id: str, last_acked_sequence: int) -> str:
    now = dt.datetime.now(_UTC)
    us = int(now.timestamp()) * 1_000_000 + now.microsecond
    return dumps(
        {
            "type": "heartbeat",
            "session_id": session_id or None,
            "timestamp": rfc3339_us(us),
            "last_acked_sequence": last_acked_sequence,
        }
    )


# ------------------------------------------------------------------------------- decoding


def _err(message: str, code: int = pb.INVALID_ARGUMENT) -> FrameError:
    return FrameError(code, message)


def _str(frame: dict[str, Any], key: str, default: str = "") -> str:
    v = frame.get(key, default)
    if v is None:
        return default
    if not isinstance(v, str):
        raise _err(f"'{key}' must be a string, got {_json_type(v)}")
    return v


def _int(frame: dict[str, Any], key: str, lo: int, hi: int, default: int = 0) -> int:
    v = frame.get(key, default)
    if v is None:
        return default
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():  # proto JSON writes 64-bit as text
        v = int(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise _err(f"'{key}' must be an integer, got {_json_type(v)}")
    if not lo <= v <= hi:
        raise _err(f"'{key}' must be in {lo}..{hi}, got {v}")
    return v


def _num(frame: dict[str, Any], key: str) -> float:
    v = frame[key]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _err(f"'{key}' must be a number, got {_json_type(v)}")
    return float(v)


def _bool(frame: dict[str, Any], key: str) -> bool:
    v = frame.get(key, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _err(f"'{key}' must be true or false, got {_json_type(v)}")
    return v


def _enum(frame: dict[str, Any], key: str, enum: Any, prefix: str = "") -> int:
    """An enum given by name (any case, with or without the proto's prefix) or number."""
    v = frame.get(key)
    if v is None:
        return 0
    names = {n.lower(): num for n, num in enum.items()}
    if isinstance(v, str):
        low = v.strip().lower()
        for candidate in (low, prefix + low):
            if candidate in names:
                return names[candidate]
    elif isinstance(v, int) and not isinstance(v, bool) and v in names.values():
        return v
    allowed = ", ".join(n.removeprefix(prefix) for n in names if n.removeprefix(prefix))
    raise _err(f"'{key}' must be one of {allowed} (or its number), got {json.dumps(v)}")


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, int | float):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    return "an object"


def _b64(frame: dict[str, Any], key: str) -> bytes:
    raw = frame[key]
    if not isinstance(raw, str):
        raise _err(f"'{key}' must be a base64 string, got {_json_type(raw)}")
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise _err(f"'{key}' is not valid base64", code=pb.BAD_VECTOR_BLOB) from None


def _floats(values: Any, key: str) -> np.ndarray:
    """A JSON list of numbers (or list of lists) as float32; never a per-float Python loop."""
    if not isinstance(values, list):
        raise _err(f"'{key}' must be a list of numbers, got {_json_type(values)}")
    try:
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, refused later
            arr = np.asarray(values, dtype="<f4")
    except OverflowError:
        raise _err(f"'{key}' holds a number beyond float range", code=pb.NON_FINITE_VALUE) from None
    except (ValueError, TypeError):
        shapes = {len(r) for r in values if isinstance(r, list)}
        if len(shapes) > 1:
            raise _err(
                f"'{key}' rows have different lengths ({', '.join(map(str, sorted(shapes)))}): "
                "every vector must have the same dimension",
                code=pb.WRONG_DIMENSION,
            ) from None
        raise _err(f"'{key}' must hold only numbers") from None
    if arr.dtype != np.dtype("<f4"):  # pragma: no cover (asarray with dtype always converts)
        arr = arr.astype("<f4")
    return arr


def _vectors(frame: dict[str, Any]) -> tuple[int, bytes]:
    """(dim, packed float32 bytes) of a batch frame."""
    has_dim = frame.get("dim") is not None
    dim = _int(frame, "dim", 0, 1 << 20)
    if "vectors_b64" in frame and frame["vectors_b64"] is not None:
        if not has_dim:
            raise _err("'vectors_b64' needs 'dim' (the number of float32 values per vector)")
        return dim, _b64(frame, "vectors_b64")
    if frame.get("vectors") is None:
        raise _err("a batch frame needs 'vectors' (list of lists) or 'vectors_b64' with 'dim'")
    arr = _floats(frame["vectors"], "vectors")
    if arr.ndim == 1:
        if arr.size == 0:
            return dim, b""
        if not has_dim:
            raise _err("'vectors' is a flat list: give 'dim', or a list of lists")
        return dim, arr.tobytes()
    if arr.ndim != 2:
        raise _err("'vectors' must be a list of lists of numbers")
    if has_dim and arr.shape[1] != dim:
        raise _err(
            f"'vectors' rows have {arr.shape[1]} values but 'dim' is {dim}",
            code=pb.WRONG_DIMENSION,
        )
    return arr.shape[1], arr.tobytes()


def _str_list(frame: dict[str, Any], key: str) -> list[str]:
    v = frame.get(key)
    if v is None:
        return []
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise _err(f"'{key}' must be a list of strings")
    return v


def _batch(frame: dict[str, Any]) -> pb.ObservationBatch:
    dim, blob = _vectors(frame)
    b = pb.ObservationBatch(dim=dim, vectors=blob)
    b.ids.extend(_str_list(frame, "ids"))
    b.contents.extend(_str_list(frame, "contents"))
    if frame.get("confidences") is not None:
        b.confidences = _floats(frame["confidences"], "confidences").reshape(-1).tobytes()
    if frame.get("timestamps_us") is not None:
        ts = frame["timestamps_us"]
        if not isinstance(ts, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in ts
        ):
            raise _err("'timestamps_us' must be a list of integers (unix microseconds)")
        try:
            b.timestamps_us = np.asarray(ts, dtype="<i8").tobytes()
        except OverflowError:
            raise _err("'timestamps_us' holds a value beyond 64 bits") from None
    b.priority = _enum(frame, "priority", pb.Priority, "priority_")  # type: ignore[assignment]
    return b


def _episode(frame: dict[str, Any]) -> pb.Episode:
    ep_json = frame.get("episode", frame.get("observation"))
    if ep_json is None:
        raise _err("an observation frame needs 'episode' (id, what, embedding, ...)")
    if not isinstance(ep_json, dict):
        raise _err(f"'episode' must be an object, got {_json_type(ep_json)}")
    if ep_json.get("embedding") is None:
        raise _err("'episode' needs 'embedding' (a list of numbers)")
    emb = _floats(ep_json["embedding"], "embedding")
    if emb.ndim != 1:
        raise _err("'embedding' must be a flat list of numbers", code=pb.WRONG_DIMENSION)
    ep = pb.Episode(
        id=_str(ep_json, "id"),
        what=_str(ep_json, "what"),
        where_location=_str(ep_json, "where_location"),
        why=_str(ep_json, "why"),
        how=_str(ep_json, "how"),
    )
    ep.embedding.extend(emb.tolist())
    ep.who.extend(_str_list(ep_json, "who"))
    if ep_json.get("encoding_confidence") is not None:
        ep.encoding_confidence = _num(ep_json, "encoding_confidence")
    when = ep_json.get("when")
    if when is not None:
        if not isinstance(when, str):
            raise _err("'when' must be an RFC 3339 string, e.g. 2026-01-31T12:00:00Z")
        try:
            us = parse_rfc3339_us(when)
        except ValueError:
            raise _err(f"'when' is not an RFC 3339 time: {when!r}") from None
        ep.when.FromMicroseconds(us)
    return ep


def _recall(frame: dict[str, Any]) -> pb.RecallRequest:
    r = pb.RecallRequest(request_id=_str(frame, "request_id"))
    if frame.get("cue_b64") is not None:
        blob = _b64(frame, "cue_b64")
        if len(blob) % 4:
            raise _err("'cue_b64' is not whole float32 values", code=pb.BAD_VECTOR_BLOB)
        cue = np.frombuffer(blob, dtype="<f4")
    elif frame.get("cue") is not None:
        cue = _floats(frame["cue"], "cue")
        if cue.ndim != 1:
            raise _err("'cue' must be a flat list of numbers", code=pb.WRONG_DIMENSION)
    else:
        raise _err("a recall frame needs 'cue' (a list of numbers) or 'cue_b64'")
    r.cue.extend(cue.tolist())
    if frame.get("k") is None:
        raise _err("a recall frame needs 'k' (how many memories, 1..max)", code=pb.K_OUT_OF_RANGE)
    r.k = _int(frame, "k", 0, (1 << 32) - 1)
    r.consistency = _enum(frame, "consistency", pb.Consistency, "consistency_")  # type: ignore[assignment]
    r.deadline_ms = _int(frame, "deadline_ms", 0, (1 << 32) - 1)
    r.chunk_size = _int(frame, "chunk_size", 0, (1 << 32) - 1)
    for key in ("min_score", "min_confidence"):
        if frame.get(key) is not None:
            setattr(r, key, _num(frame, key))
    for key in ("since_us", "until_us"):
        if frame.get(key) is not None:
            setattr(r, key, _int(frame, key, -(1 << 63), (1 << 63) - 1))
    return r


def _time_bound(frame: dict[str, Any], name: str) -> int | None:
    """A delete's bound, ``since``/``until`` (RFC 3339) or ``since_us``/``until_us``."""
    text, us = frame.get(name), frame.get(f"{name}_us")
    if text is not None and us is not None:
        raise _err(f"give '{name}' (RFC 3339) or '{name}_us' (unix microseconds), not both")
    if us is not None:
        return _int(frame, f"{name}_us", -(1 << 63), (1 << 63) - 1)
    if text is None:
        return None
    if not isinstance(text, str):
        raise _err(f"'{name}' must be an RFC 3339 string, e.g. 2026-01-31T12:00:00Z")
    try:
        return parse_rfc3339_us(text)
    except ValueError:
        raise _err(f"'{name}' is not an RFC 3339 time: {text!r}") from None


def _delete(frame: dict[str, Any]) -> pb.DeleteRequest:
    d = pb.DeleteRequest(request_id=_str(frame, "request_id"), ids=_str_list(frame, "ids"))
    for name in ("since", "until"):
        bound = _time_bound(frame, name)
        if bound is not None:
            setattr(d, f"{name}_us", bound)
    if not d.ids and not (d.HasField("since_us") or d.HasField("until_us")):
        raise _err("a delete frame needs 'ids' and/or a time range ('since', 'until')")
    return d


def _flow(frame: dict[str, Any]) -> pb.FlowControl:
    if frame.get("action") is None:
        raise _err(
            "a flow_control frame needs 'action' (pause, resume, slow_down, speed_up, "
            "buffer_status)"
        )
    return pb.FlowControl(
        action=_enum(frame, "action", pb.FlowControl.Action, "action_"),  # type: ignore[arg-type]
        buffer_remaining=_int(frame, "buffer_remaining", 0, (1 << 32) - 1),
        preferred_rate=_int(frame, "preferred_rate", 0, (1 << 32) - 1),
        reason=_str(frame, "reason"),
    )


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _loads_stdlib(text: str) -> Any:
    return json.loads(text, parse_constant=_no_constants)


def _loads(text: str) -> Any:
    if orjson is not None:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            pass  # the standard library names the fault (or reads what orjson will not)
    return _loads_stdlib(text)


def decode_text(text: str) -> tuple[str, pb.ObservationRequest | None]:
    """A text frame -> (type, request); request is None for a client ``heartbeat``.

    Raises FrameError naming what is wrong; it carries the frame's sequence_number or
    request_id when those could be read, so the client can tell which message failed.
    """
    try:
        frame = _loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        raise FrameError(
            pb.MALFORMED_MESSAGE, f"the frame is not valid JSON: {exc}"[:500]
        ) from None
    if not isinstance(frame, dict):
        raise FrameError(
            pb.MALFORMED_MESSAGE, f"a frame must be a JSON object, got {_json_type(frame)}"
        )
    kind = frame.get("type")
    if kind is None:
        raise FrameError(
            pb.MISSING_OPERATION, f"the frame has no 'type' (one of {', '.join(CLIENT_TYPES)})"
        )
    seq = 0
    request_id = ""
    try:
        if kind in ("recall", "delete"):
            request_id = _str(frame, "request_id")
        seq = _int(frame, "sequence_number", 0, (1 << 64) - 1)
        if kind == "heartbeat":
            return kind, None
        req = pb.ObservationRequest(
            memory_space_id=_str(frame, "memory_space_id"),
            session_id=_str(frame, "session_id"),
            sequence_number=seq,
        )
        if kind == "init":
            if not req.memory_space_id and not req.session_id:
                raise _err(
                    "an init frame needs 'memory_space_id' (new session) or 'session_id' (resume)",
                    code=pb.INVALID_SPACE_ID,
                )
            req.init.CopyFrom(
                pb.StreamInit(
                    client_buffer_size=_int(frame, "client_buffer_size", 0, (1 << 32) - 1),
                    enable_backpressure=_bool(frame, "enable_backpressure"),
                    max_batch_size=_int(frame, "max_batch_size", 0, (1 << 32) - 1),
                    api_key=_str(frame, "api_key"),
                )
            )
        elif kind == "batch":
            _require_seq(seq)
            req.batch.CopyFrom(_batch(frame))
        elif kind == "observation":
            _require_seq(seq)
            req.observation.CopyFrom(_episode(frame))
        elif kind == "recall":
            req.recall.CopyFrom(_recall(frame))
        elif kind == "delete":
            req.delete.CopyFrom(_delete(frame))
        elif kind == "flow_control":
            req.flow.CopyFrom(_flow(frame))
        elif kind == "close":
            req.close.CopyFrom(
                pb.StreamClose(
                    drain_queue=_bool(frame, "drain_queue"),
                    last_sequence=_int(frame, "last_sequence", 0, (1 << 64) - 1),
                )
            )
        else:
            raise _err(
                f"unknown frame type {json.dumps(kind)[:80]} "
                f"(expected one of {', '.join(CLIENT_TYPES)})"
            )
        return kind, req
    except FrameError as exc:
        exc.sequence_number = exc.sequence_number or seq
        exc.request_id = exc.request_id or utf8_safe(request_id)
        raise
    except (OverflowError, ValueError, TypeError, MemoryError) as exc:  # e.g. a 400-digit number
        raise FrameError(
            pb.INVALID_ARGUMENT,
            f"the {kind} frame holds a value that cannot be read: {exc}"[:500],
            sequence_number=seq,
            request_id=request_id,
        ) from None


def _require_seq(seq: int) -> None:
    if seq == 0:
        raise _err("'sequence_number' is missing: batches are numbered 1, 2, 3, ...")
