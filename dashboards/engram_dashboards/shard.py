"""Shard: one shard's storage and background work (pick instances with ``$instance``): WAL
fsync time and group size, fresh-tier backlog and memory against the budget, indexing, HNSW
size, checkpoint age, event-loop lag."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash_b

from engram_dashboards.panels import RATE, SHARD, Query, new_dashboard, quantiles, timeseries

UID = "engram-shard"


def _rate(metric: str) -> str:
    """Per-instance rate of a counter (or a histogram's _sum/_count) on the selected shards."""
    return f"sum by (instance) (rate({metric}{{{SHARD}}}[{RATE}]))"


def dashboard() -> dash_b.Dashboard:
    board = new_dashboard(
        UID,
        "Engram Stream / Shard",
        "A shard's WAL, memory, index and checkpoints.",
        instance_job="engram-shard",
    )
    return (
        board.with_row(dash_b.Row("WAL"))
        .with_panel(
            timeseries(
                "WAL fsync time",
                "One fdatasync per group commit; every ack of the round waits for it.",
                "s",
                quantiles("engram_shard_wal_fsync_seconds", SHARD, by="instance"),
            )
        )
        .with_panel(
            timeseries(
                "WAL group size and fsync rate",
                "Records made durable per fdatasync (mean), and fdatasyncs per second.",
                "short",
                [
                    Query(
                        f"{_rate('engram_shard_wal_group_records_sum')} / "
                        f"{_rate('engram_shard_wal_group_records_count')}",
                        "{{instance}} records/fsync",
                    ),
                    Query(_rate("engram_shard_wal_fsync_seconds_count"), "{{instance}} fsyncs/s"),
                ],
            )
        )
        .with_row(dash_b.Row("Fresh tier and memory"))
        .with_panel(
            timeseries(
                "Fresh-tier backlog",
                "Visible observations not yet in HNSW (recalls scan them exactly).",
                "short",
                [
                    Query(
                        f"sum by (instance) (engram_shard_index_backlog{{{SHARD}}})", "{{instance}}"
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Memory against budget",
                "Bytes held that are not yet in HNSW (intake + fresh tier), and the budget "
                "admission control refuses writes at.",
                "bytes",
                [
                    Query(
                        f"sum by (instance) (engram_shard_memory_bytes{{{SHARD}}})",
                        "{{instance}} used",
                    ),
                    Query(
                        f"sum by (instance) (engram_shard_memory_budget_bytes{{{SHARD}}})",
                        "{{instance}} budget",
                    ),
                ],
            )
        )
        .with_row(dash_b.Row("Index and checkpoints"))
        .with_panel(
            timeseries(
                "Indexing rate",
                "Observations added to HNSW per second.",
                "ops",
                [
                    Query(
                        f"sum by (instance) (rate(engram_shard_indexed_total{{{SHARD}}}[{RATE}]))",
                        "{{instance}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "HNSW size",
                "Observations in the HNSW index: visible rows less the fresh-tier backlog.",
                "short",
                [
                    Query(
                        f"sum by (instance) (engram_shard_rows{{{SHARD}}}) - "
                        f"sum by (instance) (engram_shard_index_backlog{{{SHARD}}})",
                        "{{instance}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Checkpoint age",
                "Per space: seconds its newest rows have waited for a checkpoint (a restart "
                "replays them from the WAL); 0 when the checkpoint covers every row.",
                "s",
                [
                    Query(
                        "max by (instance, memory_space) "
                        f"(engram_shard_checkpoint_age_seconds{{{SHARD}}})",
                        "{{instance}} {{memory_space}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Event-loop lag",
                "How late the shard's event loop ran a timer: how long any request waited "
                "before the loop looked at it.",
                "s",
                quantiles("engram_event_loop_lag_seconds", SHARD, by="instance", qs=(0.99,)),
            )
        )
    )
