"""Settings of every service: declared once, loaded from ``ENGRAM_*`` variables in one place.

Each setting is a field of a frozen dataclass (one per concern) declared with :func:`setting`:
its variable name, its default, its range (or choices) and one line of doc live together in
that declaration, and nowhere else. From the declarations come

* :func:`load`, the only reader of the environment: it parses and range-checks every variable
  and raises :class:`SettingsError` naming the variable and what it allows;
* :func:`catalog`, the list the settings table in ``docs/settings.md`` is generated from (a test
  fails when the two differ: ``python -m engram.common.settings --write-docs`` rewrites it),
  and from which the Helm chart's values are checked.

A default that depends on another setting (the memory budget on the shard count, the data
directory on the shard id) is computed by :func:`load` and described in words in the table.
The local launcher and the Kubernetes manifests configure services only through these variables.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

_MIB = 1024 * 1024
_KIB = 1024


class SettingsError(ValueError):
    """A setting is missing or out of range; the message names the variable."""


@dataclass(frozen=True)
class Setting:
    """How one field is read: ``ENGRAM_*`` name, kind, range or choices, and its doc."""

    # Variable name (for a field of a group with an env prefix: the name after the prefix).
    env: str
    # "int", "float", "size" (bytes, with an optional KB/MB/GB unit), "bool", "str", "choice".
    kind: str
    doc: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    # A default computed from other settings, in words (the field's default is then a fallback).
    derived: str = ""


def setting(
    env: str,
    default: Any,
    doc: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    kind: str = "",
    choices: tuple[str, ...] = (),
    derived: str = "",
) -> Any:
    """A dataclass field read from ``env``; ``kind`` defaults to the default's type."""
    if not kind:
        kind = {bool: "bool", int: "int", float: "float", str: "str"}[type(default)]
    if choices:
        kind = "choice"
    meta = Setting(env, kind, doc, lo, hi, choices, derived)
    return field(default=default, metadata={"setting": meta})


def group(prefix: str, default: Any) -> Any:
    """A field holding settings of its own, read from ``prefix`` + each of their names."""
    return field(default=default, metadata={"prefix": prefix})


def _required(env: str, doc: str, *, kind: str = "", lo: float = 1, hi: float = 1 << 50) -> Any:
    """A field whose default comes from the group that holds it (see :func:`group`)."""
    meta = Setting(env, kind or "int", doc, lo, hi)
    return field(metadata={"setting": meta})


# --------------------------------------------------------------------------- the settings


@dataclass(frozen=True)
class ClusterSettings:
    redis_url: str = setting(
        "ENGRAM_REDIS_URL",
        "redis://127.0.0.1:6379/0",
        "Redis URL of the control-plane store (sessions, assignment, heartbeats).",
    )
    shard_count: int = setting(
        "ENGRAM_SHARD_COUNT",
        2,
        "Number of home shards: a new space's owner is a hash of its id over shard ids "
        "0..count-1. A shard with a higher id is an extra one: it serves only the spaces moved "
        "to it.",
        lo=1,
        hi=1024,
    )
    key_prefix: str = setting(
        "ENGRAM_KEY_PREFIX",
        "engram",
        "Prefix of every Redis key, so several clusters can share one Redis.",
    )


@dataclass(frozen=True)
class WalSettings:
    segment_bytes: int = setting(
        "ENGRAM_WAL_SEGMENT_BYTES",
        64 * _MIB,
        "Bytes after which a WAL segment is closed and a new one started.",
        lo=4096,
        hi=1 << 34,
    )
    directory: str = setting(
        "ENGRAM_WAL_DIR",
        "",
        "Directory of the WALs, one subdirectory per space (put it on its own SSD volume); "
        "empty: in each space's directory under the data directory.",
    )


