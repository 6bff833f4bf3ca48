"""The un-indexed rows of one memory space by priority lane, in row order.

Rows wait in the fresh tier until the builder indexes them, oldest first. The builder serves
the space whose waiting rows include the most urgent lane (:meth:`LaneBacklog.top`), and now
and then the space whose LOW rows waited longest (:meth:`LaneBacklog.oldest_low_since`), so it
needs to know which lanes the un-indexed rows came in on. They are kept as runs
``(end_row, lane, since)``: consecutive batches of one lane share a run.

The event loop adds a run as a batch becomes visible (the write path, and recovery for rows
replayed into the fresh tier); the builder thread drops runs as it indexes rows
(:meth:`~engram.shard.maintenance.Maintenance.index_step`). A lock keeps the two apart.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict, deque

from engram.v1 import streaming_pb2 as pb


class LaneBacklog:
    """Un-indexed rows per priority lane (HIGH=1 ... LOW=3), as runs in row order."""

    def __init__(self) -> None:
        self._runs: deque[tuple[int, int, float]] = deque()  # (end_row, lane, published_at)
        self.rows: dict[int, int] = defaultdict(int)  # un-indexed rows per lane
        self._lock = threading.Lock()  # the loop appends runs, the builder drops them

    def add(self, end_row: int, lane: int, n: int) -> None:
        """``n`` rows of ``lane`` ending at ``end_row`` became visible (event loop)."""
        with self._lock:
            runs = self._runs
            if runs and runs[-1][1] == lane:
                runs[-1] = (end_row, lane, runs[-1][2])
            else:
                runs.append((end_row, lane, time.monotonic()))
            self.rows[lane] += n

    def drop(self, indexed: int, previous: int) -> None:
        """Moves the lane accounting past rows ``[previous, indexed)`` (builder thread)."""
        with self._lock:
            runs = self._runs
            row = previous
            while runs and row < indexed:
                end, lane, _since = runs[0]
                take = min(end, indexed) - row
                self.rows[lane] -= take
                row += take
                if end <= indexed:
                    runs.popleft()

    def top(self) -> int | None:
        """The most urgent lane among the un-indexed rows."""
        lanes = [lane for lane, n in self.rows.items() if n > 0]
        return min(lanes) if lanes else None

    def oldest_low_since(self) -> float | None:
        """When the oldest un-indexed LOW rows became visible (monotonic), if any wait."""
        with self._lock:
            for _end, lane, since in self._runs:
                if lane == pb.PRIORITY_LOW:
                    return since
        return None
