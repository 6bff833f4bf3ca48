"""Recall filters, large k and incremental (chunked) results.

Filters: time range on ``when`` (``since_us`` inclusive, ``until_us`` exclusive — bounds are
placed exactly on stored timestamps, which repeat, to pin both ends), ``min_confidence``
(inclusive, float32 like the stored values), ``min_score``; k from 1 to 1000 (1001 is
K_OUT_OF_RANGE on both recall paths). With rows split between the HNSW tier and the fresh tier
the result must be the exact filtered top-k.

Chunks: with ``chunk_size=7`` and ``k=30`` a recall arrives as ceil(30/7) = 5 chunks, best
first across chunks, every chunk but the last with ``more_results``, chunk_index 0..4, the last
carrying the snapshot; their union (in order) equals the unchunked answer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
from types import ModuleType
from typing import Any

import grpc
import numpy as np
import pytest

from engram.common.settings import IndexSettings
from engram.contract.errors import ValidationError
from engram.launcher.cluster import LocalCluster
from engram.shard.space import Filters, Space
from engram.v1 import streaming_pb2 as pb
from engram_client import EngramClient

CLUSTER_SHARDS = 1  # the shared cluster of the end-to-end tests
DIM = 16
ROWS = 3000
INDEXED = 1700
T0 = 1_700_000_000_000_000
CONFIDENCES = np.array([0.1, 0.25, 0.5, 0.7, 0.9, 1.0], dtype=np.float32)


@dataclasses.dataclass
class Data:
    vectors: np.ndarray  # raw
    stored: np.ndarray  # normalised
    ids: list[str]
    ts: np.ndarray  # int64, groups of three rows share a timestamp
    conf: np.ndarray  # float32


def _data(kit: ModuleType, rows: int = ROWS, offset: int = 0) -> Data:
    vectors = kit.corpus(DIM).vectors(offset, rows)
    rng = np.random.default_rng(3)
    ts = T0 + (np.arange(rows) // 3).astype(np.int64) * 1000
    conf = rng.choice(CONFIDENCES, rows).astype(np.float32)
    return Data(vectors, kit.normalise(vectors), [f"m{r}" for r in range(rows)], ts, conf)


def _eligible(d: Data, f: Filters) -> np.ndarray:
    keep = np.ones(len(d.ids), bool)
    if f.since_us is not None:
        keep &= d.ts >= f.since_us
    if f.until_us is not None:
        keep &= d.ts < f.until_us
    if f.min_confidence is not None:
        keep &= d.conf >= np.float32(f.min_confidence)
    return keep


def _filters() -> list[Filters]:
    t = lambda row: int(T0 + (row // 3) * 1000)  # noqa: E731 (timestamp of a row)
    return [
        Filters(),
        Filters(since_us=t(1500)),  # exactly the stamp of rows 1500-1502: inclusive
        Filters(until_us=t(1500)),  # exclusive: rows 1500-1502 are out
        Filters(since_us=t(600), until_us=t(2400)),  # across both tiers
        Filters(since_us=t(1650), until_us=t(1750)),  # straddles the tier boundary
        Filters(since_us=t(2901), until_us=t(2901)),  # empty range
        Filters(until_us=t(30)),  # 30 rows, all in HNSW
        Filters(min_confidence=0.7),
        Filters(min_confidence=1.0),
        Filters(min_confidence=0.5, since_us=t(1000), until_us=t(2200)),
        Filters(min_score=0.6),
        Filters(min_score=0.9, min_confidence=0.25),
        Filters(min_score=0.3, since_us=t(100), until_us=t(2800), min_confidence=0.9),
    ]


async def _load(harness: Any, kit: ModuleType, d: Data) -> Space:
    space = harness.space()
    await space.open_session("a", create=True)
    seq, lo = 0, 0
    for n in (400, 1, 599, 333, 667, 1000):
        seq += 1
        batch = kit.make_batch(
            d.vectors[lo : lo + n],
            d.ids[lo : lo + n],
            confidences=d.conf[lo : lo + n],
            timestamps_us=d.ts[lo : lo + n],
        )
        await space.begin_append("a", seq, batch)
        lo += n
    assert lo == space.visible == len(d.ids)
    return space


async def test_filtered_recall_is_the_exact_filtered_topk(harness: Any, kit: ModuleType) -> None:
    d = _data(kit)
    space = await _load(harness, kit, d)
    assert await asyncio.to_thread(space.index_step, INDEXED) == INDEXED
    cues = np.concatenate([kit.corpus(DIM).vectors(80_000, 6), d.vectors[[0, 1699, 1700, 2999]]])
    snap = space.snapshot()
    assert (snap.indexed, snap.visible) == (INDEXED, ROWS)
    await _check_filters(kit, space, d, cues, "before restart")
    # times and confidences come back from the checkpoint's metadata (rows below 1700) and
    # from the WAL (the rest; 1700 is inside a batch, so its head is skipped on replay)
    assert await asyncio.to_thread(space.checkpoint) == INDEXED
    space = await harness.restart(space)
    assert (space.checkpoint_rows, space.visible) == (INDEXED, ROWS)
    await _check_filters(kit, space, d, cues, "after restart")


async def _check_filters(
    kit: ModuleType, space: Space, d: Data, cues: np.ndarray, stage: str
) -> None:
    snap = space.snapshot()
    for f in _filters():
        eligible = _eligible(d, f)
        for qi, cue in enumerate(cues):
            exact = kit.exact_scores(d.stored, cue)
            for k in (1, 10, 100, 1000):
                res = await asyncio.to_thread(space.recall, snap, cue, k, f)
                rows, scores = kit.result_rows(res)
                what = f"{stage}: {f} cue {qi} k={k}"
                kit.assert_exact_topk(
                    rows, scores, exact, k, eligible=eligible, min_score=f.min_score, what=what
                )
                for m in res.results:
                    row = m.lsn - 1
                    assert m.id == d.ids[row], what
                    assert m.when.ToMicroseconds() == d.ts[row], what
                    assert m.confidence == pytest.approx(float(d.conf[row])), what


async def test_filtered_recall_racing_new_indexed_rows(harness: Any, kit: ModuleType) -> None:
    d = _data(kit, rows=1200)
    space = await _load_small(harness, kit, d)
    await asyncio.to_thread(space.index_step, 10_000)
    cue = kit.corpus(DIM).vectors(90_000, 1)[0]

    class PausedHnsw:
        """The snapshot's index, with the recall thread held just before it searches (the
        scheduler's choice: the loop and the builder run meanwhile)."""

        def __init__(self, real: Any) -> None:
            self.real = real
            self.entered = threading.Event()
            self.go = threading.Event()

        def search(self, *args: Any, **kwargs: Any) -> Any:
            self.entered.set()
            assert self.go.wait(30)
            return self.real.search(*args, **kwargs)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.real, name)

    snap = space.snapshot()
    paused = PausedHnsw(snap.hnsw)
    held = dataclasses.replace(snap, hnsw=paused)
    task = asyncio.ensure_future(
        asyncio.to_thread(space.recall, held, cue, 10, Filters(min_confidence=0.0))
    )
    try:
        assert await asyncio.to_thread(paused.entered.wait, 30)
        # rows close to the cue are published and indexed while the recall is held
        near = np.repeat(cue[None, :], 50, axis=0) + 0.01 * np.arange(50)[:, None]
        await space.begin_append("a", 7, kit.make_batch(near, [f"near-{i}" for i in range(50)]))
        await asyncio.to_thread(space.index_step, 10_000)
    finally:
        paused.go.set()
    res = await task
    rows, scores = kit.result_rows(res)
    kit.assert_exact_topk(rows, scores, kit.exact_scores(d.stored, cue), 10)


