"""The control-plane store: sessions, the assignment table, shard registry; in Redis.

:class:`ControlPlane` is the store as the gateway uses it (its client streams and its router);
:class:`ControlStore` is the Redis implementation every process runs with (shards also
heartbeat through it), :class:`~engram.control.memory.MemoryControlStore` the in-memory one.

Redis holds soft state only. Shards keep the truth about sessions (their WALs record each
session and its high-water mark), so a Redis restarted empty loses nothing: the gateway falls
back to asking the owning shard, and shards re-register with their next heartbeat.

The routing table is a copy too: every shard records the spaces it owns in its own data
directory and publishes them here (:meth:`ControlStore.publish_owners`, a script that keeps a
claim only over one of a lower epoch), again after Redis lost them.

Keys (``P`` is the configured prefix):
  P:session:<id>       hash {space, state, last_acked, created_us, updated_us}, with a TTL
  P:space:<space>:sessions
                       set of the space's session ids (put_session adds, with the sessions'
                       TTL renewed): a dropped space's sessions are found without a SCAN
  P:assign:epoch       integer, the table's version: rises on every change of the owners
  P:assign:owners      hash space -> "<shard>:<epoch>"
  P:assign:published   set of the shard ids that published their owners since Redis started
  P:shard:<id>         hash {address, heartbeat_us}, with a TTL a few heartbeats long
  P:shards             set of the shard ids that ever registered (home and extra shards):
                       :meth:`ControlStore.shards` reads the hashes of these ids and of
                       0..count-1; an id whose hash expired is left out
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis

from engram.control.assignment import Assignment, decode_claim


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
    recall_address: str = ""  # the shard's recall port ("": recalls on ``address``)


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
        self._publish = self._redis.register_script(_PUBLISH)  # EVALSHA after the first
        self._unroute = self._redis.register_script(_UNROUTE)
        self._update = self._redis.register_script(_UPDATE)
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
            pipe.sadd(self._space_sessions(rec.space), rec.session_id)
            pipe.expire(self._space_sessions(rec.space), ttl_s)
            await pipe.execute()

    def _space_sessions(self, space: str) -> str:
        return f"{self._p}:space:{space}:sessions"

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
        """Updates a known session; an unknown one (expired, or of a dropped space: a stream
        ending after the drop) is left unknown rather than created partly."""
        key = f"{self._p}:session:{session_id}"
        await self._update(keys=[key], args=[last_acked, state, _now_us(), ttl_s])

    async def forget_space(
        self,
        space: str,
        *,
        shard: int,
        epoch: int,
        sessions: Collection[str] = (),
        keep_route: bool = False,
    ) -> None:
        """Forgets a dropped space: its sessions (those of its set and ``sessions``), the set,
        and its routing entry if it is still ``shard`` at ``epoch`` (a claim published since,
        by another shard or at a higher epoch, stays) unless ``keep_route``."""
        members = await self._redis.smembers(self._space_sessions(space))
        ids = sorted(set(members) | set(sessions))
        async with self._redis.pipeline(transaction=True) as pipe:
            for session_id in ids:
                pipe.delete(f"{self._p}:session:{session_id}")
            pipe.delete(self._space_sessions(space))
            await pipe.execute()
        if not keep_route:
            keys = [f"{self._p}:assign:owners", f"{self._p}:assign:epoch"]
            await self._unroute(keys=keys, args=[space, f"{shard}:{epoch}"])

    async def count_sessions(self) -> int:
        n = 0
        async for _ in self._redis.scan_iter(match=f"{self._p}:session:*", count=1000):
            n += 1
        return n

    # ---------------------------------------------------------------- assignment

    async def assignment(self) -> Assignment:
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.get(f"{self._p}:assign:epoch")
            pipe.hgetall(f"{self._p}:assign:owners")
            pipe.smembers(f"{self._p}:assign:published")
            version, owners, published = await pipe.execute()
        claims = {space: decode_claim(value) for space, value in owners.items()}
        return Assignment(
            shard_count=self.shard_count,
            epoch=int(version or 0),
            overrides={space: shard for space, (shard, _) in claims.items()},
            epochs={space: epoch for space, (_, epoch) in claims.items()},
            published=frozenset(int(s) for s in published),
        )

    async def publish_owners(self, shard_id: int, claims: Mapping[str, int]) -> int:
        """Publishes the spaces ``shard_id`` owns (space -> epoch); a claim replaces an entry
        only with a higher epoch. Returns how many entries changed."""
        args: list[str | int] = [shard_id]
        for space, epoch in sorted(claims.items()):
            args += [space, epoch]
        keys = [
            f"{self._p}:assign:owners",
            f"{self._p}:assign:epoch",
            f"{self._p}:assign:published",
        ]
        return int(await self._publish(keys=keys, args=args))

    # ------------------------------------------------------------ shard registry

    async def heartbeat(
        self, shard_id: int, address: str, ttl_s: float, recall_address: str = ""
    ) -> None:
        key = f"{self._p}:shard:{shard_id}"
        row = {"address": address, "heartbeat_us": _now_us(), "recall_address": recall_address}
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=row)
            pipe.pexpire(key, int(ttl_s * 1000))
            pipe.sadd(f"{self._p}:shards", shard_id)
            await pipe.execute()

    async def registered(self) -> dict[int, ShardInfo]:
        """Every shard registered now, whatever this store's shard count (for tools)."""
        out: dict[int, ShardInfo] = {}
        async for key in self._redis.scan_iter(match=f"{self._p}:shard:*", count=1000):
            suffix = key.rsplit(":", 1)[1]
            row = await self._redis.hgetall(key)
            if suffix.isdigit() and row and "address" in row:
                out[int(suffix)] = _shard_info(int(suffix), row)
        return dict(sorted(out.items()))

    async def shards(self) -> dict[int, ShardInfo]:
        """Every shard registered now: the home shards (0..count-1) and the extra shards
        (higher ids) alike. Two round trips, no SCAN: the gateways call it every second."""
        members = await self._redis.smembers(f"{self._p}:shards")
        ids = sorted(set(range(self.shard_count)) | {int(m) for m in members if m.isdigit()})
        async with self._redis.pipeline(transaction=False) as pipe:
            for i in ids:
                pipe.hgetall(f"{self._p}:shard:{i}")
            rows = await pipe.execute()
        return {
            i: _shard_info(i, row)
            for i, row in zip(ids, rows, strict=True)
            if row and "address" in row
        }