@dataclass(frozen=True)
class IndexSettings:
    m: int = setting("ENGRAM_HNSW_M", 16, "HNSW graph degree.", lo=2, hi=256)
    ef_construction: int = setting(
        "ENGRAM_HNSW_EF_CONSTRUCTION", 100, "HNSW construction beam width.", lo=8, hi=4096
    )
    # At 600 K clustered rows, recall@10 was 0.948 / 0.973 / 0.983 at 64 / 256 / 512 (0.14 /
    # 0.27 / 0.63 ms a query), and it falls as the index grows: the fresh-tier scan costs more.
    ef_search: int = setting(
        "ENGRAM_HNSW_EF_SEARCH",
        512,
        "Least HNSW search beam; a recall uses max(this, 2k).",
        lo=8,
        hi=8192,
    )
    # A recall waits for the add_items call in progress (hnswlib cannot search while it
    # inserts), so the builder sizes its calls to about build_chunk_ms at its measured rate.
    build_chunk: int = setting(
        "ENGRAM_INDEX_BUILD_CHUNK",
        1024,
        "Most vectors handed to hnswlib in one add_items call.",
        lo=1,
        hi=1_000_000,
    )
    build_chunk_ms: float = setting(
        "ENGRAM_INDEX_BUILD_CHUNK_MS",
        8.0,
        "Milliseconds of work the builder aims for per add_items call.",
        lo=0.1,
        hi=10_000.0,
    )
    build_threads: int = setting(
        "ENGRAM_INDEX_BUILD_THREADS",
        2,
        "Threads hnswlib uses for add_items once writes and recalls stop (one while they arrive).",
        lo=1,
        hi=256,
    )
    # The builder sleeps in between, so acks and recalls keep the CPU; the share rises with
    # memory pressure (the fuller the budget, the more indexing matters).
    build_busy_share: float = setting(
        "ENGRAM_INDEX_BUSY_SHARE",
        0.15,
        "Least share of the time the builder works while writes arrive (beyond a trickle of "
        "1,000 rows a second a shard).",
        lo=0.01,
        hi=1.0,
    )
    # 0 by default: a niced builder holding the index lock is preempted for long stretches,
    # and recalls wait behind it.
    builder_nice: int = setting(
        "ENGRAM_INDEX_BUILDER_NICE",
        0,
        "Nice value of the builder thread (and hnswlib's threads).",
        lo=0,
        hi=19,
    )
    fresh_partition_rows: int = setting(
        "ENGRAM_FRESH_PARTITION_ROWS",
        32_768,
        "Un-indexed rows of a space above which fresh blocks are partitioned (IVF) and "
        "recalls scan only the lists nearest the cue.",
        lo=1,
        hi=1 << 40,
    )
    fresh_lists: int = setting(
        "ENGRAM_FRESH_LISTS",
        1024,
        "Least lists (leaves of the two-level quantiser) of a partitioned fresh tier.",
        lo=1,
        hi=65_536,
    )
    # A recall probing ENGRAM_FRESH_NPROBE lists then scores about nprobe * this many rows
    # whatever the backlog (docs/performance.md, "The fresh tier at a large backlog").
    fresh_list_rows: int = setting(
        "ENGRAM_FRESH_LIST_ROWS",
        1024,
        "Un-indexed rows per list the fresh tier's quantiser aims for as the backlog grows "
        "(learnt again from the backlog once it needs twice the lists); 0: always "
        "ENGRAM_FRESH_LISTS.",
        lo=0,
        hi=1 << 30,
    )
    fresh_float16: bool = setting(
        "ENGRAM_FRESH_FLOAT16",
        False,
        "Store fresh-tier rows as float16: half the memory and half the bytes a recall's "
        "scan reads; the index gets the float16 values.",
    )
    fresh_nprobe: int = setting(
        "ENGRAM_FRESH_NPROBE",
        24,
        "Lists of a partitioned fresh tier a recall scans.",
        lo=1,
        hi=65_536,
    )
    fresh_refit_drop: float = setting(
        "ENGRAM_FRESH_REFIT_DROP",
        0.05,
        "Drop in a full block's fit (mean cosine to its leaf) that makes the space learn a "
        "new quantiser: embeddings drift.",
        lo=0.0,
        hi=2.0,
    )
    checkpoint_every: int = setting(
        "ENGRAM_CHECKPOINT_EVERY",
        200_000,
        "Checkpoint after this many newly indexed observations...",
        lo=1,
        hi=1 << 40,
    )
    checkpoint_interval_s: float = setting(
        "ENGRAM_CHECKPOINT_INTERVAL_S",
        60.0,
        "...or after this many seconds with un-checkpointed indexed data.",
        lo=0.01,
        hi=86_400,
    )
    # Compaction rebuilds the HNSW index from the live rows and empties deleted rows' ids and
    # contents, on the builder thread in steps like indexing (acks never wait for it).
    compact_deleted_share: float = setting(
        "ENGRAM_COMPACT_DELETED_SHARE",
        0.2,
        "Share of a space's indexed rows that are deleted (still in the index, or with their "
        "id and content still held) above which the space is compacted.",
        lo=0.01,
        hi=1.0,
    )
    compact_min_rows: int = setting(
        "ENGRAM_COMPACT_MIN_ROWS",
        10_000,
        "Indexed rows a space needs before it is compacted.",
        lo=1,
        hi=1 << 40,
    )


