"""The faults a chaos run injects into a local cluster, one at a time.

=========================  ==================================================================
kind                       what happens
=========================  ==================================================================
``shard_kill``             SIGKILL a shard; the launcher restarts it
``shard_kill_recovering``  SIGKILL a shard, then SIGKILL its successor again before it serves
                           (while it replays its WAL, or right after it started)
``shard_pause``            SIGSTOP a shard for a few seconds, then SIGCONT
``gateway_kill``           SIGKILL the gateway while clients stream (they resume)
``redis_kill``             SIGKILL Redis; it restarts empty and the cluster rebuilds its state
``net_delay``              the gateway->shard proxies (a shard's main and recall port) delay
                           every chunk (one shard or all)
``net_reset``              the proxy resets every connection, and new ones, for a moment
``net_blackhole``          the proxy forwards nothing for a few seconds (a partition)
``wal_fsync_error``        a shard's WAL fsyncs fail (some, or all for a while)
``wal_enospc``             a shard's WAL writes fail with ENOSPC (some, or all for a while)
``move``, ``move_kill``    a space moves; or a move is killed at a step (``chaos/move_faults``)
=========================  ==================================================================

A WAL fault sometimes ends with a SIGKILL of the shard while the fault is still on, so a batch
acknowledged without being durable would be lost and found by the checkers.

:class:`Injector` carries each fault out and waits until every process serves again; it never
touches a process except through the launcher (by PID) and always undoes what it did (SIGCONT,
proxy back to ``pass``, fault file cleared), also when the run is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engram.chaos.move_faults import MoveFaults
from engram.chaos.proxy import PASS, RECALL, Mode, ProxyHost
from engram.common import internal
from engram.control.assignment import default_shard
from engram.internal.v1 import shard_pb2 as ipb
from engram.internal.v1 import shard_pb2_grpc
from engram.launcher.cluster import ClusterError, LocalCluster

log = logging.getLogger("engram.chaos.faults")

KINDS = (
    "shard_kill",
    "shard_kill_recovering",
    "shard_pause",
    "gateway_kill",
    "redis_kill",
    "net_delay",
    "net_reset",
    "net_blackhole",
    "wal_fsync_error",
    "wal_enospc",
    "move",
    "move_kill",
)


@dataclass
class FaultEvent:
    kind: str
    target: str
    start: float
    params: dict[str, Any] = field(default_factory=dict)
    end: float = 0.0  # the fault was lifted (or the kill done)
    recovered: float = 0.0  # every process served again (0: not within the timeout)
    note: str = ""


class Injector:
    def __init__(
        self,
        cluster: LocalCluster,
        proxies: ProxyHost,
        fault_files: dict[int, Path],
        rng: random.Random,
        *,
        long_faults: bool,
        short: bool = False,
        recovery_timeout_s: float = 60.0,
        key_prefix: str = "engram",
        spaces: list[str] | None = None,
    ) -> None:
        self.cluster = cluster
        self.proxies = proxies
        self.fault_files = fault_files
        self.rng = rng
        self.long_faults = long_faults
        self.scale = 0.6 if short else 1.0  # short runs: shorter pauses, partitions, faults
        self.recovery_timeout_s = recovery_timeout_s
        self.key_prefix = key_prefix
        self.shards = cluster.shards
        self.paused: set[str] = set()
        self.counters: dict[str, int] = {}
        # PIDs of shard processes seen answering SERVING to gRPC health while still recovering.
        self.serving_while_recovering: set[int] = set()
        # A space each shard owns and never holds: scanning it tells whether a shard is ready.
        self._probe_space = {
            i: _owned_name("chaos-probe", i, self.shards) for i in range(self.shards)
        }
        self.moves = MoveFaults(
            cluster,
            list(spaces or []),
            rng,
            hold=lambda i, phase: self._write_faults(i, {"hold_move_at": phase} if phase else {}),
            event=lambda kind, target: FaultEvent(kind, target, time.monotonic()),
            count=self._count,
        )

    # ------------------------------------------------------------------ entry points

    async def inject(self, kind: str) -> FaultEvent:
        """Injects one fault of ``kind``; returns once it is lifted and the cluster serves."""
        method = getattr(self, f"_{kind}")
        event: FaultEvent = await method()
        if not event.end:
            event.end = time.monotonic()
        event.recovered = await self.wait_serving(self.recovery_timeout_s)
        if not event.recovered:
            event.note = (event.note + "; " if event.note else "") + "cluster did not recover"
        return event

    async def undo_all(self) -> None:
        """Lifts whatever may still be in effect (after an interruption)."""
        for name in list(self.paused):
            self._signal(name, signal.SIGCONT)
        self.paused.clear()
        self.proxies.set_mode(self.proxies.names, PASS)
        for i in self.fault_files:
            self._write_faults(i, {})

    async def wait_serving(self, within_s: float) -> float:
        """Waits until Redis, every shard and the gateway serve; the time they did, or 0."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if await self.all_serving():
                return time.monotonic()
            await asyncio.sleep(0.1)
        return 0.0

    async def all_serving(self) -> bool:
        phases = await asyncio.gather(*(self.shard_phase(i) for i in range(self.shards)))
        if any(p != "serving" for p in phases):
            return False
        async with grpc.aio.insecure_channel(self.cluster.gateway_address) as channel:
            if not await _health(channel, 1.0) == "SERVING":
                return False
        return await asyncio.to_thread(self.cluster.healthy, "redis", 1.0)

    async def shard_phase(self, i: int) -> str:
        """ "down", "recovering" or "serving", asked directly (not through the proxy).

        The gRPC health answer alone is not enough: a shard that is still replaying its WAL
        may already say SERVING, so a scan of an empty space it owns decides."""
        address, security = self.cluster.shard_address(i), self.cluster.security.internal
        async with internal.aio_channel(address, security=security) as channel:
            health = await _health(channel, 0.5)
            if health in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "UNKNOWN"):
                return "down"
            if health == "NOT_SERVING":
                return "recovering"
            stub = shard_pb2_grpc.ShardStub(channel)
            try:
                call = stub.Scan(ipb.ScanRequest(memory_space_id=self._probe_space[i]), timeout=1.0)
                async for _ in call:
                    pass
            except grpc.aio.AioRpcError as exc:
                if "recovering" in (exc.details() or ""):
                    if health == "SERVING":
                        with contextlib.suppress(ClusterError, KeyError):
                            self.serving_while_recovering.add(self.cluster.pid(f"shard-{i}"))
                    return "recovering"
                return "down"
        return "serving"

    # ------------------------------------------------------------------ process faults

    async def _shard_kill(self) -> FaultEvent:
        name = self._pick_shard()
        event = FaultEvent("shard_kill", name, time.monotonic())
        event.params["pid"] = self._signal(name, signal.SIGKILL)
        return event

    async def _shard_kill_recovering(self) -> FaultEvent:
        name = self._pick_shard()
        i = int(name.split("-")[1])
        event = FaultEvent("shard_kill_recovering", name, time.monotonic())
        target = "recovering" if self.rng.random() < 0.7 else "starting"
        event.params["aim"] = target
        phases: list[str] = []
        for attempt in range(4):
            old = self._signal(name, signal.SIGKILL)
            if not await self._wait_new_pid(name, old, 20.0):
                event.note = "no successor process appeared"
                return event
            aim = target if attempt < 3 else "starting"
            hit = await self._catch_unready(i, aim)
            if hit is not None:
                self._signal(name, signal.SIGKILL)
                phases.append(hit)
                break
            phases.append("missed")
        event.params["phases"] = phases
        event.note = f"killed while {phases[-1]}" if phases else ""
        return event

    async def _catch_unready(self, i: int, aim: str) -> str | None:
        """Returns the phase the new shard process was in when it should be killed, or None
        when it already served (missed)."""
        if aim == "starting":
            await asyncio.sleep(self.rng.uniform(0.0, 0.3))
            phase = await self.shard_phase(i)
            if phase == "serving":
                return None
            return "recovering" if phase == "recovering" else "starting"
        deadline = time.monotonic() + 20.0
        while time.monotonic() < deadline:
            phase = await self.shard_phase(i)
            if phase == "recovering":
                return "recovering"
            if phase == "serving":
                return None
            await asyncio.sleep(0.005)
        return "starting"

    async def _shard_pause(self) -> FaultEvent:
        name = self._pick_shard()
        seconds = self._duration(2.0, 6.0, long=(12.0, 18.0))
        event = FaultEvent("shard_pause", name, time.monotonic(), {"seconds": round(seconds, 2)})
        self._signal(name, signal.SIGSTOP)
        self.paused.add(name)
        try:
            await asyncio.sleep(seconds)
        finally:
            self._signal(name, signal.SIGCONT)
            self.paused.discard(name)
        return event

    async def _move(self) -> FaultEvent:
        return await self.moves.move()

    async def _move_kill(self) -> FaultEvent:
        return await self.moves.move_kill()

    async def _gateway_kill(self) -> FaultEvent:
        event = FaultEvent("gateway_kill", "gateway", time.monotonic())
        event.params["pid"] = self._signal("gateway", signal.SIGKILL)
        return event

    async def _redis_kill(self) -> FaultEvent:
        """SIGKILL Redis; it restarts empty. Rebuilt means: every shard registered again
        (heartbeats) and the routing table (each space's owner and epoch, as the shards
        publish them) is what it was before."""
        event = FaultEvent("redis_kill", "redis", time.monotonic())
        client = aioredis.Redis.from_url(
            self.cluster.redis_url,
            decode_responses=True,
            socket_timeout=1.0,
            socket_connect_timeout=1.0,
        )
        try:
            before = await self._assignment(client)
            event.start = time.monotonic()
            self._signal("redis", signal.SIGKILL)
            event.end = time.monotonic()
            rebuilt = 0.0
            deadline = time.monotonic() + 30.0
            keys = [f"{self.key_prefix}:shard:{i}" for i in range(self.shards)]
            while time.monotonic() < deadline:
                with contextlib.suppress(aioredis.RedisError, OSError):
                    if await client.exists(*keys) == self.shards:
                        rebuilt = time.monotonic()
                        break
                await asyncio.sleep(0.05)
            if not rebuilt:
                event.note = "shards did not re-register in Redis within 30 s"
                self._count("redis_not_rebuilt")
                return event
            event.params["shards_registered_s"] = round(rebuilt - event.start, 3)
            after = None
            while time.monotonic() < deadline:
                after = await self._assignment(client)
                if after == before:
                    break
                await asyncio.sleep(0.2)
            if before is not None and after != before:
                event.note = f"assignment not rebuilt: {before} before, {after} after"
                self._count("redis_assignment_lost")
            await asyncio.sleep(2.0)
            with contextlib.suppress(aioredis.RedisError, OSError):
                n = 0
                async for _ in client.scan_iter(match=f"{self.key_prefix}:session:*"):
                    n += 1
                event.params["sessions_after_2s"] = n
        finally:
            await client.aclose()
        return event

    async def _assignment(self, client: aioredis.Redis) -> dict[str, str] | None:
        """The routing table as stored in Redis (space -> "shard:epoch"); None if Redis does
        not answer."""
        try:
            owners = await client.hgetall(f"{self.key_prefix}:assign:owners")
        except (aioredis.RedisError, OSError):
            return None
        return dict(owners)

    # ------------------------------------------------------------------ network faults

    async def _net_delay(self) -> FaultEvent:
        targets = self._pick_proxies()
        delay = self.rng.choice([20, 50, 100, 200, 400])
        seconds = self._duration(3.0, 6.0)
        return await self._proxy_fault(
            "net_delay", targets, Mode("delay", delay), seconds, {"delay_ms": delay}
        )

    async def _net_reset(self) -> FaultEvent:
        targets = self._pick_proxies()
        seconds = self._duration(0.5, 3.0)
        return await self._proxy_fault("net_reset", targets, Mode("reset"), seconds, {})

    async def _net_blackhole(self) -> FaultEvent:
        targets = self._pick_proxies()
        seconds = self._duration(2.0, 6.0, long=(16.0, 22.0))
        return await self._proxy_fault("net_blackhole", targets, Mode("blackhole"), seconds, {})

    async def _proxy_fault(
        self, kind: str, targets: list[str], mode: Mode, seconds: float, params: dict[str, Any]
    ) -> FaultEvent:
        event = FaultEvent(kind, ",".join(targets), time.monotonic(), params)
        event.params["seconds"] = round(seconds, 2)
        self.proxies.set_mode(targets, mode)
        try:
            await asyncio.sleep(seconds)
        finally:
            self.proxies.set_mode(targets, PASS)
        return event

    # ------------------------------------------------------------------ disk faults

    async def _wal_fsync_error(self) -> FaultEvent:
        return await self._wal_fault("wal_fsync_error", "fail_fsync", "persistent_fsync_error")

    async def _wal_enospc(self) -> FaultEvent:
        return await self._wal_fault("wal_enospc", "fail_write", "persistent_enospc")

    async def _wal_fault(self, kind: str, count_field: str, flag_field: str) -> FaultEvent:
        name = self._pick_shard()
        i = int(name.split("-")[1])
        event = FaultEvent(kind, name, time.monotonic())
        kill = self.rng.random() < 0.4
        if self.rng.random() < 0.5:
            spec: dict[str, Any] = {count_field: self.rng.randint(1, 3)}
            seconds = self.rng.uniform(1.0, 2.0)
        else:
            spec = {flag_field: True}
            seconds = self._duration(1.0, 4.0)
        event.params.update(spec=spec, seconds=round(seconds, 2), kill=kill)
        self._write_faults(i, spec)
        try:
            await asyncio.sleep(seconds)
            if kill:  # anything acked but not durable would be lost now
                old = self._signal(name, signal.SIGKILL)
                await self._wait_new_pid(name, old, 20.0)
                await asyncio.sleep(0.5)
        finally:
            self._write_faults(i, {})
        return event

    def _write_faults(self, i: int, spec: dict[str, Any]) -> None:
        path = self.fault_files[i]
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(spec))
        os.replace(tmp, path)

    # ------------------------------------------------------------------ helpers

    def _pick_shard(self) -> str:
        return f"shard-{self.rng.randrange(self.shards)}"

    def _pick_proxies(self) -> list[str]:
        """One shard's proxies (its main port's and its recall port's), or every shard's."""
        names = self.proxies.names
        shards = [n for n in names if not n.endswith(RECALL)]
        if len(shards) > 1 and self.rng.random() < 0.3:
            return names
        shard = self.rng.choice(shards)
        return [n for n in names if n in (shard, shard + RECALL)]

    def _duration(self, lo: float, hi: float, long: tuple[float, float] | None = None) -> float:
        if long is not None and self.long_faults and self.rng.random() < 0.15:
            return self.rng.uniform(*long)
        return self.rng.uniform(lo, hi) * self.scale

    def _signal(self, name: str, sig: int) -> int:
        try:
            return self.cluster.kill(name, sig)
        except (ClusterError, ProcessLookupError) as exc:
            log.warning("could not signal %s: %s", name, exc)
            return 0

    async def _wait_new_pid(self, name: str, old: int, within_s: float) -> bool:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            try:
                pid = self.cluster.pid(name)
            except ClusterError:
                pid = old
            if pid != old and self.cluster.state(name).alive:
                return True
            await asyncio.sleep(0.005)
        return False

    def _count(self, what: str) -> None:
        self.counters[what] = self.counters.get(what, 0) + 1


def _owned_name(prefix: str, shard: int, shards: int) -> str:
    for n in range(10_000):
        name = f"{prefix}-{n}"
        if default_shard(name, shards) == shard:
            return name
    raise RuntimeError(f"no name for shard {shard}")


async def _health(channel: grpc.aio.Channel, timeout: float) -> str:  # noqa: ASYNC109
    """The gRPC health status name, or the status code name of the failed check (``timeout``
    is a gRPC deadline)."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return str(exc.code().name)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
