"""Restart decisions for supervised processes: pure logic, no I/O.

The local launcher polls its children and calls :func:`decide`; the Kubernetes operator makes
the same decisions for pods. A dead process is restarted after an exponential backoff
(``initial_delay_s`` doubling up to ``max_delay_s``); the backoff starts over once a process
has run for ``reset_after_s``; after ``max_restarts`` restarts within ``window_s`` the
supervisor gives up on it.

The caller owns the states: it records what it observed with :func:`record_exit` and what it
did with :func:`record_restart` (both return a new state), and calls :func:`decide` again on
every poll. A :class:`Restart` whose ``delay_s`` is positive is not due yet: poll again later
(or requeue after ``delay_s``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Policy:
    # Delay before the first restart after a healthy run.
    initial_delay_s: float = 0.5
    # Longest delay between restarts.
    max_delay_s: float = 10.0
    # A process that ran this long before exiting starts its backoff over.
    reset_after_s: float = 60.0
    # Give up after this many restarts within window_s.
    max_restarts: int = 20
    window_s: float = 600.0


@dataclass(frozen=True)
class ProcessState:
    name: str
    role: str
    alive: bool
    exit_code: int | None = None
    # Restarts since the process was first started.
    restarts: int = 0
    # Monotonic time of the last (re)start, and of the last observed exit.
    last_start: float = 0.0
    last_exit: float | None = None
    # Consecutive restarts without a run of reset_after_s in between.
    streak: int = 0
    # Times of the restarts still inside the give-up window.
    restart_times: tuple[float, ...] = ()
    # Stopped on purpose: not restarted until released.
    held: bool = False
    # The supervisor gave up on the process.
    given_up: bool = False


@dataclass(frozen=True)
class Restart:
    name: str
    # Seconds until the restart is due; 0 means now.
    delay_s: float


@dataclass(frozen=True)
class GiveUp:
    name: str
    reason: str


Action = Restart | GiveUp


def backoff_delay(streak: int, policy: Policy) -> float:
    """Delay before a restart when ``streak`` restarts happened in a row already."""
    return min(policy.max_delay_s, policy.initial_delay_s * float(2 ** min(streak, 32)))


def effective_streak(state: ProcessState, policy: Policy) -> int:
    """The restart streak, reset when the last run lasted ``reset_after_s`` or more."""
    if state.last_exit is not None and state.last_exit - state.last_start >= policy.reset_after_s:
        return 0
    return state.streak


def _recent(times: Iterable[float], now: float, policy: Policy) -> tuple[float, ...]:
    return tuple(t for t in times if now - t < policy.window_s)


def decide(
    states: Iterable[ProcessState], now: float, policy: Policy | None = None
) -> list[Action]:
    """What to do about each dead process that is neither held nor given up."""
    policy = policy or Policy()
    actions: list[Action] = []
    for state in states:
        if state.alive or state.held or state.given_up:
            continue
        recent = _recent(state.restart_times, now, policy)
        if len(recent) >= policy.max_restarts:
            actions.append(
                GiveUp(
                    state.name,
                    f"{state.name} restarted {len(recent)} times in {policy.window_s:g} s "
                    f"(last exit code {state.exit_code})",
                )
            )
            continue
        delay = backoff_delay(effective_streak(state, policy), policy)
        exited = state.last_exit if state.last_exit is not None else now
        actions.append(Restart(state.name, max(0.0, exited + delay - now)))
    return actions


def record_exit(state: ProcessState, exit_code: int | None, now: float) -> ProcessState:
    """The state after the process was seen dead at ``now``."""
    return replace(state, alive=False, exit_code=exit_code, last_exit=now)


def record_restart(state: ProcessState, now: float, policy: Policy | None = None) -> ProcessState:
    """The state after the process was restarted at ``now``."""
    policy = policy or Policy()
    return replace(
        state,
        alive=True,
        exit_code=None,
        restarts=state.restarts + 1,
        last_start=now,
        streak=effective_streak(state, policy) + 1,
        restart_times=(*_recent(state.restart_times, now, policy), now),
    )


def record_start(state: ProcessState, now: float) -> ProcessState:
    """The state after a deliberate (not supervised) start: the backoff starts over."""
    return replace(
        state, alive=True, exit_code=None, last_start=now, streak=0, held=False, given_up=False
    )


def hold(state: ProcessState) -> ProcessState:
    """Marks a process as stopped on purpose."""
    return replace(state, held=True)


def give_up(state: ProcessState) -> ProcessState:
    """Marks a process as given up: no more restarts until it is started deliberately."""
    return replace(state, given_up=True)
