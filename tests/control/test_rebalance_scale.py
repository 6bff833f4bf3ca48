"""The rebalancer at scale: 10,000 Zipf-skewed spaces over 64 hash-assigned shards.

One simulation (``engram.control.simulate``, about 8 s) feeds every test here; its report is
printed (``pytest -s`` shows it; ``python -m engram.control.simulate`` prints the same).
"""

from __future__ import annotations

import time

import pytest

from engram.control.rebalance import Policy, figure, shard_loads
from engram.control.simulate import Report, Workload, format_report, simulate

WORKLOAD = Workload()
POLICY = Policy()


@pytest.fixture(scope="module")
def report() -> Report:
    started = time.monotonic()
    result = simulate(WORKLOAD, POLICY)
    elapsed = time.monotonic() - started
    print(f"\n{format_report(result, WORKLOAD, POLICY)}\n(simulated in {elapsed:.1f} s)")
    assert elapsed < 30.0
    return result


def test_the_simulation_is_of_the_size_asked_for(report: Report) -> None:
    assert (report.spaces, report.shards) == (10_000, 64)
    assert len(report.final.spaces) == 10_000 and len(report.final.shards) == 64
    assert report.before.hottest > 2 * POLICY.trigger  # the hash assignment is skewed


def test_it_converges_under_the_target_but_for_spaces_alone_over_it(report: Report) -> None:
    cluster = report.final
    loads = shard_loads(cluster, POLICY)
    mean = sum(loads.values()) / len(loads)
    top = dict.fromkeys(loads, 0.0)
    for space in cluster.spaces:
        top[space.owner] = max(top[space.owner], figure(space.load, POLICY))
    over = {s for s in loads if loads[s] > POLICY.target * mean}
    assert over, "the Zipf head holds spaces hotter than the target alone"
    assert all(top[s] > POLICY.target * mean for s in over), {
        s: (round(loads[s] / mean, 3), round(top[s] / mean, 3)) for s in over
    }
    assert report.after.hottest_unheld <= POLICY.target + 1e-9
    assert report.after.held == len(over)


def test_it_converges_in_few_rounds_moving_little(report: Report) -> None:
    assert 0 < report.rounds <= 60
    assert 0 < report.moves <= 500
    assert report.bytes_moved <= 0.15 * report.bytes_total


def test_a_settled_cluster_stays_put(report: Report) -> None:
    assert report.steady_moves == 0
    assert report.noisy_moves <= 20  # +/-3 % on every space's figures, every round
    assert report.noisy_most_per_space <= 1  # none moved back and forth


def test_new_shards_fill_and_drained_shards_empty(report: Report) -> None:
    assert report.scale_out_new_least >= 0.5  # the median shard carries 0.7 of the mean
    assert report.drain_moves >= 1_000 and report.drain_left == 0  # ~1,250 spaces
    assert report.after_drain.hottest_unheld <= POLICY.trigger


def test_the_report_gives_the_figures(report: Report) -> None:
    text = format_report(report, WORKLOAD, POLICY)
    for figure_text in (
        f"converged in {report.rounds} rounds",
        f"{report.moves:,} moves",
        f"hottest {report.before.hottest:.2f}",
        f"hottest of the others {report.after.hottest_unheld:.2f}",
        "steady load 0 moves",
    ):
        assert figure_text in text
