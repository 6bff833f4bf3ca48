"""Sequencing of engram.shard.space.Space.begin_append: sessions, gaps, duplicates, validation.

Every batch of a session carries a sequence number 1, 2, 3...; the next one is stored, a lower
one is a duplicate (acknowledged, never stored twice), a higher one is a gap. Bad input is
refused before it touches the sequence.
"""

from __future__ import annotations

import asyncio
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from engram.common.settings import LimitSettings
from engram.contract.errors import SequenceError, SessionError, StorageError, ValidationError
from engram.v1 import streaming_pb2 as pb

DIM = 16


async def test_first_sequence_number_must_be_one(harness: Any, ledger: Any) -> None:
    space = harness.space()
    assert await space.open_session("a", create=True) == 0
    ledger.open("a")
    p = ledger.batch("a", 2, 3)
    with pytest.raises(SequenceError) as info:
        space.begin_append("a", 2, p.batch)
    assert info.value.expected == 1
    assert info.value.code == pb.SEQUENCE_GAP
    assert info.value.to_proto().expected_sequence == 1
    assert space.visible == 0

    result = await ledger.append(space, "a", 1, 3)
    assert (result.sequence_number, result.first_lsn, result.count) == (1, 1, 3)
    assert not result.duplicate
    ledger.check(space)


async def test_next_sequence_numbers_are_stored_in_order(harness: Any, ledger: Any) -> None:
    space = harness.space()
    for sid in ("a", "b"):
        await space.open_session(sid, create=True)
        ledger.open(sid)
    lsn = 1
    for seq in range(1, 6):
        for sid, n in (("a", seq), ("b", 7 - seq)):
            result = await ledger.append(space, sid, seq, n)
            assert result.first_lsn == lsn
            lsn += n
        assert space.session_mark("a") == seq
    ledger.check(space)


async def test_server_made_ids_and_defaults(harness: Any, ledger: Any) -> None:
    space = harness.space()
    await space.open_session("s", create=True)
    ledger.open("s")
    result = await ledger.append(space, "s", 1, 4, explicit_ids=False)
    assert result.first_id == "s/1/0"
    ledger.check(space)
    assert space.confidences.view().tolist() == pytest.approx([0.7] * 4)
    assert space.contents[:] == [""] * 4


async def test_duplicate_of_durable_batch_is_acked_and_not_stored(
    harness: Any, ledger: Any
) -> None:
    space = harness.space()
    await space.open_session("a", create=True)
    ledger.open("a")
    for seq in (1, 2, 3):
        await ledger.append(space, "a", seq, 5)
    before = space.visible

    for seq in (1, 2, 3):
        retry = ledger.batch("a", seq, 5)  # a retry may even carry other content
        dup = await space.begin_append("a", seq, retry.batch)
        assert dup.duplicate
        assert dup.sequence_number == seq
        assert dup.count == 0
    assert space.visible == before
    assert space.session_mark("a") == 3
    ledger.check(space)

    # The duplicates did not disturb the sequence: 4 is next.
    await ledger.append(space, "a", 4, 2)
    ledger.check(space)


async def test_duplicate_of_inflight_batch_resolves_after_the_original(
    harness: Any, ledger: Any, gated_faults: Any
) -> None:
    space = harness.space(faults=gated_faults)
    await space.open_session("a", create=True)
    ledger.open("a")
    await ledger.append(space, "a", 1, 3)

    gated_faults.arm()
    original = ledger.batch("a", 2, 4)
    fut = space.begin_append("a", 2, original.batch)
    await gated_faults.wait_entered()
    dup = space.begin_append("a", 2, ledger.batch("a", 2, 4).batch)
    dup_of_older = space.begin_append("a", 1, ledger.batch("a", 1, 3).batch)
    await asyncio.sleep(0.05)
    assert not fut.done()
    assert not dup.done(), "a duplicate of an in-flight batch resolved before it was durable"
    assert dup_of_older.done() and dup_of_older.result().duplicate
    assert space.visible == 3

    original_done_when_dup_resolved: list[bool] = []
    dup.add_done_callback(lambda _: original_done_when_dup_resolved.append(fut.done()))
    gated_faults.release()
    result = await dup
    assert result.duplicate and result.count == 0 and result.sequence_number == 2
    ledger.record(original, await fut)
    await asyncio.sleep(0)
    assert original_done_when_dup_resolved == [True]
    ledger.check(space)