@dataclass(frozen=True)
class LimitSettings:
    max_batch_observations: int = setting(
        "ENGRAM_MAX_BATCH_OBSERVATIONS",
        10_000,
        "Most observations in one batch.",
        lo=1,
        hi=1_000_000,
    )
    max_batch_bytes: int = setting(
        "ENGRAM_MAX_BATCH_BYTES",
        32 * _MIB,
        "Most bytes of one request taken in-band (beyond the gRPC limit the transport ends "
        "the stream).",
        lo=1024,
        hi=1 << 30,
    )
    grpc_max_message_bytes: int = setting(
        "ENGRAM_GRPC_MAX_MESSAGE_BYTES",
        64 * _MIB,
        "gRPC's own message size limit (and the WebSocket frame limit).",
        lo=1024,
        hi=(1 << 31) - 1,
    )
    max_dim: int = setting(
        "ENGRAM_MAX_DIM", 4096, "Largest accepted vector dimension.", lo=1, hi=65_536
    )
    max_k: int = setting("ENGRAM_MAX_K", 1000, "Most results of one recall.", lo=1, hi=100_000)
    max_in_flight_batches: int = setting(
        "ENGRAM_MAX_IN_FLIGHT_BATCHES",
        8,
        "Unacked batches a client may have in flight on one stream (its credits).",
        lo=1,
        hi=1024,
    )


@dataclass(frozen=True)
class LaneLimits:
    soft_observations: int = _required(
        "SOFT_OBSERVATIONS",
        "Admitted, not yet durable observations of the lane above which it is shed while the "
        "shard is CRITICAL or worse...",
    )
    hard_observations: int = _required("HARD_OBSERVATIONS", "...and above which it is always shed.")
    soft_bytes: int = _required(
        "SOFT_BYTES", "The soft limit in bytes of batch payload.", kind="size"
    )
    hard_bytes: int = _required(
        "HARD_BYTES", "The hard limit in bytes of batch payload.", kind="size"
    )


@dataclass(frozen=True)
class AdmissionSettings:
    memory_budget_bytes: int = setting(
        "ENGRAM_MEMORY_BUDGET",
        1 << 30,
        "Bytes a shard may hold that are not yet in HNSW: intake plus fresh tier.",
        lo=1 << 20,
        hi=1 << 50,
        kind="size",
        derived="40 % of the machine's memory / shard count (at least 64 MiB)",
    )
    high: LaneLimits = group("ENGRAM_LANE_HIGH_", LaneLimits(10_000, 20_000, 64 * _MIB, 128 * _MIB))
    normal: LaneLimits = group(
        "ENGRAM_LANE_NORMAL_", LaneLimits(100_000, 200_000, 256 * _MIB, 512 * _MIB)
    )
    low: LaneLimits = group("ENGRAM_LANE_LOW_", LaneLimits(50_000, 100_000, 128 * _MIB, 256 * _MIB))
    hysteresis: float = setting(
        "ENGRAM_PRESSURE_HYSTERESIS",
        0.9,
        "A pressure level is left only below this fraction of its threshold...",
        lo=0.5,
        hi=1.0,
    )
    min_dwell_s: float = setting(
        "ENGRAM_PRESSURE_MIN_DWELL_S",
        0.5,
        "...and no sooner than this many seconds after it was entered.",
        lo=0.0,
        hi=60.0,
    )
    # The floor of latency-driven shedding: however slow recalls are, NORMAL and LOW batches
    # are still admitted at this rate (HIGH ones are never shed for latency), so acks go on.
    latency_floor_obs_per_s: int = setting(
        "ENGRAM_LATENCY_FLOOR_OBS_PER_S",
        10_000,
        "Observations/s a shard still admits while it sheds for recall latency or "
        "visibility lag (not for memory).",
        lo=1,
        hi=1 << 40,
    )
    low_every: int = setting(
        "ENGRAM_INDEX_LOW_EVERY",
        4,
        "Every this-many builder picks go to the space whose LOW rows waited longest.",
        lo=1,
        hi=1000,
    )


