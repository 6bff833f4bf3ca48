"""Event-loop lag: how late the loop runs a timer, which is how long any request waits before
the loop even looks at it (``engram_event_loop_lag_seconds``; a log line when it is large)."""

from __future__ import annotations

import asyncio
import logging
import time

from engram.common import metrics

log = logging.getLogger("engram.looplag")

INTERVAL_S = 0.025
_LOG_ABOVE_S = 0.1  # a minute whose worst lag is above this is logged
_WINDOW_S = 60.0


async def watch() -> None:
    loop = asyncio.get_running_loop()
    window_start = time.monotonic()
    worst = 0.0
    while True:
        t = loop.time()
        await asyncio.sleep(INTERVAL_S)
        lag = max(0.0, loop.time() - t - INTERVAL_S)
        metrics.event_loop_lag.observe(lag)
        worst = max(worst, lag)
        now = time.monotonic()
        if now - window_start >= _WINDOW_S:
            if worst > _LOG_ABOVE_S:
                log.info("event loop ran up to %.0f ms late in the last minute", worst * 1000)
            window_start, worst = now, 0.0
