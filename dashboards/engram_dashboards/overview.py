"""Overview: is the cluster taking writes, how fast, how soon are they acknowledged and
visible, and who is being pushed back. Gateway-side figures, plus each shard's backpressure."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as dash_b

from engram_dashboards.panels import (
    GATEWAY,
    RATE,
    SHARD,
    Query,
    new_dashboard,
    quantiles,
    timeseries,
)

UID = "engram-overview"


def dashboard() -> dash_b.Dashboard:
    board = new_dashboard(
        UID,
        "Engram Stream / Overview",
        "Ingest, acknowledgements, visibility, recall and sessions across the cluster.",
        instance_job="engram-shard",
    )
    return (
        board.with_row(dash_b.Row("Ingest"))
        .with_panel(
            timeseries(
                "Ingest and acknowledged rate",
                "Observations arriving at the gateways (in valid batches) and observations "
                "acknowledged durable, per second.",
                "ops",
                [
                    Query(
                        f"sum(rate(engram_streaming_batch_size_sum{{{GATEWAY}}}[{RATE}]))",
                        "received",
                    ),
                    Query(
                        f"sum(rate(engram_streaming_observations_total{{{GATEWAY}}}[{RATE}]))",
                        "acknowledged",
                    ),
                ],
            )
        )
        .with_panel(
            timeseries(
                "Rejections by reason",
                "Observations refused, per second, by reason (overload answers carry a "
                "retry-after; bad input is the client's fault).",
                "ops",
                [
                    Query(
                        "sum by (reason) (rate(engram_streaming_observations_rejected_total"
                        f"{{{GATEWAY}}}[{RATE}]))",
                        "{{reason}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Backpressure level per shard",
                "Highest backpressure level of each shard's spaces: 0 NORMAL, 1 WARNING, "
                "2 CRITICAL, 3 OVERLOADED.",
                "none",
                [
                    Query(
                        f"max by (instance) (engram_streaming_backpressure_state{{{SHARD}}})",
                        "{{instance}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Active client streams",
                "Client streams (sessions) open on each gateway.",
                "short",
                [
                    Query(
                        f"sum by (instance) (engram_streaming_active_sessions_total{{{GATEWAY}}})",
                        "{{instance}}",
                    )
                ],
            )
        )
        .with_row(dash_b.Row("Latency"))
        .with_panel(
            timeseries(
                "Acknowledgement latency",
                "From a batch's arrival at the gateway to its durable ack (WAL fsynced).",
                "s",
                quantiles("engram_streaming_observation_latency_seconds", GATEWAY),
            )
        )
        .with_panel(
            timeseries(
                "Visibility latency (canary)",
                "From writing a probe to the first recall that returns it, per shard; the "
                "product's bound is 100 ms at P99.",
                "s",
                quantiles("engram_recall_visibility_latency_seconds", GATEWAY, by="shard"),
            )
        )
        .with_panel(
            timeseries(
                "Recall latency",
                "Time to answer a recall, as the gateway sees it.",
                "s",
                quantiles("engram_streaming_recall_latency_seconds", GATEWAY),
            )
        )
        .with_panel(
            timeseries(
                "Processes up",
                "Targets Prometheus scrapes successfully, per job.",
                "short",
                [Query('sum by (job) (up{job=~"engram-gateway|engram-shard"})', "{{job}}")],
            )
        )
    )
