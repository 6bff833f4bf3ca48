"""Recall stays the same answer while rows move fresh -> HNSW, across a checkpoint and restarts.

On a Space (3,000 rows of dimension 16: HNSW is searched exactly below 4,096 rows) the same
queries (k = 1, 10, 100) are answered at every stage — all fresh, after a restart that replays
the WAL, after a partial index step (inside a batch, past the first fresh block, which the
builder then drops), through a snapshot taken before indexing, fully indexed, after a
checkpoint, after a restart from the checkpoint, and again with new rows on top of the loaded
index — and every answer (ids in order, scores within 1e-4, snapshot LSN) equals the first one
for the same snapshot and the exact top-k.

Through a one-shard cluster: write, recall (STRONG), kill -9 the shard (it recovers from a
checkpoint plus the WAL tail), wait until healthy, recall again: same hits, same scores, same
snapshot_sequence.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np

from engram.common.settings import IndexSettings
from engram.contract.errors import ServerError
from engram.launcher.cluster import LocalCluster
from engram.shard.space import Snapshot, Space
from engram_client import EngramClient, RecallResult

DIM = 16
ROWS = 3000
KS = (1, 10, 100)
Answer = dict[tuple[int, int], tuple[list[str], list[float], int]]


class Model:
    def __init__(self, kit: ModuleType) -> None:
        self.kit = kit
        self.ids: list[str] = []
        self.parts: list[np.ndarray] = []
        self.seqs: dict[str, int] = {"a": 0, "b": 0}

    async def append(self, space: Space, sid: str, offset: int, n: int) -> None:
        self.seqs[sid] += 1
        seq = self.seqs[sid]
        raw = self.kit.corpus(DIM).vectors(offset, n)
        ids = [f"{sid}-{seq}-{i}" for i in range(n)]
        result = await space.begin_append(sid, seq, self.kit.make_batch(raw, ids))
        assert result.first_lsn == len(self.ids) + 1
        self.ids.extend(ids)
        self.parts.append(self.kit.normalise(raw))

    def stored(self) -> np.ndarray:
        return np.concatenate(self.parts)


def _cues(kit: ModuleType) -> np.ndarray:
    corpus = kit.corpus(DIM)
    held_out = corpus.vectors(60_000, 16)
    stored = np.concatenate([corpus.vectors(r, 1) for r in (0, 1023, 1024, 1234, 2999, 3100)])
    return np.concatenate([held_out, stored])


def _answer(kit: ModuleType, space: Space, model: Model, snap: Snapshot, stage: str) -> Answer:
    stored = model.stored()[: snap.visible]
    out: Answer = {}
    for qi, cue in enumerate(_cues(kit)):
        exact = kit.exact_scores(stored, cue)
        for k in KS:
            res = space.recall(snap, cue, k, None)
            rows, scores = kit.result_rows(res)
            what = f"{stage}: cue {qi} k={k}"
            assert res.snapshot_sequence == snap.visible, what
            kit.assert_exact_topk(rows, scores, exact, k, what=what)
            ids = [m.id for m in res.results]
            assert ids == [model.ids[r] for r in rows], what
            out[qi, k] = (ids, scores, res.snapshot_sequence)
    return out


def _same(reference: Answer, got: Answer, stage: str) -> None:
    assert reference.keys() == got.keys()
    for key, (ids, scores, snapshot) in reference.items():
        g_ids, g_scores, g_snapshot = got[key]
        assert g_snapshot == snapshot, f"{stage} {key}: snapshot {g_snapshot} != {snapshot}"
        assert g_ids == ids, f"{stage} {key}: hits differ"
        np.testing.assert_allclose(g_scores, scores, atol=1e-4, err_msg=f"{stage} {key}")


async def test_same_answers_across_tiers_checkpoint_and_restart(
    harness: Any, kit: ModuleType
) -> None:
    index = IndexSettings(build_threads=2)
    space = harness.space(index=index)
    model = Model(kit)
    for sid in ("a", "b"):
        await space.open_session(sid, create=True)
    sizes = [137, 250, 63, 311, 200, 239, 300] * 2
    offset = 0
    for i, n in enumerate(sizes):
        await model.append(space, "ab"[i % 2], offset, n)
        offset += n
    assert offset == ROWS == space.visible

    def answer(stage: str, snap: Snapshot | None = None) -> Answer:
        return _answer(kit, space, model, snap or space.snapshot(), stage)

    reference = answer("all fresh")
    space = await harness.restart(space)  # everything replayed from the WAL
    assert space.backlog() == ROWS
    _same(reference, answer("restarted, WAL only"), "restarted, WAL only")

    before = space.snapshot()
    assert before.hnsw is None and before.indexed == 0
    assert await asyncio.to_thread(space.index_step, 1234) == 1234
    assert space.fresh is not None and space.fresh.blocks[0].first_row > 0  # a block dropped
    _same(reference, answer("1234 indexed"), "1234 indexed")
    _same(reference, answer("old snapshot", before), "snapshot from before indexing")
    while await asyncio.to_thread(space.index_step, 397):
        pass
    assert space.backlog() == 0
    _same(reference, answer("all indexed"), "all indexed")
    _same(reference, answer("old snapshot", before), "snapshot from before indexing")

    assert await asyncio.to_thread(space.checkpoint) == ROWS
    _same(reference, answer("checkpointed"), "checkpointed")
    space = await harness.restart(space)
    assert space.checkpoint_rows == ROWS and space.backlog() == 0
    _same(reference, answer("restarted from the checkpoint"), "restarted from the checkpoint")

    # new rows on top of the loaded index: fresh, partly indexed, checkpointed, restarted
    model.seqs = {sid: space.session_mark(sid) or 0 for sid in ("a", "b")}
    for i, n in enumerate((170, 230, 100)):
        await model.append(space, "ba"[i % 2], offset, n)
        offset += n
    assert space.visible == ROWS + 500
    second = answer("500 new rows, fresh")
    assert await asyncio.to_thread(space.index_step, 321) == 321
    _same(second, answer("321 of them indexed"), "321 of them indexed")
    await asyncio.to_thread(space.checkpoint)
    space = await harness.restart(space)
    assert space.checkpoint_rows == ROWS + 321 and space.backlog() == 179
    _same(second, answer("restarted: checkpoint + WAL tail"), "checkpoint + WAL tail")
    while await asyncio.to_thread(space.index_step, 64):
        pass
    _same(second, answer("all indexed again"), "all indexed again")


# ------------------------------------------------------------------------- end to end

E2E_DIM = 32
E2E_ROWS = 2000


async def _recall_all(
    client: EngramClient, space: str, cues: np.ndarray, k: int
) -> list[RecallResult]:
    return [await client.recall(space, cue, k, consistency="STRONG") for cue in cues]


async def _retry(call: Callable[[], Any], give_up_s: float = 60.0) -> Any:
    """Retries a call the restarting shard refuses (SHARD_UNAVAILABLE and friends)."""
    deadline = time.monotonic() + give_up_s
    while True:
        try:
            return await call()
        except ServerError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


def _checkpoint_rows(cluster: LocalCluster, space: str) -> int:
    path = cluster.shard_data_dir(0) / "spaces" / space / "ckpt" / "manifest.json"
    try:
        return int(json.loads(path.read_text())["rows"])
    except (OSError, ValueError, KeyError):
        return 0


async def test_same_answers_after_kill_9_of_the_shard(make_cluster: Any, kit: ModuleType) -> None:
    cluster: LocalCluster = make_cluster(
        shards=1, env={"ENGRAM_CHECKPOINT_EVERY": "700", "ENGRAM_CHECKPOINT_INTERVAL_S": "3600"}
    )
    space = "tiers-restart"
    corpus = kit.corpus(E2E_DIM)
    vectors = corpus.vectors(0, E2E_ROWS)
    cues = np.concatenate([corpus.vectors(70_000, 12), vectors[[5, 999, 1500, 1999]]])
    async with EngramClient(cluster.gateway_address) as client:
        stream = await client.open_stream(space)
        futs = []
        for lo in range(0, E2E_ROWS, 200):
            ids = [f"row-{r}" for r in range(lo, lo + 200)]
            futs.append(await stream.send(vectors[lo : lo + 200], ids=ids))
        acks = await asyncio.gather(*futs)
        assert max(a.first_lsn + a.count - 1 for a in acks) == E2E_ROWS
        await stream.close()

        # let the builder checkpoint part of the rows, so recovery = checkpoint + WAL tail
        give_up = time.monotonic() + 60
        while _checkpoint_rows(cluster, space) == 0:
            assert time.monotonic() < give_up, "no checkpoint was written"
            await asyncio.sleep(0.1)

        before = {k: await _recall_all(client, space, cues, k) for k in (10, 50)}
        stored = kit.normalise(vectors)
        for k, results in before.items():
            for qi, res in enumerate(results):
                assert res.snapshot_sequence == E2E_ROWS
                rows = [int(h.id.split("-")[1]) for h in res.hits]
                assert [h.lsn - 1 for h in res.hits] == rows
                exact = kit.exact_scores(stored, cues[qi])
                kit.assert_exact_topk(rows, [h.score for h in res.hits], exact, k, what=f"{qi}")

        old_pid = cluster.kill("shard-0")
        await asyncio.to_thread(cluster.wait_healthy, "shard-0", 120)
        assert cluster.pid("shard-0") != old_pid
        for k, results in before.items():
            after = [
                await _retry(
                    lambda cue=cue, k=k: client.recall(space, cue, k, consistency="STRONG")
                )
                for cue in cues
            ]
            for qi, (b, a) in enumerate(zip(results, after, strict=True)):
                what = f"cue {qi} k={k}"
                assert a.snapshot_sequence == b.snapshot_sequence == E2E_ROWS, what
                assert [h.id for h in a.hits] == [h.id for h in b.hits], what
                assert [h.lsn for h in a.hits] == [h.lsn for h in b.hits], what
                np.testing.assert_allclose(
                    [h.score for h in a.hits], [h.score for h in b.hits], atol=1e-4, err_msg=what
                )
