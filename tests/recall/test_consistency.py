"""Consistency levels of recall: on a Space directly and end to end through a one-shard cluster.

* SESSION reads the session's writes: after a batch's ack, a SESSION recall of that session
  sees it (snapshot >= its last LSN) — pipelined batches too;
* STRONG sees everything acknowledged, by any session, before it was issued; when the WAL has
  made rows durable that are not visible yet, it waits for them;
* EVENTUAL never waits, even then; BOUNDED (also the default, 0) is reported as BOUNDED and
  waits only when the newest durable write not yet visible is older than the bound;
* SESSION for an unknown session is refused (UNKNOWN_SESSION);
* a level that cannot be reached before the deadline raises ConsistencyTimeout
  (CONSISTENCY_TIMEOUT, retryable, naming the LSN) rather than answering from a staler snapshot.

"Never waits" is checked without clocks: the ``consistent_snapshot`` coroutine is driven by
hand and must finish at its first step, i.e. without ever suspending.

The durable-ahead-of-visible state arises naturally between a WAL round's fsync and the
publish callback on the event loop; the tests hold the loop thread (time.sleep inside a
coroutine) until the committer thread has made a batch durable. An unreachable target cannot
arise without a broken WAL, so for ConsistencyTimeout ``space.wal`` is wrapped in a stub whose
``durable_lsn`` runs ahead (the brief's seam; everything else goes to the real WAL).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from engram.contract.errors import ConsistencyTimeout, SessionError
from engram.launcher.cluster import LocalCluster
from engram.shard.space import Snapshot, Space
from engram.v1 import streaming_pb2 as pb
from engram_client import EngramClient

CLUSTER_SHARDS = 1  # the shared cluster of the end-to-end tests
DIM = 16
LEVELS = ("EVENTUAL", "BOUNDED", "SESSION", "STRONG")


def finish_without_waiting(coro: Coroutine[Any, Any, Snapshot]) -> Snapshot:
    """Runs ``coro`` one step; it must complete without suspending (i.e. without waiting)."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    coro.close()
    raise AssertionError("the snapshot waited")


class AheadWal:
    """The space's real WAL, except that ``durable_lsn`` claims ``ahead`` more rows than are
    visible, made durable ``age_s`` seconds ago."""

    def __init__(self, space: Space, ahead: int, age_s: float) -> None:
        self._space = space
        self._real = space.wal
        self.ahead = ahead
        self.at = time.monotonic() - age_s

    @property
    def durable_lsn(self) -> tuple[int, float]:
        return self._target, self.at

    def durable_since(self, lsn: int) -> float | None:
        return self.at if self._target > lsn else None

    def pin(self) -> int:
        self._target = self._space.visible + self.ahead
        return self._target

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class SlowWal:
    """The real WAL, but reading ``durable_lsn`` or ``durable_since`` takes 2 ms (as when the
    loop thread loses the GIL to the builder or the WAL committer at that moment)."""

    def __init__(self, real: Any) -> None:
        self._real = real

    @property
    def durable_lsn(self) -> tuple[int, float]:
        time.sleep(0.002)
        return self._real.durable_lsn

    def durable_since(self, lsn: int) -> float | None:
        time.sleep(0.002)
        return self._real.durable_since(lsn)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def hold_loop_until_durable(space: Space, end: int) -> None:
    """Blocks the calling (event loop) thread until the WAL committer thread has made rows
    up to ``end`` durable; their publish callbacks then wait, queued, on the held loop."""
    give_up = time.monotonic() + 30
    while space.wal.durable_lsn[0] < end:
        assert time.monotonic() < give_up, "the batch never became durable"
        time.sleep(0.001)


async def _new_space(harness: Any, kit: ModuleType, sessions: tuple[str, ...] = ("a", "b")):
    space = harness.space()
    for sid in sessions:
        await space.open_session(sid, create=True)
    return space


def _batch(kit: ModuleType, sid: str, seq: int, offset: int, n: int) -> pb.ObservationBatch:
    vecs = kit.corpus(DIM).vectors(offset, n)
    return kit.make_batch(vecs, [f"{sid}-{seq}-{i}" for i in range(n)])


