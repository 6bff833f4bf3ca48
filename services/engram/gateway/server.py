"""Runs a gateway process: the public gRPC service, health, the HTTP port, clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc

from engram.common import grpcutil, looplag, tls
from engram.common.http import start_http
from engram.common.keys import KeyRing, KeysFileError
from engram.common.settings import Settings, SettingsError
from engram.control.store import ControlStore
from engram.gateway import ws, ws_static
from engram.gateway.auth import Authenticator
from engram.gateway.canary import Canary
from engram.gateway.context import GatewayContext
from engram.gateway.router import Router
from engram.gateway.service import SERVICE, EngramStreamService, handler
from engram.gateway.shards import GrpcShards

log = logging.getLogger("engram.gateway")


async def serve(settings: Settings) -> None:
    try:  # before anything starts: a bad certificate or key stops the gateway here
        grpc_tls = tls.grpc_server_credentials(settings.security)
        http_tls = tls.server_ssl_context(settings.security)
    except SettingsError as exc:
        raise SystemExit(f"gateway: {exc}") from None
    c = settings.cluster
    store = ControlStore(c.redis_url, c.key_prefix, c.shard_count)
    keyring = None
    if settings.security.keys_file:  # API keys on: a keys file that does not load stops here
        keyring = KeyRing(settings.security.keys_file, settings.security.keys_reload_s)
        try:
            keyring.load()
        except KeysFileError as exc:
            raise SystemExit(f"gateway: {exc}") from None
        keyring.start()
    router = Router(settings, store)
    await router.start()
    authenticator = Authenticator(settings.security, keyring)
    gw = GatewayContext(settings, store, GrpcShards(router, settings), authenticator)
    endpoint = ws.WebSocketEndpoint(gw)
    server = grpc.aio.server(options=grpcutil.server_options(settings.limits))
    server.add_generic_rpc_handlers((handler(EngramStreamService(gw)),))
    health = grpcutil.add_health_and_reflection(server, [SERVICE])
    listen = settings.gateway.listen
    if grpc_tls is not None:
        port = server.add_secure_port(listen, grpc_tls)
    else:
        port = server.add_insecure_port(listen)
    if port == 0:
        raise SystemExit(f"gateway: cannot listen on {listen} (port in use?)")
    await grpcutil.set_serving(health, False)  # grpc's health service starts out SERVING
    await server.start()

    async def healthy() -> tuple[bool, str]:
        try:
            redis_ok = await asyncio.wait_for(store.ping(), 1.0)
        except Exception:
            redis_ok = False
        return True, f"gateway ok; redis {'reachable' if redis_ok else 'UNREACHABLE'}"

    http = await start_http(
        settings.gateway.http_host,
        settings.gateway.http_port,
        healthy,
        ws_handler=endpoint,
        ws_path=ws.PATH,
        max_size=endpoint.initial_max_size,
        routes=ws_static.route,
        ws_check=endpoint.handshake,
        ssl=http_tls,
    )
    tls_task = None
    if http_tls is not None:
        tls_task = asyncio.create_task(tls.keep_reloaded(http_tls, settings.security))
    lag_task = asyncio.create_task(looplag.watch(settings.loop_stall_trace_ms))
    canary_task = None
    if settings.gateway.canary_interval_s > 0:
        canary_task = asyncio.create_task(Canary(gw, settings.gateway.canary_interval_s).run())
    await grpcutil.set_serving(health, True)
    log.info(
        "gateway serving gRPC on %s, HTTP on %s:%d%s",
        settings.gateway.listen,
        settings.gateway.http_host,
        settings.gateway.http_port,
        " (TLS)" if grpc_tls is not None else "",
    )

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("gateway stopping")
    await grpcutil.set_serving(health, False)
    lag_task.cancel()
    if tls_task is not None:
        tls_task.cancel()
    if canary_task is not None:
        canary_task.cancel()
        await asyncio.gather(canary_task, return_exceptions=True)
    await server.stop(grace=5)
    http.close()
    await router.close()
    await store.close()
    if keyring is not None:
        await keyring.stop()
    log.info("gateway stopped")


def run(settings: Settings) -> None:
    asyncio.run(serve(settings))
