"""Scale simulation of the rebalancer: Zipf-skewed spaces over hash-assigned shards.

Builds a cluster whose spaces' loads follow a Zipf law (the space of rank k carries k^-s of
the load), placed by :func:`~engram.control.assignment.default_shard`; runs
:func:`~engram.control.rebalance.plan` round after round, each round's moves finished and the
clock past the cooldowns before the next, until no move is proposed; then runs more rounds on
steady and on noisy loads to count the moves a settled cluster still makes. Pure (a seeded
``random.Random``, a simulated clock). ``python -m engram.control.simulate`` prints the
figures; ``tests/control/test_rebalance_scale.py`` asserts on them.
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from dataclasses import dataclass, replace

from engram.control.assignment import default_shard
from engram.control.rebalance import (
    GIB,
    Cluster,
    Load,
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


@dataclass(frozen=True)
class Workload:
    spaces: int = 10_000
    shards: int = 64
    # Zipf exponent of the load over the spaces' ranks.
    zipf_s: float = 1.1
    seed: int = 7
    # Cluster totals, split over the spaces by rank (each dimension with its own jitter).
    ingest: float = 400_000.0
    recalls: float = 2_000.0
    bytes: int = 128 * GIB
    # Rounds run on the settled cluster, and the noise of the noisy ones (+/- fraction).
    settled_rounds: int = 50
    noise: float = 0.03
    # Shards added to, then (separately) drained from, the settled cluster.
    added: int = 8
    drained: int = 8


@dataclass(frozen=True)
class Balance:
    # Shard load figures over the mean (of the shards that are not draining).
    hottest: float
    coolest: float
    # The hottest shard whose biggest space alone is within the target.
    hottest_unheld: float
    # Shards over the target held up by a space alone over it.
    held: int


@dataclass(frozen=True)
class Report:
    spaces: int
    shards: int
    # From the hash assignment to the first round that proposes nothing.
    rounds: int
    moves: int
    bytes_moved: int
    bytes_total: int
    before: Balance
    after: Balance
    # Moves proposed over the settled rounds, steady and noisy, and the most any space made.
    steady_moves: int
    noisy_moves: int
    noisy_most_per_space: int
    # Shards added to the settled cluster: rounds and moves until they are filled, and the
    # least loaded of them over the mean then.
    scale_out_rounds: int
    scale_out_moves: int
    scale_out_new_least: float
    # Shards drained from the settled cluster: rounds, moves, spaces left on them (none
    # expected) and the balance after.
    drain_rounds: int
    drain_moves: int
    drain_left: int
    after_drain: Balance
    final: Cluster


def zipf_cluster(workload: Workload) -> Cluster:
    """Spaces ``space-00000``...; load ranks shuffled, owners by the default hash."""
    rng = random.Random(workload.seed)
    ranks = list(range(1, workload.spaces + 1))
    rng.shuffle(ranks)
    weights = [r**-workload.zipf_s for r in ranks]
    total = sum(weights)

    def jitter() -> float:
        return rng.lognormvariate(0.0, 0.3)

    spaces = []
    for i, w in enumerate(weights):
        share = w / total
        space = f"space-{i:05d}"
        load = Load(
            ingest=workload.ingest * share * jitter(),
            recall=workload.recalls * share * jitter(),
            bytes=int(workload.bytes * share * jitter()),
        )
        spaces.append(SpaceState(space, default_shard(space, workload.shards), load))
    shards = tuple(ShardState(s) for s in range(workload.shards))
    return Cluster(shards, tuple(spaces))


def with_noise(cluster: Cluster, rng: random.Random, noise: float) -> Cluster:
    """The cluster with each space's rates and bytes off by up to +/- ``noise``."""

    def off() -> float:
        return 1.0 + rng.uniform(-noise, noise)

    spaces = tuple(
        replace(
            s,
            load=replace(
                s.load,
                ingest=s.load.ingest * off(),
                recall=s.load.recall * off(),
                bytes=int(s.load.bytes * off()),
            ),
        )
        for s in cluster.spaces
    )
    return replace(cluster, spaces=spaces)


def rest(policy: Policy) -> float:
    """Simulated seconds between rounds: past both cooldowns."""
    return max(policy.space_cooldown_s, policy.cluster_cooldown_s) + 1.0


def converge(
    cluster: Cluster, policy: Policy, now: float = 0.0, max_rounds: int = 1_000
) -> tuple[Cluster, list[Plan], float]:
    """Rounds until one proposes no move and leaves no work: the final cluster, the plans
    (the last one empty) and the clock."""
    plans: list[Plan] = []
    for _ in range(max_rounds):
        now += rest(policy)
        p = plan(cluster, now, policy)
        plans.append(p)
        cluster = record_round(cluster, p, now)
        if not p.moves and not p.unfinished:
            return cluster, plans, now
    raise RuntimeError(f"no convergence in {max_rounds} rounds")


