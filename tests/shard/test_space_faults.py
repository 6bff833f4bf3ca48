"""Storage faults under engram.shard.space.Space (through the WAL's WalFaults hook).

A failed write or fsync fails every batch in flight with StorageError; none of them becomes
visible, none comes back after a restart and none consumes its sequence number. The space
refuses writes until the WAL is reset (at once when the in-flight batches have settled, or every
second while the disk keeps failing) and then accepts the same sequence numbers again.
"""

from __future__ import annotations

import asyncio
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from engram.common.settings import IndexSettings
from engram.contract.errors import SequenceError, SessionError, StorageError
from engram.shard.wal import WalFaults
from engram.v1 import streaming_pb2 as pb

DIM = 16


async def _setup(harness: Any, ledger: Any, faults: WalFaults, **kw: Any) -> Any:
    space = harness.space(faults=faults, **kw)
    for sid in ("a", "b"):
        await space.open_session(sid, create=True)
        ledger.open(sid)
        await ledger.append(space, sid, 1, 4)
    return space


def _segment_bytes(space: Any) -> int:
    return sum(p.stat().st_size for p in (space.directory / "wal").glob("wal-*.log"))


@pytest.mark.parametrize("fault", ["fail_fsync", "fail_write"])
async def test_one_failed_round_fails_the_batch_and_nothing_remains(
    harness: Any, ledger: Any, kit: ModuleType, fault: str
) -> None:
    faults = WalFaults()
    space = await _setup(harness, ledger, faults)
    size = _segment_bytes(space)
    setattr(faults, fault, 1)

    failed = ledger.batch("a", 2, 5, tag="failed")
    with pytest.raises(StorageError) as info:
        await space.begin_append("a", 2, failed.batch)
    assert info.value.code == pb.STORAGE_FAILURE and info.value.retryable
    assert space.visible == 8
    assert space.session_mark("a") == 1
    ledger.check(space)

    # The same sequence number is accepted again once the WAL is reset: not a duplicate.
    retry = ledger.batch("a", 2, 3)
    result = await kit.retry_append(space, "a", 2, retry.batch)
    assert not result.duplicate and result.first_lsn == 9
    ledger.record(retry, result)
    ledger.check(space)
    assert _segment_bytes(space) > size
    assert getattr(faults, fault) == 0

    space = await harness.restart(space)
    ledger.check(space)
    assert not set(failed.ids) & set(kit.all_ids(space))
    assert (await space.begin_append("a", 2, retry.batch)).duplicate


async def test_every_batch_in_flight_fails_and_sequences_roll_back(
    harness: Any, ledger: Any, kit: ModuleType, gated_faults: Any
) -> None:
    space = await _setup(harness, ledger, gated_faults)
    gated_faults.arm()
    batches = [ledger.batch("a", 2, 3, tag="failed")]
    futs = [space.begin_append("a", 2, batches[0].batch)]
    await gated_faults.wait_entered()  # the first round is held; the rest queue behind it
    for sid, seq in (("b", 2), ("a", 3), ("b", 3), ("a", 4)):
        p = ledger.batch(sid, seq, 2, tag="failed")
        batches.append(p)
        futs.append(space.begin_append(sid, seq, p.batch))
    dup = space.begin_append("a", 3, ledger.batch("a", 3, 2).batch)
    gated_faults.release(fail=True)

    outcomes = await asyncio.gather(*futs, dup, return_exceptions=True)
    assert all(isinstance(o, StorageError) for o in outcomes), outcomes
    ledger.check(space)

    # Each session's expected sequence number rolled back to its durable mark.
    async def expected(sid: str) -> int:
        while True:
            try:
                space.begin_append(sid, 9, ledger.batch(sid, 9, 1).batch)
            except SequenceError as exc:
                return exc.expected
            except StorageError:
                await asyncio.sleep(0.02)
                continue
            raise AssertionError("a gap was accepted")

    assert await expected("a") == 2
    assert await expected("b") == 2
    for sid, seq in (("a", 2), ("b", 2), ("a", 3)):
        await ledger.append(space, sid, seq, 2)
    ledger.check(space)
    space = await harness.restart(space)
    ledger.check(space)
    assert not {i for p in batches for i in p.ids} & set(kit.all_ids(space))


async def test_persistent_fsync_error_refuses_until_cleared(
    harness: Any, ledger: Any, kit: ModuleType
) -> None:
    faults = WalFaults()
    space = await _setup(harness, ledger, faults)
    faults.persistent_fsync_error = True
    with pytest.raises(StorageError):
        await space.begin_append("a", 2, ledger.batch("a", 2, 3).batch)

    loop = asyncio.get_running_loop()
    until = loop.time() + 1.5  # longer than the 1 s reset retry
    while loop.time() < until:
        with pytest.raises(StorageError):  # refused at once, nothing queued
            space.begin_append("b", 2, ledger.batch("b", 2, 3).batch)
        with pytest.raises(StorageError):
            space.open_session("new", create=True)
        await asyncio.sleep(0.1)
    assert space.visible == 8
    assert space.session_mark("new") is None
    ledger.check(space)

    faults.persistent_fsync_error = False
    p = ledger.batch("b", 2, 3)
    ledger.record(p, await kit.retry_append(space, "b", 2, p.batch, give_up_after=3.0))
    await ledger.append(space, "a", 2, 2)
    await space.open_session("new", create=True)
    ledger.open("new")
    ledger.check(space)
    space = await harness.restart(space)
    ledger.check(space)


