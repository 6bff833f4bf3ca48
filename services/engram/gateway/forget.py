"""What the gateway checks of a delete and a retention before it asks a shard, and how a
stream's delete waits for the batches the stream sent before it.

Called by the public service's ``Delete`` / ``SetRetention`` (``service.py``) and by a client
stream's ``delete`` op (``stream_forget.py``); the shard checks again before it writes its
tombstone. Every refusal is a :class:`~engram.contract.errors.ValidationError` naming the field.

A stream's delete must see the stream's own writes (write, then delete what was written), so
it is sent to the shard only once every batch the stream forwarded before it is answered:
:class:`AnsweredBefore` holds such deletes until those sequence numbers are settled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Container

from engram.common import validation
from engram.common.settings import LimitSettings
from engram.contract.errors import ValidationError
from engram.v1 import streaming_pb2 as pb

# 10,000 years: a larger maximum age would overflow the microseconds it is compared in.
MAX_AGE_S = 10_000 * 366 * 86_400


def delete_request(req: pb.DeleteRequest, space: str, limits: LimitSettings) -> pb.DeleteRequest:
    """A copy of ``req`` addressed to ``space`` once checked (:func:`validation.delete`, the
    rules the shard applies again)."""
    validation.delete(req, limits)
    checked = pb.DeleteRequest()
    checked.CopyFrom(req)
    checked.memory_space_id = space
    return checked


def retention(r: pb.Retention) -> pb.Retention:
    """``r`` once checked (0 in a field: no bound of that kind; all zeros: keep everything)."""
    if r.max_age_s > MAX_AGE_S:
        raise ValidationError(
            f"max_age_s must be at most {MAX_AGE_S} (10,000 years), got {r.max_age_s}; "
            "0 means no maximum age",
            code=pb.INVALID_ARGUMENT,
        )
    return r


class AnsweredBefore:
    """A stream's deletes waiting for the batches it forwarded before them to be answered."""

    def __init__(self) -> None:
        self._waiting: list[tuple[frozenset[int], asyncio.Future[None]]] = []

    def wait(self, unanswered: Collection[int]) -> asyncio.Future[None]:
        """Resolves once none of ``unanswered`` (sequence numbers in flight now) is left; take
        it when the delete arrives, await it later."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if unanswered:
            self._waiting.append((frozenset(unanswered), future))
        else:
            future.set_result(None)
        return future

    def fail(self, err: Exception) -> None:
        """The batches will never be answered (the space was dropped): every waiting delete
        fails with ``err``."""
        for _, future in self._waiting:
            if not future.done():
                future.set_exception(err)
        self._waiting = []

    def answered(self, in_flight: Container[int]) -> None:
        """A batch was answered: releases the deletes none of whose batches is ``in_flight``."""
        if not self._waiting:
            return
        still = []
        for seqs, future in self._waiting:
            if future.done():
                continue
            if any(seq in in_flight for seq in seqs):
                still.append((seqs, future))
            else:
                future.set_result(None)
        self._waiting = still