async def test_duplicate_of_inflight_batch_fails_with_the_original(
    harness: Any, ledger: Any, gated_faults: Any, kit: ModuleType
) -> None:
    space = harness.space(faults=gated_faults)
    await space.open_session("a", create=True)
    ledger.open("a")
    await ledger.append(space, "a", 1, 3)

    gated_faults.arm()
    fut = space.begin_append("a", 2, ledger.batch("a", 2, 4).batch)
    await gated_faults.wait_entered()
    dup = space.begin_append("a", 2, ledger.batch("a", 2, 4).batch)
    gated_faults.release(fail=True)
    with pytest.raises(StorageError):
        await fut
    with pytest.raises(StorageError):
        await dup
    ledger.check(space)

    # Not acked, so not a duplicate: the retry is stored.
    retry = ledger.batch("a", 2, 4)
    ledger.record(retry, await kit.retry_append(space, "a", 2, retry.batch))
    ledger.check(space)


async def test_gap_raises_with_expected_sequence(
    harness: Any, ledger: Any, gated_faults: Any
) -> None:
    space = harness.space(faults=gated_faults)
    await space.open_session("a", create=True)
    ledger.open("a")
    await ledger.append(space, "a", 1, 2)
    for seq in (3, 4, 100):
        with pytest.raises(SequenceError) as info:
            space.begin_append("a", seq, ledger.batch("a", seq, 2).batch)
        assert info.value.expected == 2
    assert space.visible == 2

    # While 2 is in flight the session expects 3.
    gated_faults.arm()
    p2 = ledger.batch("a", 2, 2)
    fut = space.begin_append("a", 2, p2.batch)
    await gated_faults.wait_entered()
    with pytest.raises(SequenceError) as info:
        space.begin_append("a", 4, ledger.batch("a", 4, 2).batch)
    assert info.value.expected == 3
    p3 = ledger.batch("a", 3, 2)
    fut3 = space.begin_append("a", 3, p3.batch)
    gated_faults.release()
    ledger.record(p2, await fut)
    ledger.record(p3, await fut3)
    ledger.check(space)


async def test_unknown_session(harness: Any, ledger: Any) -> None:
    space = harness.space()
    with pytest.raises(SessionError) as info:
        space.begin_append("ghost", 1, ledger.batch("ghost", 1, 2).batch)
    assert info.value.code == pb.UNKNOWN_SESSION
    with pytest.raises(SessionError):
        await space.open_session("ghost", create=False)
    assert space.session_mark("ghost") is None

    await space.open_session("a", create=True)
    ledger.open("a")
    await ledger.append(space, "a", 1, 2)
    # Sessions are per space and per id: another id is still unknown.
    with pytest.raises(SessionError):
        space.begin_append("ghost", 1, ledger.batch("ghost", 1, 2).batch)
    assert await space.open_session("a", create=False) == 1
    assert await space.open_session("a", create=True) == 1  # re-opening keeps the mark
    ledger.check(space)


async def test_concurrent_opens_of_one_session(harness: Any) -> None:
    space = harness.space()
    futs = [space.open_session("a", create=True) for _ in range(3)]
    assert await asyncio.gather(*futs) == [0, 0, 0]
    assert space.session_count == 1


