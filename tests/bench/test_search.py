"""``--find-max``'s search and the SLO verdict of a step, on made-up telemetry (no processes),
and the reason a REJECTED ack gives."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engram.bench import search, tradeoff
from engram.bench.config import parse


def _rates(start: float, factor: float, max_steps: int, capacity: float) -> list[float]:
    """The rates the search offers to a cluster that holds the SLO up to ``capacity``."""
    finder = search.RateSearch(start, factor, max_steps)
    rates: list[float] = []
    rate: float | None = finder.rate
    while rate is not None:
        rates.append(rate)
        rate = finder.next(rate <= capacity)
    return rates


def test_steps_up_then_bisects_until_within_resolution() -> None:
    rates = _rates(20_000, 1.5, 20, capacity=50_000)
    assert rates[:4] == [20_000, 30_000, 45_000, 67_500]  # up until one fails
    passed = max(r for r in rates if r <= 50_000)
    failed = min(r for r in rates if r > 50_000)
    assert failed - passed <= search.RESOLUTION * failed  # stopped once close enough
    assert 45_000 <= passed <= 50_000 < failed


def test_max_steps_bounds_the_search_and_a_failing_first_step_bisects_down() -> None:
    assert len(_rates(20_000, 1.5, 5, capacity=1e9)) == 5
    assert _rates(1000, 2, 3, capacity=0) == [1000, 500, 250]


@dataclass
class _Tel:
    acks: list[tuple[Any, ...]] = field(default_factory=list)
    recalls: list[tuple[Any, ...]] = field(default_factory=list)
    vis: list[tuple[Any, ...]] = field(default_factory=list)


def _telemetry(rate: float, recall_s: float, vis_s: float, failed: int, missed: int) -> _Tel:
    """10 s of acks at ``rate`` (batches of 1,000), 300 recalls and 300 visibility samples of
    the given latencies, ``failed`` of the recalls failed and ``missed`` samples never found."""
    tel = _Tel()
    per_s = int(rate // 1000)
    for i in range(10 * per_s):
        t = i / per_s
        tel.acks.append((0, i, t, t, t + 0.05, 1000, True, 1))
    for i in range(300):
        t = i / 30
        tel.recalls.append((t, recall_s, 0, 0, 0, 0, i >= failed, None))
        found = None if i < missed else t + vis_s
        tel.vis.append((0, t, t, t, found, 1, t))
    return tel


def _judge(tel: _Tel, rate: float) -> dict[str, Any]:
    return search.judge(tel, parse(["--find-max"]), rate, 0.0, 10.0)


def test_a_step_holds_the_slo_only_if_every_bound_holds() -> None:
    ok = _judge(_telemetry(10_000, 0.005, 0.02, 0, 0), 10_000)
    assert ok["keeps_up"] and ok["held"] == {"acked": True, "recall": True, "visibility": True}
    assert ok["acked"] == 10_000 and ok["recalls"] == 300

    short = _judge(_telemetry(9_000, 0.005, 0.02, 0, 0), 10_000)  # 10 % not acked
    assert short["held"]["acked"] is False and not short["keeps_up"]
    slow = _judge(_telemetry(10_000, 0.030, 0.02, 0, 0), 10_000)
    assert slow["held"] == {"acked": True, "recall": False, "visibility": True}
    assert slow["recall_p99_ms"] == 30.0


def test_failed_recalls_and_missed_samples_count_as_infinitely_slow() -> None:
    # two failures in 300 are within the 1 % a P99 leaves out; four are not
    assert _judge(_telemetry(10_000, 0.005, 0.02, 2, 0), 10_000)["held"]["recall"] is True
    failing = _judge(_telemetry(10_000, 0.005, 0.02, 4, 0), 10_000)
    assert failing["held"]["recall"] is False and failing["recall_p99_ms"] is None
    assert failing["recalls_failed"] == 4
    missing = _judge(_telemetry(10_000, 0.005, 0.02, 0, 4), 10_000)
    assert missing["held"]["visibility"] is False and missing["visibility_missed"] == 4
    assert _judge(_telemetry(10_000, 0.005, 0.02, 0, 2), 10_000)["held"]["visibility"] is True


def test_the_scenario_sets_the_recall_rate_unless_given() -> None:
    assert parse([]).recall_rate == 10
    assert parse(["--scenario", "recall-heavy"]).recall_rate == 100
    assert parse(["--scenario", "recall-heavy", "--recall-rate", "50"]).recall_rate == 50
    assert parse(["--find-max"]).step_seconds == 300


def test_the_reason_of_a_rejected_ack() -> None:
    detail = "batch 7: NORMAL priority batch refused: memory: 1.2 GB of 1 GB; retry in 50 ms"
    assert tradeoff._reason(detail) == "memory"
    assert tradeoff._reason("batch 3: key over 500 obs/s; retry in 20 ms") == "key over N obs/s"
