"""gRPC plumbing shared by the services: server and channel options, health, reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from engram.common.settings import LimitSettings


def options(limits: LimitSettings) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", limits.grpc_max_message_bytes),
        ("grpc.max_send_message_length", limits.grpc_max_message_bytes),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        # a restarted shard is back in well under a second: do not wait gRPC's default
        # reconnect backoff (which grows to minutes) before trying it again
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
    ]


# A connection must finish its TLS and HTTP/2 handshakes within this (gRPC's default is 120 s,
# which lets a client that opens connections and never speaks hold each one for two minutes).
HANDSHAKE_TIMEOUT_MS = 10_000


def server_options(limits: LimitSettings) -> list[tuple[str, int]]:
    return options(limits) + [
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 5_000),
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
    ]


def add_health_and_reflection(
    server: grpc.aio.Server, service_names: list[str]
) -> health.aio.HealthServicer:
    """Registers grpc.health.v1 and reflection; the caller sets NOT_SERVING before it starts
    the server (grpc's servicer starts out SERVING) and SERVING once it is ready."""
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection(
        [*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    return servicer


async def set_serving(servicer: health.aio.HealthServicer, serving: bool) -> None:
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    await servicer.set("", status)
