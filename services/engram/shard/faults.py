"""Fault injection for chaos runs: a JSON file the shard polls and applies to its WAL faults.

Off unless ``ENGRAM_FAULT_FILE`` names a file. The file holds the fields of
:class:`~engram.shard.wal.WalFaults`, e.g. ``{"fail_fsync": 3}`` (the next three fsyncs fail)
or ``{"persistent_enospc": true}`` (every write fails until the file says otherwise), and
``{"hold_move_at": "fenced"}``: a move into this shard waits at that phase (``copying``,
``catching_up``, ``fenced``, ``committed``) until the file says otherwise, so a test can kill
a process at a chosen step of a move. The file is polled every ``POLL_S``: write it by
replacing it (a new file renamed over the old one), and give the shard ``SETTLE_S`` to see
it. Counts are applied once each time the file changes; persistent flags follow the file.
Writing ``{}`` clears persistent faults.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from dataclasses import dataclass

from engram.shard.wal import WalFaults

log = logging.getLogger("engram.shard.faults")

POLL_S = 0.1
# Long enough for a change of the file to have been applied (a few polls).
SETTLE_S = 0.35
_COUNTS = ("fail_fsync", "fail_write")
_FLAGS = ("persistent_fsync_error", "persistent_enospc")


@dataclass
class MoveFaults:
    # The phase at which moves into this shard wait while it is named here.
    hold_at: str = ""

    async def passing(self, phase: str) -> None:
        """Returns once the move may go past ``phase``."""
        while self.hold_at == phase:  # noqa: ASYNC110 (a test's hold, polled from the file)
            await asyncio.sleep(0.02)


def apply(faults: WalFaults, spec: dict[str, object], moves: MoveFaults | None = None) -> None:
    for name in _COUNTS:
        value = spec.get(name, 0)
        if isinstance(value, int) and value > 0:
            setattr(faults, name, getattr(faults, name) + value)
    for name in _FLAGS:
        setattr(faults, name, bool(spec.get(name, False)))
    if moves is not None:
        moves.hold_at = str(spec.get("hold_move_at", ""))


async def watch(path: str, faults: WalFaults, moves: MoveFaults | None = None) -> None:
    """Applies the file's faults whenever it changes (runs until cancelled)."""
    seen: tuple[int, int, int] | None = None
    while True:
        try:
            st = os.stat(path)
            # the inode too: two writes within one tick of the clock that stamps files leave
            # the same mtime, and writers replace the file (a new inode) to be seen
            version: tuple[int, int, int] | None = (st.st_mtime_ns, st.st_ino, st.st_size)
        except FileNotFoundError:
            version = None
        if version is not None and version != seen:
            seen = version
            try:
                spec = json.loads(await asyncio.to_thread(_read, path))
                apply(faults, spec, moves)
                log.warning("fault injection: %s -> %s", spec, faults)
            except (OSError, ValueError) as exc:
                log.error("fault file %s unreadable: %s", path, exc)
        await asyncio.sleep(POLL_S)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()
