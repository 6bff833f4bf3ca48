"""Runs a shard process: recovery, the gRPC service (and its recall port), health, the HTTP port,
clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc

from engram.common import grpcutil, internal, looplag
from engram.common.http import start_http
from engram.common.settings import Settings, SettingsError
from engram.internal.v1 import shard_pb2, shard_pb2_grpc
from engram.shard.node import ShardNode
from engram.shard.recall_port import RecallPort
from engram.shard.service import ShardService

log = logging.getLogger("engram.shard")


async def serve(settings: Settings) -> None:
    try:  # the secret and certificates first: a bad file stops the shard before recovery
        interceptors = internal.server_interceptors(settings.security)
        internal.channel_credentials(settings.security)
    except SettingsError as exc:
        raise SystemExit(f"shard: {exc}") from None
    node = ShardNode(settings)
    server = grpc.aio.server(
        options=grpcutil.server_options(settings.limits), interceptors=interceptors
    )
    service = ShardService(node)
    shard_pb2_grpc.add_ShardServicer_to_server(service, server)
    health = grpcutil.add_health_and_reflection(
        server, [shard_pb2.DESCRIPTOR.services_by_name["Shard"].full_name]
    )
    if internal.add_port(server, settings.shard.listen, settings.security) == 0:
        raise SystemExit(f"shard: cannot listen on {settings.shard.listen} (port in use?)")
    recall_port = None
    if settings.shard.recall_listen:
        recall_port = RecallPort(service, settings)
        if recall_port.start() == 0:
            raise SystemExit(
                f"shard: cannot listen on {settings.shard.recall_listen} (the recall port; "
                "port in use?)"
            )
    await grpcutil.set_serving(health, False)  # until recovery is done (grpc starts SERVING)
    await server.start()
    await asyncio.to_thread(node.recover)
    await node.start()
    await node.publish_ownership()  # routable before it reports SERVING

    async def healthy() -> tuple[bool, str]:
        return True, f"shard {node.shard_id}: {len(node.spaces)} spaces"

    http = None
    if settings.shard.http_port:
        http = await start_http(settings.shard.http_host, settings.shard.http_port, healthy)
    lag_task = asyncio.create_task(looplag.watch(settings.loop_stall_trace_ms))
    await grpcutil.set_serving(health, True)
    log.info(
        "shard %d serving on %s (data %s)",
        node.shard_id,
        settings.shard.listen,
        settings.shard.data_dir,
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shard %d stopping", node.shard_id)
    await grpcutil.set_serving(health, False)
    lag_task.cancel()
    await server.stop(grace=5)
    if recall_port is not None:
        await asyncio.to_thread(recall_port.stop, 5)
    if http is not None:
        http.close()
    await node.stop()
    log.info("shard %d stopped", node.shard_id)


def run(settings: Settings) -> None:
    _huge_pages(settings.shard.huge_pages)
    asyncio.run(serve(settings))


def _huge_pages(on: bool) -> None:
    """Whether numpy madvises its large arrays for transparent huge pages (ENGRAM_HUGE_PAGES)."""
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # a numpy without the switch
        return
    _set_madvise_hugepage(on)
