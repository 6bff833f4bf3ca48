"""Client flow control on one stream: the SLOW_DOWN token bucket.

Used by :class:`~engram.gateway.stream.ClientStream` when the client sends ``SLOW_DOWN`` (a
bucket at its preferred rate) or ``SPEED_UP`` (a new bucket, or none).
"""

from __future__ import annotations

import asyncio
import time


class TokenBucket:
    """Holds a stream to ``rate`` observations/s (SLOW_DOWN); bursts up to one second."""

    def __init__(self, rate: int) -> None:
        self.rate = max(1, rate)
        self._tokens = float(self.rate)
        self._at = time.monotonic()
        self.replaced = asyncio.Event()  # a later SLOW_DOWN / SPEED_UP took over

    async def take(self, n: int) -> bool:
        """Waits for ``n`` tokens; False if the bucket was replaced meanwhile."""
        now = time.monotonic()
        self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
        self._at = now
        self._tokens -= n
        if self._tokens < 0:
            try:
                await asyncio.wait_for(self.replaced.wait(), -self._tokens / self.rate)
                return False
            except TimeoutError:
                pass
        return True
