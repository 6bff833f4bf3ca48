"""The partitioned (IVF) fresh tier: large backlogs are scanned list by list, not row by row."""

from __future__ import annotations

import mmap
import threading
from types import ModuleType
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.common.settings import IndexSettings
from engram.corpus import Corpus
from engram.shard.fresh import (
    BLOCK_ROWS,
    LIST_STEP,
    SCRATCH_ROWS,
    FreshTier,
    Listing,
    Partitioning,
    _score_rows,
    block_memory,
    list_block,
    scan,
    train,
)

DIM = 32


def _normalised(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def _partition(tier: FreshTier, nlist: int, nprobe: int) -> Partitioning:
    full = [b for b in tier.snapshot() if b.full and len(b.data) == BLOCK_ROWS]
    assert len(full) >= 2
    ivf = Partitioning.learn(full[0].data, nlist, nprobe)
    for block in full:
        list_block(block, ivf)
    return ivf


def _tier(blocks: int) -> tuple[FreshTier, np.ndarray]:
    corpus = Corpus(DIM, seed=3)
    # the first blocks of a tier are small (1,024 rows and doubling): fill past them
    rows = _normalised(corpus.vectors(0, BLOCK_ROWS * blocks))
    tier = FreshTier(DIM)
    tier.append(rows)
    return tier, rows


def test_partitioned_scan_finds_what_the_exact_scan_finds() -> None:
    tier, rows = _tier(blocks=4)
    _partition(tier, nlist=256, nprobe=16)
    queries = _normalised(Corpus(DIM, seed=3).vectors(10 * BLOCK_ROWS, 100))
    hits = 0
    for q in queries:
        exact, _ = scan(tier.snapshot(), q, 0, len(rows), 10, probe=False)
        approx, scores = scan(tier.snapshot(), q, 0, len(rows), 10)
        assert list(scores) == sorted(scores, reverse=True)
        hits += len(set(exact) & set(approx))
    recall = hits / (10 * len(queries))
    assert recall >= 0.9, recall


def test_a_stored_vector_is_always_found_and_ranges_are_respected() -> None:
    tier, rows = _tier(blocks=3)
    _partition(tier, nlist=64, nprobe=4)
    rng = np.random.default_rng(1)
    for row in rng.integers(0, len(rows), 50):
        # the leaf a cue would be assigned to is always probed: a stored row's own leaf
        found, scores = scan(tier.snapshot(), rows[row], 0, len(rows), 1)
        assert found[0] == row and scores[0] > 0.999
    lo, hi = BLOCK_ROWS + 100, 2 * BLOCK_ROWS + 50
    found, _ = scan(tier.snapshot(), rows[5], lo, hi, 50)
    assert len(found) and all(lo <= r < hi for r in found)


def test_filters_apply_inside_partitioned_blocks() -> None:
    tier, rows = _tier(blocks=3)
    _partition(tier, nlist=16, nprobe=16)  # every list: must equal the exact scan
    even = lambda r: r % 2 == 0  # noqa: E731
    for q in rows[:20]:
        exact, _ = scan(tier.snapshot(), q, 0, len(rows), 10, even, probe=False)
        approx, _ = scan(tier.snapshot(), q, 0, len(rows), 10, even)
        assert list(approx) == list(exact)
        assert all(r % 2 == 0 for r in approx)


def test_blocks_keep_the_quantiser_they_were_listed_with() -> None:
    tier, rows = _tier(blocks=3)
    full = [b for b in tier.snapshot() if b.full and len(b.data) == BLOCK_ROWS]
    first = Partitioning.learn(full[0].data, 64, 64)
    flipped = Partitioning.learn(-full[0].data, 64, 64)  # a different quantiser per block
    list_block(full[0], first)
    list_block(full[1], flipped)
    for q in rows[:: len(rows) // 15][:15]:  # every leaf is probed: exact
        exact, _ = scan(tier.snapshot(), q, 0, len(rows), 10, probe=False)
        probed, _ = scan(tier.snapshot(), q, 0, len(rows), 10)
        assert list(probed) == list(exact)


def test_a_partly_listed_block_scans_its_newer_rows_exactly() -> None:
    corpus = Corpus(DIM, seed=6)
    rows = _normalised(corpus.vectors(0, 15 * 1024 + BLOCK_ROWS))
    tier = FreshTier(DIM)
    tier.append(rows[: 15 * 1024 + 5000])  # the last block holds 5,000 of its 16,384 rows
    block = tier.snapshot()[-1]
    ivf = Partitioning.learn(rows[:4096], 32, 32)  # every leaf: must equal the exact scan
    list_block(block, ivf)
    assert block.listing is not None and block.listing.covered == 5000
    tier.append(rows[15 * 1024 + 5000 :])  # rows appended after the listing
    n = len(rows)
    for q in rows[-20:]:
        exact, _ = scan(tier.snapshot(), q, 0, n, 10, probe=False)
        listed, _ = scan(tier.snapshot(), q, 0, n, 10)
        assert list(listed) == list(exact)
        assert listed[0] == int(np.flatnonzero((rows == q).all(axis=1))[0])
    lo = 15 * 1024 + 4000  # a range that starts inside the listed part
    found, _ = scan(tier.snapshot(), rows[lo + 10], lo, lo + 3000, 50)
    assert len(found) and all(lo <= r < lo + 3000 for r in found)


def test_partitioned_blocks_keep_every_row_in_row_order_for_the_index() -> None:
    tier, rows = _tier(blocks=3)
    _partition(tier, nlist=64, nprobe=4)
    lo, hi = 100, 2 * BLOCK_ROWS + 7  # spans partitioned blocks and the tail
    assert np.array_equal(tier.rows(lo, hi), rows[lo:hi])


def test_two_level_assignment_picks_the_best_leaf_of_the_nearest_coarse_centroid() -> None:
    tier, rows = _tier(blocks=2)
    ivf = Partitioning.learn(rows[:BLOCK_ROWS], nlist=64, nprobe=4)
    assert len(ivf.coarse) == 8 and ivf.nlist <= 64 and ivf.leaf_start[-1] == ivf.nlist
    sample = rows[:500]
    leaf, sims = ivf.assign(sample)
    assert np.allclose(sims, np.sum(sample * ivf.leaves[leaf], axis=1), atol=1e-5)
    coarse = np.argmax(sample @ ivf.coarse.T, axis=1)
    for r, c, got in zip(sample, coarse, leaf, strict=True):
        lo, hi = ivf.leaf_start[c], ivf.leaf_start[c + 1]
        assert lo <= got < hi
        assert got == lo + int(np.argmax(ivf.leaves[lo:hi] @ r))


def test_normalising_on_the_way_in_matches_normalised_rows() -> None:
    raw = Corpus(DIM, seed=5).vectors(0, 3000).astype(np.float32) * 3.0
    norms = np.linalg.norm(raw, axis=1)
    tier = FreshTier(DIM)
    tier.append(raw, norms)
    assert np.allclose(tier.rows(0, 3000), _normalised(raw), atol=1e-6)


def test_rows_like_the_training_rows_fit_as_well_and_drifted_rows_do_not() -> None:
    corpus = Corpus(DIM, seed=9)
    rows = _normalised(corpus.vectors(0, 3 * BLOCK_ROWS))
    ivf = Partitioning.learn(rows[:BLOCK_ROWS], nlist=256, nprobe=8)
    _, same = ivf.assign(rows[BLOCK_ROWS:])
    assert float(same.mean()) > ivf.fit - 0.02  # no refit for more of the same
    signs = np.where(np.random.default_rng(0).random(DIM) < 0.5, -1.0, 1.0).astype(np.float32)
    _, drifted = ivf.assign(rows[BLOCK_ROWS:] * signs)
    assert float(drifted.mean()) < ivf.fit - 0.2


async def test_a_space_partitions_its_backlog_and_learns_again_when_rows_drift(
    harness: Any, kit: ModuleType
) -> None:
    space = harness.space(
        index=IndexSettings(fresh_partition_rows=1, fresh_lists=64, fresh_nprobe=4)
    )
    await space.open_session("s", create=True)
    corpus = Corpus(DIM, seed=4)
    first = 15 * 1024 + BLOCK_ROWS  # the small first blocks, then one full block
    signs = np.where(np.random.default_rng(2).random(DIM) < 0.5, -1.0, 1.0).astype(np.float32)
    raw = np.concatenate(
        [corpus.vectors(0, first), corpus.vectors(first, BLOCK_ROWS + 5_000) * signs]
    ).astype(np.float32)
    for seq, lo in enumerate(range(0, len(raw), 5_000), start=1):
        await space.begin_append("s", seq, kit.make_batch(raw[lo : lo + 5_000]))
    while space.partition_step():
        pass
    blocks = space.snapshot().blocks
    quantisers = {id(b.listing.partitioning) for b in blocks if b.listing is not None}
    assert len(quantisers) == 2  # the sign-flipped block made the space learn again
    filling = blocks[-1]  # listed as it grows, with the newer quantiser
    assert not filling.full and filling.listing is not None
    assert filling.listing.covered == 5_000 and filling.listing.partitioning is space.partitioning
    snap = space.snapshot()
    stored = _normalised(raw)
    for row in [20_000, 25_000, first + 100, first + 9_000, first + BLOCK_ROWS + 4_000]:
        res = space.recall(snap, stored[row], 5)
        assert res.results[0].lsn == row + 1 and res.results[0].score > 0.999
        assert res.metadata.fresh_us > 0


async def test_a_block_drifting_as_it_fills_is_assigned_once_then_learnt_from(
    harness: Any, kit: ModuleType, monkeypatch: Any
) -> None:
    """Rows arriving while the partitioner runs: once the filling block's rows fit the quantiser
    badly, they are not assigned to it again step after step, nor once more when the block is
    full; the full block is learnt from at once."""
    space = harness.space(
        index=IndexSettings(fresh_partition_rows=1, fresh_lists=64, fresh_nprobe=4)
    )
    await space.open_session("s", create=True)
    corpus = Corpus(DIM, seed=4)
    first = 15 * 1024 + BLOCK_ROWS  # the small first blocks, then one full block
    signs = np.where(np.random.default_rng(2).random(DIM) < 0.5, -1.0, 1.0).astype(np.float32)
    raw = np.concatenate(
        [corpus.vectors(0, first), corpus.vectors(first, BLOCK_ROWS) * signs]
    ).astype(np.float32)
    assigned: list[int] = []
    assign = Partitioning.assign

    def counting(self: Partitioning, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assigned.append(len(rows))
        return assign(self, rows)

    monkeypatch.setattr(Partitioning, "assign", counting)
    seq = 0
    for lo in range(0, len(raw), 1_024):
        seq += 1
        await space.begin_append("s", seq, kit.make_batch(raw[lo : lo + 1_024]))
        while space.partition_step():
            pass
        if lo + 1_024 == first:
            learnt_from_first = space.partitioning
            assigned.clear()  # from here on, only the drifting block's rows arrive
    drifting = space.snapshot().blocks[-1]
    assert drifting.full and drifting.first_row == first
    assert drifting.listing is not None
    assert drifting.listing.partitioning is space.partitioning is not learnt_from_first
    # LIST_STEP rows assigned to the old quantiser to find the drift, then the new one's
    # assignment of the whole block it learnt from
    assert assigned == [LIST_STEP, BLOCK_ROWS], assigned


def test_training_on_a_strided_view_matches_training_on_a_copy() -> None:
    rows = _normalised(Corpus(DIM, seed=5).vectors(0, 4_096))
    strided = rows[::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_allclose(train(strided, 16, 4), train(strided.copy(), 16, 4), atol=1e-5)


def test_k_means_centroids_are_the_normalised_means_of_their_members() -> None:
    rows = _normalised(Corpus(DIM, seed=6).vectors(0, 2_000))
    centroids = train(rows, 8, iterations=3)
    # one more round by hand: each centroid of a further round is its members' mean direction
    nearest = np.argmax(rows @ centroids.T, axis=1)
    again = _mean_directions(rows, centroids, nearest)
    assert np.allclose(np.linalg.norm(centroids, axis=1), 1.0, atol=1e-5)
    # a fixed point is close: three rounds on clustered rows have nearly converged
    assert float(np.mean(np.sum(again * centroids, axis=1))) > 0.99


def _mean_directions(rows: np.ndarray, centroids: np.ndarray, nearest: np.ndarray) -> np.ndarray:
    out = centroids.copy()
    for c in range(len(centroids)):
        members = rows[nearest == c]
        if len(members):
            mean = members.sum(axis=0)
            out[c] = mean / np.linalg.norm(mean)
    return out


def test_fresh_blocks_are_zeroed_writable_and_of_their_own_memory() -> None:
    block = block_memory(1_024, DIM)
    assert block.shape == (1_024, DIM) and block.dtype == np.float32
    assert block.flags.writeable and block.flags.c_contiguous
    assert not block.any()
    block[7] = 1.0
    other = block_memory(1_024, DIM)
    assert not other.any()  # not a view of the first
    owner = block
    while isinstance(owner, np.ndarray):
        owner = owner.base
    # unmapped when the block goes, not kept by the allocator
    assert isinstance(owner, memoryview) and isinstance(owner.obj, mmap.mmap)


def test_probe_lists_hold_the_cues_own_leaf_and_mostly_its_nearest_leaves() -> None:
    rows = _normalised(Corpus(DIM, seed=8).vectors(0, 8_192))
    p = Partitioning.learn(rows, 256, 16)
    cues = rows[::97]
    own, _ = p.assign(cues)
    overlap = []
    for cue, leaf in zip(cues, own, strict=True):
        lists = p.lists_for(cue)
        assert leaf in lists and len(set(lists.tolist())) == len(lists) <= p.nprobe + 1
        best = set(np.argsort(-(p.leaves @ cue))[: p.nprobe].tolist())
        overlap.append(len(best & set(lists.tolist())) / p.nprobe)
    assert float(np.mean(overlap)) > 0.9  # the nearest coarse cells hold the nearest leaves


def test_the_last_block_is_retired_only_when_every_row_in_it_is_indexed() -> None:
    tier = FreshTier(DIM)
    rows = _normalised(Corpus(DIM, seed=9).vectors(0, 1_500))
    tier.append(rows)  # blocks of 1,024 (full) and 2,048 (476 rows)
    assert not tier.retire_tail(1_499)
    assert tier.retire_tail(1_500)
    assert [b.first_row for b in tier.snapshot()] == [0]  # full blocks wait for drop_below
    tier.drop_below(1_500)
    tier.append(rows[:10])
    assert [(b.first_row, len(b.data)) for b in tier.snapshot()] == [(1_500, 1_024)]
    np.testing.assert_array_equal(tier.rows(1_500, 1_510), rows[:10])
    assert not tier.retire_tail(1_500)  # rows 1,500.. are not indexed


def test_gathered_scores_match_fancy_indexing_in_every_thread_and_size() -> None:
    rng = np.random.default_rng(4)
    results: list[bool] = []

    def check() -> None:
        for dim in (DIM, 8):
            data = rng.standard_normal((SCRATCH_ROWS * 2, dim)).astype(np.float32)
            cue = rng.standard_normal(dim).astype(np.float32)
            for n in (0, 1, 100, SCRATCH_ROWS, SCRATCH_ROWS + 1):
                local = rng.choice(len(data), n, replace=False).astype(np.int32)
                got = _score_rows(data, local, cue)
                results.append(bool(np.allclose(got, data[local] @ cue, atol=1e-5)))

    threads = [threading.Thread(target=check) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 20 and all(results)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 70_000), st.lists(st.integers(0, 69_999), max_size=300), st.data())
def test_a_listing_names_each_leafs_positions_in_order(
    nlist: int, raw: list[int], data: st.DataObject
) -> None:
    """Leaf ``c``'s positions are ``order[offsets[c]:offsets[c + 1]]``, ascending, for any
    number of leaves (16-bit ones are sorted by radix, more by comparison)."""
    leaf = np.asarray([x % nlist for x in raw], np.int32)
    centroids = np.zeros((nlist, 1), np.float32)
    starts = np.asarray([0, nlist])
    listing = Listing.of(leaf, Partitioning(centroids[:1], centroids, starts, nprobe=1))
    assert listing.covered == len(leaf) and len(listing.offsets) == nlist + 1
    for c in set(leaf.tolist()) | {0, nlist - 1, data.draw(st.integers(0, nlist - 1))}:
        members = listing.order[listing.offsets[c] : listing.offsets[c + 1]]
        assert members.tolist() == np.flatnonzero(leaf == c).tolist()
    assert listing.offsets[-1] == len(leaf)
