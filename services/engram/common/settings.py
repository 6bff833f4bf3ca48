"""Settings of every service, one frozen dataclass per concern.

Values come from the environment in exactly one place, :func:`load`, and are validated there;
an invalid value raises :class:`SettingsError` naming the variable and the allowed range. The
local launcher and the Kubernetes manifests configure services only through these variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from engram.common.errors import SettingsError

_MIB = 1024 * 1024


@dataclass(frozen=True)
class ClusterSettings:
    # Redis URL of the control-plane store (sessions, assignment, heartbeats).
    redis_url: str = "redis://127.0.0.1:6379/0"
    # Number of shards; spaces are spread over shard ids 0..shard_count-1.
    shard_count: int = 2
    # Prefix of every Redis key, so several clusters can share one Redis.
    key_prefix: str = "engram"


@dataclass(frozen=True)
class WalSettings:
    # Bytes after which a WAL segment is closed and a new one started.
    segment_bytes: int = 64 * _MIB
    # Longest a batch waits for the next group-commit fsync, in milliseconds; 0 syncs at once.
    group_commit_ms: float = 1.0


@dataclass(frozen=True)
class IndexSettings:
    # HNSW graph degree.
    m: int = 16
    # HNSW construction beam width.
    ef_construction: int = 100
    # Minimum HNSW search beam width; the beam used is max(ef_search, 2 * k).
    ef_search: int = 64
    # Most vectors handed to hnswlib in one add_items call (recalls wait at most one call).
    build_chunk: int = 256
    # Threads hnswlib uses for add_items.
    build_threads: int = 2
    # Checkpoint after this many newly indexed observations...
    checkpoint_every: int = 200_000
    # ...or after this many seconds with un-checkpointed indexed data.
    checkpoint_interval_s: float = 60.0


@dataclass(frozen=True)
class LimitSettings:
    # Most observations in one batch.
    max_batch_observations: int = 10_000
    # Most bytes of one ObservationRequest the services take in-band; beyond the gRPC limit
    # (grpc_max_message_bytes) the transport ends the stream.
    max_batch_bytes: int = 32 * _MIB
    # gRPC's own message size limit.
    grpc_max_message_bytes: int = 64 * _MIB
    # Largest accepted vector dimension.
    max_dim: int = 4096
    # Most results of one recall.
    max_k: int = 1000
    # Unacked batches a client may have in flight on one stream.
    max_in_flight_batches: int = 8


@dataclass(frozen=True)
class ShardSettings:
    shard_id: int = 0
    # gRPC listen address of the shard.
    listen: str = "127.0.0.1:50061"
    # Address the gateways use to reach this shard (defaults to ``listen``).
    advertise: str = ""
    # Directory holding this shard's WALs and checkpoints.
    data_dir: str = "./data/shard-0"
    # HTTP port for /metrics and /healthz (0: none).
    http_port: int = 0
    # Fault-injection file polled by chaos runs (empty: fault injection off).
    fault_file: str = ""
    wal: WalSettings = field(default_factory=WalSettings)
    index: IndexSettings = field(default_factory=IndexSettings)


@dataclass(frozen=True)
class GatewaySettings:
    # gRPC listen address for clients.
    listen: str = "127.0.0.1:50051"
    # HTTP listen host and port for /metrics and /healthz.
    http_host: str = "127.0.0.1"
    http_port: int = 7432
    # Idle sessions expire from Redis after this many seconds (they resume from the shard).
    session_ttl_s: int = 86_400


@dataclass(frozen=True)
class Settings:
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    shard: ShardSettings = field(default_factory=ShardSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    # Log level name.
    log_level: str = "INFO"


class _Env:
    """Typed, range-checked reads of ENGRAM_* variables."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def str(self, name: str, default: str) -> str:
        return self._env.get(name, default)

    def int(self, name: str, default: int, lo: int, hi: int) -> int:
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not an integer ({lo}..{hi})") from None
        if not lo <= value <= hi:
            raise SettingsError(f"{name}={value} is out of range {lo}..{hi}")
        return value

    def float(self, name: str, default: float, lo: float, hi: float) -> float:
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a number ({lo}..{hi})") from None
        if not lo <= value <= hi:
            raise SettingsError(f"{name}={value} is out of range {lo}..{hi}")
        return value


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Reads and validates every setting from ``env`` (default: the process environment)."""
    e = _Env(os.environ if env is None else env)
    cluster = ClusterSettings(
        redis_url=e.str("ENGRAM_REDIS_URL", ClusterSettings.redis_url),
        shard_count=e.int("ENGRAM_SHARD_COUNT", ClusterSettings.shard_count, 1, 1024),
        key_prefix=e.str("ENGRAM_KEY_PREFIX", ClusterSettings.key_prefix),
    )
    limits = LimitSettings(
        max_batch_observations=e.int(
            "ENGRAM_MAX_BATCH_OBSERVATIONS", LimitSettings.max_batch_observations, 1, 1_000_000
        ),
        max_batch_bytes=e.int(
            "ENGRAM_MAX_BATCH_BYTES", LimitSettings.max_batch_bytes, 1024, 1 << 30
        ),
        grpc_max_message_bytes=e.int(
            "ENGRAM_GRPC_MAX_MESSAGE_BYTES",
            LimitSettings.grpc_max_message_bytes,
            1024,
            (1 << 31) - 1,
        ),
        max_dim=e.int("ENGRAM_MAX_DIM", LimitSettings.max_dim, 1, 65_536),
        max_k=e.int("ENGRAM_MAX_K", LimitSettings.max_k, 1, 100_000),
        max_in_flight_batches=e.int(
            "ENGRAM_MAX_IN_FLIGHT_BATCHES", LimitSettings.max_in_flight_batches, 1, 1024
        ),
    )
    if limits.max_batch_bytes > limits.grpc_max_message_bytes:
        raise SettingsError(
            "ENGRAM_MAX_BATCH_BYTES must not exceed ENGRAM_GRPC_MAX_MESSAGE_BYTES "
            f"({limits.max_batch_bytes} > {limits.grpc_max_message_bytes})"
        )
    shard_id = e.int("ENGRAM_SHARD_ID", 0, 0, cluster.shard_count - 1)
    listen = e.str("ENGRAM_SHARD_LISTEN", ShardSettings.listen)
    shard = ShardSettings(
        shard_id=shard_id,
        listen=listen,
        advertise=e.str("ENGRAM_SHARD_ADVERTISE", "") or listen,
        data_dir=e.str("ENGRAM_SHARD_DATA_DIR", f"./data/shard-{shard_id}"),
        http_port=e.int("ENGRAM_SHARD_HTTP_PORT", 0, 0, 65_535),
        fault_file=e.str("ENGRAM_FAULT_FILE", ""),
        wal=WalSettings(
            segment_bytes=e.int(
                "ENGRAM_WAL_SEGMENT_BYTES", WalSettings.segment_bytes, 4096, 1 << 34
            ),
            group_commit_ms=e.float(
                "ENGRAM_WAL_GROUP_COMMIT_MS", WalSettings.group_commit_ms, 0, 1000
            ),
        ),
        index=IndexSettings(
            m=e.int("ENGRAM_HNSW_M", IndexSettings.m, 2, 256),
            ef_construction=e.int(
                "ENGRAM_HNSW_EF_CONSTRUCTION", IndexSettings.ef_construction, 8, 4096
            ),
            ef_search=e.int("ENGRAM_HNSW_EF_SEARCH", IndexSettings.ef_search, 8, 8192),
            build_chunk=e.int("ENGRAM_INDEX_BUILD_CHUNK", IndexSettings.build_chunk, 1, 1_000_000),
            build_threads=e.int("ENGRAM_INDEX_BUILD_THREADS", IndexSettings.build_threads, 1, 256),
            checkpoint_every=e.int(
                "ENGRAM_CHECKPOINT_EVERY", IndexSettings.checkpoint_every, 1, 1 << 40
            ),
            checkpoint_interval_s=e.float(
                "ENGRAM_CHECKPOINT_INTERVAL_S", IndexSettings.checkpoint_interval_s, 0.01, 86_400
            ),
        ),
    )
    gateway = GatewaySettings(
        listen=e.str("ENGRAM_GATEWAY_LISTEN", GatewaySettings.listen),
        http_host=e.str("ENGRAM_GATEWAY_HTTP_HOST", GatewaySettings.http_host),
        http_port=e.int("ENGRAM_GATEWAY_HTTP_PORT", GatewaySettings.http_port, 0, 65_535),
        session_ttl_s=e.int("ENGRAM_SESSION_TTL_S", GatewaySettings.session_ttl_s, 1, 1 << 31),
    )
    level = e.str("ENGRAM_LOG_LEVEL", "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise SettingsError(f"ENGRAM_LOG_LEVEL={level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    return Settings(cluster=cluster, limits=limits, shard=shard, gateway=gateway, log_level=level)