def balance(cluster: Cluster, policy: Policy) -> Balance:
    loads = shard_loads(cluster, policy)
    kept = [s.shard for s in cluster.shards if s.status is not ShardStatus.DRAINING]
    mean = sum(loads.values()) / len(kept)
    top = dict.fromkeys(loads, 0.0)
    for s in cluster.spaces:
        top[s.owner] = max(top[s.owner], figure(s.load, policy))
    cap = policy.target * mean
    held = [s for s in kept if loads[s] > cap and top[s] > cap]
    return Balance(
        hottest=max(loads[s] for s in kept) / mean,
        coolest=min(loads[s] for s in kept) / mean,
        hottest_unheld=max((loads[s] for s in kept if s not in held), default=0.0) / mean,
        held=len(held),
    )


def settled_rounds(
    cluster: Cluster, policy: Policy, now: float, rounds: int, noise: float, seed: int
) -> Counter[str]:
    """Moves per space over ``rounds`` rounds whose loads are off by up to ``noise``."""
    rng = random.Random(seed)
    moved = Counter[str]()
    for _ in range(rounds):
        now += rest(policy)
        observed = with_noise(cluster, rng, noise) if noise else cluster
        p = plan(observed, now, policy)
        moved.update(m.space for m in p.moves)
        cluster = record_round(cluster, p, now)
    return moved


def simulate(workload: Workload | None = None, policy: Policy | None = None) -> Report:
    workload = workload or Workload()
    policy = policy or Policy()
    start = zipf_cluster(workload)
    sizes = {s.space: s.load.bytes for s in start.spaces}
    settled, plans, now = converge(start, policy)
    moves = [m for p in plans for m in p.moves]
    steady = settled_rounds(settled, policy, now, workload.settled_rounds, 0.0, workload.seed)
    noisy = settled_rounds(
        settled, policy, now, workload.settled_rounds, workload.noise, workload.seed
    )

    n = workload.shards
    added = tuple(ShardState(s, ShardStatus.NEW) for s in range(n, n + workload.added))
    grown, grow_plans, _ = converge(replace(settled, shards=settled.shards + added), policy, now)
    loads = shard_loads(grown, policy)
    grown_mean = sum(loads.values()) / len(loads)

    drained = {s.shard for s in settled.shards[n - workload.drained :]}
    draining = tuple(
        replace(s, status=ShardStatus.DRAINING) if s.shard in drained else s for s in settled.shards
    )
    shrunk, drain_plans, _ = converge(replace(settled, shards=draining), policy, now)

    return Report(
        spaces=workload.spaces,
        shards=n,
        rounds=len(plans),
        moves=len(moves),
        bytes_moved=sum(sizes[m.space] for m in moves),
        bytes_total=sum(sizes.values()),
        before=balance(start, policy),
        after=balance(settled, policy),
        steady_moves=steady.total(),
        noisy_moves=noisy.total(),
        noisy_most_per_space=max(noisy.values(), default=0),
        scale_out_rounds=len(grow_plans),
        scale_out_moves=sum(len(p.moves) for p in grow_plans),
        scale_out_new_least=min(loads[s.shard] for s in added) / grown_mean,
        drain_rounds=len(drain_plans),
        drain_moves=sum(len(p.moves) for p in drain_plans),
        drain_left=sum(1 for s in shrunk.spaces if s.owner in drained),
        after_drain=balance(shrunk, policy),
        final=settled,
    )


def format_report(report: Report, workload: Workload, policy: Policy) -> str:
    def shape(b: Balance) -> str:
        return (
            f"hottest {b.hottest:.2f} ({b.held} shards held up by one space alone over the "
            f"target), hottest of the others {b.hottest_unheld:.2f}, coolest {b.coolest:.2f}"
        )

    moved, total = report.bytes_moved, report.bytes_total
    return "\n".join(
        [
            f"{report.spaces:,} spaces, Zipf s={workload.zipf_s:g}, on {report.shards} shards "
            f"by hash; trigger {policy.trigger:g}, target {policy.target:g}, "
            f"{policy.max_moves_per_round} moves a round",
            f"load / mean before:  {shape(report.before)}",
            f"load / mean after:   {shape(report.after)}",
            f"converged in {report.rounds} rounds: {report.moves:,} moves, "
            f"{moved / GIB:.1f} GiB moved ({moved / total:.1%} of {total / GIB:.0f} GiB)",
            f"{workload.settled_rounds} more rounds: steady load {report.steady_moves} moves, "
            f"+/-{workload.noise:.0%} noise {report.noisy_moves} moves "
            f"(at most {report.noisy_most_per_space} per space)",
            f"scale-out +{workload.added} shards: {report.scale_out_moves} moves in "
            f"{report.scale_out_rounds} rounds, least loaded new shard "
            f"{report.scale_out_new_least:.2f} x the mean",
            f"drain {workload.drained} shards: {report.drain_moves} moves in "
            f"{report.drain_rounds} rounds; after: {shape(report.after_drain)}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spaces", type=int, default=Workload.spaces)
    parser.add_argument("--shards", type=int, default=Workload.shards)
    parser.add_argument("--zipf", type=float, default=Workload.zipf_s, help="Zipf exponent")
    parser.add_argument("--seed", type=int, default=Workload.seed)
    args = parser.parse_args(argv)
    workload = Workload(spaces=args.spaces, shards=args.shards, zipf_s=args.zipf, seed=args.seed)
    policy = Policy()
    print(format_report(simulate(workload, policy), workload, policy))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
