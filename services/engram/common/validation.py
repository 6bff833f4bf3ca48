"""Validation of everything a client sends: space ids, batches, episodes, recall requests,
deletes.

Called by the gateway before it routes a message (so most bad input never reaches a shard)
and by the shard before it writes (so a shard never trusts its caller). Every failure raises
:class:`~engram.contract.errors.ValidationError` with a precise code and message. Checks are
vectorised: no per-float Python work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from engram.common.settings import LimitSettings
from engram.contract.errors import ValidationError
from engram.v1 import streaming_pb2 as pb

_SPACE_ID = re.compile(r"[a-z0-9_-]{3,64}")
DEFAULT_CONFIDENCE = 0.7
# google.protobuf.Timestamp's range, 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59Z, in seconds:
# an episode's ``when`` outside it does not fit the batch's int64 microseconds.
_MIN_SECONDS, _MAX_SECONDS = -62_135_596_800, 253_402_300_799
# A request_id is echoed in the answer and in errors: an identifier, not a payload.
MAX_REQUEST_ID_CHARS = 128
# An observation id, as a batch may carry it (the shard stores ids as given).
MAX_ID_CHARS = 1024


def space_id(raw: str) -> str:
    """Returns the trimmed space id, or raises INVALID_SPACE_ID."""
    value = raw.strip()
    if not _SPACE_ID.fullmatch(value):
        raise ValidationError(
            f"memory space id {raw!r} is invalid: use 3-64 characters of [a-z0-9_-]",
            code=pb.INVALID_SPACE_ID,
        )
    return value


@dataclass(frozen=True)
class CheckedBatch:
    """A batch whose shape and values were checked; arrays are views on the message bytes."""

    n: int
    dim: int
    vectors: np.ndarray  # (n, dim) float32, read-only view
    sq_norms: np.ndarray  # (n,) squared length of each vector, all > 0


def batch(b: pb.ObservationBatch, limits: LimitSettings, space_dim: int = 0) -> CheckedBatch:
    """Checks a batch's shape, lengths, values and size; ``space_dim`` 0 means not fixed yet."""
    dim = b.dim
    if dim == 0 or dim > limits.max_dim:
        raise ValidationError(
            f"dim must be 1..{limits.max_dim}, got {dim}", code=pb.WRONG_DIMENSION
        )
    if space_dim and dim != space_dim:
        raise ValidationError(
            f"this memory space holds vectors of dimension {space_dim}, the batch has {dim}",
            code=pb.WRONG_DIMENSION,
        )
    size = len(b.vectors)
    if size == 0:
        raise ValidationError("the batch holds no observation", code=pb.EMPTY_BATCH)
    if size % (4 * dim):
        raise ValidationError(
            f"vectors blob has {size} bytes, not a multiple of 4 * dim = {4 * dim}",
            code=pb.BAD_VECTOR_BLOB,
        )
    n = size // (4 * dim)
    if n > limits.max_batch_observations:
        raise ValidationError(
            f"batch of {n} observations exceeds the limit of {limits.max_batch_observations}",
            code=pb.BATCH_TOO_LARGE,
        )
    _same_length("ids", len(b.ids), n)
    _same_length("contents", len(b.contents), n)
    _same_length("confidences", len(b.confidences) // 4 if len(b.confidences) % 4 == 0 else -1, n)
    _same_length(
        "timestamps_us", len(b.timestamps_us) // 8 if len(b.timestamps_us) % 8 == 0 else -1, n
    )
    vectors = np.frombuffer(b.vectors, dtype="<f4").reshape(n, dim)
    if not np.isfinite(vectors).all():
        raise ValidationError("a vector holds NaN or infinity", code=pb.NON_FINITE_VALUE)
    with np.errstate(over="ignore", under="ignore"):
        norms = np.einsum("ij,ij->i", vectors, vectors)
    finite = np.isfinite(norms)
    if not finite.all():  # the shard would divide by an infinite norm: a zero vector stored
        row = int(np.argmin(finite))
        raise ValidationError(
            f"observation {row} has a vector too long for float32: its squared length "
            "overflows (scale it down; only its direction counts)",
            code=pb.NON_FINITE_VALUE,
        )
    if not (norms > 0).all():
        row = int(np.argmin(norms > 0))
        raise ValidationError(
            f"observation {row} has a zero vector (cosine similarity is undefined)",
            code=pb.ZERO_VECTOR,
        )
    if b.confidences:
        conf = np.frombuffer(b.confidences, dtype="<f4")
        if not np.isfinite(conf).all():
            raise ValidationError("a confidence is NaN or infinity", code=pb.NON_FINITE_VALUE)
    return CheckedBatch(n=n, dim=dim, vectors=vectors, sq_norms=norms)


def _same_length(name: str, got: int, n: int) -> None:
    if got not in (0, n):
        shown = "a byte length that is not a whole number of values" if got < 0 else f"{got}"
        raise ValidationError(
            f"{name} has {shown} entries but the batch has {n} vectors (give {n} or none)",
            code=pb.LENGTH_MISMATCH,
        )


def episode_to_batch(ep: pb.Episode) -> pb.ObservationBatch:
    """Turns a single Engram-compatible episode into a one-observation batch."""
    emb = np.asarray(ep.embedding, dtype="<f4")
    conf = ep.encoding_confidence or DEFAULT_CONFIDENCE
    conf = min(max(conf, 0.0), 1.0)
    b = pb.ObservationBatch(
        dim=len(ep.embedding),
        vectors=emb.tobytes(),
        contents=[ep.what],
        confidences=np.asarray([conf], dtype="<f4").tobytes(),
    )
    if ep.id:
        b.ids.append(ep.id)
    if ep.HasField("when"):
        seconds, nanos = ep.when.seconds, ep.when.nanos
        if not (_MIN_SECONDS <= seconds <= _MAX_SECONDS and 0 <= nanos < 1_000_000_000):
            raise ValidationError(
                f"the episode's 'when' ({seconds} s, {nanos} ns) is not a time in the years "
                "1..9999",
                code=pb.INVALID_ARGUMENT,
            )
        us = seconds * 1_000_000 + nanos // 1000
        b.timestamps_us = np.asarray([us], dtype="<i8").tobytes()
    return b


def recall(r: pb.RecallRequest, limits: LimitSettings) -> np.ndarray:
    """Checks a recall request; returns the cue as a float32 vector."""
    if not 1 <= r.k <= limits.max_k:
        raise ValidationError(f"k must be 1..{limits.max_k}, got {r.k}", code=pb.K_OUT_OF_RANGE)
    cue = np.asarray(r.cue, dtype=np.float32)
    if cue.size == 0 or cue.size > limits.max_dim:
        raise ValidationError(
            f"cue must hold 1..{limits.max_dim} values, got {cue.size}", code=pb.WRONG_DIMENSION
        )
    if not np.isfinite(cue).all():
        raise ValidationError("the cue holds NaN or infinity", code=pb.NON_FINITE_VALUE)
    with np.errstate(over="ignore", under="ignore"):
        sq_norm = float(np.dot(cue, cue))
    if not np.isfinite(sq_norm):
        raise ValidationError(
            "the cue is too long for float32: its squared length overflows (scale it down; "
            "only its direction counts)",
            code=pb.NON_FINITE_VALUE,
        )
    if not sq_norm > 0:
        raise ValidationError("the cue is a zero vector", code=pb.ZERO_VECTOR)
    if r.HasField("min_score") and not -1.0 <= r.min_score <= 1.0:
        raise ValidationError(
            f"min_score must be in [-1, 1], got {r.min_score}", code=pb.INVALID_ARGUMENT
        )
    return cue


def delete(req: pb.DeleteRequest, limits: LimitSettings) -> None:
    """Checks a delete (its space id aside): it names ids and/or a time range
    (``[since_us, until_us)``, either bound alone an open range), at most
    ``ENGRAM_MAX_BATCH_OBSERVATIONS`` ids (as many as a batch may write), none empty.

    The gateway checks before it routes, the shard again before it writes its tombstone: both
    read the same setting, so a shard takes every delete its gateways let through."""
    has_range = req.HasField("since_us") or req.HasField("until_us")
    if not req.ids and not has_range:
        raise ValidationError(
            "the delete names nothing: give ids, or a time range (since_us and/or until_us)",
            code=pb.INVALID_ARGUMENT,
        )
    if len(req.request_id) > MAX_REQUEST_ID_CHARS:
        raise ValidationError(
            f"request_id has {len(req.request_id)} characters, the limit is {MAX_REQUEST_ID_CHARS}",
            code=pb.INVALID_ARGUMENT,
        )
    if len(req.ids) > limits.max_batch_observations:
        raise ValidationError(
            f"a delete of {len(req.ids)} ids exceeds the limit of "
            f"{limits.max_batch_observations} (ENGRAM_MAX_BATCH_OBSERVATIONS): split it",
            code=pb.BATCH_TOO_LARGE,
        )
    for i, obs_id in enumerate(req.ids):
        if not obs_id or len(obs_id) > MAX_ID_CHARS:
            raise ValidationError(
                f"ids[{i}] is {'empty' if not obs_id else f'{len(obs_id)} characters long'}: "
                f"an observation id has 1..{MAX_ID_CHARS} characters",
                code=pb.INVALID_ARGUMENT,
            )
    if req.HasField("since_us") and req.HasField("until_us") and req.since_us >= req.until_us:
        raise ValidationError(
            f"since_us ({req.since_us}) must be before until_us ({req.until_us}): "
            "the range [since_us, until_us) holds no time",
            code=pb.INVALID_ARGUMENT,
        )