@dataclass(frozen=True)
class RecallFirstSettings:
    """Recalls get the CPU first (:mod:`engram.shard.recall_first`)."""

    # OFF: background work ignores recalls (only the builder's duty cycle); QUEUED: indexing,
    # partitioning and checkpoints wait while recalls are queued; LATENCY: while the recent
    # recall P99 is above its bound (the builder only: the partitioner's listing is what makes
    # recalls cheap); BOTH: either.
    isolation: str = setting(
        "ENGRAM_RECALL_ISOLATION",
        "BOTH",
        "When the builder and partitioner yield to recalls.",
        choices=("OFF", "QUEUED", "LATENCY", "BOTH"),
    )
    queue: int = setting(
        "ENGRAM_RECALL_QUEUE",
        16,
        "Recalls a shard holds for its recall workers (waiting or running); beyond, a recall "
        "is refused OVERLOADED with a retry-after from the measured recall rate.",
        lo=1,
        hi=100_000,
    )
    recall_bound_ms: float = setting(
        "ENGRAM_RECALL_LATENCY_BOUND_MS",
        20.0,
        "Bound on the shard's recall P99 (queue + search) over the latency window.",
        lo=0.1,
        hi=60_000.0,
    )
    visibility_bound_ms: float = setting(
        "ENGRAM_VISIBILITY_LAG_BOUND_MS",
        50.0,
        "Bound on the age of a space's oldest durable write not yet visible to recalls.",
        lo=0.1,
        hi=60_000.0,
    )
    window_s: float = setting(
        "ENGRAM_RECALL_LATENCY_WINDOW_S",
        2.0,
        "Window of recent recalls the P99 and the recall rate are taken over.",
        lo=0.1,
        hi=600.0,
    )
    yield_max_ms: float = setting(
        "ENGRAM_RECALL_YIELD_MAX_MS",
        250.0,
        "Longest the builder or the partitioner waits for recalls before one step of its work.",
        lo=1.0,
        hi=60_000.0,
    )
    # Off by default: on the 2-core machine it halves the acknowledged rate at 100 K obs/s
    # offered and still misses the 20 ms / 100 ms bounds (docs/performance.md, "Recalls first").
    latency_pressure: bool = setting(
        "ENGRAM_LATENCY_PRESSURE",
        False,
        "Feed recall latency and visibility lag into the admission levels: ingest is pushed "
        "back (SLOW_DOWN, refusals with reason latency) to protect recalls (0 or 1).",
    )
    # The signal rises at once and falls with this time constant: with the levels' own
    # hysteresis and dwell, admission does not flap between a slow and a fast second.
    fall_s: float = setting(
        "ENGRAM_LATENCY_PRESSURE_FALL_S",
        1.0,
        "Time constant (seconds) of the latency pressure's fall once latencies are back.",
        lo=0.0,
        hi=600.0,
    )


