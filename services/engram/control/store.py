"""The control-plane store: sessions, the assignment table, shard registry; in Redis.

:class:`ControlPlane` is the store as the gateway uses it (its client streams and its router);
:class:`ControlStore` is the Redis implementation every process runs with (shards also
heartbeat through it), :class:`~engram.control.memory.MemoryControlStore` the in-memory one.

Redis holds soft state only. Shards keep the truth about sessions (their WALs record each
session and its high-water mark), so a Redis restarted empty loses nothing: the gateway falls
back to asking the owning shard, and shards re-register with their next heartbeat.

Keys (``P`` is the configured prefix):
  P:session:<id>      hash {space, state, last_acked, created_us, updated_us}, with a TTL
  P:assign:epoch      integer, rises on every change of the overrides
  P:assign:overrides  hash space -> shard id
  P:shard:<id>        hash {address, heartbeat_us}, with a TTL a few heartbeats long
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis

from engram.control.assignment import Assignment


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    space: str
    state: str
    last_acked: int


@dataclass(frozen=True)
class ShardInfo:
    shard_id: int
    address: str
    heartbeat_us: int


def _now_us() -> int:
    return time.time_ns() // 1000


class ControlPlane(Protocol):
    """What the gateway reads and writes in the control plane. Every call may raise (the
    store is unreachable): callers treat it as a cache and fall back on the shards."""

    async def put_session(self, rec: SessionRecord, ttl_s: int) -> None: ...

    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    async def update_session(
        self, session_id: str, *, last_acked: int, state: str, ttl_s: int
    ) -> None: ...

    async def assignment(self) -> Assignment: ...

    async def shards(self) -> dict[int, ShardInfo]: ...


class ControlStore:
    """Async access to the control-plane keys in Redis; one instance per process."""

    def __init__(self, redis_url: str, prefix: str = "engram", shard_count: int = 1) -> None:
        self._redis = aioredis.Redis.from_url(
            redis_url, decode_responses=True, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        self._p = prefix
        self.shard_count = shard_count

    async def close(self) -> None:
        await self._redis.aclose()

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    # ------------------------------------------------------------------ sessions

    async def put_session(self, rec: SessionRecord, ttl_s: int) -> None:
        key = f"{self._p}:session:{rec.session_id}"
        now = _now_us()
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                key,
                mapping={
                    "space": rec.space,
                    "state": rec.state,
                    "last_acked": rec.last_acked,
                    "updated_us": now,
                },
            )
            pipe.hsetnx(key, "created_us", now)
            pipe.expire(key, ttl_s)
            await pipe.execute()

    async def get_session(self, session_id: str) -> SessionRecord | None:
        data = await self._redis.hgetall(f"{self._p}:session:{session_id}")
        if not data or "space" not in data:
            return None
        return SessionRecord(
            session_id=session_id,
            space=data["space"],
            state=data.get("state", "active"),
            last_acked=int(data.get("last_acked", 0)),
        )

    async def update_session(
        self, session_id: str, *, last_acked: int, state: str, ttl_s: int
    ) -> None:
        key = f"{self._p}:session:{session_id}"
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hset(
                key, mapping={"last_acked": last_acked, "state": state, "updated_us": _now_us()}
            )
            pipe.expire(key, ttl_s)
            await pipe.execute()

    async def count_sessions(self) -> int:
        n = 0
        async for _ in self._redis.scan_iter(match=f"{self._p}:session:*", count=1000):
            n += 1
        return n

    # ---------------------------------------------------------------- assignment

    async def assignment(self) -> Assignment:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(f"{self._p}:assign:epoch")
            pipe.hgetall(f"{self._p}:assign:overrides")
            epoch, overrides = await pipe.execute()
        return Assignment(
            shard_count=self.shard_count,
            epoch=int(epoch or 0),
            overrides={space: int(shard) for space, shard in overrides.items()},
        )

    async def set_override(self, space: str, shard_id: int) -> int:
        """Assigns ``space`` to ``shard_id``; returns the new epoch."""
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(f"{self._p}:assign:overrides", space, shard_id)
            pipe.incr(f"{self._p}:assign:epoch")
            _, epoch = await pipe.execute()
        return int(epoch)

    # ------------------------------------------------------------ shard registry

    async def heartbeat(self, shard_id: int, address: str, ttl_s: float) -> None:
        key = f"{self._p}:shard:{shard_id}"
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping={"address": address, "heartbeat_us": _now_us()})
            pipe.pexpire(key, int(ttl_s * 1000))
            await pipe.execute()

    async def shards(self) -> dict[int, ShardInfo]:
        out: dict[int, ShardInfo] = {}
        async with self._redis.pipeline(transaction=False) as pipe:
            for i in range(self.shard_count):
                pipe.hgetall(f"{self._p}:shard:{i}")
            rows = await pipe.execute()
        for i, row in enumerate(rows):
            if row and "address" in row:
                out[i] = ShardInfo(i, row["address"], int(row.get("heartbeat_us", 0)))
        return out