def _shard_info(shard_id: int, row: Mapping[str, str]) -> ShardInfo:
    return ShardInfo(
        shard_id,
        row["address"],
        int(row.get("heartbeat_us", 0)),
        row.get("recall_address", ""),
    )


# KEYS: owners hash, version counter, published set. ARGV: shard, then space, epoch pairs.
# The same rule as engram.control.assignment.wins: only a higher epoch replaces a claim.
_PUBLISH = """
local shard = ARGV[1]
local changed = 0
for i = 2, #ARGV, 2 do
  local space, epoch = ARGV[i], tonumber(ARGV[i + 1])
  local current = redis.call('HGET', KEYS[1], space)
  local take = true
  if current then
    local e = tonumber(string.match(current, ':(%d+)$'))
    if e >= epoch then take = false end
  end
  if take then
    redis.call('HSET', KEYS[1], space, shard .. ':' .. epoch)
    changed = changed + 1
  end
end
redis.call('SADD', KEYS[3], shard)
if changed > 0 then redis.call('INCR', KEYS[2]) end
return changed
"""

# KEYS: owners hash, version counter. ARGV: space, the claim "<shard>:<epoch>" to remove.
_UNROUTE = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('INCR', KEYS[2])
  return 1
end
return 0
"""

# KEYS: a session's hash. ARGV: last_acked, state, updated_us, ttl_s. Only an existing session.
_UPDATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'last_acked', ARGV[1], 'state', ARGV[2], 'updated_us', ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""
