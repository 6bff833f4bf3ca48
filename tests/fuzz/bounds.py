"""Limits every fuzz example runs under: a time limit (a watchdog on top of hypothesis'
``deadline``) and a memory limit (tracemalloc's peak), and the hypothesis settings of the two
budgets.

Budgets (``ENGRAM_FUZZ_PROFILE``): ``ci`` (the default: 150 examples per test, every fuzz
test together well under a minute in ``make test``) and ``long`` (``make fuzz``: 20,000 examples
per test, ``ENGRAM_FUZZ_EXAMPLES`` to change). Both leave the example database off (nothing
written under .hypothesis/) and keep randomisation on, so each run tries new inputs; a failure
prints the ``@reproduce_failure`` blob that replays it.

Each test decorates itself with :data:`FUZZ` (not a global profile: loading one would change
every other property test of the session) and runs the code under test inside
:func:`bounded`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import tracemalloc
from collections.abc import Iterator
from datetime import timedelta

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("ENGRAM_FUZZ_PROFILE", "ci")
_LONG_EXAMPLES = int(os.environ.get("ENGRAM_FUZZ_EXAMPLES", "20000"))

# One example's time: an example takes milliseconds; hypothesis fails one slower than DEADLINE
# (far above that, so a stall of a busy machine fails nothing) and the watchdog stops one that
# hangs.
DEADLINE = timedelta(seconds=5)
WATCHDOG_S = 30.0
# Scratch directories (WAL segments) in memory where there is a tmpfs: replay's repair fsyncs,
# and an fsync on a busy disk can stall for seconds.
SCRATCH = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
# Memory an example may allocate beyond what its input explains.
SLACK_BYTES = 4 << 20

settings.register_profile(
    "engram-fuzz-ci",
    max_examples=150,
    deadline=DEADLINE,
    database=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "engram-fuzz-long",
    max_examples=_LONG_EXAMPLES,
    deadline=DEADLINE,
    database=None,
    derandomize=False,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
if PROFILE not in ("ci", "long"):
    raise RuntimeError(f"ENGRAM_FUZZ_PROFILE must be 'ci' or 'long', got {PROFILE!r}")
FUZZ = settings.get_profile(f"engram-fuzz-{PROFILE}")


class Hang(AssertionError):
    """An example ran past the watchdog's limit."""


@contextlib.contextmanager
def watchdog(seconds: float = WATCHDOG_S) -> Iterator[None]:
    """Raises :class:`Hang` in the block if it runs longer than ``seconds`` (SIGALRM; the main
    thread only, elsewhere a no-op). pytest-timeout's own alarm is put back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def expired(signum: int, frame: object) -> None:
        raise Hang(f"the example ran longer than {seconds} s")

    started = time.monotonic()
    previous = signal.signal(signal.SIGALRM, expired)
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_delay:
            left = max(outer_delay - (time.monotonic() - started), 0.001)
            signal.setitimer(signal.ITIMER_REAL, left, outer_interval)


@contextlib.contextmanager
def memory_peak(limit: int, what: str = "the example") -> Iterator[None]:
    """Fails if the block's tracemalloc peak exceeds ``limit`` bytes above what was allocated
    when it began. numpy's buffers are counted (numpy reports to tracemalloc)."""
    started_here = not tracemalloc.is_tracing()
    if started_here:
        tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        yield
        _, peak = tracemalloc.get_traced_memory()
    finally:
        if started_here:
            tracemalloc.stop()
    grew = peak - base
    assert grew <= limit, f"{what} allocated {grew} bytes at its peak, the limit is {limit}"


@contextlib.contextmanager
def bounded(input_bytes: int, factor: int = 1, what: str = "the example") -> Iterator[None]:
    """Both limits: the watchdog, and a peak of at most ``factor`` x the input plus
    :data:`SLACK_BYTES` (``factor``: how much a decoder may legitimately expand its input, e.g.
    JSON numbers into Python floats)."""
    with watchdog(), memory_peak(factor * input_bytes + SLACK_BYTES, what):
        yield
