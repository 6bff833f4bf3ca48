"""The recall queue bound and when background work yields to recalls (pure decisions).

A shard holds at most ``ENGRAM_RECALL_QUEUE`` recalls for its workers; one more is refused
OVERLOADED with the time the queue takes to drain at the measured rate. The builder and the
partitioner wait while recalls are queued or slow, by ``ENGRAM_RECALL_ISOLATION`` (the
partitioner only while they are queued).
"""

from __future__ import annotations

import threading

import pytest
from tests.admission.test_admission_controller import Clock

from engram.common.settings import RecallFirstSettings
from engram.contract.errors import OverloadedError
from engram.shard.recall_first import (
    RecallLoad,
    p99,
    queue_refusal,
    retry_after_ms,
    should_yield,
)
from engram.v1 import streaming_pb2 as pb


def test_p99_by_nearest_rank() -> None:
    assert p99([]) == 0.0
    assert p99([3.0, 1.0, 2.0]) == 3.0
    assert p99([float(i) for i in range(1, 201)]) == 198.0


def test_retry_after_is_the_drain_time_of_the_recalls_ahead() -> None:
    assert retry_after_ms(queued=16, bound=16, rate=100.0) == 10  # one ahead: 10 ms
    assert retry_after_ms(queued=20, bound=16, rate=50.0) == 100  # five ahead at 50/s
    assert retry_after_ms(queued=16, bound=16, rate=0.0) == 1000  # unknown rate
    assert retry_after_ms(queued=10_000, bound=1, rate=1.0) == 5000  # capped


def test_queue_refusal_beyond_the_bound_only() -> None:
    assert queue_refusal(15, 16, 100.0) is None
    err = queue_refusal(16, 16, 40.0)
    assert isinstance(err, OverloadedError)
    assert err.code == pb.OVERLOADED and err.retryable
    assert err.reason == "recall_queue"
    assert err.retry_after_ms == 25
    assert "ENGRAM_RECALL_QUEUE" in err.message and "retry after 25 ms" in err.message


@pytest.mark.parametrize(
    ("isolation", "queued", "p99_ms", "expected"),
    [
        ("OFF", 5, 500.0, False),
        ("QUEUED", 1, 0.0, True),
        ("QUEUED", 0, 500.0, False),
        ("LATENCY", 3, 5.0, False),
        ("LATENCY", 0, 25.0, True),
        ("BOTH", 1, 0.0, True),
        ("BOTH", 0, 25.0, True),
        ("BOTH", 0, 15.0, False),
    ],
)
def test_who_yields_when(isolation: str, queued: int, p99_ms: float, expected: bool) -> None:
    assert should_yield(isolation, queued, p99_ms, 20.0) is expected


def test_load_counts_queued_recalls_refuses_and_measures_the_rate() -> None:
    clock = Clock()
    load = RecallLoad(RecallFirstSettings(queue=2, window_s=2.0), clock)
    a = load.enter()
    b = load.enter()
    with pytest.raises(OverloadedError) as refused:
        load.enter()
    assert refused.value.retry_after_ms == 1000  # nothing answered yet
    assert load.queued == 2 and load.refused == 1
    clock.now += 0.01
    load.leave(a)
    clock.now += 0.03
    load.leave(b)
    assert load.queued == 0
    assert load.rate() == pytest.approx(1.0)  # 2 in the 2 s window
    assert load.p99_ms() == pytest.approx(40.0)
    clock.now += 2.5
    assert load.rate() == 0.0 and load.p99_ms() == 0.0  # out of the window


def test_background_waits_while_recalls_are_queued_and_resumes_when_they_are_done() -> None:
    load = RecallLoad(RecallFirstSettings(isolation="QUEUED", yield_max_ms=10_000))
    started = load.enter()
    stop = threading.Event()
    waiter = threading.Thread(target=load.wait_for_recalls, args=(stop,))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()  # held while the recall is queued
    load.leave(started)
    waiter.join(5)
    assert not waiter.is_alive()  # resumed once the queue is empty


def test_background_waits_at_most_yield_max() -> None:
    load = RecallLoad(RecallFirstSettings(isolation="QUEUED", yield_max_ms=50))
    load.enter()
    waiter = threading.Thread(target=load.wait_for_recalls, args=(threading.Event(),))
    waiter.start()
    waiter.join(5)
    assert not waiter.is_alive()  # then one step of its work: indexing is never starved


@pytest.mark.parametrize("isolation", ["LATENCY", "BOTH"])
def test_without_latency_a_slow_p99_holds_nothing_back(isolation: str) -> None:
    """The partitioner yields only to queued recalls: its work is what makes them cheap, so
    waiting for a high P99 to fall would only keep it high."""
    clock = Clock()
    load = RecallLoad(RecallFirstSettings(isolation=isolation, window_s=2.0), clock)
    load.leave(load.enter() - 0.5)  # one recall of 500 ms: P99 far above the 20 ms bound
    assert load.should_yield() is True
    assert load.should_yield(latency=False) is False
    started = load.enter()
    assert load.should_yield(latency=False) is (isolation == "BOTH")  # a recall is queued
    load.leave(started)
