"""Prometheus metrics of every service, defined once.

Names keep the original Engram streaming metric names (``engram_streaming_*``) so alerts carry
over; shard-internal figures are ``engram_shard_*``. Each process exposes its own registry on
its HTTP port at ``/metrics`` (:mod:`engram.common.http`).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# ----------------------------------------------------------------- gateway (client streams)
observations_total = Counter(
    "engram_streaming_observations_total",
    "Observations acknowledged durable",
    ["memory_space", "priority"],
)
observations_rejected_total = Counter(
    "engram_streaming_observations_rejected_total",
    "Observations refused (bad input, overload, storage failure)",
    ["memory_space", "reason"],
)
batches_processed_total = Counter(
    "engram_streaming_batches_processed_total", "Batches acknowledged durable"
)
batch_failures_total = Counter(
    "engram_streaming_batch_failures_total", "Batches answered with an error", ["code"]
)
active_sessions = Gauge(
    "engram_streaming_active_sessions_total", "Client streams open on this gateway"
)
observation_latency = Histogram(
    "engram_streaming_observation_latency_seconds",
    "Time from a batch's arrival at the gateway to its durable ack",
    buckets=_LATENCY_BUCKETS,
)
recall_latency = Histogram(
    "engram_streaming_recall_latency_seconds",
    "Time to answer a recall, as the gateway sees it",
    buckets=_LATENCY_BUCKETS,
)
batch_size = Histogram(
    "engram_streaming_batch_size",
    "Observations per batch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000),
)
shard_stream_failures_total = Counter(
    "engram_streaming_shard_stream_failures_total",
    "Client streams ended because their shard became unreachable",
)
stream_reroutes_total = Counter(
    "engram_streaming_reroutes_total",
    "Times a client stream followed its space to a new owner (NOT_OWNER: the space moved)",
)
reroute_pause = Histogram(
    "engram_streaming_reroute_pause_seconds",
    "From a NOT_OWNER answer to the stream's batches resent to the new owner",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

# ------------------------------------------------------------------ gateway (API keys)
auth_failures_total = Counter(
    "engram_auth_failures_total",
    "Clients refused authentication (reason: missing, malformed, unknown, revoked, expired, "
    "timeout, too_large)",
    ["transport", "reason"],
)
key_rate_limited_total = Counter(
    "engram_key_rate_limited_total",
    "Batches or recalls refused because their API key was over its per-gateway limit",
    ["key_id", "kind"],
)

# --------------------------------------------------------------------------------- shard
shard_rows = Gauge("engram_shard_rows", "Durable, visible observations per space", ["memory_space"])
shard_index_backlog = Gauge(
    "engram_shard_index_backlog",
    "Visible observations not yet in the HNSW index (searched exactly in the fresh tier)",
    ["memory_space"],
)
shard_indexed_total = Counter(
    "engram_shard_indexed_total", "Observations added to the HNSW index", ["memory_space"]
)
shard_checkpoints_total = Counter(
    "engram_shard_checkpoints_total", "Checkpoints written", ["memory_space"]
)
shard_wal_failures_total = Counter(
    "engram_shard_wal_failures_total",
    "Times the space's WAL failed a commit (fsync or write error) and began refusing writes",
    ["memory_space"],
)
# Observed by the WAL's committer thread once per group-commit round (never per record).
shard_wal_fsync_seconds = Histogram(
    "engram_shard_wal_fsync_seconds",
    "Time of one WAL fdatasync (one group commit); every ack of its round waited for it",
    buckets=_LATENCY_BUCKETS,
)
shard_wal_group_records = Histogram(
    "engram_shard_wal_group_records",
    "WAL records (batches, session opens) made durable by one fdatasync",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
)
shard_checkpoint_age = Gauge(
    "engram_shard_checkpoint_age_seconds",
    "Seconds since the space's last checkpoint while it holds rows no checkpoint covers "
    "(a restart replays them from the WAL); 0 when the checkpoint covers every row",
    ["memory_space"],
)
shard_compactions_total = Counter(
    "engram_shard_compactions_total",
    "Compactions of a space: its HNSW index rebuilt from the live rows, deleted rows' ids and "
    "contents emptied",
    ["memory_space"],
)
shard_space_bytes = Gauge(
    "engram_shard_space_bytes",
    "Memory a space holds by part: index (HNSW, estimated from its rows and capacity), "
    "columns (ids and contents)",
    ["memory_space", "part"],
)
SPACE_BYTES_PARTS = ("index", "columns")
shard_memory_bytes = Gauge(
    "engram_shard_memory_bytes",
    "Bytes held that are not yet in HNSW (intake + fresh tier), counted by admission control",
)
shard_memory_budget_bytes = Gauge(
    "engram_shard_memory_budget_bytes", "The shard's memory budget for un-indexed data"
)
shard_pressure = Gauge("engram_shard_pressure", "Admission pressure, 0..1 of the tightest limit")
backpressure_state = Gauge(
    "engram_streaming_backpressure_state",
    "Backpressure level of the shard holding the space: 0 NORMAL, 1 WARNING, 2 CRITICAL, "
    "3 OVERLOADED",
    ["memory_space"],
)
backpressure_activations_total = Counter(
    "engram_streaming_backpressure_activations_total",
    "Times the space's shard entered a backpressure level",
    ["memory_space", "level"],
)
queue_depth = Gauge(
    "engram_streaming_queue_depth", "Admitted, not yet durable observations per lane", ["priority"]
)
queue_memory_bytes = Gauge(
    "engram_streaming_queue_memory_bytes", "Bytes of admitted, not yet durable batches"
)

# ------------------------------------------------------------------------- shard: moves
shard_moves_total = Counter(
    "engram_shard_moves_total",
    "Moves into this shard that ended: committed (the space lives here now) or aborted",
    ["result"],
)
for _result in ("committed", "aborted"):  # exported at 0: increase() misses a series born at 1
    shard_moves_total.labels(_result)
shard_move_pause = Histogram(
    "engram_shard_move_pause_seconds",
    "Write pause of a committed move into this shard: from the source's fence to the commit",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
shard_move_oldest = Gauge(
    "engram_shard_move_oldest_seconds",
    "Age of the oldest move in progress on this shard, as source or target (0: none)",
)

# ------------------------------------------------------------------------------ every process
control_store_up = Gauge(
    "engram_control_store_up",
    "1 while the control store (Redis) answered the process's last periodic call, else 0",
)
event_loop_lag = Histogram(
    "engram_event_loop_lag_seconds",
    "How late the process's event loop ran a timer: time other work (or the GIL) kept it busy",
    buckets=_LATENCY_BUCKETS,
)
tracing_spans_exported_total = Counter(
    "engram_tracing_spans_exported_total", "Sampled spans the OTLP collector accepted"
)
tracing_spans_dropped_total = Counter(
    "engram_tracing_spans_dropped_total",
    "Sampled spans never delivered: the export queue was full (the collector slow or "
    "unreachable) or the export failed",
    ["reason"],
)
for _reason in ("queue_full", "export_failed"):  # exported at 0, like every alerting counter
    tracing_spans_dropped_total.labels(_reason)


# The per-space gauges a shard sets; a space that leaves the shard takes its series along.
_SPACE_GAUGES = (shard_rows, shard_index_backlog, shard_checkpoint_age, backpressure_state)


def forget_space(name: str) -> None:
    """Drops ``name``'s per-space gauges (it moved away or was deleted): a frozen last value
    would otherwise be summed with the new owner's on every dashboard."""
    for gauge in _SPACE_GAUGES:
        try:
            gauge.remove(name)
        except KeyError:
            pass
    for part in SPACE_BYTES_PARTS:
        try:
            shard_space_bytes.remove(name, part)
        except KeyError:
            pass
