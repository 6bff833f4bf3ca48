"""Recalls first: a shard's recall queue, its recent latency, and what the rest does about them.

Agents wait on recalls; ingest, indexing, partitioning and checkpoints can wait. Three
decisions follow, each a pure function here with a small holder of state around it:

* **the queue bound** (:func:`queue_refusal`): at most ``ENGRAM_RECALL_QUEUE`` recalls wait
  for or run on the recall workers. A recall beyond it is refused OVERLOADED (reason
  ``recall_queue``) with a retry-after of the time the queue takes to drain at the measured
  recall rate, so a burst of recalls cannot grow a queue that starves acks of the event loop;
* **yielding** (:func:`should_yield`): the builder and the partitioner wait (at most
  ``ENGRAM_RECALL_YIELD_MAX_MS`` at a time, then do one step) while recalls are queued
  (QUEUED), or while the recent recall P99 is above its bound (LATENCY), or either (BOTH);
* **latency pressure** (:class:`LatencySignal`): the recent recall P99 and the visibility lag
  (the age of the oldest durable write not yet visible) against their bounds, as one ratio
  that rises at once and falls with a time constant. :func:`watch` hands it to admission
  every 100 ms (:meth:`~engram.shard.admission.AdmissionController.set_latency`), whose
  levels then shed, push statuses and name retry-afters as they do for memory, with their
  own hysteresis and dwell, and a floor rate that latency never sheds below.

Held by :class:`~engram.shard.node.ShardNode` as ``node.recalls``: the gRPC service calls
:meth:`RecallLoad.enter` / :meth:`RecallLoad.leave` around each recall (event loop), the
background threads :meth:`RecallLoad.wait_for_recalls`.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from engram.common.settings import RecallFirstSettings
from engram.contract.errors import OverloadedError

if TYPE_CHECKING:
    from engram.shard.node import ShardNode

WATCH_S = 0.1
# A full queue drains in at most this long by the retry-after; longer is a stalled shard.
MAX_RETRY_AFTER_MS = 5_000


def p99(samples: Sequence[float]) -> float:
    """The 99th percentile by nearest rank (the largest of fewer than 100); 0 if empty."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def retry_after_ms(queued: int, bound: int, rate: float) -> int:
    """When a refused recall may find room: the time the recalls ahead of it (``queued``, of
    which ``bound`` fit) take to get down to ``bound - 1`` at ``rate`` recalls/s; 1 s while
    no recall finished lately (the rate is unknown)."""
    if rate <= 0:
        return 1000
    ahead = max(1, queued - bound + 1)
    return int(min(MAX_RETRY_AFTER_MS, max(10, math.ceil(1000 * ahead / rate))))


def queue_refusal(queued: int, bound: int, rate: float) -> OverloadedError | None:
    """The error for one more recall beside ``queued`` ones, or None if it fits."""
    if queued < bound:
        return None
    after = retry_after_ms(queued, bound, rate)
    return OverloadedError(
        f"the shard holds {queued} recalls for its workers, its limit is {bound} "
        f"(ENGRAM_RECALL_QUEUE; {rate:.0f} recalls/s answered lately): retry after {after} ms",
        reason="recall_queue",
        retry_after_ms=after,
    )


def latency_ratio(
    recall_p99_ms: float, visibility_lag_ms: float, recall_bound_ms: float, lag_bound_ms: float
) -> float:
    """How far the worse of the two is against its bound (1.0: at the bound)."""
    return max(recall_p99_ms / recall_bound_ms, visibility_lag_ms / lag_bound_ms)


def should_yield(isolation: str, queued: int, recall_p99_ms: float, bound_ms: float) -> bool:
    """Whether background work waits now, by ``ENGRAM_RECALL_ISOLATION``."""
    if isolation in ("QUEUED", "BOTH") and queued > 0:
        return True
    return isolation in ("LATENCY", "BOTH") and recall_p99_ms > bound_ms