async def test_every_row_is_recallable_among_many_equal_vectors(
    harness: Any, kit: ModuleType
) -> None:
    corpus = kit.corpus(DIM)
    same = corpus.vectors(9_000, 1)
    vectors = np.concatenate([corpus.vectors(0, 10), np.repeat(same, 300, axis=0)])
    ids = [f"e{r}" for r in range(len(vectors))]
    space = harness.space(index=IndexSettings(build_threads=1))  # one thread: a fixed graph
    await space.open_session("a", create=True)
    await space.begin_append("a", 1, kit.make_batch(vectors, ids))
    exact = kit.exact_scores(kit.normalise(vectors), same[0])

    fresh = space.recall(space.snapshot(), same[0], 1000, None)
    assert len(fresh.results) == len(vectors)  # the fresh tier is scanned exactly
    while await asyncio.to_thread(space.index_step, 128):  # as the builder does
        pass
    indexed = space.recall(space.snapshot(), same[0], 1000, None)
    rows, scores = kit.result_rows(indexed)
    kit.assert_exact_topk(rows, scores, exact, 1000, what="all indexed")


async def _load_small(harness: Any, kit: ModuleType, d: Data) -> Space:
    space = harness.space()
    await space.open_session("a", create=True)
    for seq, lo in enumerate(range(0, len(d.ids), 200), 1):
        hi = min(lo + 200, len(d.ids))
        batch = kit.make_batch(
            d.vectors[lo:hi], d.ids[lo:hi], confidences=d.conf[lo:hi], timestamps_us=d.ts[lo:hi]
        )
        await space.begin_append("a", seq, batch)
    return space