def _find(kit: ModuleType, space: Space, snap: Snapshot, offset: int) -> str:
    """The id of the best match of corpus row ``offset`` in ``snap``."""
    res = space.recall(snap, kit.corpus(DIM).vectors(offset, 1)[0], 1, None)
    return res.results[0].id if res.results else ""


# --------------------------------------------------------------------------- on a Space


async def test_session_reads_its_own_writes(harness: Any, kit: ModuleType) -> None:
    space = await _new_space(harness, kit)
    offset = 0
    for seq in range(1, 6):
        for sid in ("a", "b"):
            n = 3 + 7 * seq
            result = await space.begin_append(sid, seq, _batch(kit, sid, seq, offset, n))
            last = result.first_lsn + result.count - 1
            snap = finish_without_waiting(space.consistent_snapshot(pb.SESSION, sid))
            assert snap.consistency == pb.SESSION
            assert snap.visible >= last
            assert _find(kit, space, snap, offset + n - 1) == f"{sid}-{seq}-{n - 1}"
            offset += n

    # pipelined: three batches in flight, recall after the second's ack
    futs = [
        space.begin_append("a", 6 + i, _batch(kit, "a", 6 + i, offset + 10 * i, 10))
        for i in range(3)
    ]
    second = await futs[1]
    snap = await space.consistent_snapshot(pb.SESSION, "a", 5.0)
    assert snap.visible >= second.first_lsn + second.count - 1
    assert _find(kit, space, snap, offset + 19) == "a-7-9"
    await asyncio.gather(*futs)


async def test_strong_waits_for_durable_rows_and_eventual_does_not(
    harness: Any, kit: ModuleType
) -> None:
    space = await _new_space(harness, kit)
    acked = await space.begin_append("a", 1, _batch(kit, "a", 1, 0, 50))
    fut = space.begin_append("b", 1, _batch(kit, "b", 1, 50, 30))
    end = space.visible + 30
    assert acked.first_lsn + acked.count - 1 == space.visible == 50
    # hold the loop thread until the committer made b's batch durable: its publish is queued
    hold_loop_until_durable(space, end)
    assert space.visible == 50 and not fut.done()

    eventual = finish_without_waiting(space.consistent_snapshot(pb.EVENTUAL))
    assert eventual.visible == 50 and eventual.consistency == pb.EVENTUAL
    # a's own writes are all visible: SESSION a does not wait either
    session = finish_without_waiting(space.consistent_snapshot(pb.SESSION, "a"))
    assert session.visible == 50
    strong = await space.consistent_snapshot(pb.STRONG, "", 30.0)
    assert strong.consistency == pb.STRONG
    assert strong.visible >= end and fut.done()
    assert strong.waited_us > 0  # it did wait (for the publish callback)
    res = space.recall(strong, kit.corpus(DIM).vectors(79, 1)[0], 1, None)
    assert res.results[0].id == "b-1-29" and res.snapshot_sequence == end
    assert res.metadata.consistency == pb.STRONG
    await fut


async def test_strong_sees_every_session_acked_before_it(harness: Any, kit: ModuleType) -> None:
    space = await _new_space(harness, kit, ("a", "b", "c"))
    offset, acked_end = 0, 0
    for seq in range(1, 4):
        futs = []
        for sid in ("a", "b", "c"):
            futs.append(space.begin_append(sid, seq, _batch(kit, sid, seq, offset, 11)))
            offset += 11
        for r in await asyncio.gather(*futs):
            acked_end = max(acked_end, r.first_lsn + r.count - 1)
        snap = await space.consistent_snapshot(pb.STRONG, "", 5.0)
        assert snap.visible >= acked_end
        ids = [m.id for m in space.recall(snap, np.ones(DIM, np.float32), 1000, None).results]
        assert len(ids) == acked_end
        assert {f"{sid}-{seq}-{i}" for sid in "abc" for i in range(11)} <= set(ids)


async def test_bounded_is_the_default_and_is_reported(harness: Any, kit: ModuleType) -> None:
    space = await _new_space(harness, kit)
    await space.begin_append("a", 1, _batch(kit, "a", 1, 0, 20))
    for level in (0, pb.BOUNDED):
        snap = finish_without_waiting(space.consistent_snapshot(level))
        assert snap.consistency == pb.BOUNDED and snap.visible == 20
        res = space.recall(snap, kit.corpus(DIM).vectors(3, 1)[0], 3, None)
        assert res.metadata.consistency == pb.BOUNDED
        assert res.metadata.staleness_us == 0  # nothing durable is missing


