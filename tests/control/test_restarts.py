"""Restart decisions: backoff, reset after a healthy run, give-up on crash loops."""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st

from engram.control.restarts import (
    GiveUp,
    Policy,
    ProcessState,
    Restart,
    backoff_delay,
    decide,
    give_up,
    hold,
    record_exit,
    record_restart,
    record_start,
)

POLICY = Policy()


def started(name: str = "shard-0", at: float = 0.0) -> ProcessState:
    return record_start(ProcessState(name, "shard", alive=False), at)


def crash_loop(
    state: ProcessState, now: float, times: int, run_s: float
) -> tuple[ProcessState, float]:
    """Lets ``state`` die after ``run_s`` and restarts it when due, ``times`` times."""
    for _ in range(times):
        now += run_s
        state = record_exit(state, -9, now)
        [action] = decide([state], now, POLICY)
        assert isinstance(action, Restart)
        now += action.delay_s
        state = record_restart(state, now, POLICY)
    return state, now


def test_live_held_and_given_up_processes_need_nothing() -> None:
    alive = started()
    dead = record_exit(started("shard-1"), 1, 5.0)
    assert decide([alive], 10.0) == []
    assert decide([hold(dead)], 10.0) == []
    assert decide([give_up(dead)], 10.0) == []
    assert decide([alive, dead], 10.0) == [Restart("shard-1", 0.0)]


def test_first_restart_waits_half_a_second_after_the_exit() -> None:
    dead = record_exit(started(at=0.0), -9, 30.0)
    assert decide([dead], 30.0) == [Restart("shard-0", 0.5)]
    [early] = decide([dead], 30.2)
    assert isinstance(early, Restart) and abs(early.delay_s - 0.3) < 1e-9
    assert decide([dead], 30.5) == [Restart("shard-0", 0.0)]
    assert decide([dead], 99.0) == [Restart("shard-0", 0.0)]


def test_backoff_doubles_up_to_ten_seconds() -> None:
    state = started()
    now = 0.0
    delays = []
    for _ in range(8):
        now += 1.0  # crashes one second after each start
        state = record_exit(state, 1, now)
        [action] = decide([state], now)
        assert isinstance(action, Restart)
        delays.append(action.delay_s)
        now += action.delay_s
        state = record_restart(state, now)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0, 10.0]
    assert state.restarts == 8


def test_backoff_resets_after_a_minute_of_healthy_running() -> None:
    state, now = crash_loop(started(), 0.0, times=5, run_s=1.0)
    assert state.streak == 5
    state = record_exit(state, -9, now + 59.0)
    assert decide([state], now + 59.0) == [Restart("shard-0", 10.0)]
    state = replace(state, last_exit=now + 60.0)
    assert decide([state], now + 60.0) == [Restart("shard-0", 0.5)]
    assert record_restart(state, now + 60.5).streak == 1


def test_deliberate_start_resets_the_backoff() -> None:
    state, now = crash_loop(started(), 0.0, times=6, run_s=0.1)
    state = record_start(hold(record_exit(state, 0, now)), now + 1.0)
    assert not state.held and state.streak == 0
    assert decide([record_exit(state, 1, now + 2.0)], now + 2.0) == [Restart("shard-0", 0.5)]


def test_gives_up_after_twenty_restarts_in_ten_minutes() -> None:
    state, now = crash_loop(started(), 0.0, times=20, run_s=1.0)
    assert now < POLICY.window_s
    state = record_exit(state, 3, now + 1.0)
    [action] = decide([state], now + 1.0)
    assert isinstance(action, GiveUp)
    assert action.name == "shard-0"
    assert "20 times" in action.reason and "exit code 3" in action.reason


def test_restarts_spread_over_more_than_the_window_never_give_up() -> None:
    # One crash every 40 s: the backoff resets never, but the window only ever holds 15.
    state, now = crash_loop(started(), 0.0, times=60, run_s=40.0)
    state = record_exit(state, 1, now + 40.0)
    [action] = decide([state], now + 40.0)
    assert isinstance(action, Restart)
    assert len(state.restart_times) < POLICY.max_restarts


def test_custom_policy() -> None:
    policy = Policy(initial_delay_s=0.1, max_delay_s=0.3, max_restarts=2, window_s=5.0)
    assert [backoff_delay(n, policy) for n in range(4)] == [0.1, 0.2, 0.3, 0.3]
    state = record_restart(record_restart(started(), 1.0, policy), 2.0, policy)
    assert isinstance(decide([record_exit(state, 1, 3.0)], 3.0, policy)[0], GiveUp)
    assert isinstance(decide([record_exit(state, 1, 7.5)], 7.5, policy)[0], Restart)


@given(
    streak=st.integers(min_value=0, max_value=10_000),
    exited=st.floats(min_value=0, max_value=1e6),
    elapsed=st.floats(min_value=0, max_value=1e3),
)
def test_delay_is_never_negative_nor_above_the_maximum(
    streak: int, exited: float, elapsed: float
) -> None:
    state = replace(record_exit(started(), 1, exited), streak=streak, last_start=exited)
    for action in decide([state], exited + elapsed):
        assert isinstance(action, Restart)
        assert 0.0 <= action.delay_s <= POLICY.max_delay_s
