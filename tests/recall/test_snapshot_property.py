"""Property test: every recall is the exact top-k of a batch-aligned snapshot, under any
interleaving of concurrent writers, recalls and the index builder.

Two or three sessions append batches of random sizes as asyncio tasks (some awaited at once,
some left in flight); meanwhile recalls are taken at random consistency levels (each recall
runs in a worker thread, some concurrently) and a builder task moves rows into HNSW in random
chunks on a thread and sometimes writes a checkpoint. Batches reuse overlapping corpus rows, so
equal vectors (exact ties) are common.

For every recall:

* ``snapshot_sequence`` is the snapshot's visible LSN and falls on a batch boundary: a batch is
  either wholly in the snapshot or not at all;
* the results equal the exact top-k (numpy, cosine over exactly the rows with LSN <= snapshot)
  in ids' scores (1e-4), ties allowed; ids belong to their LSNs;
* STRONG sees every batch acknowledged before the call, SESSION every batch of its session;
* no blinking: a row once returned for a query is returned by every later recall of that query
  (at a snapshot at least as new) in which it is clearly within the exact top-k.

Spaces stay below 1,024 rows (one fresh block that never fills, so the builder never drops a
block): indexes that small are searched by brute force, so results must be exact.
"""

from __future__ import annotations

import asyncio
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.common.settings import IndexSettings
from engram.v1 import streaming_pb2 as pb

N_QUERIES = 6
LEVELS = (pb.EVENTUAL, pb.BOUNDED, pb.SESSION, pb.STRONG)

batch_plan = st.tuples(
    st.integers(1, 40),  # rows
    st.integers(0, 400),  # first corpus row: batches overlap, so equal vectors recur
    st.booleans(),  # await the ack before sending the next batch
    st.integers(0, 8),  # then let the other tasks run this many times
)
recall_op = st.tuples(
    st.just("recall"),
    st.integers(0, N_QUERIES - 1),
    st.sampled_from([1, 3, 10, 50, 1000]),
    st.sampled_from(LEVELS),
    st.booleans(),  # run concurrently with the next recalls
)
# move this task's mark on by this percentage of all planned rows and wait until that many are
# acknowledged: spreads recalls and builder steps over the whole run
progress_op = st.tuples(st.just("progress"), st.integers(0, 12))
yield_op = st.tuples(st.just("yield"), st.integers(1, 6))
builder_op = st.one_of(
    st.tuples(st.just("index"), st.integers(1, 150)),
    st.tuples(st.just("checkpoint")),
    yield_op,
    progress_op,
)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple:
    dim = draw(st.sampled_from([8, 12, 16]))
    writers = draw(st.lists(st.lists(batch_plan, min_size=2, max_size=8), min_size=2, max_size=3))
    recalls = draw(st.lists(st.one_of(recall_op, progress_op, yield_op), min_size=10, max_size=40))
    builder = draw(st.lists(builder_op, min_size=3, max_size=16))
    return dim, writers, recalls, builder


@dataclass
class Recorded:
    query: int
    k: int
    level: int
    session: str
    floor: int  # the snapshot must be at least this (acked rows the level must include)
    visible: int
    response: pb.RecallResponse


@dataclass
class Model:
    dim: int
    next_row: int = 0
    parts: list[np.ndarray] = field(default_factory=list)  # normalised, row order
    ids: list[str] = field(default_factory=list)
    boundaries: set[int] = field(default_factory=lambda: {0})
    acked_end: int = 0  # end row of every acked batch so far (max)
    session_end: dict[str, int] = field(default_factory=dict)


async def _scenario(kit: ModuleType, root: Path, scenario: tuple) -> None:
    dim, writers, recall_ops, builder_ops = scenario
    corpus = kit.corpus(dim)
    cues = np.concatenate([corpus.vectors(50_000, N_QUERIES - 2), corpus.vectors(17, 2)])
    model = Model(dim)
    records: list[Recorded] = []
    harness = kit.Harness(root)
    try:
        space = harness.space(index=IndexSettings())
        sessions = [f"w{i}" for i in range(len(writers))]
        for sid in sessions:
            await space.open_session(sid, create=True)

        async def writer(sid: str, plan: list[tuple[int, int, bool, int]]) -> None:
            pending = []
            for seq, (n, offset, wait, yields) in enumerate(plan, 1):
                raw = corpus.vectors(offset, n)
                ids = [f"{sid}-{seq}-{i}" for i in range(n)]
                fut = space.begin_append(sid, seq, kit.make_batch(raw, ids))
                first = model.next_row  # LSNs are assigned at once, in call order
                model.next_row += n
                model.boundaries.add(model.next_row)
                model.parts.append(kit.normalise(raw))
                model.ids.extend(ids)
                entry = (fut, first, n)
                if wait:
                    await _settled(sid, *entry)
                else:
                    pending.append(entry)
                for _ in range(1 + yields):
                    await asyncio.sleep(0)
            for entry in pending:
                await _settled(sid, *entry)

        async def _settled(sid: str, fut: asyncio.Future, first: int, n: int) -> None:
            result = await fut
            assert not result.duplicate and result.first_lsn == first + 1 and result.count == n
            model.acked_end = max(model.acked_end, first + n)
            model.session_end[sid] = max(model.session_end.get(sid, 0), first + n)
            async with progressed:
                progressed.notify_all()

        async def one_recall(query: int, k: int, level: int, sid: str) -> None:
            floor = {pb.STRONG: model.acked_end, pb.SESSION: model.session_end.get(sid, 0)}
            snap = await space.consistent_snapshot(level, sid, 30.0)
            assert snap.consistency == level
            res = await asyncio.to_thread(space.recall, snap, cues[query], k, None)
            records.append(Recorded(query, k, level, sid, floor.get(level, 0), snap.visible, res))

        progressed = asyncio.Condition()
        total_rows = sum(batch[0] for plan in writers for batch in plan)

        async def pause(op: tuple, mark: list[int]) -> bool:
            if op[0] == "yield":
                for _ in range(op[1]):
                    await asyncio.sleep(0)
            elif op[0] == "progress":
                mark[0] = min(100, mark[0] + op[1])
                async with progressed:
                    await progressed.wait_for(
                        lambda: model.acked_end >= total_rows * mark[0] // 100
                    )
            else:
                return False
            return True

        async def recaller() -> None:
            running, mark = [], [0]
            for i, op in enumerate(recall_ops):
                if await pause(op, mark):
                    continue
                _, query, k, level, concurrent = op
                sid = sessions[i % len(sessions)] if level == pb.SESSION else ""
                task = asyncio.ensure_future(one_recall(query, k, level, sid))
                if concurrent:
                    running.append(task)
                else:
                    await task
            await asyncio.gather(*running)

        async def builder() -> None:  # the builder thread: index steps and checkpoints in turn
            mark = [0]
            for op in builder_ops:
                if op[0] == "index":
                    await asyncio.to_thread(space.index_step, op[1])
                elif op[0] == "checkpoint":
                    if space.hnsw is not None:
                        await asyncio.to_thread(space.checkpoint)
                else:
                    await pause(op, mark)

        await asyncio.gather(
            *(writer(sid, plan) for sid, plan in zip(sessions, writers, strict=True)),
            recaller(),
            builder(),
        )
        # the end state, fresh and then fully indexed
        for query in range(N_QUERIES):
            await one_recall(query, 10, pb.STRONG, "")
        await asyncio.to_thread(space.index_step, 10_000)
        for query in range(N_QUERIES):
            await one_recall(query, 10, pb.STRONG, "")
        assert space.visible == model.next_row
    finally:
        await harness.close_all()

    _verify(kit, model, cues, records)