class LatencySignal:
    """The latency ratio, held: a higher ratio is taken at once, a lower one is approached
    with time constant ``fall_s``, so one fast second after slow ones does not undo the
    pressure (and one slow recall among fast ones is not forgotten in 100 ms)."""

    def __init__(self, fall_s: float) -> None:
        self.fall_s = fall_s
        self.value = 0.0
        self._at: float | None = None

    def update(self, ratio: float, now: float) -> float:
        if self._at is None or ratio >= self.value or self.fall_s <= 0:
            self.value = ratio
        else:
            keep = math.exp(-(now - self._at) / self.fall_s)
            self.value = ratio + (self.value - ratio) * keep
        self._at = now
        return self.value


class RecallLoad:
    """The recalls of one shard: how many are queued, how fast and how slowly they went."""

    def __init__(
        self, settings: RecallFirstSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._clock = clock
        self._lock = threading.Lock()
        self.queued = 0  # recalls waiting for or running on a recall worker
        self.refused = 0  # recalls refused for the queue bound, since the start
        self._done: deque[tuple[float, float]] = deque()  # (finished at, milliseconds)
        self._empty = threading.Event()
        self._empty.set()
        self.signal = LatencySignal(settings.fall_s)

    def enter(self) -> float:
        """One more recall for the workers (event loop or recall port thread); its start, for
        :meth:`leave`. Raises :class:`OverloadedError` beyond the queue bound."""
        rate = self.rate()
        with self._lock:
            refusal = queue_refusal(self.queued, self.settings.queue, rate)
            if refusal is None:
                self.queued += 1
                self._empty.clear()
            else:
                self.refused += 1
        if refusal is not None:
            raise refusal
        return self._clock()

    def leave(self, started: float) -> None:
        """The recall that entered at ``started`` is answered (or failed)."""
        now = self._clock()
        with self._lock:
            self.queued -= 1
            if self.queued == 0:
                self._empty.set()
            self._done.append((now, (now - started) * 1000))
            self._trim(now)

    def _trim(self, now: float) -> None:
        horizon = now - self.settings.window_s
        while self._done and self._done[0][0] < horizon:
            self._done.popleft()

    def recent_ms(self) -> list[float]:
        with self._lock:
            self._trim(self._clock())
            return [ms for _, ms in self._done]

    def p99_ms(self) -> float:
        return p99(self.recent_ms())

    def rate(self) -> float:
        """Recalls answered per second over the window."""
        with self._lock:
            self._trim(self._clock())
            return len(self._done) / self.settings.window_s

    def should_yield(self, latency: bool = True) -> bool:
        """Whether background work waits now; without ``latency``, only for queued recalls."""
        s = self.settings
        if s.isolation == "OFF":
            return False
        p99_ms = self.p99_ms() if latency else 0.0  # a P99 of 0 never holds work back
        return should_yield(s.isolation, self.queued, p99_ms, s.recall_bound_ms)

    def wait_for_recalls(self, stop: threading.Event, latency: bool = True) -> None:
        """Background thread: waits while recalls come first, at most ``yield_max_ms``.
        Without ``latency`` it waits only while recalls are queued, not for a high P99: the
        partitioner's work is what keeps recalls cheap, and waiting for the P99 to fall while
        it cannot fall without that work would be a spiral (measured: 110 K rows a space
        left unlisted and scanned exactly by every recall, fresh-tier P99 300 ms)."""
        deadline = time.monotonic() + self.settings.yield_max_ms / 1000
        while not stop.is_set() and self.should_yield(latency):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if self.queued:  # the queue's emptying ends the wait at once
                self._empty.wait(min(left, 0.05))
            else:  # only the P99 is high: look again soon
                stop.wait(min(left, 0.01))


def visibility_lag_ms(node: ShardNode, now: float) -> float:
    """The age of the oldest durable write of any space that recalls cannot see yet."""
    worst = 0.0
    for space in node.working_spaces():
        since = space.wal.durable_since(space.visible)
        if since is not None:
            worst = max(worst, (now - since) * 1000)
    return worst


async def watch(node: ShardNode) -> None:
    """Every 100 ms: the latency pressure into admission (a task of the node)."""
    load = node.recalls
    s = load.settings
    if not s.latency_pressure:
        return
    while True:
        await asyncio.sleep(WATCH_S)
        now = time.monotonic()
        ratio = latency_ratio(
            load.p99_ms(), visibility_lag_ms(node, now), s.recall_bound_ms, s.visibility_bound_ms
        )
        node.admission.set_latency(load.signal.update(ratio, now))