@dataclass(frozen=True)
class ShardSettings:
    shard_id: int = setting(
        "ENGRAM_SHARD_ID",
        0,
        "This shard's id: 0..ENGRAM_SHARD_COUNT-1 a home shard, higher an extra shard (it "
        "owns no space by default; it serves the spaces moved to it).",
        lo=0,
        hi=1023,
    )
    listen: str = setting("ENGRAM_SHARD_LISTEN", "127.0.0.1:50061", "gRPC listen address.")
    advertise: str = setting(
        "ENGRAM_SHARD_ADVERTISE",
        "",
        "Address the gateways reach this shard at.",
        derived="ENGRAM_SHARD_LISTEN",
    )
    recall_listen: str = setting(
        "ENGRAM_SHARD_RECALL_LISTEN",
        "",
        "Listen address of the recall port: recalls served by threads of their own, not by the "
        "event loop that receives the batches (empty: recalls on ENGRAM_SHARD_LISTEN only).",
    )
    recall_advertise: str = setting(
        "ENGRAM_SHARD_RECALL_ADVERTISE",
        "",
        "Address the gateways reach the recall port at.",
        derived="the host of ENGRAM_SHARD_ADVERTISE, the port of ENGRAM_SHARD_RECALL_LISTEN",
    )
    data_dir: str = setting(
        "ENGRAM_SHARD_DATA_DIR",
        "./data/shard-0",
        "Directory of this shard's spaces: checkpoints, index and (by default) WALs.",
        derived="./data/shard-<ENGRAM_SHARD_ID>",
    )
    http_host: str = setting(
        "ENGRAM_SHARD_HTTP_HOST",
        "127.0.0.1",
        "Host /metrics and /healthz listen on (0.0.0.0 for Prometheus in a cluster).",
    )
    http_port: int = setting(
        "ENGRAM_SHARD_HTTP_PORT", 0, "Port of /metrics and /healthz (0: none).", lo=0, hi=65_535
    )
    fault_file: str = setting(
        "ENGRAM_FAULT_FILE",
        "",
        "Fault-injection file polled by chaos runs (empty: fault injection off).",
    )
    slow_recall_ms: float = setting(
        "ENGRAM_SLOW_RECALL_MS",
        200.0,
        "Recalls slower than this on the shard are logged with where the time went (0: never).",
        lo=0.0,
        hi=1e6,
    )
    recall_workers: int = setting(
        "ENGRAM_RECALL_WORKERS",
        2,
        "Threads that compute recalls (numpy and hnswlib release the GIL in the heavy parts).",
        lo=1,
        hi=256,
    )
    bounded_staleness_ms: float = setting(
        "ENGRAM_BOUNDED_STALENESS_MS",
        100.0,
        "Staleness bound of BOUNDED recalls: older durable writes must be visible.",
        lo=0.0,
        hi=60_000.0,
    )
    # Where the kernel rarely has a free huge page (memory full of page cache), each failed
    # attempt compacts memory first: a 25 MB block took 4-67 ms of kernel time instead of 12.
    huge_pages: bool = setting(
        "ENGRAM_HUGE_PAGES",
        False,
        "Let numpy ask for transparent huge pages for its large arrays (0 or 1).",
    )
    wal: WalSettings = field(default_factory=WalSettings)
    index: IndexSettings = field(default_factory=IndexSettings)
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    recall_first: RecallFirstSettings = field(default_factory=RecallFirstSettings)


@dataclass(frozen=True)
class GatewaySettings:
    listen: str = setting(
        "ENGRAM_GATEWAY_LISTEN", "127.0.0.1:50051", "gRPC listen address for clients."
    )
    http_host: str = setting(
        "ENGRAM_GATEWAY_HTTP_HOST",
        "127.0.0.1",
        "Host of the HTTP port (/metrics, /healthz, WebSocket /v1/stream, /demo).",
    )
    http_port: int = setting(
        "ENGRAM_GATEWAY_HTTP_PORT", 7432, "Port of the HTTP listener.", lo=0, hi=65_535
    )
    session_ttl_s: int = setting(
        "ENGRAM_SESSION_TTL_S",
        86_400,
        "Idle sessions expire from Redis after this many seconds (they resume from the shard).",
        lo=1,
        hi=1 << 31,
    )
    canary_interval_s: float = setting(
        "ENGRAM_CANARY_INTERVAL_S",
        0.0,
        "Seconds between visibility canary probes per shard (0: canary off).",
        lo=0.0,
        hi=3600.0,
    )
    recall_timeout_s: float = setting(
        "ENGRAM_RECALL_TIMEOUT_S",
        10.0,
        "Seconds the gateway waits for a shard's recall beyond the recall's own deadline.",
        lo=0.1,
        hi=3600.0,
    )
    ws_heartbeat_s: float = setting(
        "ENGRAM_WS_HEARTBEAT_S",
        30.0,
        "WebSocket: seconds between the server's heartbeat frames...",
        lo=0.05,
        hi=3600,
    )
    ws_idle_timeout_s: float = setting(
        "ENGRAM_WS_IDLE_TIMEOUT_S",
        120.0,
        "...and seconds without a frame from the client after which the server closes (1008).",
        lo=0.1,
        hi=86_400,
    )


