"""Small statistics helpers of the benchmark: percentiles, per-second series, summaries.

Pure functions over plain lists; every figure the report quotes is computed here, so the JSON,
the markdown summary and the plots agree.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np


def percentile(values: Sequence[float] | np.ndarray, q: float) -> float | None:
    """The ``q``-th percentile (0..100, linear interpolation), or None for no values."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def summary_ms(values_s: Sequence[float] | np.ndarray) -> dict[str, float | int | None]:
    """count, p50, p90, p99, max and mean of durations given in seconds, in milliseconds."""
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0
    if arr.size == 0:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    return {
        "count": int(arr.size),
        "p50": round(float(np.percentile(arr, 50)), 3),
        "p90": round(float(np.percentile(arr, 90)), 3),
        "p99": round(float(np.percentile(arr, 99)), 3),
        "max": round(float(arr.max()), 3),
        "mean": round(float(arr.mean()), 3),
    }


def buckets(
    times: Iterable[float], weights: Iterable[float] | None, start: float, seconds: int
) -> list[float]:
    """Sums ``weights`` (1 each if None) into 1 s buckets ``[start + i, start + i + 1)``."""
    out = [0.0] * max(0, seconds)
    ws = weights if weights is not None else (1.0 for _ in iter(int, 1))
    for t, w in zip(times, ws, strict=False):
        i = math.floor(t - start)
        if 0 <= i < seconds:
            out[i] += w
    return out


def per_second_percentiles(
    times: Sequence[float], values: Sequence[float], start: float, seconds: int, q: float
) -> list[float | None]:
    """The ``q``-th percentile of ``values`` (seconds, returned in ms) per 1 s bucket of
    ``times``."""
    groups: list[list[float]] = [[] for _ in range(max(0, seconds))]
    for t, v in zip(times, values, strict=True):
        i = math.floor(t - start)
        if 0 <= i < seconds:
            groups[i].append(v)
    return [round(float(np.percentile(g, q)) * 1000.0, 3) if g else None for g in groups]


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b rounded to 3 places, or None if either is missing or b is 0."""
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def rounded(x: float | None, places: int = 1) -> float | None:
    return None if x is None else round(float(x), places)