async def test_session_of_an_unknown_session_is_refused(harness: Any, kit: ModuleType) -> None:
    space = await _new_space(harness, kit)
    await space.begin_append("a", 1, _batch(kit, "a", 1, 0, 5))
    with pytest.raises(SessionError) as info:
        await space.consistent_snapshot(pb.SESSION, "nobody", 1.0)
    assert info.value.code == pb.UNKNOWN_SESSION
    assert "nobody" in info.value.message


async def test_unreachable_level_times_out_rather_than_answer_stale(
    harness: Any, kit: ModuleType
) -> None:
    space = await _new_space(harness, kit)
    await space.begin_append("a", 1, _batch(kit, "a", 1, 0, 40))
    real = space.wal
    stale = AheadWal(space, ahead=7, age_s=10.0)  # durable long ago, never published
    space.wal = stale  # type: ignore[assignment]
    try:
        target = stale.pin()
        for level in (pb.STRONG, pb.BOUNDED):
            with pytest.raises(ConsistencyTimeout) as info:
                await space.consistent_snapshot(level, "a", 0.2)
            err = info.value
            assert err.code == pb.CONSISTENCY_TIMEOUT and err.retryable
            assert f"LSN {target}" in err.message, err.message
            assert pb.Consistency.Name(level) in err.message
            assert err.to_proto().code == pb.CONSISTENCY_TIMEOUT
        # the levels that do not need those rows answer at once, and say how stale they are
        for level in (pb.EVENTUAL, pb.SESSION):
            snap = finish_without_waiting(space.consistent_snapshot(level, "a"))
            assert snap.visible == 40 and snap.staleness_us > 0
        # a durable write younger than the bound: BOUNDED answers at once
        young = AheadWal(space, ahead=7, age_s=0.0)
        young.at = time.monotonic() + 3600  # stays "young" however slow the machine is
        space.wal = young  # type: ignore[assignment]
        young.pin()
        snap = finish_without_waiting(space.consistent_snapshot(pb.BOUNDED, "a"))
        assert snap.visible == 40 and snap.consistency == pb.BOUNDED

        # a reachable target: STRONG waits until the rows are published, then answers
        space.wal = stale  # type: ignore[assignment]
        stale.ahead = 9
        target = stale.pin()
        waiting = asyncio.ensure_future(space.consistent_snapshot(pb.STRONG, "", 30.0))
        await asyncio.sleep(0)
        assert not waiting.done()
        space.wal = real
        await space.begin_append("b", 1, _batch(kit, "b", 1, 100, 9))
        snap = await waiting
        assert snap.visible >= target == 49
    finally:
        space.wal = real
    # the space still works after the timeouts
    r = await space.begin_append("a", 2, _batch(kit, "a", 2, 200, 3))
    assert r.first_lsn == 50


async def test_eventual_never_waits(harness: Any, kit: ModuleType) -> None:
    space = await _new_space(harness, kit)
    await space.begin_append("a", 1, _batch(kit, "a", 1, 0, 10))
    for _ in range(20):
        snap = finish_without_waiting(space.consistent_snapshot(pb.EVENTUAL))
        assert snap.visible == 10 and snap.consistency == pb.EVENTUAL


async def test_waited_us_is_zero_when_nothing_was_waited_for(harness: Any, kit: ModuleType) -> None:
    space = await _new_space(harness, kit)
    await space.begin_append("a", 1, _batch(kit, "a", 1, 0, 10))
    real = space.wal
    space.wal = SlowWal(real)  # type: ignore[assignment]
    try:
        for level in (pb.EVENTUAL, pb.BOUNDED, pb.SESSION, pb.STRONG):
            snap = finish_without_waiting(space.consistent_snapshot(level, "a"))
            assert snap.waited_us == 0, (pb.Consistency.Name(level), snap.waited_us)
    finally:
        space.wal = real


# ------------------------------------------------------------------------- end to end


