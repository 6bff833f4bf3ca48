"""Forgetting in the client: what a delete answers, a space's retention, and the messages.

Used by :meth:`EngramClient.delete` / :meth:`~EngramClient.drop_space` /
:meth:`~EngramClient.set_retention` (unary calls) and by :meth:`ObservationStream.delete`
(on the stream, after the batches sent before it are durable). A delete names observations by
id and/or by time (``[since_us, until_us)``, either bound alone an open range); ids the space
does not hold are counted in ``not_found``, never an error. A delete the stream had to send
again after a reconnect may find its rows deleted already: they are then counted in
``already_deleted``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from engram.v1 import streaming_pb2 as pb


@dataclass(frozen=True)
class DeleteResult:
    request_id: str
    deleted: int  # observations this request deleted
    already_deleted: int  # named by id but deleted before
    not_found: int  # ids the space does not hold
    lsn: int  # the space's visible LSN the delete took effect at
    committed_at_us: int  # when its tombstone was durable (unix microseconds)


@dataclass(frozen=True)
class Retention:
    """A space's retention; 0 in a field: no bound of that kind (both 0: keep everything)."""

    max_age_s: int = 0  # observations older than this (by their time) are deleted
    max_rows: int = 0  # beyond this many, the oldest (by LSN) are deleted


def delete_request(
    space: str,
    ids: Sequence[str] = (),
    *,
    since_us: int | None = None,
    until_us: int | None = None,
    request_id: str = "",
) -> pb.DeleteRequest:
    if isinstance(ids, str):
        raise TypeError("ids must be a sequence of ids, not one string: pass [id]")
    if not ids and since_us is None and until_us is None:
        raise ValueError("a delete names ids, or a time range (since_us and/or until_us)")
    req = pb.DeleteRequest(memory_space_id=space, request_id=request_id, ids=list(ids))
    if since_us is not None:
        req.since_us = since_us
    if until_us is not None:
        req.until_us = until_us
    return req


def delete_result(resp: pb.DeleteResponse) -> DeleteResult:
    return DeleteResult(
        resp.request_id,
        resp.deleted,
        resp.already_deleted,
        resp.not_found,
        resp.lsn,
        resp.committed_at.ToMicroseconds(),
    )


def retention(r: pb.Retention) -> Retention:
    return Retention(r.max_age_s, r.max_rows)