async def test_persistent_enospc_fails_every_write_until_cleared(
    harness: Any, ledger: Any, kit: ModuleType
) -> None:
    faults = WalFaults()
    space = await _setup(harness, ledger, faults)
    size = _segment_bytes(space)
    faults.persistent_enospc = True
    loop = asyncio.get_running_loop()
    until = loop.time() + 0.5
    attempts = 0
    while loop.time() < until:
        try:
            await space.begin_append("a", 2, ledger.batch("a", 2, 3).batch)
        except StorageError:
            attempts += 1
        else:
            raise AssertionError("a write succeeded on a full disk")
        await asyncio.sleep(0.02)
    assert attempts > 3
    assert _segment_bytes(space) == size, "torn bytes of failed writes were left in the WAL"
    ledger.check(space)

    faults.persistent_enospc = False
    p = ledger.batch("a", 2, 3)
    ledger.record(p, await kit.retry_append(space, "a", 2, p.batch))
    ledger.check(space)
    space = await harness.restart(space)
    ledger.check(space)


async def test_failed_first_batch_leaves_the_dimension_open(harness: Any, kit: ModuleType) -> None:
    faults = WalFaults()
    space = harness.space(faults=faults)
    await space.open_session("a", create=True)
    faults.fail_fsync = 1
    with pytest.raises(StorageError):
        await space.begin_append("a", 1, kit.make_batch(np.ones((2, DIM), np.float32)))
    wide = np.random.default_rng(1).standard_normal((3, 2 * DIM)).astype(np.float32)
    result = await kit.retry_append(space, "a", 1, kit.make_batch(wide, ids=["x", "y", "z"]))
    assert result.first_lsn == 1 and space.dim == 2 * DIM
    space = await harness.restart(space)
    assert space.dim == 2 * DIM and kit.all_ids(space) == ["x", "y", "z"]


async def test_failed_session_open_leaves_no_session(harness: Any, ledger: Any) -> None:
    faults = WalFaults()
    space = await _setup(harness, ledger, faults)
    faults.fail_fsync = 1
    with pytest.raises(StorageError):
        await space.open_session("c", create=True)
    with pytest.raises(SessionError):
        space.begin_append("c", 1, ledger.batch("c", 1, 1).batch)
    space = await harness.restart(space)
    assert space.session_mark("c") is None
    assert await space.open_session("c", create=True) == 0
    ledger.open("c")
    await ledger.append(space, "c", 1, 2)
    ledger.check(space)


async def test_fault_after_checkpoint_then_restart(
    harness: Any, ledger: Any, kit: ModuleType
) -> None:
    faults = WalFaults()
    space = await _setup(
        harness, ledger, faults, index=IndexSettings(m=8, ef_construction=40, build_threads=1)
    )
    for seq in range(2, 8):
        await ledger.append(space, "a", seq, 5)
    space.index_step(17)
    await asyncio.to_thread(space.checkpoint)
    faults.fail_write = 1
    with pytest.raises(StorageError):
        await space.begin_append("b", 2, ledger.batch("b", 2, 4).batch)
    p = ledger.batch("b", 2, 4)
    ledger.record(p, await kit.retry_append(space, "b", 2, p.batch))
    space.index_step(1000)
    # A checkpoint racing a failing fsync: it either completes or fails with StorageError
    # (its WAL rotation is refused); either way nothing is lost or duplicated.
    faults.fail_fsync = 1
    appended, checkpointed = await asyncio.gather(
        space.begin_append("a", 8, ledger.batch("a", 8, 2, tag="failed").batch),
        asyncio.to_thread(space.checkpoint),
        return_exceptions=True,
    )
    assert isinstance(appended, StorageError)
    assert isinstance(checkpointed, StorageError) or checkpointed == space.visible
    ledger.check(space)
    space = await harness.restart(space)
    ledger.check(space)
    p = ledger.batch("a", 8, 2)
    ledger.record(p, await space.begin_append("a", 8, p.batch))
    ledger.check(space)


async def test_retry_of_failed_batch_is_refused_at_once_while_the_wal_is_down(
    harness: Any, ledger: Any
) -> None:
    faults = WalFaults()
    space = await _setup(harness, ledger, faults)
    faults.persistent_fsync_error = True
    try:
        with pytest.raises(StorageError):
            await space.begin_append("a", 2, ledger.batch("a", 2, 3).batch)
        # A gap names the sequence number the space will expect once it has recovered.
        with pytest.raises(SequenceError) as info:
            space.begin_append("a", 4, ledger.batch("a", 4, 3).batch)
        assert info.value.expected == 2
        with pytest.raises(StorageError):
            fut = space.begin_append("a", 2, ledger.batch("a", 2, 3).batch)  # the client retries
            await asyncio.wait_for(fut, 0.5)  # TimeoutError here means it hung
    finally:
        faults.persistent_fsync_error = False


async def test_failed_session_open_during_checkpoint_leaves_no_session(
    harness: Any, ledger: Any, gated_faults: Any
) -> None:
    space = await _setup(
        harness, ledger, gated_faults, index=IndexSettings(m=8, ef_construction=40, build_threads=1)
    )
    space.index_step(100)
    gated_faults.arm()
    opening = space.open_session("c", create=True)
    await gated_faults.wait_entered()
    checkpoint = asyncio.ensure_future(asyncio.to_thread(space.checkpoint))
    await asyncio.sleep(0.2)  # the checkpoint runs while the open is in flight (or waits for it)
    gated_faults.release(fail=True)
    with pytest.raises(StorageError):
        await opening
    (outcome,) = await asyncio.gather(checkpoint, return_exceptions=True)
    assert isinstance(outcome, (int, StorageError)), outcome
    assert space.session_mark("c") is None
    space = await harness.restart(space)
    ledger.check(space)
    assert space.session_mark("c") is None
