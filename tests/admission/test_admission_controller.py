"""AdmissionController: pressure, levels with hysteresis, lane shedding order, retry-after."""

from __future__ import annotations

import pytest

from engram.common.settings import AdmissionSettings, LaneLimits
from engram.contract.errors import OverloadedError
from engram.shard import admission as adm
from engram.shard.admission import AdmissionController
from engram.v1 import streaming_pb2 as pb

MB = 1 << 20
HIGH, NORMAL, LOW = pb.PRIORITY_HIGH, pb.PRIORITY_NORMAL, pb.PRIORITY_LOW


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def controller(budget: int = 100 * MB, dwell: float = 0.5) -> tuple[AdmissionController, Clock]:
    clock = Clock()
    big = LaneLimits(10**9, 10**9, 1 << 50, 1 << 50)
    settings = AdmissionSettings(
        memory_budget_bytes=budget, high=big, normal=big, low=big, min_dwell_s=dwell
    )
    return AdmissionController(settings, clock), clock


def fill(c: AdmissionController, nbytes: int) -> None:
    """Puts ``nbytes`` into the fresh tier (admitted and made durable)."""
    c.admit(HIGH, 1, 0)
    c.settle(HIGH, 1, 0, nbytes)


def test_levels_follow_pressure_of_the_memory_budget() -> None:
    c, _ = controller()
    seen = []
    c.listeners.append(lambda s: seen.append(s.level))
    fill(c, 40 * MB)
    assert c.level == adm.NORMAL
    fill(c, 15 * MB)  # 0.55
    assert c.level == adm.WARNING
    fill(c, 30 * MB)  # 0.85
    assert c.level == adm.CRITICAL
    fill(c, 11 * MB)  # 0.96
    assert c.level == adm.OVERLOADED
    assert seen == [adm.WARNING, adm.CRITICAL, adm.OVERLOADED]
    assert c.pressure == pytest.approx(0.96)


def test_hysteresis_and_dwell_keep_the_level_from_flapping() -> None:
    c, clock = controller(dwell=0.5)
    fill(c, 96 * MB)
    assert c.level == adm.OVERLOADED
    changes = []
    c.listeners.append(lambda s: changes.append(s.level))
    # oscillate just around the OVERLOADED threshold: no change at all
    for _ in range(50):
        clock.now += 0.01
        c.indexed(3 * MB)  # 0.93: below 0.95 but above 0.95 * 0.9
        fill(c, 3 * MB)  # 0.96
    assert changes == []
    # well below the threshold, but before the dwell time: still no change
    c, clock = controller(dwell=0.5)
    fill(c, 96 * MB)
    c.indexed(20 * MB)  # 0.76
    assert c.level == adm.OVERLOADED
    clock.now += 0.6
    c.tick()
    assert c.level == adm.CRITICAL  # 0.76 is below 0.95 * 0.9 but not below 0.8 * 0.9


def test_steps_down_only_below_each_threshold_times_hysteresis() -> None:
    c, clock = controller(dwell=0.0)
    fill(c, 96 * MB)
    c.indexed(10 * MB)  # 0.86 >= 0.95 * 0.9 = 0.855: stays OVERLOADED
    assert c.level == adm.OVERLOADED
    c.indexed(2 * MB)  # 0.84 < 0.855 and >= 0.8 * 0.9 = 0.72: CRITICAL
    assert c.level == adm.CRITICAL
    c.indexed(14 * MB)  # 0.70 < 0.72: WARNING (0.70 >= 0.45)
    assert c.level == adm.WARNING
    c.indexed(30 * MB)  # 0.40 < 0.45: NORMAL
    assert c.level == adm.NORMAL


def test_low_is_shed_before_normal_before_high() -> None:
    c, _ = controller()
    fill(c, 85 * MB)  # CRITICAL
    with pytest.raises(OverloadedError) as low:
        c.admit(LOW, 10, MB)
    assert low.value.reason == "shed_low"
    c.admit(NORMAL, 10, MB)  # NORMAL still taken at CRITICAL
    c.settle(NORMAL, 10, MB, 0)
    fill(c, 11 * MB)  # OVERLOADED
    with pytest.raises(OverloadedError) as normal:
        c.admit(NORMAL, 10, MB)
    assert normal.value.reason == "shed_normal"
    c.admit(HIGH, 10, MB)  # HIGH is taken until the budget itself is full
    with pytest.raises(OverloadedError) as high:
        c.admit(HIGH, 10, 10 * MB)
    assert high.value.reason == "memory_budget"
    assert c.memory_bytes() <= c.budget


def test_lane_hard_and_soft_limits() -> None:
    clock = Clock()
    settings = AdmissionSettings(
        memory_budget_bytes=1 << 40,
        normal=LaneLimits(100, 200, 1 << 40, 1 << 40),
        min_dwell_s=0.0,
    )
    c = AdmissionController(settings, clock)
    c.admit(NORMAL, 150, 0)  # above soft: fine while calm
    with pytest.raises(OverloadedError) as hard:
        c.admit(NORMAL, 60, 0)  # would pass 200
    assert hard.value.reason == "lane_full"
    assert c.pressure == pytest.approx(0.75)  # the lane is the tightest limit


def test_retry_after_comes_from_the_measured_drain_rate() -> None:
    c, clock = controller()
    fill(c, 96 * MB)
    for _ in range(10):  # indexing frees 10 MB/s
        clock.now += 0.1
        c.indexed(MB)
        fill(c, MB)
    with pytest.raises(OverloadedError) as exc:
        c.admit(NORMAL, 1, MB)
    # NORMAL is taken again below 0.95 * 0.9 of the budget: the excess is about 11.5 MB,
    # ~1.15 s at 10 MB/s
    assert 800 <= exc.value.retry_after_ms <= 1800


def test_a_failed_batch_frees_its_intake() -> None:
    c, _ = controller()
    c.admit(NORMAL, 1000, 50 * MB)
    assert c.memory_bytes() == 50 * MB
    c.settle(NORMAL, 1000, 50 * MB, 0)
    assert c.memory_bytes() == 0
