"""Latency pressure: the signal's hysteresis, the levels it drives, its floor and retry-after.

Recall P99 and visibility lag against their bounds (:mod:`engram.shard.recall_first`) feed the
admission levels like memory does; latency alone never sheds HIGH, never waives the memory
budget, and always admits NORMAL and LOW at the floor rate.
"""

from __future__ import annotations

import pytest
from tests.admission.test_admission_controller import Clock

from engram.common.settings import AdmissionSettings, LaneLimits
from engram.contract.errors import OverloadedError
from engram.shard import admission as adm
from engram.shard.admission import AdmissionController, FloorBucket
from engram.shard.recall_first import LatencySignal, latency_ratio
from engram.v1 import streaming_pb2 as pb

MB = 1 << 20
HIGH, NORMAL, LOW = pb.PRIORITY_HIGH, pb.PRIORITY_NORMAL, pb.PRIORITY_LOW


def controller(floor: int = 1000, dwell: float = 0.5) -> tuple[AdmissionController, Clock]:
    clock = Clock()
    big = LaneLimits(10**9, 10**9, 1 << 50, 1 << 50)
    settings = AdmissionSettings(
        memory_budget_bytes=100 * MB,
        high=big,
        normal=big,
        low=big,
        min_dwell_s=dwell,
        latency_floor_obs_per_s=floor,
    )
    return AdmissionController(settings, clock), clock


def test_ratio_is_the_worse_of_recall_p99_and_visibility_lag() -> None:
    assert latency_ratio(10, 25, 20, 50) == pytest.approx(0.5)
    assert latency_ratio(40, 25, 20, 50) == pytest.approx(2.0)
    assert latency_ratio(0, 100, 20, 50) == pytest.approx(2.0)


def test_signal_rises_at_once_and_falls_with_its_time_constant() -> None:
    s = LatencySignal(fall_s=1.0)
    assert s.update(0.2, 0.0) == pytest.approx(0.2)
    assert s.update(2.0, 0.1) == pytest.approx(2.0)  # a slow spell counts at once
    after_100ms = s.update(0.0, 0.2)
    assert 1.7 < after_100ms < 1.9  # one fast tick does not undo it
    for i in range(3, 60):
        value = s.update(0.0, i / 10)
    assert value < 0.01  # gone after several time constants


def test_a_signal_without_fall_time_follows_the_ratio() -> None:
    s = LatencySignal(fall_s=0.0)
    s.update(2.0, 0.0)
    assert s.update(0.3, 0.1) == pytest.approx(0.3)


def test_latency_at_its_bound_makes_the_shard_critical_and_sheds_low_first() -> None:
    c, _ = controller()
    seen = []
    c.listeners.append(lambda snap: seen.append((snap.level, round(snap.latency_pressure, 2))))
    c.set_latency(0.5)
    assert c.level == adm.NORMAL
    c.set_latency(1.0)
    assert c.level == adm.CRITICAL
    assert seen == [(adm.CRITICAL, 0.8)]
    c.admit(NORMAL, 100, 1000)  # NORMAL still goes in at CRITICAL
    c.admit(HIGH, 100, 1000)


def test_latency_shed_admits_the_floor_rate_then_refuses_explicitly() -> None:
    c, clock = controller(floor=1000)
    c.set_latency(2.0)
    assert c.level == adm.OVERLOADED
    for _ in range(10):  # 1,000 observations: the floor's second
        c.admit(NORMAL, 100, 1000)
    with pytest.raises(OverloadedError) as refused:
        c.admit(NORMAL, 100, 1000)
    assert refused.value.reason == "latency"
    assert "floor of 1000 observations/s" in refused.value.message
    assert refused.value.retry_after_ms == 100  # 100 observations at 1,000/s
    c.admit(HIGH, 500, 1000)  # never shed for latency
    clock.now += 0.1
    c.admit(LOW, 100, 1000)  # the floor refilled by 100


def test_latency_never_waives_the_memory_budget() -> None:
    c, _ = controller()
    c.set_latency(2.0)
    with pytest.raises(OverloadedError) as refused:
        c.admit(HIGH, 1, 101 * MB)
    assert refused.value.reason == "memory_budget"


def test_memory_shedding_is_not_waived_by_the_floor() -> None:
    c, _ = controller()
    c.admit(HIGH, 1, 0)
    c.settle(HIGH, 1, 0, 96 * MB)  # memory alone: OVERLOADED
    c.set_latency(2.0)
    with pytest.raises(OverloadedError) as refused:
        c.admit(NORMAL, 1, 10)
    assert refused.value.reason == "shed_normal"


def test_levels_leave_latency_pressure_only_after_dwell_and_below_hysteresis() -> None:
    c, clock = controller(dwell=0.5)
    c.set_latency(2.0)
    assert c.level == adm.OVERLOADED
    clock.now += 0.1
    c.set_latency(0.0)
    assert c.level == adm.OVERLOADED  # dwell not over
    clock.now += 0.5
    c.set_latency(1.1)  # 0.88: below OVERLOADED's 0.95 but not its exit (0.855)
    assert c.level == adm.OVERLOADED
    c.set_latency(0.0)
    assert c.level == adm.NORMAL


def test_memory_pressure_stays_apart_for_the_builder() -> None:
    c, _ = controller()
    c.set_latency(2.0)
    assert c.memory_pressure == 0.0
    assert c.pressure == pytest.approx(1.6)


def test_floor_bucket_takes_a_batch_above_its_rate_only_when_full() -> None:
    b = FloorBucket(100, now=0.0)
    assert b.take(500, 0.0)
    assert not b.take(1, 0.5)  # -400 + 50
    assert b.wait_ms(1) == 3510  # 351 observations short at 100/s
