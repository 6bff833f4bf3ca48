"""What the client sends and what it hands back: batches, recall requests and their results.

:func:`make_batch` packs numpy vectors (n x dim) and their metadata into one batch message;
:func:`recall_request` builds a recall for a stream or for the standalone call. What comes back
is plain data: an :class:`Ack` per durable batch, a :class:`RecallResult` of :class:`Hit`
(made by :func:`recall_result` from the answer's chunks), and the :class:`StreamEvent` a stream
reports to the application. Used by :mod:`engram_client.client` and the stream modules.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engram.v1 import streaming_pb2 as pb


@dataclass(frozen=True)
class Ack:
    sequence_number: int
    first_lsn: int
    count: int
    duplicate: bool
    memory_id: str


@dataclass(frozen=True)
class Hit:
    id: str
    content: str
    score: float
    confidence: float
    when_us: int
    lsn: int


@dataclass(frozen=True)
class RecallResult:
    hits: list[Hit]
    snapshot_sequence: int  # the space LSN the results were computed at
    latency_us: int
    consistency: str = "BOUNDED"
    staleness_us: int = 0  # age of the oldest durable write not in the snapshot
    waited_us: int = 0  # time the server waited for the snapshot to meet the level
    chunks: int = 1


def recall_result(
    hits: list[Hit], last: pb.RecallResponse | pb.StreamingRecallResponse, chunks: int
) -> RecallResult:
    """A recall's result: every chunk's ``hits``, the metadata of the ``last`` one."""
    m = last.metadata
    return RecallResult(
        hits,
        last.snapshot_sequence,
        m.latency_us,
        pb.Consistency.Name(m.consistency or pb.BOUNDED),
        m.staleness_us,
        m.waited_us,
        chunks,
    )


def recall_request(
    cue: np.ndarray | Sequence[float],
    k: int,
    *,
    min_score: float | None = None,
    consistency: str | int = "BOUNDED",
    deadline_ms: int = 0,
    since_us: int | None = None,
    until_us: int | None = None,
    min_confidence: float | None = None,
    chunk_size: int = 0,
) -> pb.RecallRequest:
    level = (
        pb.Consistency.Value(consistency.upper()) if isinstance(consistency, str) else consistency
    )
    req = pb.RecallRequest(
        cue=np.asarray(cue, dtype=np.float32).tolist(),
        k=k,
        consistency=level,
        deadline_ms=deadline_ms,
        chunk_size=chunk_size,
    )
    for name, value in (
        ("min_score", min_score),
        ("since_us", since_us),
        ("until_us", until_us),
        ("min_confidence", min_confidence),
    ):
        if value is not None:
            setattr(req, name, value)
    return req


@dataclass(frozen=True)
class StreamEvent:
    """Something the application may want to know: kind is 'connected', 'resumed',
    'disconnected', 'status' (a pushed StreamStatus: backpressure level, pause, ...),
    'rejected' (a batch refused for now; the stream resends it after retry-after) or 'error'."""

    kind: str
    detail: str
    status: pb.StreamStatus | None = None


def hits_of(results: Sequence[pb.Memory]) -> list[Hit]:
    """The hits of one recall chunk."""
    return [
        Hit(m.id, m.content, m.score, m.confidence, m.when.ToMicroseconds(), m.lsn) for m in results
    ]


def make_batch(
    vectors: np.ndarray,
    *,
    ids: Sequence[str] | None = None,
    contents: Sequence[str] | None = None,
    confidences: np.ndarray | Sequence[float] | None = None,
    timestamps_us: np.ndarray | Sequence[int] | None = None,
    priority: int = pb.PRIORITY_NORMAL,
) -> pb.ObservationBatch:
    """Packs numpy vectors (n x dim) and their metadata into one batch message."""
    arr = np.ascontiguousarray(vectors, dtype="<f4")
    if arr.ndim == 1:
        arr = arr.reshape(1, -1)
    if arr.ndim != 2:
        raise ValueError(f"vectors must be a 2-D array (n x dim), got shape {arr.shape}")
    b = pb.ObservationBatch(dim=arr.shape[1], vectors=arr.tobytes(), priority=priority)
    if ids is not None:
        b.ids.extend(ids)
    if contents is not None:
        b.contents.extend(contents)
    if confidences is not None:
        b.confidences = np.asarray(confidences, dtype="<f4").tobytes()
    if timestamps_us is not None:
        b.timestamps_us = np.asarray(timestamps_us, dtype="<i8").tobytes()
    return b
