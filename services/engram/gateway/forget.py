"""What the gateway checks of a delete and a retention before it asks a shard, and how a
stream's delete waits for the batches the stream sent before it.

Called by the public service's ``Delete`` / ``SetRetention`` (``service.py``) and by a client
stream's ``delete`` op (``stream.py``); the shard checks again before it writes its tombstone.
Every refusal is a :class:`~engram.contract.errors.ValidationError` naming the field.

A stream's delete must see the stream's own writes (write, then delete what was written), so
it is sent to the shard only once every batch the stream forwarded before it is answered:
:class:`AnsweredBefore` holds such deletes until those sequence numbers are settled.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Container

from engram.common.settings import LimitSettings
from engram.contract.errors import ValidationError
from engram.v1 import streaming_pb2 as pb

# A request_id is echoed in the answer and in errors: an identifier, not a payload.
MAX_REQUEST_ID_CHARS = 128
# An observation id, as a batch may carry it (the shard stores ids as given).
MAX_ID_CHARS = 1024
# 10,000 years: a larger maximum age would overflow the microseconds it is compared in.
MAX_AGE_S = 10_000 * 366 * 86_400


def delete_request(req: pb.DeleteRequest, space: str, limits: LimitSettings) -> pb.DeleteRequest:
    """A copy of ``req`` addressed to ``space`` once checked: it names ids and/or a time range
    (``[since_us, until_us)``, either bound alone an open range), at most
    ``ENGRAM_MAX_BATCH_OBSERVATIONS`` ids, none empty."""
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
            f"{limits.max_batch_observations}: split it",
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
