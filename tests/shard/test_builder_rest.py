"""When the index builder rests between steps: while writes arrive at more than a trickle.

A shard's builder works only part of the time while writes arrive, so acks keep the CPU; a
trickle (the visibility canary's row a second) must not make it rest, or an idle shard indexes
its backlog at a fraction of its speed. The builder runs here against stand-in spaces (the
``working_spaces`` seam of the node), one step at a time.
"""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from engram.common.settings import IndexSettings
from engram.shard.builder import TRICKLE_ROWS_PER_S, ArrivalRate, Background


def test_arrival_rate_is_measured_over_whole_windows() -> None:
    rate = ArrivalRate(window_s=1.0)
    assert rate.update(100.0, 0) is None  # the first look only marks
    assert rate.update(100.5, 5_000) is None  # half a window: no rate yet
    assert rate.update(101.0, 10_000) == pytest.approx(10_000.0)
    assert rate.update(102.0, 10_003) == pytest.approx(3.0)
    assert rate.update(104.0, 4_000) == 0.0  # a space went away: no rows, not a negative rate


class _Space:
    """A space as the builder sees it: rows that arrive, a backlog it indexes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.visible = 0
        self.last_write = 0.0
        self.last_recall = 0.0
        self.threads: list[int | None] = []

    def write(self, rows: int) -> None:
        self.visible += rows
        self.last_write = time.monotonic()

    def backlog(self) -> int:
        return 1_000

    def index_step(self, max_rows: int, threads: int | None = None) -> int:
        self.threads.append(threads)
        time.sleep(0.01)  # the step's work, for the rest to be a share of
        return max_rows

    def checkpoint_due(self) -> bool:
        return False


def _background(space: _Space) -> Background:
    node = SimpleNamespace(
        settings=SimpleNamespace(shard=SimpleNamespace(index=IndexSettings())),
        admission=SimpleNamespace(memory_pressure=0.0),
        working_spaces=lambda: [space],
    )
    return Background(node)  # type: ignore[arg-type]


def _steps(space: _Space, rows_per_step: int, steps: int) -> list[float]:
    """Rest after each of ``steps`` build steps, ``rows_per_step`` rows written before each,
    steps 0.25 s apart (so the arrival rate spans whole windows)."""
    bg = _background(space)
    rests = []
    for _ in range(steps):
        space.write(rows_per_step)
        rests.append(bg._build_step(space))  # type: ignore[arg-type]
        time.sleep(0.25)
    return rests


def test_a_trickle_of_writes_leaves_the_builder_working_all_the_time() -> None:
    space = _Space("trickle")
    rests = _steps(space, rows_per_step=1, steps=8)  # ~4 rows a second
    assert rests[-4:] == [0.0] * 4  # once a whole window says it is a trickle
    assert space.threads[-1] == 1  # writes arrive: a core stays free for them all the same


def test_writes_beyond_a_trickle_make_the_builder_rest() -> None:
    space = _Space("flood")
    rows = int(TRICKLE_ROWS_PER_S)  # per step, four steps a second: 4 x the trickle bound
    rests = _steps(space, rows_per_step=rows, steps=6)
    assert all(r > 0.0 for r in rests)  # before a whole window any write counts, then the rate
    share = IndexSettings().build_busy_share
    took = 0.01
    assert rests[-1] >= took * (1 - share) / share * 0.9


def test_no_writes_no_rest_and_every_thread() -> None:
    space = _Space("idle")
    bg = _background(space)
    assert bg._build_step(space) == 0.0  # type: ignore[arg-type]
    assert space.threads == [None]  # nothing arrives: hnswlib may use every core