@dataclass(frozen=True)
class SecuritySettings:
    """API keys and TLS on the gateway's public listeners; the shared secret (and optional mTLS)
    that shards require of their callers (docs/security.md)."""

    keys_file: str = setting(
        "ENGRAM_KEYS_FILE",
        "",
        "API keys file (engram keys); set: every client must present a key (empty: no auth).",
    )
    keys_reload_s: float = setting(
        "ENGRAM_KEYS_RELOAD_S",
        2.0,
        "Seconds between checks of the keys file for changes (reloaded without a restart).",
        lo=0.05,
        hi=3600.0,
    )
    auth_timeout_s: float = setting(
        "ENGRAM_AUTH_TIMEOUT_S",
        10.0,
        "Seconds a connection has to authenticate (WebSocket init frame) before it is closed.",
        lo=0.1,
        hi=3600.0,
    )
    preauth_max_bytes: int = setting(
        "ENGRAM_PREAUTH_MAX_BYTES",
        64 * _KIB,
        "Largest message or frame taken from a client that has not authenticated yet.",
        kind="size",
        lo=1024,
        hi=1 << 30,
    )
    key_max_observations_per_s: int = setting(
        "ENGRAM_KEY_MAX_OBSERVATIONS_PER_S",
        0,
        "Default per-key limit of observations/s on each gateway, for keys that set none "
        "(0: none).",
        lo=0,
        hi=1 << 40,
    )
    key_max_recalls_per_s: int = setting(
        "ENGRAM_KEY_MAX_RECALLS_PER_S",
        0,
        "Default per-key limit of recalls/s on each gateway, for keys that set none (0: none).",
        lo=0,
        hi=1 << 40,
    )
    tls_cert: str = setting(
        "ENGRAM_TLS_CERT",
        "",
        "PEM certificate chain of the gateway's gRPC and HTTP/WebSocket listeners (empty: "
        "plaintext); with ENGRAM_TLS_KEY.",
    )
    tls_key: str = setting("ENGRAM_TLS_KEY", "", "PEM private key of ENGRAM_TLS_CERT.")
    tls_reload_s: float = setting(
        "ENGRAM_TLS_RELOAD_S",
        10.0,
        "Seconds between checks of the certificate and key files for changes.",
        lo=0.05,
        hi=86_400.0,
    )
    internal_token_file: str = setting(
        "ENGRAM_INTERNAL_TOKEN_FILE",
        "",
        "File holding the secret shards require of every caller but health checks (gateways, "
        "other shards, the operator, engram tools); empty: shards accept any caller.",
    )
    internal_tls_ca: str = setting(
        "ENGRAM_INTERNAL_TLS_CA",
        "",
        "mTLS between services: PEM CA that signed every service's certificate (empty: "
        "plaintext inside the cluster); with ENGRAM_INTERNAL_TLS_CERT and _KEY.",
    )
    internal_tls_cert: str = setting(
        "ENGRAM_INTERNAL_TLS_CERT", "", "mTLS: this process's PEM certificate (server and client)."
    )
    internal_tls_key: str = setting(
        "ENGRAM_INTERNAL_TLS_KEY", "", "mTLS: the PEM private key of ENGRAM_INTERNAL_TLS_CERT."
    )


@dataclass(frozen=True)
class TracingSettings:
    # The rest of tracing's configuration is the standard OTEL_* variables (common/tracing.py).
    client_context: bool = setting(
        "ENGRAM_OTEL_CLIENT_CONTEXT",
        True,
        "Continue the trace a client names (traceparent in its stream's gRPC metadata or "
        "WebSocket handshake), its sampling decision included (0: ignore it).",
    )