# ------------------------------------------------------------------------- end to end


async def _write(client: EngramClient, space: str, d: Data) -> None:
    stream = await client.open_stream(space)
    try:
        futs = []
        for lo in range(0, len(d.ids), 500):
            hi = lo + 500
            futs.append(
                await stream.send(
                    d.vectors[lo:hi],
                    ids=d.ids[lo:hi],
                    confidences=d.conf[lo:hi],
                    timestamps_us=d.ts[lo:hi],
                )
            )
        await asyncio.gather(*futs)
    finally:
        await stream.close()


async def test_filters_and_k_end_to_end(
    shared_cluster: LocalCluster, space_id: str, kit: ModuleType
) -> None:
    d = _data(kit)
    cues = np.concatenate([kit.corpus(DIM).vectors(80_000, 2), d.vectors[[1700]]])
    async with EngramClient(shared_cluster.gateway_address) as client:
        await _write(client, space_id, d)
        stream = await client.open_stream(space_id)
        try:
            for f in _filters():
                eligible = _eligible(d, f)
                options = {
                    name: getattr(f, name)
                    for name in ("since_us", "until_us", "min_confidence")
                    if getattr(f, name) is not None
                }
                for qi, cue in enumerate(cues):
                    exact = kit.exact_scores(d.stored, cue)
                    for k in (10, 1000):
                        for path in ("standalone", "stream"):
                            if path == "standalone":
                                res = await client.recall(
                                    space_id, cue, k, f.min_score, consistency="STRONG", **options
                                )
                            else:
                                res = await stream.recall(
                                    cue, k, f.min_score, consistency="STRONG", **options
                                )
                            what = f"{path} {f} cue {qi} k={k}"
                            assert res.snapshot_sequence == ROWS, what
                            rows = [h.lsn - 1 for h in res.hits]
                            assert [h.id for h in res.hits] == [d.ids[r] for r in rows], what
                            assert [h.when_us for h in res.hits] == [int(d.ts[r]) for r in rows]
                            kit.assert_exact_topk(
                                rows,
                                [h.score for h in res.hits],
                                exact,
                                k,
                                eligible=eligible,
                                min_score=f.min_score,
                                what=what,
                            )

            for k in (0, 1001):
                with pytest.raises(ValidationError) as info:
                    await client.recall(space_id, cues[0], k)
                assert info.value.code == pb.K_OUT_OF_RANGE
                with pytest.raises(ValidationError) as info:
                    await stream.recall(cues[0], k)
                assert info.value.code == pb.K_OUT_OF_RANGE
            # the stream is still usable after the refused recall
            assert len((await stream.recall(cues[0], 1000)).hits) == 1000
        finally:
            await stream.close()