def _vectors(n: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(n * 31 + dim).standard_normal((n, dim)).astype("<f4")


def _bad_batches(kit: ModuleType) -> dict[str, tuple[pb.ObservationBatch, int]]:
    v = _vectors(4)
    nan = v.copy()
    nan[2, 5] = np.nan
    inf = v.copy()
    inf[0, 0] = np.inf
    zero = v.copy()
    zero[1] = 0.0
    short_blob = kit.make_batch(v)
    short_blob.vectors = short_blob.vectors[:-4]
    bad_conf = kit.make_batch(v)
    bad_conf.confidences = np.array([0.5, np.nan, 0.5, 0.5], "<f4").tobytes()
    torn_conf = kit.make_batch(v)
    torn_conf.confidences = b"\x00" * 15
    torn_ts = kit.make_batch(v)
    torn_ts.timestamps_us = b"\x00" * 30
    no_dim = kit.make_batch(v)
    no_dim.dim = 0
    return {
        "wrong-dim": (kit.make_batch(_vectors(4, DIM // 2)), pb.WRONG_DIMENSION),
        "wider-dim": (kit.make_batch(_vectors(2, DIM * 2)), pb.WRONG_DIMENSION),
        "dim-zero": (no_dim, pb.WRONG_DIMENSION),
        "nan": (kit.make_batch(nan), pb.NON_FINITE_VALUE),
        "inf": (kit.make_batch(inf), pb.NON_FINITE_VALUE),
        "zero-vector": (kit.make_batch(zero), pb.ZERO_VECTOR),
        "blob-not-multiple": (short_blob, pb.BAD_VECTOR_BLOB),
        "empty": (pb.ObservationBatch(dim=DIM), pb.EMPTY_BATCH),
        "ids-short": (kit.make_batch(v, ids=["x", "y", "z"]), pb.LENGTH_MISMATCH),
        "ids-long": (kit.make_batch(v, ids=[str(i) for i in range(5)]), pb.LENGTH_MISMATCH),
        "contents-mismatch": (kit.make_batch(v, contents=["only one"]), pb.LENGTH_MISMATCH),
        "confidence-nan": (bad_conf, pb.NON_FINITE_VALUE),
        "confidences-torn": (torn_conf, pb.LENGTH_MISMATCH),
        "timestamps-torn": (torn_ts, pb.LENGTH_MISMATCH),
        "too-many": (kit.make_batch(_vectors(9)), pb.BATCH_TOO_LARGE),
    }


CASES = [
    "wrong-dim",
    "wider-dim",
    "dim-zero",
    "nan",
    "inf",
    "zero-vector",
    "blob-not-multiple",
    "empty",
    "ids-short",
    "ids-long",
    "contents-mismatch",
    "confidence-nan",
    "confidences-torn",
    "timestamps-torn",
    "too-many",
]


@pytest.mark.parametrize("case", CASES)
async def test_invalid_batch_consumes_no_sequence_number(
    harness: Any, ledger: Any, kit: ModuleType, case: str
) -> None:
    space = harness.space(limits=LimitSettings(max_batch_observations=8))
    await space.open_session("a", create=True)
    ledger.open("a")
    await ledger.append(space, "a", 1, 3)
    bad, code = _bad_batches(kit)[case]

    with pytest.raises(ValidationError) as info:
        space.begin_append("a", 2, bad)
    assert info.value.code == code, str(info.value)
    assert not info.value.retryable
    assert space.visible == 3
    assert space.session_mark("a") == 1
    assert space.dim == DIM

    # Sequence 2 is still free (not a duplicate, no gap), and 3 is still a gap.
    with pytest.raises(SequenceError) as gap:
        space.begin_append("a", 3, ledger.batch("a", 3, 2).batch)
    assert gap.value.expected == 2
    result = await ledger.append(space, "a", 2, 2)
    assert not result.duplicate and result.first_lsn == 4
    ledger.check(space)

    space = await harness.restart(space)
    ledger.check(space)


async def test_invalid_first_batch_does_not_fix_the_dimension(
    harness: Any, kit: ModuleType
) -> None:
    space = harness.space()
    await space.open_session("a", create=True)
    v = _vectors(3, 8)
    v[0, 0] = np.nan
    with pytest.raises(ValidationError):
        space.begin_append("a", 1, kit.make_batch(v))
    assert space.dim == 0
    wide = _vectors(3, 24)
    result = await space.begin_append("a", 1, kit.make_batch(wide, ids=["p", "q", "r"]))
    assert result.count == 3 and space.dim == 24
    space = await harness.restart(space)
    assert space.dim == 24
    assert kit.all_ids(space) == ["p", "q", "r"]


async def test_confidences_are_clipped(harness: Any, kit: ModuleType) -> None:
    space = harness.space()
    await space.open_session("a", create=True)
    b = kit.make_batch(_vectors(3))
    b.confidences = np.array([-0.5, 0.25, 7.0], "<f4").tobytes()
    await space.begin_append("a", 1, b)
    assert space.confidences.view().tolist() == [0.0, 0.25, 1.0]
    space = await harness.restart(space)
    assert space.confidences.view().tolist() == [0.0, 0.25, 1.0]
