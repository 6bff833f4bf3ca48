"""Moving a memory space to another shard, as a caller sees it: one call, progress, a result.

The shards carry a move out themselves (the target runs it: ``engram.shard.move_target``);
this module is what ``engram move``, the local rebalancer and the operator call. It finds who
owns a space from the shards' own answers (``Stats``: each shard reports the spaces it holds,
with their epoch and any move in progress), checks the request, starts ``MoveIn`` on the target
and follows its progress to the end::

    result = await move_space(shards, "agent-7", target=2, on_progress=print)
    result.pause_ms, result.seconds, result.epoch

Bad requests fail before anything changes, with :class:`MoveRefused` saying why: an unknown
space or shard, a target that already owns the space, a space already moving.
Every call goes through :mod:`engram.common.internal` (the shards' token and mTLS):
``security`` None is the caller's own settings (its environment).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grpc

from engram.common import internal
from engram.common.settings import SecuritySettings
from engram.contract.errors import (
    EngramError,
    UnavailableError,
    ValidationError,
    from_proto,
    from_rpc_error,
)
from engram.internal.v1 import shard_pb2 as ipb
from engram.internal.v1 import shard_pb2_grpc
from engram.v1 import streaming_pb2 as pb

P = ipb.MoveProgress
PHASES = {v: k.lower() for k, v in P.Phase.items()}
STATS_TIMEOUT_S = 5.0


class MoveRefused(ValidationError):
    """The move was not started: the request names something that cannot be moved so."""


@dataclass(frozen=True)
class SpaceState:
    """A space as the shards report it."""

    space: str
    owner: int  # the shard that owns it (or, while fenced, still answers for it)
    epoch: int
    state: str  # owned, fenced (moving out)
    rows: int
    bytes: int
    indexed: int = 0
    move_id: str = ""
    # while moving: the other shard
    peer: int = -1


@dataclass(frozen=True)
class MoveResult:
    space: str
    source: int
    target: int
    epoch: int
    seconds: float
    pause_ms: float  # how long the source refused writes (fence to commit)
    copied_bytes: int  # checkpoint files
    wal_bytes: int
    rows: int


async def shard_stats(
    addresses: Mapping[int, str], security: SecuritySettings | None = None
) -> dict[int, ipb.StatsResponse]:
    """Stats of every shard that answers (the others are left out). The shards are asked at
    once, so one that hangs costs a look ``STATS_TIMEOUT_S`` in all, not that much per shard."""

    async def one(address: str) -> ipb.StatsResponse | None:
        async with internal.aio_channel(address, security=security) as channel:
            try:
                return await shard_pb2_grpc.ShardStub(channel).Stats(
                    ipb.StatsRequest(), timeout=STATS_TIMEOUT_S
                )
            except grpc.aio.AioRpcError:
                return None

    shards = sorted(addresses)
    answers = await asyncio.gather(*(one(addresses[shard]) for shard in shards))
    return {shard: stats for shard, stats in zip(shards, answers, strict=True) if stats}


def spaces_of(stats: Mapping[int, ipb.StatsResponse]) -> dict[str, SpaceState]:
    """Every space some shard claims, by the highest epoch where two claim it."""
    found: dict[str, SpaceState] = {}
    for shard, reply in stats.items():
        for s in reply.spaces:
            if s.state not in ("owned", "fenced"):
                continue
            state = SpaceState(
                s.memory_space_id,
                shard,
                s.epoch,
                s.state,
                s.count,
                s.bytes,
                s.indexed,
                s.move_id,
                s.peer,
            )
            old = found.get(s.memory_space_id)
            if old is None or state.epoch > old.epoch:
                found[s.memory_space_id] = state
    return found


def incoming_of(stats: Mapping[int, ipb.StatsResponse]) -> dict[str, tuple[int, ipb.SpaceStats]]:
    """Spaces being copied into a shard: space -> (target shard, what it reports of the move:
    ``move_id``, ``peer`` (the source), ``move_phase``, ``epoch``)."""
    return {
        s.memory_space_id: (shard, s)
        for shard, reply in stats.items()
        for s in reply.spaces
        if s.state == "incoming"
    }


async def move_space(
    addresses: Mapping[int, str],
    space: str,
    target: int,
    *,
    on_progress: Callable[[ipb.MoveProgress], None] | None = None,
    move_id: str = "",
    security: SecuritySettings | None = None,
) -> MoveResult:
    """Moves ``space`` to shard ``target`` and returns once the move is done.

    ``addresses``: every shard's gRPC address (as the shards advertise them). Raises
    :class:`MoveRefused` for a bad request, or the move's error if it aborted (nothing
    changed then: the space stays where it was)."""
    if target not in addresses:
        known = ", ".join(f"shard-{i}" for i in sorted(addresses)) or "none"
        raise MoveRefused(f"there is no shard-{target} (shards: {known})")
    stats = await shard_stats(addresses, security)
    if target not in stats:
        raise UnavailableError(f"shard-{target} does not answer; retry once it is up")
    where = spaces_of(stats).get(space)
    if where is None:
        raise MoveRefused(f"no shard holds a memory space {space!r}", code=pb.INVALID_SPACE_ID)
    if where.owner == target:
        raise MoveRefused(f"memory space {space!r} is already on shard-{target}")
    if where.state == "fenced" or space in incoming_of(stats):
        raise MoveRefused(
            f"memory space {space!r} is already moving (move {where.move_id or '?'}); "
            "wait for it, or cancel it with `engram move --cancel`"
        )
    move_id = move_id or f"m-{uuid.uuid4().hex[:12]}"
    started = time.monotonic()
    last = P()
    req = ipb.MoveInRequest(
        memory_space_id=space,
        source_shard=where.owner,
        source_address=addresses[where.owner],
        move_id=move_id,
    )
    async with internal.aio_channel(addresses[target], security=security) as channel:
        try:
            async for progress in shard_pb2_grpc.ShardStub(channel).MoveIn(req):
                last = progress
                if on_progress is not None:
                    on_progress(progress)
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc, f"shard-{target} (the target)") from None
    if last.phase == P.ABORTED:
        raise from_proto(last.error)
    if last.phase != P.DONE:
        raise EngramError(f"move {move_id} of {space!r} ended in phase {PHASES[last.phase]}")
    return MoveResult(
        space=space,
        source=where.owner,
        target=target,
        epoch=last.epoch,
        seconds=time.monotonic() - started,
        pause_ms=last.pause_us / 1000,
        copied_bytes=last.bytes_copied,
        wal_bytes=last.wal_bytes,
        rows=last.lsn,
    )


async def cancel_move(
    addresses: Mapping[int, str], space: str, security: SecuritySettings | None = None
) -> int:
    """Cancels the move of ``space`` in progress; returns the target shard it was going to."""
    stats = await shard_stats(addresses, security)
    incoming = incoming_of(stats)
    if space not in incoming:
        raise MoveRefused(f"memory space {space!r} is not moving")
    target, _ = incoming[space]
    async with internal.aio_channel(addresses[target], security=security) as channel:
        reply = await shard_pb2_grpc.ShardStub(channel).CancelMove(
            ipb.CancelMoveRequest(memory_space_id=space), timeout=STATS_TIMEOUT_S
        )
    if reply.HasField("error"):
        raise from_proto(reply.error)
    return target