@dataclass(frozen=True)
class Settings:
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    shard: ShardSettings = field(default_factory=ShardSettings)
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    tracing: TracingSettings = field(default_factory=TracingSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    log_level: str = setting(
        "ENGRAM_LOG_LEVEL", "INFO", "Log level.", choices=("DEBUG", "INFO", "WARNING", "ERROR")
    )
    loop_stall_trace_ms: float = setting(
        "ENGRAM_LOOP_STALL_TRACE_MS",
        250.0,
        "An event loop this late has its threads' stacks logged while it is late (at most "
        "every 10 s; 0: never).",
        lo=0.0,
        hi=60_000.0,
    )


# ------------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class Entry:
    """One setting as the docs and the chart see it."""

    path: str  # e.g. "shard.index.ef_search"
    env: str
    setting: Setting
    default: Any


def catalog() -> list[Entry]:
    """Every setting, in declaration order."""
    return list(_walk(Settings, "", "", Settings()))


def _walk(cls: type, path: str, prefix: str, defaults: Any) -> Iterator[Entry]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        here = f"{path}{f.name}"
        if "setting" in f.metadata:
            meta: Setting = f.metadata["setting"]
            yield Entry(here, prefix + meta.env, meta, value)
        elif dataclasses.is_dataclass(hints[f.name]):
            sub_prefix = prefix + f.metadata.get("prefix", "")
            yield from _walk(hints[f.name], here + ".", sub_prefix, value)


# ---------------------------------------------------------------------------------- load


def load(env: Mapping[str, str] | None = None) -> Settings:
    """Reads and validates every setting from ``env`` (default: the process environment)."""
    env = os.environ if env is None else env
    loaded = Settings()
    unset: set[str] = set()
    for entry in catalog():
        raw = env.get(entry.env)
        if raw is None or raw == "":
            unset.add(entry.path)
            continue
        loaded = _replace_at(loaded, entry.path, _parse(entry.env, entry.setting, raw))
    for path, derive in _DERIVED.items():
        if path in unset:
            loaded = _replace_at(loaded, path, derive(loaded))
    for check in _CHECKS:
        check(loaded)
    return loaded


def _parse(name: str, s: Setting, raw: str) -> Any:
    value: Any
    if s.kind == "str":
        return raw
    if s.kind == "choice":
        value = raw.strip().upper()
        if value not in s.choices:
            raise SettingsError(f"{name}={raw!r} is not one of {', '.join(s.choices)}")
        return value
    if s.kind == "bool":
        if raw.strip() in ("0", "1"):
            return raw.strip() == "1"
        raise SettingsError(f"{name}={raw!r} is not 0 or 1")
    if s.kind == "size":
        value = parse_size(raw)
        if value is None:
            raise SettingsError(f"{name}={raw!r} is not a size (e.g. 64MB, 2GB, 1048576)")
        unit = " bytes"
    elif s.kind == "int":
        try:
            value = int(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not an integer ({_range(s)})") from None
        unit = ""
    else:
        try:
            value = float(raw)
        except ValueError:
            raise SettingsError(f"{name}={raw!r} is not a number ({_range(s)})") from None
        unit = ""
    if (s.lo is not None and value < s.lo) or (s.hi is not None and value > s.hi):
        shown = raw if s.kind == "size" else value
        raise SettingsError(f"{name}={shown} is out of range {_range(s)}{unit}")
    return value


def _range(s: Setting) -> str:
    def num(x: float | None) -> str:
        return "" if x is None else f"{x:g}" if isinstance(x, float) else str(x)

    return f"{num(s.lo)}..{num(s.hi)}"


def _replace_at(obj: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    if not rest:
        return replace(obj, **{head: value})
    return replace(obj, **{head: _replace_at(getattr(obj, head), rest, value)})


def default_memory_budget(shard_count: int) -> int:
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        total = 8 << 30
    return max(64 * _MIB, int(total * 0.4) // max(1, shard_count))


def recall_advertise(advertise: str, recall_listen: str) -> str:
    """The recall port's address for gateways: the shard's advertised host, the recall port
    (empty without a recall port)."""
    if not recall_listen:
        return ""
    host = advertise.rpartition(":")[0]
    return f"{host}:{recall_listen.rpartition(':')[2]}"


# Defaults computed from other settings (described by each Setting's ``derived``).
_DERIVED: dict[str, Callable[[Settings], Any]] = {
    "shard.advertise": lambda s: s.shard.listen,
    "shard.recall_advertise": lambda s: recall_advertise(s.shard.advertise, s.shard.recall_listen),
    "shard.data_dir": lambda s: f"./data/shard-{s.shard.shard_id}",
    "shard.admission.memory_budget_bytes": lambda s: default_memory_budget(s.cluster.shard_count),
}


def _check_batch_bytes(s: Settings) -> None:
    lim = s.limits
    if lim.max_batch_bytes > lim.grpc_max_message_bytes:
        raise SettingsError(
            "ENGRAM_MAX_BATCH_BYTES must not exceed ENGRAM_GRPC_MAX_MESSAGE_BYTES "
            f"({lim.max_batch_bytes} > {lim.grpc_max_message_bytes})"
        )


def _check_ws_timeouts(s: Settings) -> None:
    gw = s.gateway
    if gw.ws_idle_timeout_s <= gw.ws_heartbeat_s:
        raise SettingsError(
            "ENGRAM_WS_IDLE_TIMEOUT_S must exceed ENGRAM_WS_HEARTBEAT_S (clients send heartbeats "
            f"at the server's interval): {gw.ws_idle_timeout_s} <= {gw.ws_heartbeat_s}"
        )


def _check_tls_pairs(s: Settings) -> None:
    sec = s.security
    if bool(sec.tls_cert) != bool(sec.tls_key):
        raise SettingsError("ENGRAM_TLS_CERT and ENGRAM_TLS_KEY are set together or not at all")
    internal = (sec.internal_tls_ca, sec.internal_tls_cert, sec.internal_tls_key)
    if any(internal) and not all(internal):
        raise SettingsError(
            "ENGRAM_INTERNAL_TLS_CA, ENGRAM_INTERNAL_TLS_CERT and ENGRAM_INTERNAL_TLS_KEY are set "
            "together or not at all"
        )


# Rules that involve more than one setting, checked after every variable is read.
_CHECKS: list[Callable[[Settings], None]] = [
    _check_batch_bytes,
    _check_ws_timeouts,
    _check_tls_pairs,
]


# ---------------------------------------------------------------------------------- sizes

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


def format_size(n: int) -> str:
    """67108864 -> ``"64 MiB"`` (the largest unit that divides it)."""
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} B"


# ----------------------------------------------------------------------------------- docs

DOCS_START = "<!-- settings table: generated by `python -m engram.common.settings --write-docs` -->"
DOCS_END = "<!-- end of settings table -->"


def markdown_table() -> str:
    """The settings table of ``docs/settings.md``."""
    rows = [
        "| Variable | Type | Range | Default | Meaning |",
        "|---|---|---|---|---|",
    ]
    for e in catalog():
        s = e.setting
        rows.append(f"| `{e.env}` | {s.kind} | {_shown_range(s)} | {_shown_default(e)} | {s.doc} |")
    return "\n".join(rows)


def _shown_range(s: Setting) -> str:
    if s.choices:
        return ", ".join(s.choices)
    if s.kind == "bool":
        return "0, 1"
    if s.lo is None and s.hi is None:
        return ""
    if s.kind == "size":
        return f"{format_size(int(s.lo or 0))} .. {format_size(int(s.hi or 0))}"
    return _range(s).replace("..", " .. ")


def _shown_default(e: Entry) -> str:
    s = e.setting
    if s.derived:
        return s.derived
    if s.kind == "size":
        return format_size(int(e.default))
    if s.kind == "bool":
        return str(int(e.default))
    if s.kind == "str":
        return f"`{e.default}`" if e.default else "(empty)"
    return f"{e.default:g}" if isinstance(e.default, float) else str(e.default)


def render_docs(text: str) -> str:
    """``text`` (the docs page) with the table between its markers replaced."""
    start = text.index(DOCS_START) + len(DOCS_START)
    end = text.index(DOCS_END)
    return f"{text[:start]}\n{markdown_table()}\n{text[end:]}"


if __name__ == "__main__":
    import sys
    from pathlib import Path

    if sys.argv[1:] == ["--write-docs"]:
        page = Path(__file__).resolve().parents[3] / "docs" / "settings.md"
        page.write_text(render_docs(page.read_text()))
        print(f"wrote {page}")
    else:
        print(markdown_table())
