"""The sessions of one memory space: high-water marks, duplicates and read-your-writes rows.

A session numbers its batches 1, 2, 3 ... and the space keeps two marks per session:
``assigned``, the last sequence number queued for the WAL, and ``durable``, the last one
fsynced (and so acknowledged). ``assigned`` runs ahead of ``durable`` by the batches in flight;
a WAL failure rolls it back to ``durable`` (:meth:`Sessions.roll_back`), so a batch that was
never acknowledged can be sent again under its number.

A batch sent again (a *duplicate*) is answered from the marks: at once if it is durable, else
once the batch it repeats is (:meth:`Sessions.duplicate`, :meth:`Sessions.answer_duplicates`).
``opening`` holds sessions whose WAL record is being written, ``rows`` the rows visible when each
session's last batch was (what a SESSION-consistent recall must see).

Only the event loop touches a :class:`Sessions`: the write path
(:class:`~engram.shard.writes.WritePath`) moves the marks, recovery restores ``durable`` from the
checkpoint and the WAL, recall reads ``rows``, and a checkpoint copies ``durable``.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from dataclasses import dataclass

from engram.contract.errors import StorageError


def now_us() -> int:
    return time.time_ns() // 1000


@dataclass(frozen=True)
class AppendResult:
    """What appending a batch resolves to, once it is durable and visible (``duplicate``: the
    session had sent it before, nothing was stored again)."""

    sequence_number: int
    first_lsn: int
    count: int
    duplicate: bool
    committed_at_us: int
    first_id: str


class Sessions:
    """Per-session sequencing state of one memory space (event loop only)."""

    def __init__(self) -> None:
        self.assigned: dict[str, int] = {}  # last sequence number queued for the WAL
        self.durable: dict[str, int] = {}  # last sequence number durable (acknowledged)
        self.opening: dict[str, asyncio.Future[int]] = {}  # WAL record being written
        self.rows: dict[str, int] = {}  # rows visible when the session's last batch was
        # duplicates of batches still in flight, answered once the batch they repeat is durable
        self._waiters: dict[str, list[tuple[int, asyncio.Future[AppendResult]]]] = defaultdict(list)

    def duplicate(
        self, loop: asyncio.AbstractEventLoop, session_id: str, seq: int
    ) -> asyncio.Future[AppendResult]:
        """Answers batch ``seq`` sent again: now if it is durable, else once it is."""
        fut: asyncio.Future[AppendResult] = loop.create_future()
        if seq <= self.durable.get(session_id, 0):
            fut.set_result(AppendResult(seq, 0, 0, True, now_us(), ""))
        else:
            self._waiters[session_id].append((seq, fut))
        return fut

    def answer_duplicates(self, session_id: str, durable: int) -> None:
        """Answers the duplicates waiting for batches up to ``durable``."""
        waiters = self._waiters.get(session_id)
        if waiters:
            still = []
            for seq, fut in waiters:
                if seq <= durable:
                    if not fut.done():
                        fut.set_result(AppendResult(seq, 0, 0, True, now_us(), ""))
                else:
                    still.append((seq, fut))
            self._waiters[session_id] = still

    def fail(self, session_id: str, err: Exception) -> None:
        """Fails the duplicates waiting in ``session_id``."""
        for _seq, fut in self._waiters.pop(session_id, []):
            if not fut.done():
                fut.set_exception(err)

    def roll_back(self) -> None:
        """After a WAL failure, once nothing is in flight: what is not durable is gone, so the
        marks go back to the durable ones and the duplicates waiting for it fail."""
        self.assigned = dict(self.durable)
        for sid in list(self._waiters):
            self.fail(sid, StorageError("the WAL failed before this batch was durable"))