async def test_levels_end_to_end(
    shared_cluster: LocalCluster, space_id: str, kit: ModuleType
) -> None:
    corpus = kit.corpus(DIM)
    async with EngramClient(shared_cluster.gateway_address) as client:
        a = await client.open_stream(space_id)
        b = await client.open_stream(space_id)
        try:
            offset = 0
            for round_ in range(3):
                # a pipelines 3 batches, b one; then every recall path at every level
                futs = []
                for _ in range(3):
                    ids = [f"a-{offset + i}" for i in range(20)]
                    futs.append(await a.send(corpus.vectors(offset, 20), ids=ids))
                    offset += 20
                acks = await asyncio.gather(*futs)
                a_last = max(x.first_lsn + x.count - 1 for x in acks)
                b_ack = await (
                    await b.send(
                        corpus.vectors(offset, 5), ids=[f"b-{offset + i}" for i in range(5)]
                    )
                )
                offset += 5
                b_last = b_ack.first_lsn + b_ack.count - 1
                newest_a = corpus.vectors(offset - 6, 1)[0]  # a's last row
                for level in LEVELS:
                    results = {
                        "a-stream": await a.recall(newest_a, 3, consistency=level),
                        "b-stream": await b.recall(newest_a, 3, consistency=level),
                        "standalone-a": await client.recall(
                            space_id, newest_a, 3, session_id=a.session_id, consistency=level
                        ),
                    }
                    for path, res in results.items():
                        what = f"round {round_} {level} {path}"
                        assert res.consistency == level, what
                        assert res.chunks == 1, what
                        assert res.waited_us >= 0 and res.staleness_us >= 0, what
                        assert len(res.hits) == 3, what
                        assert all(h.lsn <= res.snapshot_sequence for h in res.hits), what
                        if level == "STRONG" or (level == "SESSION" and path != "b-stream"):
                            assert res.snapshot_sequence >= max(a_last, b_last), what
                            assert res.hits[0].id == f"a-{offset - 6}", what
                        if level == "SESSION" and path == "b-stream":
                            assert res.snapshot_sequence >= b_last, what
                # the level left unspecified on the wire is BOUNDED
                async for chunk in client.stub.RecallStream(
                    pb.StreamingRecallRequest(
                        memory_space_id=space_id, cue=newest_a.tolist(), max_results=2
                    ),
                    timeout=10,
                ):
                    assert chunk.metadata.consistency == pb.BOUNDED
                    assert chunk.snapshot_sequence >= a_last
        finally:
            await a.close()
            await b.close()


async def test_unknown_session_end_to_end(
    shared_cluster: LocalCluster, space_id: str, kit: ModuleType
) -> None:
    async with EngramClient(shared_cluster.gateway_address) as client:
        stream = await client.open_stream(space_id)
        try:
            await (await stream.send(kit.corpus(DIM).vectors(0, 4)))
            with pytest.raises(SessionError) as info:
                await client.recall(
                    space_id,
                    np.ones(DIM, np.float32),
                    3,
                    session_id="s-does-not-exist",
                    consistency="SESSION",
                )
            assert info.value.code == pb.UNKNOWN_SESSION
            assert "s-does-not-exist" in info.value.message
            # the stream's own session is fine
            res = await client.recall(
                space_id,
                np.ones(DIM, np.float32),
                3,
                session_id=stream.session_id,
                consistency="SESSION",
            )
            assert res.snapshot_sequence == 4 and res.consistency == "SESSION"
        finally:
            await stream.close()


async def test_recall_of_a_space_never_written_reports_its_level(
    shared_cluster: LocalCluster, space_id: str
) -> None:
    async with EngramClient(shared_cluster.gateway_address) as client:
        for level in LEVELS:
            res = await client.recall(space_id, np.ones(DIM, np.float32), 3, consistency=level)
            assert res.hits == [] and res.snapshot_sequence == 0
            assert res.consistency == level, (level, res.consistency)


async def test_session_recall_of_unknown_session_on_a_space_never_written(
    shared_cluster: LocalCluster, space_id: str
) -> None:
    async with EngramClient(shared_cluster.gateway_address) as client:
        with pytest.raises(SessionError) as info:
            await client.recall(
                space_id,
                np.ones(DIM, np.float32),
                3,
                session_id="s-does-not-exist",
                consistency="SESSION",
            )
        assert info.value.code == pb.UNKNOWN_SESSION