def _verify(kit: ModuleType, model: Model, cues: np.ndarray, records: list[Recorded]) -> None:
    stored = np.concatenate(model.parts)
    assert len(stored) == len(model.ids) == model.next_row
    exact_all = [kit.exact_scores(stored, cue) for cue in cues]
    seen: dict[tuple[int, int], set[int]] = {}
    for rec in sorted(records, key=lambda r: r.visible):
        res = rec.response
        what = f"query {rec.query} k={rec.k} {pb.Consistency.Name(rec.level)} at {rec.visible}"
        assert res.snapshot_sequence == rec.visible, what
        assert rec.visible in model.boundaries, f"{what}: snapshot inside a batch"
        assert rec.visible >= rec.floor, f"{what}: misses acked rows up to {rec.floor}"
        assert res.metadata.indexed_count + res.metadata.fresh_count == rec.visible, what
        assert res.metadata.consistency == rec.level, what
        rows, scores = kit.result_rows(res)
        exact = exact_all[rec.query][: rec.visible]
        kit.assert_exact_topk(rows, scores, exact, rec.k, what=what)
        for m in res.results:
            assert m.id == model.ids[m.lsn - 1], f"{what}: id {m.id} is not LSN {m.lsn}'s"
        # no blinking
        before = seen.setdefault((rec.query, rec.k), set())
        if len(rows) == rec.k:
            kth = float(np.sort(exact)[::-1][rec.k - 1])
            clearly_in = {r for r in before if exact[r] > kth + kit.TOL}
        else:
            clearly_in = set(before)
        missing = clearly_in - set(rows)
        assert not missing, f"{what}: rows seen before vanished: {sorted(missing)}"
        before.update(rows)


@settings(max_examples=40, deadline=None, database=None)
@given(scenario=scenarios())
def test_every_recall_is_the_exact_topk_of_a_batch_aligned_snapshot(
    kit: ModuleType, scenario: tuple
) -> None:
    with tempfile.TemporaryDirectory(prefix="engram-recall-prop-") as root:
        asyncio.run(_scenario(kit, Path(root), scenario))


def test_the_oracle_rejects_wrong_answers(kit: ModuleType) -> None:
    """assert_exact_topk accepts the exact answer (ties in any order) and nothing else."""
    exact = np.array([0.9, 0.5, 0.7, 0.7, 0.1, 0.7])
    kit.assert_exact_topk([0, 2, 3], [0.9, 0.7, 0.7], exact, 3)
    kit.assert_exact_topk([0, 5, 2], [0.9, 0.7, 0.7], exact, 3)  # another tie
    kit.assert_exact_topk([0, 3, 2, 5, 1, 4], list(exact[[0, 3, 2, 5, 1, 4]]), exact, 1000)
    wrong = [
        ([0, 2, 1], [0.9, 0.7, 0.5]),  # a worse row instead of a tie
        ([0, 2], [0.9, 0.7]),  # too few
        ([0, 2, 2], [0.9, 0.7, 0.7]),  # twice
        ([2, 0, 3], [0.7, 0.9, 0.7]),  # not best-first
        ([0, 2, 3], [0.9, 0.7, 0.6]),  # a wrong score
        ([0, 2, 6], [0.9, 0.7, 0.7]),  # beyond the snapshot
    ]
    for rows, scores in wrong:
        with pytest.raises(AssertionError):
            kit.assert_exact_topk(rows, scores, exact, 3)
    with pytest.raises(AssertionError):  # a row the filter excludes
        kit.assert_exact_topk([0, 2, 3], [0.9, 0.7, 0.7], exact, 3, eligible=exact != 0.9)
