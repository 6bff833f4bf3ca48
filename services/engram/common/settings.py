"""Settings of every service, one frozen dataclass per concern.

Values come from the environment in exactly one place, :func:`load`, and are validated there;
an invalid value raises :class:`SettingsError` naming the variable and the allowed range. The
local launcher and the Kubernetes manifests configure services only through these variables.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

_MIB = 1024 * 1024


class SettingsError(ValueError):
    """A setting is missing or out of range; the message names the variable."""


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


@dataclass(frozen=True)
class IndexSettings:
    # HNSW graph degree.
    m: int = 16
    # HNSW construction beam width.
    ef_construction: int = 100
    # Minimum HNSW search beam width; the beam used is max(ef_search, 2 * k). At 600 K clustered
    # rows, recall@10 was 0.948 / 0.973 / 0.983 at 64 / 256 / 512 (0.14 / 0.27 / 0.63 ms a
    # query), and it falls as the index grows: a recall's fresh-tier scan costs far more.
    ef_search: int = 512
    # Most vectors handed to hnswlib in one add_items call. A recall waits for the call in
    # progress (hnswlib cannot search while it inserts), so the builder sizes its calls to
    # about ``build_chunk_ms`` at its measured rate, and never above this.
    build_chunk: int = 1024
    build_chunk_ms: float = 8.0
    # Threads hnswlib uses for add_items (one while writes or recalls are arriving).
    build_threads: int = 2
    # Least share of the time the builder works while writes are arriving (it sleeps in
    # between, so acks and recalls keep the CPU); the share rises with memory pressure (the
    # fuller the budget, the more indexing matters), and once writes stop it works flat out.
    build_busy_share: float = 0.15
    # Nice value of the builder thread (and hnswlib's threads). 0 by default: a niced builder
    # holding the index lock is preempted for long stretches, and recalls wait behind it.
    builder_nice: int = 0
    # Un-indexed rows of a space above which full fresh-tier blocks are partitioned (IVF) and
    # recalls scan only the lists nearest the cue there; below it the scan is exact.
    fresh_partition_rows: int = 32_768
    # Lists (leaves of the two-level quantiser) of a partitioned fresh tier, and how many of
    # them a recall scans.
    fresh_lists: int = 1024
    fresh_nprobe: int = 24
    # A block whose rows fit the quantiser this much worse (mean cosine to their leaf) than its
    # training rows did makes the space learn a new quantiser: embeddings drift.
    fresh_refit_drop: float = 0.05
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
class LaneLimits:
    # Admitted, not yet durable observations of this priority above which the lane is shed
    # while the shard is CRITICAL or worse...
    soft_observations: int
    # ...and above which it is always shed.
    hard_observations: int
    # The same two limits in bytes of batch payload.
    soft_bytes: int
    hard_bytes: int


@dataclass(frozen=True)
class AdmissionSettings:
    # Bytes a shard may hold that are not yet in HNSW: intake plus fresh tier (vectors and
    # metadata). Default: 40 % of the machine's memory divided by the shard count.
    memory_budget_bytes: int = 1 << 30
    high: LaneLimits = LaneLimits(10_000, 20_000, 64 * _MIB, 128 * _MIB)
    normal: LaneLimits = LaneLimits(100_000, 200_000, 256 * _MIB, 512 * _MIB)
    low: LaneLimits = LaneLimits(50_000, 100_000, 128 * _MIB, 256 * _MIB)
    # A level is left only when pressure falls below this fraction of its threshold...
    hysteresis: float = 0.9
    # ...and no sooner than this many seconds after it was entered.
    min_dwell_s: float = 0.5
    # Every this-many builder picks go to the space whose LOW rows waited longest.
    low_every: int = 4


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
    # Recalls slower than this on the shard are logged with where the time went (0: never).
    slow_recall_ms: float = 200.0
    # Threads that compute recalls (numpy releases the GIL in the heavy parts).
    recall_workers: int = 2
    # Let numpy ask for transparent huge pages (madvise) for its large arrays. Off by default:
    # where the kernel rarely has a free huge page (memory full of page cache, as under a WAL),
    # each failed attempt compacts memory first, and a 25 MB block took 4-67 ms of kernel time
    # instead of a steady 12 (measured on the 2-core development machines).
    huge_pages: bool = False
    wal: WalSettings = field(default_factory=WalSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)


@dataclass(frozen=True)
class GatewaySettings:
    # gRPC listen address for clients.
    listen: str = "127.0.0.1:50051"
    # HTTP listen host and port for /metrics and /healthz.
    http_host: str = "127.0.0.1"
    http_port: int = 7432
    # Idle sessions expire from Redis after this many seconds (they resume from the shard).
    session_ttl_s: int = 86_400
    # Seconds between visibility canary probes per shard (0: canary off).
    canary_interval_s: float = 0.0
    # WebSocket (/v1/stream on the HTTP port): seconds between the server's heartbeat frames...
    ws_heartbeat_s: float = 30.0
    # ...and seconds without any frame from the client after which the server closes (1008).
    ws_idle_timeout_s: float = 120.0


@dataclass(frozen=True)
class Settings:
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    shard: ShardSettings = field(default_factory=ShardSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    # Log level name.
    log_level: str = "INFO"
    # An event loop this many ms late has the stacks of its threads logged while it is late
    # (at most one trace every 10 s; 0: never), to name what blocked it.
    loop_stall_trace_ms: float = 250.0


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

    def size(self, name: str, default: int, lo: int, hi: int) -> int:
        """A byte size: a plain number or one with a unit (KB, MB, GB; powers of 1024)."""
        raw = self._env.get(name)
        if raw is None or raw == "":
            return default
        value = parse_size(raw)
        if value is None:
            raise SettingsError(f"{name}={raw!r} is not a size (e.g. 64MB, 2GB, 1048576)")
        if not lo <= value <= hi:
            raise SettingsError(f"{name}={raw} is out of range {lo}..{hi} bytes")
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


_UNITS = {
    "": 1,
    "B": 1,
    "K": 1 << 10,
    "KB": 1 << 10,
    "KIB": 1 << 10,
    "M": 1 << 20,
    "MB": 1 << 20,
    "MIB": 1 << 20,
    "G": 1 << 30,
    "GB": 1 << 30,
    "GIB": 1 << 30,
}


def parse_size(raw: str) -> int | None:
    """``"64MB"`` -> 67108864; None if it is not a size."""
    text = raw.strip().upper().replace(" ", "")
    number = text.rstrip("KMGIB")
    unit = text[len(number) :]
    if unit not in _UNITS:
        return None
    try:
        return int(float(number) * _UNITS[unit])
    except ValueError:
        return None


def default_memory_budget(shard_count: int) -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return max(64 * _MIB, int(total * 0.4) // max(1, shard_count))


def _lane(e: _Env, name: str, d: LaneLimits) -> LaneLimits:
    p = f"ENGRAM_LANE_{name}_"
    return LaneLimits(
        soft_observations=e.int(p + "SOFT_OBSERVATIONS", d.soft_observations, 1, 1 << 40),
        hard_observations=e.int(p + "HARD_OBSERVATIONS", d.hard_observations, 1, 1 << 40),
        soft_bytes=e.size(p + "SOFT_BYTES", d.soft_bytes, 1, 1 << 50),
        hard_bytes=e.size(p + "HARD_BYTES", d.hard_bytes, 1, 1 << 50),
    )


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
        slow_recall_ms=e.float("ENGRAM_SLOW_RECALL_MS", ShardSettings.slow_recall_ms, 0.0, 1e6),
        recall_workers=e.int("ENGRAM_RECALL_WORKERS", ShardSettings.recall_workers, 1, 256),
        huge_pages=bool(e.int("ENGRAM_HUGE_PAGES", int(ShardSettings.huge_pages), 0, 1)),
        http_port=e.int("ENGRAM_SHARD_HTTP_PORT", 0, 0, 65_535),
        fault_file=e.str("ENGRAM_FAULT_FILE", ""),
        wal=WalSettings(
            segment_bytes=e.int(
                "ENGRAM_WAL_SEGMENT_BYTES", WalSettings.segment_bytes, 4096, 1 << 34
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
            build_chunk_ms=e.float(
                "ENGRAM_INDEX_BUILD_CHUNK_MS", IndexSettings.build_chunk_ms, 0.1, 10_000.0
            ),
            build_busy_share=e.float(
                "ENGRAM_INDEX_BUSY_SHARE", IndexSettings.build_busy_share, 0.01, 1.0
            ),
            builder_nice=e.int("ENGRAM_INDEX_BUILDER_NICE", IndexSettings.builder_nice, 0, 19),
            fresh_partition_rows=e.int(
                "ENGRAM_FRESH_PARTITION_ROWS", IndexSettings.fresh_partition_rows, 1, 1 << 40
            ),
            fresh_lists=e.int("ENGRAM_FRESH_LISTS", IndexSettings.fresh_lists, 1, 65_536),
            fresh_nprobe=e.int("ENGRAM_FRESH_NPROBE", IndexSettings.fresh_nprobe, 1, 65_536),
            fresh_refit_drop=e.float(
                "ENGRAM_FRESH_REFIT_DROP", IndexSettings.fresh_refit_drop, 0.0, 2.0
            ),
            checkpoint_every=e.int(
                "ENGRAM_CHECKPOINT_EVERY", IndexSettings.checkpoint_every, 1, 1 << 40
            ),
            checkpoint_interval_s=e.float(
                "ENGRAM_CHECKPOINT_INTERVAL_S", IndexSettings.checkpoint_interval_s, 0.01, 86_400
            ),
        ),
    )
    a = AdmissionSettings()
    admission = AdmissionSettings(
        memory_budget_bytes=e.size(
            "ENGRAM_MEMORY_BUDGET", default_memory_budget(cluster.shard_count), 1 << 20, 1 << 50
        ),
        high=_lane(e, "HIGH", a.high),
        normal=_lane(e, "NORMAL", a.normal),
        low=_lane(e, "LOW", a.low),
        hysteresis=e.float("ENGRAM_PRESSURE_HYSTERESIS", a.hysteresis, 0.5, 1.0),
        min_dwell_s=e.float("ENGRAM_PRESSURE_MIN_DWELL_S", a.min_dwell_s, 0.0, 60.0),
        low_every=e.int("ENGRAM_INDEX_LOW_EVERY", a.low_every, 1, 1000),
    )
    shard = replace(shard, admission=admission)
    gateway = GatewaySettings(
        listen=e.str("ENGRAM_GATEWAY_LISTEN", GatewaySettings.listen),
        http_host=e.str("ENGRAM_GATEWAY_HTTP_HOST", GatewaySettings.http_host),
        http_port=e.int("ENGRAM_GATEWAY_HTTP_PORT", GatewaySettings.http_port, 0, 65_535),
        session_ttl_s=e.int("ENGRAM_SESSION_TTL_S", GatewaySettings.session_ttl_s, 1, 1 << 31),
        canary_interval_s=e.float("ENGRAM_CANARY_INTERVAL_S", 0.0, 0.0, 3600.0),
        ws_heartbeat_s=e.float("ENGRAM_WS_HEARTBEAT_S", GatewaySettings.ws_heartbeat_s, 0.05, 3600),
        ws_idle_timeout_s=e.float(
            "ENGRAM_WS_IDLE_TIMEOUT_S", GatewaySettings.ws_idle_timeout_s, 0.1, 86_400
        ),
    )
    if gateway.ws_idle_timeout_s <= gateway.ws_heartbeat_s:
        raise SettingsError(
            "ENGRAM_WS_IDLE_TIMEOUT_S must exceed ENGRAM_WS_HEARTBEAT_S (clients send heartbeats "
            f"at the server's interval): {gateway.ws_idle_timeout_s} <= {gateway.ws_heartbeat_s}"
        )
    level = e.str("ENGRAM_LOG_LEVEL", "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise SettingsError(f"ENGRAM_LOG_LEVEL={level!r} is not one of DEBUG, INFO, WARNING, ERROR")
    return Settings(
        cluster=cluster,
        limits=limits,
        shard=shard,
        gateway=gateway,
        log_level=level,
        loop_stall_trace_ms=e.float(
            "ENGRAM_LOOP_STALL_TRACE_MS", Settings.loop_stall_trace_ms, 0.0, 60_000.0
        ),
    )
