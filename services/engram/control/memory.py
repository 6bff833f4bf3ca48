"""The control-plane store in memory: the same keys and answers as the Redis store, in dicts.

Used where a control plane is needed without a Redis server: the gateway's unit tests, and
simulations that drive the assignment table (moving spaces) without processes. It implements
:class:`~engram.control.store.ControlPlane` and the rest of
:class:`~engram.control.store.ControlStore` (owners, heartbeats, counting sessions) with the
same semantics, with one difference: **a session's TTL is ignored** (the record stays until the
store is dropped, where Redis would let it expire). A shard's registration expires as in Redis,
on ``clock`` (monotonic seconds; a test may pass its own).

Like Redis, an ``update_session`` of an unknown session changes nothing (a stream that ends
after its space was dropped must not bring the session back).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from engram.control.assignment import Assignment, wins
from engram.control.store import SessionRecord, ShardInfo


@dataclass
class _Session:
    space: str | None  # None: only ever updated, never put (a partial record)
    state: str
    last_acked: int
    created_us: int
    updated_us: int


def _now_us() -> int:
    return time.time_ns() // 1000


class MemoryControlStore:
    """One process's control plane in dicts; not shared between processes."""

    def __init__(self, shard_count: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.shard_count = shard_count
        self._clock = clock
        self._sessions: dict[str, _Session] = {}
        self._epoch = 0
        self._owners: dict[str, tuple[int, int]] = {}
        self._published: set[int] = set()
        self._shards: dict[int, tuple[ShardInfo, float]] = {}  # id -> (info, expires at)

    async def close(self) -> None:
        pass

    async def ping(self) -> bool:
        return True

    # ------------------------------------------------------------------ sessions

    async def put_session(self, rec: SessionRecord, ttl_s: int) -> None:
        now = _now_us()
        old = self._sessions.get(rec.session_id)
        created = old.created_us if old is not None else now
        record = _Session(rec.space, rec.state, rec.last_acked, created, now)
        self._sessions[rec.session_id] = record

    async def get_session(self, session_id: str) -> SessionRecord | None:
        s = self._sessions.get(session_id)
        if s is None or s.space is None:
            return None
        return SessionRecord(session_id, s.space, s.state, s.last_acked)

    async def update_session(
        self, session_id: str, *, last_acked: int, state: str, ttl_s: int
    ) -> None:
        s = self._sessions.get(session_id)
        if s is not None:
            s.last_acked, s.state, s.updated_us = last_acked, state, _now_us()

    async def count_sessions(self) -> int:
        return len(self._sessions)

    # ---------------------------------------------------------------- assignment

    async def assignment(self) -> Assignment:
        return Assignment(
            self.shard_count,
            self._epoch,
            {space: shard for space, (shard, _) in self._owners.items()},
            {space: epoch for space, (_, epoch) in self._owners.items()},
            frozenset(self._published),
        )

    async def publish_owners(self, shard_id: int, claims: Mapping[str, int]) -> int:
        """Publishes the spaces ``shard_id`` owns (space -> epoch); a claim replaces an entry
        only with a higher epoch. Returns how many entries changed."""
        changed = 0
        for space, epoch in sorted(claims.items()):
            if wins(self._owners.get(space), shard_id, epoch):
                self._owners[space] = (shard_id, epoch)
                changed += 1
        self._published.add(shard_id)
        if changed:
            self._epoch += 1
        return changed

    # ------------------------------------------------------------ shard registry

    async def heartbeat(
        self, shard_id: int, address: str, ttl_s: float, recall_address: str = ""
    ) -> None:
        info = ShardInfo(shard_id, address, _now_us(), recall_address)
        self._shards[shard_id] = (info, self._clock() + ttl_s)

    async def shards(self) -> dict[int, ShardInfo]:
        """Every shard registered now (home and extra), as the Redis store answers."""
        now = self._clock()
        return {i: info for i, (info, until) in sorted(self._shards.items()) if until > now}
