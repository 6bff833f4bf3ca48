"""Rebalancing decisions: trigger and target, drain, scale-out, hotspots, limits, no flapping."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.control.assignment import default_shard
from engram.control.rebalance import (
    GIB,
    Cluster,
    InFlight,
    Load,
    Move,
    Plan,
    Policy,
    ShardState,
    ShardStatus,
    SpaceState,
    figure,
    plan,
    record_round,
    shard_loads,
)
from engram.control.simulate import converge, rest, settled_rounds

# Load figure = ingest rate, so the numbers below read as loads; the rest is the default.
POLICY = Policy(recall_weight=0.0, gib_weight=0.0)
# No limit on moves or bytes: a round goes as far as the rules let it.
UNLIMITED = replace(
    POLICY, max_concurrent_moves=10_000, max_moves_per_round=10_000, max_bytes_per_round=1 << 62
)
NOW = 1_000_000.0
NEW, DRAINING = ShardStatus.NEW, ShardStatus.DRAINING


def sp(
    name: str,
    owner: int,
    load: float,
    *,
    nbytes: int = 0,
    backlog: int = 0,
    last_moved: float | None = None,
) -> SpaceState:
    """A space whose ingest rate (its load figure under POLICY) is ``load``."""
    return SpaceState(name, owner, Load(ingest=load, bytes=nbytes, backlog=backlog), last_moved)


def cluster(
    shards: int | list[ShardState],
    *spaces: SpaceState,
    in_flight: tuple[InFlight, ...] = (),
    last_round: float | None = None,
    unfinished: bool = False,
) -> Cluster:
    listed = [ShardState(s) for s in range(shards)] if isinstance(shards, int) else shards
    return Cluster(tuple(listed), spaces, in_flight, last_round, unfinished)


def filled(shard: int, loads: list[float], prefix: str = "") -> list[SpaceState]:
    """Spaces ``<prefix>s<shard>-<i>`` on ``shard`` with the given loads."""
    return [sp(f"{prefix}s{shard}-{i:03d}", shard, x) for i, x in enumerate(loads)]


def ratios(c: Cluster, policy: Policy = POLICY) -> dict[int, float]:
    loads = shard_loads(c, policy)
    kept = [s.shard for s in c.shards if s.status is not DRAINING]
    mean = sum(loads.values()) / len(kept)
    return {s: loads[s] / mean for s in kept}


def run(c: Cluster, policy: Policy = UNLIMITED) -> tuple[Plan, Cluster]:
    p = plan(c, NOW, policy)
    return p, record_round(c, p, NOW)


# --- load model, trigger, target -----------------------------------------------------------


def test_the_load_figure_weighs_ingest_recall_and_bytes() -> None:
    load = Load(ingest=500.0, recall=3.0, bytes=2 * GIB, backlog=10**6)
    assert figure(load, Policy()) == 500.0 + 3.0 * 100.0 + 2 * 1000.0
    assert figure(load, Policy(ingest_weight=0.0, recall_weight=0.0)) == 2 * 1000.0
    # Four shards alike in ingest; shard 0 serves the recalls, so only the weights find it hot.
    spaces = [
        SpaceState(f"s{s}-{i}", s, Load(ingest=1000.0, recall=20.0 if s == 0 else 0.0))
        for s in range(4)
        for i in range(4)
    ]
    c = cluster(4, *spaces)
    assert plan(c, NOW, replace(UNLIMITED, recall_weight=100.0)).moves
    assert plan(c, NOW, replace(UNLIMITED, recall_weight=0.0)).moves == ()


def test_a_balanced_cluster_gets_no_move() -> None:
    c = cluster(4, *[s for shard in range(4) for s in filled(shard, [10, 20, 30])])
    p = plan(c, NOW, POLICY)
    assert p == Plan(hottest_before=1.0, hottest_after=1.0)


def test_a_hot_shard_sheds_to_the_coolest_shards_until_under_the_target() -> None:
    c = cluster(4, *filled(0, [30, 20, 10, 10, 5, 5]), *filled(1, [10]), *filled(2, [20]))
    p, after = run(c)
    assert p.hottest_before == pytest.approx(80 / 27.5)
    assert p.moves and all(m.source == 0 and m.reason.startswith("balance") for m in p.moves)
    assert max(ratios(after).values()) <= POLICY.target
    assert p.hottest_after == pytest.approx(max(ratios(after).values()))
    # The coolest shard (3, empty) gets the first space: the one closest to what brings one
    # of the two to the mean (shard 0 is 52.5 over it, shard 3 27.5 under it).
    assert p.moves[0] == Move("s0-000", 0, 3, p.moves[0].reason)


def test_an_imbalance_between_target_and_trigger_is_left_alone() -> None:
    def shaped(hot: int) -> Cluster:  # shard 0 at hot / 100 of the mean, in small spaces
        return cluster(
            4, *filled(0, [1] * hot), *filled(1, [100]), *filled(2, [100]),
            *filled(3, [200 - hot]),
        )  # fmt: skip

    assert plan(shaped(122), NOW, UNLIMITED).moves == ()
    assert plan(shaped(125), NOW, UNLIMITED).moves == ()  # at the trigger, not over it
    p, after = run(shaped(130))
    assert len(p.moves) == 10  # over the trigger: down to the target (120), not further
    assert ratios(after)[0] == pytest.approx(1.2)


def test_a_move_that_mostly_shifts_the_peak_is_not_made() -> None:
    # Shard 0 at 101 (over the trigger, mean 80.5): moving its 30 to shard 1 would leave
    # 71 / 90, the peak down by 11 only, less than half of what moved.
    c = cluster(2, *filled(0, [71, 30]), *filled(1, [60]))
    assert plan(c, NOW, UNLIMITED).moves == ()
    [move] = plan(c, NOW, replace(UNLIMITED, min_gain=0.0)).moves
    assert (move.space, move.target) == ("s0-001", 1)


def test_the_same_input_gives_the_same_plan_and_ties_go_to_the_lower_id() -> None:
    spaces = [*filled(0, [10, 10, 10, 10, 10, 10]), *filled(1, [10]), *filled(2, [10])]
    c = cluster(4, *spaces)
    p = plan(c, NOW, POLICY)
    # Equal spaces go lower id first; shard 3 (empty) first, then shards 1, 2 and 3 all at
    # 10: the lower id first.
    assert [(m.space, m.target) for m in p.moves] == [
        ("s0-000", 3),
        ("s0-001", 1),
        ("s0-002", 2),
        ("s0-003", 3),
    ]
    rng = random.Random(3)
    for _ in range(5):
        shuffled = list(spaces)
        rng.shuffle(shuffled)
        shards = list(c.shards)
        rng.shuffle(shards)
        assert plan(cluster(shards, *shuffled), NOW, POLICY) == p


# --- scale-out and drain -------------------------------------------------------------------


def test_a_new_empty_shard_is_filled_to_near_the_mean() -> None:
    # Four shards at 100 in spaces of 10; a fifth joins: the others are at 1.25 of the new
    # mean (80), at the trigger but not over it, so only the new shard asks for moves.
    spaces = [s for shard in range(4) for s in filled(shard, [10] * 10)]
    shards = [*(ShardState(s) for s in range(4)), ShardState(4, NEW)]
    p, after = run(cluster(shards, *spaces))
    share = ratios(after)
    assert all(m.target == 4 for m in p.moves)
    assert p.moves[0].reason.startswith("fill: new shard 4")
    assert POLICY.fill <= share[4] <= POLICY.target
    assert max(share.values()) <= POLICY.target
    assert plan(cluster(4 + 1, *spaces), NOW, UNLIMITED).moves == ()  # not marked new


def test_a_new_shard_fills_to_the_median_when_a_hot_space_lifts_the_mean() -> None:
    # Shard 0 holds a space of 400 alone: the mean (140) is over what the others carry
    # (100, in spaces of 10 and of 1). Filling to 0.9 of the mean would take the others'
    # small spaces one by one; the new shard stops at 0.9 of the median shard instead.
    donors = [s for shard in (1, 2, 3) for s in filled(shard, [10] * 9 + [1] * 10)]
    shards = [*(ShardState(s) for s in range(4)), ShardState(4, NEW)]
    p, after = run(cluster(shards, *filled(0, [400]), *donors))
    loads = shard_loads(after, POLICY)
    assert loads[4] >= POLICY.fill * sorted(loads[s] for s in range(4))[2]
    assert len(p.moves) == 9 and all(m.target == 4 for m in p.moves)


def test_engram_up_with_more_shards_on_existing_data_spreads_the_load() -> None:
    rng = random.Random(11)
    names = [f"space-{i:04d}" for i in range(400)]
    spaces = [sp(n, default_shard(n, 3), rng.uniform(1.0, 20.0)) for n in names]
    shards = [ShardState(s, NEW if s >= 3 else ShardStatus.ACTIVE) for s in range(6)]
    settled, plans, _ = converge(cluster(shards, *spaces), POLICY, NOW)
    share = ratios(settled)
    assert min(share[s] for s in (3, 4, 5)) >= POLICY.fill
    assert max(share.values()) <= POLICY.target
    assert all(len(p.moves) <= POLICY.max_moves_per_round for p in plans)


def test_a_draining_shard_empties_largest_first_onto_the_least_loaded_shards() -> None:
    # Balanced, far from the trigger: the drain moves anyway.
    c = cluster(
        [ShardState(0), ShardState(1), ShardState(2, DRAINING)],
        *filled(0, [50]), *filled(1, [40]), *filled(2, [10, 30, 20]),
    )  # fmt: skip
    p = plan(c, NOW, POLICY)
    assert [(m.space, m.source, m.target) for m in p.moves] == [
        ("s2-001", 2, 1),  # 30 onto 40
        ("s2-002", 2, 0),  # 20 onto 50
        ("s2-000", 2, 0),  # 10: 70 and 70, the lower id
    ]
    assert all(m.reason == "drain: shard 2 is being removed" for m in p.moves)
    assert shard_loads(record_round(c, p, NOW), POLICY)[2] == 0.0


def test_a_drain_keeps_to_the_limit_on_moves_in_flight() -> None:
    policy = replace(POLICY, max_concurrent_moves=2)
    shards = [ShardState(0), ShardState(1), ShardState(2, DRAINING)]
    c = cluster(shards, *filled(0, [5]), *filled(1, [5]), *filled(2, [1, 2, 3, 4, 5]))
    c = replace(c, in_flight=(InFlight("s2-004", 2, 1),))
    p = plan(c, NOW, policy)
    assert len(p.moves) == 1
    assert "s2-004" not in {m.space for m in p.moves}
    # The move in flight ends, the next rounds carry on, two at a time.
    c = record_round(replace(c, in_flight=()), p, NOW)
    landed = tuple(replace(s, owner=1) if s.space == "s2-004" else s for s in c.spaces)
    c = replace(c, spaces=landed)
    now = NOW
    while any(s.owner == 2 for s in c.spaces):
        now += 1.0
        p = plan(c, now, policy)
        assert 1 <= len(p.moves) <= 2
        c = record_round(c, p, now)
    assert plan(c, now + 1.0, policy) == Plan(
        hottest_before=1.04, hottest_after=1.04, deferred=plan(c, now + 1.0, policy).deferred
    )


def test_a_drain_ignores_the_cooldowns_and_balancing_waits() -> None:
    shards = [ShardState(0), ShardState(1), ShardState(2, DRAINING)]
    moved = sp("just-moved", 2, 10.0, last_moved=NOW - 1.0)
    c = cluster(shards, *filled(0, [100, 100]), *filled(1, [10]), moved, last_round=NOW - 1.0)
    p = plan(c, NOW, POLICY)
    assert [(m.space, m.target) for m in p.moves] == [("just-moved", 1)]
    assert "cooldown" in p.deferred  # shard 0 is far over the trigger, yet waits
    later = plan(c, NOW + POLICY.cluster_cooldown_s, POLICY)
    assert {m.source for m in later.moves} == {0, 2} and later.deferred == ""


# --- hotspots ------------------------------------------------------------------------------


def test_a_space_alone_over_the_target_stays_and_its_neighbours_move_off() -> None:
    c = cluster(4, *filled(0, [200, 30, 20, 1]), *filled(1, [50]), *filled(2, [50]))
    p, after = run(c)
    assert {m.space for m in p.moves} == {"s0-001", "s0-002"}  # not the hot one, not the dust
    [skip] = p.skips
    assert (skip.space, skip.shard) == ("s0-000", 0)
    assert "alone at 2.28x the mean" in skip.reason and "only move the hotspot" in skip.reason
    # Next round: nothing to do, and the plan still says why shard 0 stays hot.
    again = plan(after, NOW + rest(POLICY), UNLIMITED)
    assert again.moves == () and again.skips == p.skips


def test_a_hot_space_moves_only_when_that_lowers_its_peak_by_half_of_it() -> None:
    # Shard 0: a space of 200, over the target (156) alone, and 120 of neighbours.
    hot = [*filled(0, [200, 40, 40, 40]), *filled(2, [100]), *filled(3, [100])]
    # To the empty shard 1 it lowers shard 0's peak by 120, more than half of 200: it goes
    # (one move rather than three).
    p = plan(cluster(4, *hot), NOW, UNLIMITED)
    assert p.moves[0] == Move("s0-000", 0, 1, p.moves[0].reason) and not p.skips
    # With 60 on shard 1 it would lower it by 60 only: it stays, its neighbours go.
    p = plan(cluster(4, *hot, *filled(1, [60])), NOW, UNLIMITED)
    assert "s0-000" not in {m.space for m in p.moves} and p.moves
    assert [s.space for s in p.skips] == ["s0-000"]


def test_a_neighbour_barely_worth_moving_off_a_hot_shard_starts_no_round() -> None:
    # Shard 0: a space of 300, far over the target (120), 11 of dust and a neighbour; a
    # neighbour must lower the peak by 2% of 300 - 120 (3.6) to move. Shard 1 sits at 1.22
    # of the mean, between target and trigger: it moves only once a round has started.
    def shaped(neighbour: float) -> Cluster:
        dust = [1.0] * (15 - int(neighbour))
        return cluster(
            10, *filled(0, [300, neighbour, *dust]), *filled(1, [2] * 61),
            *(s for shard in range(2, 10) for s in filled(shard, [70])),
        )  # fmt: skip

    assert plan(shaped(4.0), NOW, UNLIMITED).moves == ()  # 0.4 over the least gain
    moved = plan(shaped(11.0), NOW, UNLIMITED).moves  # 7.4 over it: more than the band
    assert [m.space for m in moved][:1] == ["s0-001"] and {m.source for m in moved} == {0, 1}


def test_a_shard_no_allowed_move_relieves_is_reported() -> None:
    # Two spaces of 70 on shard 0, 60 on the others (mean 87, target 104): either space
    # would put its receiver at 130, over the target; an idle space moved would gain nothing.
    c = cluster(3, *filled(0, [70, 70, 0]), *filled(1, [60]), *filled(2, [60]))
    p = plan(c, NOW, UNLIMITED)
    assert p.moves == ()
    [skip] = p.skips
    assert (skip.space, skip.shard) == ("s0-000", 0)
    assert skip.reason.startswith("shard 0 at 1.62x the mean: no allowed move relieves it")
    assert plan(c, NOW, replace(UNLIMITED, target=1.5, trigger=1.5, min_gain=0.0)).moves


def test_a_drained_space_that_balancing_moves_on_moves_once() -> None:
    # The drain puts 3 on shard 1 and 2 on shard 2; balancing then moves the 9 (alone over
    # the target) to shard 2 and the 2 on to shard 1: one move of it, from shard 3.
    shards = [ShardState(0), ShardState(1), ShardState(2), ShardState(3, DRAINING)]
    c = cluster(shards, *filled(0, [8, 9]), *filled(3, [2, 3]))
    p = plan(c, NOW, UNLIMITED)
    assert [(m.space, m.source, m.target, m.reason.split(":")[0]) for m in p.moves] == [
        ("s3-001", 3, 1, "drain"),
        ("s3-000", 3, 1, "drain"),
        ("s0-001", 0, 2, "balance"),
    ]
    assert shard_loads(record_round(c, p, NOW), POLICY) == {0: 8.0, 1: 5.0, 2: 9.0, 3: 0.0}


# --- cooldowns and limits ------------------------------------------------------------------


def test_a_space_rests_after_a_move() -> None:
    def shaped(last_moved: float) -> Cluster:
        spaces = [sp(f"s0-{i}", 0, 10.0, last_moved=last_moved) for i in range(10)]
        return cluster(4, *spaces, *filled(1, [10]))

    assert plan(shaped(NOW - 1.0), NOW, POLICY).moves == ()
    assert plan(shaped(NOW - POLICY.space_cooldown_s), NOW, POLICY).moves


def test_the_cluster_rests_after_a_round() -> None:
    c = cluster(4, *filled(0, [10] * 10), *filled(1, [10]), unfinished=True)
    waiting = plan(replace(c, last_round=NOW - 60.0), NOW, POLICY)
    assert waiting.moves == () and waiting.unfinished
    assert waiting.deferred == "balancing waits 240 s for the cluster cooldown"
    assert plan(replace(c, last_round=NOW - 300.0), NOW, POLICY).moves


def test_a_round_cut_short_by_the_move_limit_is_finished_below_the_trigger() -> None:
    # Shard 0 at 1.6 of the mean in spaces of 1, two moves a round: rounds stop at the
    # limit while shard 0 is still over the target, and the next one carries on even
    # when shard 0 is no longer over the trigger.
    policy = replace(POLICY, max_moves_per_round=2)
    c = cluster(4, *filled(0, [1] * 160), *filled(1, [80]), *filled(2, [80]), *filled(3, [80]))
    now, plans = NOW, []
    while not plans or plans[-1].moves:
        now += rest(policy)
        plans.append(plan(c, now, policy))
        c = record_round(c, plans[-1], now)
    assert all(len(p.moves) <= 2 for p in plans)
    assert [p.unfinished for p in plans[-3:]] == [True, False, False]
    assert sum(len(p.moves) for p in plans) == 40
    assert ratios(c)[0] == pytest.approx(1.2)


def test_a_round_moves_at_most_its_bytes_but_a_bigger_space_alone() -> None:
    policy = replace(POLICY, max_bytes_per_round=1000)
    shards = [ShardState(0), ShardState(1), ShardState(2, DRAINING)]
    big = [sp(f"big-{i}", 2, 10.0, nbytes=5000) for i in range(2)]
    small = [sp(f"small-{i}", 2, 1.0, nbytes=400) for i in range(3)]
    c = cluster(shards, *big, *small)
    p = plan(c, NOW, policy)
    assert [m.space for m in p.moves] == ["big-0"]
    p = plan(record_round(c, p, NOW), NOW + 1.0, policy)
    assert [m.space for m in p.moves] == ["big-1"]
    c = cluster(shards, *small)
    assert [m.space for m in plan(c, NOW, policy).moves] == ["small-0", "small-1"]


def test_moves_in_flight_count_at_their_target_and_stay_put() -> None:
    c = cluster(3, *filled(0, [100, 10, 10]), *filled(1, [10]), *filled(2, [10]))
    flying = replace(c, in_flight=(InFlight("s0-000", 0, 1),))
    assert shard_loads(flying, POLICY) == {0: 20.0, 1: 110.0, 2: 10.0}
    assert "s0-000" not in {m.space for m in plan(flying, NOW, UNLIMITED).moves}
    full = plan(flying, NOW, replace(POLICY, max_concurrent_moves=1))
    assert full.moves == () and "move limit" in full.deferred
    # A space moving onto a hot shard counts there, and stays put while it moves.
    c = cluster(3, *filled(0, [10] * 10), *filled(1, [5]), in_flight=(InFlight("s1-000", 1, 0),))
    moved = {m.space for m in plan(c, NOW, UNLIMITED).moves}
    assert len(moved) == 7 and "s1-000" not in moved


def test_a_shard_behind_on_indexing_receives_nothing() -> None:
    spaces = [*filled(0, [10] * 10), *filled(1, [10]), *filled(2, [20])]
    behind = [ShardState(0), ShardState(1, overhead=Load(backlog=10**6)), ShardState(2)]
    assert 1 in {m.target for m in plan(cluster(3, *spaces), NOW, POLICY).moves}
    assert {m.target for m in plan(cluster(behind, *spaces), NOW, POLICY).moves} == {2}
    # The space's own un-indexed rows count too.
    late = [sp(f"late-{i}", 0, 10.0, backlog=300_000) for i in range(10)]
    nearly = [ShardState(0), ShardState(1, overhead=Load(backlog=300_000)), ShardState(2)]
    c = cluster(nearly, *late, *filled(1, [10]), *filled(2, [20]))
    assert {m.target for m in plan(c, NOW, POLICY).moves} == {2}


def test_a_draining_shards_overhead_leaves_with_it() -> None:
    # Shard 0 at 1.3 of the mean of shards 0 and 1; shard 2's overhead is not theirs to share.
    shards = [ShardState(0), ShardState(1), ShardState(2, DRAINING, overhead=Load(ingest=300.0))]
    c = cluster(shards, *filled(0, [10] * 13), *filled(1, [70]))
    assert len(plan(c, NOW, UNLIMITED).moves) == 1


def test_a_shards_overhead_counts_but_never_moves() -> None:
    shards = [ShardState(0, overhead=Load(ingest=300.0)), ShardState(1), ShardState(2)]
    c = cluster(shards, *filled(0, [10, 10]), *filled(1, [50]), *filled(2, [50]))
    assert shard_loads(c, POLICY)[0] == 320.0
    p = plan(c, NOW, UNLIMITED)
    assert {m.space for m in p.moves} == {"s0-000", "s0-001"}


# --- no flapping ---------------------------------------------------------------------------


@st.composite
def clusters(draw: st.DrawFn) -> Cluster:
    n = draw(st.integers(2, 6))
    status = st.sampled_from([ShardStatus.ACTIVE] * 4 + [NEW, DRAINING])
    statuses = draw(st.lists(status, min_size=n, max_size=n))
    if all(s is DRAINING for s in statuses):
        statuses[0] = ShardStatus.ACTIVE
    loads = draw(st.lists(st.integers(0, 100), max_size=40))
    owners = draw(st.lists(st.integers(0, n - 1), min_size=len(loads), max_size=len(loads)))
    placed = enumerate(zip(owners, loads, strict=True))
    spaces = [sp(f"x{i:02d}", owner, float(x)) for i, (owner, x) in placed]
    return cluster([ShardState(s, st_) for s, st_ in enumerate(statuses)], *spaces)


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_each_move_leaves_its_receiver_cooler_than_its_source_was(c: Cluster) -> None:
    p = plan(c, NOW, UNLIMITED)
    load = shard_loads(c, UNLIMITED)
    figures = {s.space: s.load.ingest for s in c.spaces}
    where = {s.space: s.owner for s in c.spaces}
    status = {s.shard: s.status for s in c.shards}
    assert len({m.space for m in p.moves}) == len(p.moves)
    for m in p.moves:
        assert where[m.space] == m.source and status[m.target] is not DRAINING
        before = load[m.source]
        load[m.source] -= figures[m.space]
        load[m.target] += figures[m.space]
        if not m.reason.startswith("drain"):
            assert load[m.target] < before
    assert all(load[s] == 0 for s in load if status[s] is DRAINING)


@settings(max_examples=300, deadline=None)
@given(clusters())
def test_steady_load_after_a_round_asks_for_nothing(c: Cluster) -> None:
    first, after = run(c)
    assert not first.unfinished
    again = plan(after, NOW + rest(UNLIMITED), UNLIMITED)
    assert again.moves == ()


def test_load_noise_of_a_few_percent_does_not_move_spaces_back_and_forth() -> None:
    rng = random.Random(5)
    names = [f"space-{i:03d}" for i in range(300)]
    spaces = [sp(n, default_shard(n, 12), 100.0 / (rank + 1)) for rank, n in enumerate(names)]
    settled, plans, now = converge(cluster(12, *spaces), POLICY, NOW)
    assert sum(len(p.moves) for p in plans) > 0
    assert settled_rounds(settled, POLICY, now, 50, 0.0, seed=1).total() == 0
    noisy = settled_rounds(settled, POLICY, now, 50, 0.03, seed=rng.randrange(1 << 30))
    assert noisy.total() <= 2 and max(noisy.values(), default=0) <= 1


# --- bad input -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shards", "spaces", "in_flight", "message"),
    [
        (2, [sp("a", 0, 1.0), sp("b", 5, 1.0)], (), "space 'b' is owned by unknown shard 5"),
        (2, [sp("a", 0, 1.0), sp("a", 1, 1.0)], (), "space 'a' is listed twice"),
        ([ShardState(0), ShardState(0)], [], (), "shard 0 is listed twice"),
        (2, [sp("a", 0, -1.0)], (), "space 'a' has ingest = -1.0"),
        (2, [sp("a", 0, float("nan"))], (), "space 'a' has ingest = nan"),
        (
            [ShardState(0, overhead=Load(backlog=-3)), ShardState(1)],
            [],
            (),
            "shard 0 has backlog = -3",
        ),
        (2, [sp("a", 0, 1.0)], (InFlight("zz", 0, 1),), "space 'zz' names an unknown space"),
        (
            3,
            [sp("a", 2, 1.0)],
            (InFlight("a", 0, 1),),
            "space 'a': the space's owner is shard 2",
        ),
        (2, [sp("a", 0, 1.0)], (InFlight("a", 0, 7),), "from shard 0 to shard 7"),
        ([ShardState(0, DRAINING)], [sp("a", 0, 1.0)], (), "every shard is draining"),
    ],
)
def test_bad_input_is_refused_naming_the_item(
    shards: int | list[ShardState],
    spaces: list[SpaceState],
    in_flight: tuple[InFlight, ...],
    message: str,
) -> None:
    c = cluster(shards, *spaces, in_flight=in_flight)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan(c, NOW)
    with pytest.raises(ValueError, match="space|shard"):
        shard_loads(c)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"target": 0.9}, "Policy.target must be >= 1, got 0.9"),
        ({"trigger": 1.1}, "Policy.trigger must be >= target, got 1.1"),
        ({"min_gain": 2.0}, r"Policy.min_gain must be in \[0, 1\]"),
        ({"max_moves_per_round": 0}, "Policy.max_moves_per_round must be >= 1, got 0"),
        ({"recall_weight": float("inf")}, "Policy.recall_weight must be >= 0, got inf"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_field(change: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(Policy(), **change)
