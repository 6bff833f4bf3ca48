"""Property test of engram.shard.space.Space: any interleaving of appends from several sessions
(with duplicates, gaps and batches in flight together), index steps of any size, checkpoints and
restarts leaves exactly the acknowledged batches, once each, in LSN order."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.common.settings import IndexSettings, WalSettings
from engram.contract.errors import SequenceError

SESSIONS = ("s0", "s1", "s2")
WAL = WalSettings(segment_bytes=4096)  # many segments, so checkpoints delete some
INDEX = IndexSettings(m=8, ef_construction=32, build_threads=1)

session = st.integers(0, len(SESSIONS) - 1)
operation = st.one_of(
    st.tuples(st.just("append"), session, st.integers(1, 6)),
    st.tuples(st.just("dup"), session, st.integers(0, 1000)),
    st.tuples(st.just("gap"), session, st.integers(2, 5)),
    st.tuples(st.just("burst"), st.lists(session, min_size=2, max_size=5)),
    st.tuples(st.just("index"), st.integers(1, 60)),
    st.tuples(st.just("checkpoint")),
    st.tuples(st.just("restart")),
)


async def _scenario(kit: ModuleType, root: Path, ops: list[tuple]) -> None:
    harness = kit.Harness(root)
    ledger = kit.Ledger()
    try:
        space = harness.space(wal=WAL, index=INDEX)
        for sid in SESSIONS:
            await space.open_session(sid, create=True)
            ledger.open(sid)

        for op in ops:
            kind = op[0]
            visible = space.visible
            if kind == "append":
                sid = SESSIONS[op[1]]
                await ledger.append(space, sid, ledger.next_seq(sid), op[2])
            elif kind == "dup":
                sid = SESSIONS[op[1]]
                mark = ledger.marks[sid]
                if mark:
                    seq = 1 + op[2] % mark
                    result = await space.begin_append(sid, seq, ledger.batch(sid, seq, 2).batch)
                    assert result.duplicate and result.count == 0
                    assert space.visible == visible
            elif kind == "gap":
                sid = SESSIONS[op[1]]
                seq = ledger.next_seq(sid) + op[2] - 1
                with pytest.raises(SequenceError) as info:
                    space.begin_append(sid, seq, ledger.batch(sid, seq, 1).batch)
                assert info.value.expected == ledger.next_seq(sid)
            elif kind == "burst":
                pending = []
                seqs = dict(ledger.marks)
                for i in op[1]:
                    sid = SESSIONS[i]
                    seqs[sid] += 1
                    pending.append(ledger.batch(sid, seqs[sid], 1 + len(pending)))
                futs = [space.begin_append(p.sid, p.seq, p.batch) for p in pending]
                first = pending[0]  # a retry of a batch still in flight
                dup = space.begin_append(first.sid, first.seq, ledger.batch(first.sid, 1, 1).batch)
                results = await asyncio.gather(*futs)
                for p, result in zip(pending, results, strict=True):
                    ledger.record(p, result)
                assert (await dup).duplicate
            elif kind == "index":
                await asyncio.to_thread(space.index_step, op[1])
            elif kind == "checkpoint":
                if space.hnsw is not None:
                    rows = await asyncio.to_thread(space.checkpoint)
                    assert rows == space.hnsw.covered == space.checkpoint_rows
            elif kind == "restart":
                space = await harness.restart(space)
                ledger.check(space)
            assert space.visible == len(ledger.ids())

        space = await harness.restart(space)
        ledger.check(space)
        for sid in SESSIONS:
            mark = ledger.marks[sid]
            if mark:
                again = await space.begin_append(sid, mark, ledger.batch(sid, mark, 1).batch)
                assert again.duplicate
            await ledger.append(space, sid, mark + 1, 2)
        ledger.check(space)
    finally:
        await harness.close_all()


@settings(max_examples=30, deadline=None, database=None)
@given(ops=st.lists(operation, max_size=25))
def test_any_interleaving_keeps_exactly_the_acked_batches(
    kit: ModuleType, ops: list[tuple]
) -> None:
    with tempfile.TemporaryDirectory(prefix="engram-space-prop-") as root:
        asyncio.run(_scenario(kit, Path(root), ops))
