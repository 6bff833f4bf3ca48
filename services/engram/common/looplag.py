"""Event-loop lag: how late the loop runs a timer, which is how long any request waits before
the loop even looks at it (``engram_event_loop_lag_seconds``; a log line when it is large).

With ``stall_ms`` set, a watchdog thread also catches the loop *while* it is late and logs
where it is: the loop thread's stack at that moment (and the stacks of the process's other
busy threads, since a thread holding the GIL stalls the loop too). That names the step that
blocked it, which the lag figure alone cannot.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
import traceback

from engram.common import metrics
from engram.common.threads import name_os_thread

log = logging.getLogger("engram.looplag")

INTERVAL_S = 0.025
_LOG_ABOVE_S = 0.1  # a minute whose worst lag is above this is logged
_WINDOW_S = 60.0
_STALL_LOG_EVERY_S = 10.0  # at most one stall trace per this many seconds
_IDLE_FRAMES = ("wait", "_wait_for_tstate_lock", "select", "poll", "get", "sleep", "acquire")


async def watch(stall_ms: float = 0.0) -> None:
    loop = asyncio.get_running_loop()
    window_start = time.monotonic()
    worst = 0.0
    watchdog = _Watchdog(threading.get_ident(), stall_ms / 1000) if stall_ms > 0 else None
    try:
        while True:
            t = loop.time()
            if watchdog is not None:
                watchdog.tick()
            await asyncio.sleep(INTERVAL_S)
            lag = max(0.0, loop.time() - t - INTERVAL_S)
            metrics.event_loop_lag.observe(lag)
            worst = max(worst, lag)
            now = time.monotonic()
            if now - window_start >= _WINDOW_S:
                if worst > _LOG_ABOVE_S:
                    log.info("event loop ran up to %.0f ms late in the last minute", worst * 1000)
                window_start, worst = now, 0.0
    finally:
        if watchdog is not None:
            watchdog.stop()


class _Watchdog:
    """Polls the loop's heartbeat from a thread of its own; a heartbeat older than the sleep
    plus ``stall_s`` is a stall in progress, and the loop thread's stack says where."""

    def __init__(self, loop_thread: int, stall_s: float) -> None:
        self._loop_thread = loop_thread
        self._stall_s = stall_s
        self._beat = time.monotonic()
        self._reported_beat = 0.0
        self._last_log = -_STALL_LOG_EVERY_S
        self._stalls = 0
        self._stopped = threading.Event()
        threading.Thread(target=self._run, name="loop-watchdog", daemon=True).start()

    def tick(self) -> None:
        self._beat = time.monotonic()

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        name_os_thread()  # its CPU shows apart from the event loop's in per-thread figures
        poll = max(0.002, min(0.01, self._stall_s / 4))
        while not self._stopped.wait(poll):
            beat = self._beat
            late = time.monotonic() - beat - INTERVAL_S
            if late < self._stall_s or beat == self._reported_beat:
                continue
            self._reported_beat = beat
            self._stalls += 1
            now = time.monotonic()
            if now - self._last_log < _STALL_LOG_EVERY_S:
                continue
            self._last_log = now
            log.warning(
                "event loop %.0f ms late (stall %d so far); where the threads are:\n%s",
                late * 1000,
                self._stalls,
                _stacks(self._loop_thread),
            )


def _stacks(loop_thread: int) -> str:
    """The loop thread's stack, then those of the threads not parked in a wait."""
    names = {t.ident: t.name for t in threading.enumerate()}
    frames = sys._current_frames()
    parts = []
    for ident, frame in sorted(frames.items(), key=lambda kv: kv[0] != loop_thread):
        if ident == threading.get_ident():
            continue
        if ident != loop_thread and frame.f_code.co_name in _IDLE_FRAMES:
            continue
        label = "event loop" if ident == loop_thread else names.get(ident, str(ident))
        stack = "".join(traceback.format_stack(frame, limit=12))
        parts.append(f"--- {label}\n{stack}")
    return "".join(parts)