async def test_chunked_results_end_to_end(
    shared_cluster: LocalCluster, space_id: str, kit: ModuleType
) -> None:
    d = _data(kit, rows=1000, offset=5000)
    cues = np.concatenate([kit.corpus(DIM).vectors(81_000, 3), d.vectors[[10]]])
    k, size = 30, 7
    n_chunks = math.ceil(k / size)
    async with EngramClient(shared_cluster.gateway_address) as client:
        await _write(client, space_id, d)
        stream = await client.open_stream(space_id)
        try:
            for qi, cue in enumerate(cues):
                what = f"cue {qi}"
                whole = await client.recall(space_id, cue, k, consistency="STRONG")
                assert whole.chunks == 1 and len(whole.hits) == k
                kit.assert_exact_topk(
                    [h.lsn - 1 for h in whole.hits],
                    [h.score for h in whole.hits],
                    kit.exact_scores(d.stored, cue),
                    k,
                    what=what,
                )
                want = [h.id for h in whole.hits]

                # standalone, raw: look at every chunk
                req = pb.StreamingRecallRequest(
                    memory_space_id=space_id,
                    cue=cue.tolist(),
                    max_results=k,
                    consistency=pb.STRONG,
                    chunk_size=size,
                )
                chunks = [c async for c in client.stub.RecallStream(req, timeout=30)]
                assert len(chunks) == n_chunks, what
                got: list[str] = []
                scores: list[float] = []
                for i, chunk in enumerate(chunks):
                    last = i == n_chunks - 1
                    assert chunk.more_results is not last, (what, i)
                    assert chunk.metadata.chunk_index == i, (what, i)
                    assert len(chunk.results) == (k - size * i if last else size), (what, i)
                    got.extend(m.id for m in chunk.results)
                    scores.extend(m.score for m in chunk.results)
                assert chunks[-1].snapshot_sequence == whole.snapshot_sequence == len(d.ids)
                assert chunks[-1].metadata.consistency == pb.STRONG
                assert got == want, what
                assert scores == sorted(scores, reverse=True), what

                # through the client, both paths
                for res in (
                    await client.recall(space_id, cue, k, consistency="STRONG", chunk_size=size),
                    await stream.recall(cue, k, consistency="STRONG", chunk_size=size),
                ):
                    assert res.chunks == n_chunks, what
                    assert [h.id for h in res.hits] == want, what
                    assert res.snapshot_sequence == whole.snapshot_sequence
                    assert res.consistency == "STRONG"

                # a chunk size of at least k, or fewer results than a chunk: one chunk
                for res in (
                    await stream.recall(cue, k, consistency="STRONG", chunk_size=k),
                    await stream.recall(cue, 5, consistency="STRONG", chunk_size=size),
                ):
                    assert res.chunks == 1
                    assert [h.id for h in res.hits] == want[: len(res.hits)]
            # concurrent chunked recalls on one stream: chunks interleave, answers do not mix
            wants = [
                [h.id for h in (await client.recall(space_id, cue, k, consistency="STRONG")).hits]
                for cue in cues
            ]
            answers = await asyncio.gather(
                *(stream.recall(cue, k, consistency="STRONG", chunk_size=size) for cue in cues)
            )
            assert [[h.id for h in res.hits] for res in answers] == wants
            assert all(res.chunks == n_chunks for res in answers)
        finally:
            await stream.close()


async def test_chunked_recall_errors_are_whole(
    shared_cluster: LocalCluster, space_id: str, kit: ModuleType
) -> None:
    """A refused chunked recall ends the call with the error (no partial chunks first)."""
    async with EngramClient(shared_cluster.gateway_address) as client:
        req = pb.StreamingRecallRequest(
            memory_space_id=space_id,
            cue=np.ones(DIM).tolist(),
            max_results=1001,
            chunk_size=7,
        )
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for chunk in client.stub.RecallStream(req, timeout=30):
                got.append(chunk)
        assert got == []
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith("K_OUT_OF_RANGE")
