"""``--find-max``: the highest offered rate the cluster sustains within the SLO.

The SLO a step must hold for its whole ``--step-seconds`` (the first seconds of a step, while
the rate changes, are left out):

* acked ≥ (1 − ``--slo-acked-tolerance``) × offered (by default within 2 %);
* recall P99 ≤ ``--slo-recall-p99-ms`` (20) for the recalls issued in the step, a failed recall
  counting as infinitely slow;
* visibility P99 ≤ ``--slo-visibility-p99-ms`` (100) for the rows sampled in the step, a row
  never found counting as infinitely slow.

:class:`RateSearch` decides the rates: up by ``--step-factor`` from ``--start-rate`` until a
step fails, then bisection between the highest rate that held and the lowest that did not,
until the two are within :data:`RESOLUTION` of each other or ``--max-steps`` steps ran. Steps
run back to back on one cluster: a step starts with the index backlog the earlier ones left,
which is the position of a service that has been taking writes for a while.

:func:`judge` is called by :mod:`.load` as each step ends (to choose the next rate) and again
by :mod:`.report` over the complete telemetry: a visibility sample is reported only once found
(or after 10 s), so the final verdict also counts samples that were still being polled.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from engram.bench.config import BenchConfig

RESOLUTION = 0.05  # bisection stops once the failing rate is within 5 % of the passing one
SETTLE_S = 2.0  # the first seconds of a step (at most a quarter of it) are a transition


def window(cfg: BenchConfig, step_end: float) -> tuple[float, float]:
    """The part of the step ending at ``step_end`` that is judged."""
    return step_end - cfg.step_seconds + min(SETTLE_S, cfg.step_seconds / 4), step_end


def _p99_ms(values_s: list[float]) -> float | None:
    """P99 in ms, the next value up rather than an interpolation (so ``inf`` entries, the
    failures, count as slower than anything: more than 1 % of them make it ``inf``)."""
    if not values_s:
        return None
    return float(np.percentile(np.asarray(values_s, np.float64), 99, method="higher")) * 1000


def judge(tel: Any, cfg: BenchConfig, rate: float, lo: float, hi: float) -> dict[str, Any]:
    """Whether offered ``rate`` held the SLO between ``lo`` and ``hi`` (monotonic times), from
    the telemetry of :mod:`.workers` (``tel.acks``, ``tel.recalls``, ``tel.vis``)."""
    span = max(hi - lo, 1e-9)
    acks = [a for a in tel.acks if a[6] and lo <= a[4] < hi]
    acked = sum(a[5] for a in acks) / span
    ack_lat = [a[4] - a[3] for a in acks]
    recalls = [r for r in tel.recalls if lo <= r[0] < hi]
    recall_s = [r[1] if r[6] else math.inf for r in recalls]
    vis = [v for v in tel.vis if lo <= v[2] < hi]
    vis_s = [v[4] - v[2] if v[4] is not None else math.inf for v in vis]
    recall_p99, vis_p99 = _p99_ms(recall_s), _p99_ms(vis_s)
    held = {
        "acked": acked >= (1 - cfg.slo_acked_tolerance) * rate,
        # no recall or sample in the step (rates of 0): that bound is not part of the verdict
        "recall": recall_p99 is None or recall_p99 <= cfg.slo_recall_p99_ms,
        "visibility": vis_p99 is None or vis_p99 <= cfg.slo_visibility_p99_ms,
    }

    def ms(x: float | None) -> float | None:  # JSON has no infinity: null, and the counts say
        return round(x, 1) if x is not None and math.isfinite(x) else None

    # a P99 is null when there was nothing to measure or when more than 1 % failed / were
    # never found (infinitely slow): the counts beside it say which
    return {
        "offered": round(rate),
        "seconds_judged": round(span, 1),
        "acked": round(acked, 1),
        "acked_ratio": round(acked / rate, 4) if rate > 0 else None,
        "ack_p50_ms": ms(float(np.percentile(ack_lat, 50)) * 1000 if ack_lat else None),
        "ack_p99_ms": ms(float(np.percentile(ack_lat, 99)) * 1000 if ack_lat else None),
        "recalls": len(recalls),
        "recalls_failed": sum(1 for r in recalls if not r[6]),
        "recall_p99_ms": ms(recall_p99),
        "visibility_samples": len(vis),
        "visibility_missed": sum(1 for v in vis if v[4] is None),
        "visibility_p99_ms": ms(vis_p99),
        "held": held,
        "keeps_up": all(held.values()),
    }


def criteria(cfg: BenchConfig) -> str:
    return (
        f"for {cfg.step_seconds:g} s: acked >= {1 - cfg.slo_acked_tolerance:.0%} of offered, "
        f"recall P99 <= {cfg.slo_recall_p99_ms:g} ms and visibility P99 <= "
        f"{cfg.slo_visibility_p99_ms:g} ms at {cfg.recall_rate:g} recalls/s"
    )


class RateSearch:
    """Which rate to offer next: geometric steps up until one fails, then bisection."""

    def __init__(self, start: float, factor: float, max_steps: int) -> None:
        self.rate, self.factor, self.max_steps = start, factor, max_steps
        self.passed = 0.0  # highest rate that held
        self.failed: float | None = None  # lowest rate that did not
        self.steps = 0

    def next(self, held: bool) -> float | None:
        """Records the verdict of the step at ``self.rate``; the next rate, or None: done."""
        self.steps += 1
        if held:
            self.passed = max(self.passed, self.rate)
        else:
            self.failed = self.rate if self.failed is None else min(self.failed, self.rate)
        if self.steps >= self.max_steps:
            return None
        if self.failed is None:
            self.rate *= self.factor
            return self.rate
        if self.failed - self.passed <= RESOLUTION * self.failed:
            return None
        self.rate = (self.passed + self.failed) / 2
        return self.rate


def best(steps: list[dict[str, Any]]) -> float | None:
    """The highest offered rate whose step held the SLO, or None."""
    ok = [s["offered"] for s in steps if s["keeps_up"]]
    return float(max(ok)) if ok else None
