"""Routing from a memory space to the shard that owns it, and the channels to shards.

The assignment table and the shard registry come from the control plane (Redis) and are
cached, refreshed in the background and on demand (an unknown shard address, a NOT_OWNER
answer). With Redis down the gateway keeps routing from its cache. Only
:class:`~engram.gateway.shards.GrpcShards` routes through it.
"""

from __future__ import annotations

import asyncio
import logging

import grpc

from engram.common import grpcutil, internal, metrics
from engram.common.settings import Settings
from engram.contract.errors import UnavailableError
from engram.control.assignment import Assignment
from engram.control.store import ControlPlane
from engram.internal.v1 import shard_pb2_grpc

log = logging.getLogger("engram.gateway.router")

REFRESH_S = 1.0


class Router:
    def __init__(self, settings: Settings, store: ControlPlane) -> None:
        self._settings = settings
        self._store = store
        self.assignment = Assignment(settings.cluster.shard_count)
        self._addresses: dict[int, str] = {}
        self._recall_addresses: dict[int, str] = {}  # shards' recall ports ("": none)
        self._channels: dict[tuple[str, bool], grpc.aio.Channel] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for channel in self._channels.values():
            await channel.close()

    async def refresh(self) -> None:
        try:
            self.assignment = await self._store.assignment()
            shards = await self._store.shards()
        except Exception as exc:
            metrics.control_store_up.set(0)
            log.debug("control store unreachable, routing from cache: %s", exc)
            return
        metrics.control_store_up.set(1)
        for shard_id, info in shards.items():
            self._addresses[shard_id] = info.address
            self._recall_addresses[shard_id] = info.recall_address

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_S)
            await self.refresh()

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata a bidirectional stream to a shard must carry (the internal token)."""
        return internal.token_metadata(self._settings.security)

    def owner(self, space: str) -> int:
        return self.assignment.owner(space)

    async def stub(
        self, space: str, reads: bool = False, recall: bool = False
    ) -> tuple[int, shard_pb2_grpc.ShardStub]:
        """The owning shard's id and a stub for it; raises UnavailableError if unknown (see
        :meth:`channel`)."""
        shard_id, channel = await self.channel(space, reads, recall)
        return shard_id, shard_pb2_grpc.ShardStub(channel)

    async def channel(
        self, space: str, reads: bool = False, recall: bool = False
    ) -> tuple[int, grpc.aio.Channel]:
        """The owning shard's id and a channel to it; raises UnavailableError if unknown.

        Reads (recalls, listings) travel on a connection of their own: on the connection that
        carries the write streams, a recall's few bytes queue behind megabytes of batches
        whenever the shard reads more slowly than the gateway writes (HTTP/2 shares one flow
        control window and one TCP stream among all the calls of a connection). ``recall``:
        to the shard's recall port if it has one (:mod:`engram.shard.recall_port`), which
        serves recalls off the shard's event loop."""
        shard_id = self.owner(space)
        address = self._addresses.get(shard_id)
        if address is None:
            await self.refresh()
            address = self._addresses.get(shard_id)
        if address is None:
            raise UnavailableError(
                f"shard {shard_id} (owner of memory space {space!r}) has not registered; "
                "retry shortly"
            )
        if recall:
            address = self._recall_addresses.get(shard_id) or address
            reads = True
        channel = self._channels.get((address, reads))
        if channel is None:
            opts = grpcutil.options(self._settings.limits)
            # a channel of its own subchannels, so the two channels to a shard do not share
            # one connection
            opts.append(("grpc.use_local_subchannel_pool", 1))
            # Append streams carry the token themselves (call_metadata): cheaper per message
            channel = internal.aio_channel(
                address, opts, self._settings.security, stream_stream_token=False
            )
            self._channels[(address, reads)] = channel
        return shard_id, channel
