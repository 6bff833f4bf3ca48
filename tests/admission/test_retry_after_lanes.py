"""A refused HIGH batch is told to come back as soon as it would fit, not when LOW would.

HIGH is refused only when the batch does not fit in the memory budget; indexing frees room for
it at the measured drain rate. The retry-after it gets today is the time to fall below CRITICAL
(0.72 of the budget), the point where LOW traffic is admitted again, so a HIGH producer waits
seconds while NORMAL and LOW batches are admitted ahead of it (in the overload run, HIGH's
throughput came out equal to NORMAL's or below it when both saturated).
"""

from __future__ import annotations

import pytest

from engram.common.settings import AdmissionSettings, LaneLimits
from engram.contract.errors import OverloadedError
from engram.shard import admission as adm
from engram.shard.admission import AdmissionController
from engram.v1 import streaming_pb2 as pb

MB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def overloaded_with_known_drain() -> AdmissionController:
    """97 MB of 100 MB un-indexed (OVERLOADED), indexing measured at 10 MB/s."""
    clock = Clock()
    big = LaneLimits(10**9, 10**9, 1 << 50, 1 << 50)
    settings = AdmissionSettings(
        memory_budget_bytes=100 * MB, high=big, normal=big, low=big, min_dwell_s=0.5
    )
    c = AdmissionController(settings, clock)
    c.admit(pb.PRIORITY_HIGH, 1, 0)
    c.settle(pb.PRIORITY_HIGH, 1, 0, 99 * MB)
    c.indexed(MB)
    clock.now += 0.1
    c.indexed(MB)  # 1 MB in 0.1 s
    assert c.level == adm.OVERLOADED
    assert c.memory_bytes() == 97 * MB
    return c


def test_low_waits_until_the_shard_leaves_critical() -> None:
    c = overloaded_with_known_drain()
    with pytest.raises(OverloadedError) as exc:
        c.admit(pb.PRIORITY_LOW, 1, MB)
    assert exc.value.reason == "shed_low"
    # (97 + 1 - 72) MB at 10 MB/s
    assert 2000 <= exc.value.retry_after_ms <= 3200


def test_high_waits_only_until_it_fits() -> None:
    c = overloaded_with_known_drain()
    with pytest.raises(OverloadedError) as exc:
        c.admit(pb.PRIORITY_HIGH, 1, 4 * MB)
    assert exc.value.reason == "memory_budget"
    # 97 + 4 - 100 = 1 MB must be freed: ~100 ms at 10 MB/s (not ~2.9 s)
    assert exc.value.retry_after_ms <= 300, exc.value.retry_after_ms
