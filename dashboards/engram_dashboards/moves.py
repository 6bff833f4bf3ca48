"""Moves and rebalancing: moves that ended, their write pause, moves in progress, clients
following their space, and the per-space load the rebalancer weighs."""

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

UID = "engram-moves"


def dashboard() -> dash_b.Dashboard:
    board = new_dashboard(
        UID,
        "Engram Stream / Moves and rebalancing",
        "Space moves between shards: outcome, write pause, progress and per-space load.",
        instance_job="engram-shard",
    )
    return (
        board.with_row(dash_b.Row("Moves"))
        .with_panel(
            timeseries(
                "Moves ended",
                "Moves into a shard that ended in the last 5 minutes, by result.",
                "short",
                [
                    Query(
                        f"sum by (result) (increase(engram_shard_moves_total{{{SHARD}}}[5m]))",
                        "{{result}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Write pause of a move",
                "Shard: from the source's fence to the target's commit. Gateway: from a "
                "NOT_OWNER answer to the stream's batches resent to the new owner.",
                "s",
                [
                    *quantiles("engram_shard_move_pause_seconds", SHARD, qs=(0.5, 0.99)),
                    *(
                        Query(q.expr, f"gateway reroute {q.legend}")
                        for q in quantiles(
                            "engram_streaming_reroute_pause_seconds", GATEWAY, qs=(0.99,)
                        )
                    ),
                ],
            )
        )
        .with_panel(
            timeseries(
                "Oldest move in progress",
                "Age of the oldest move in progress on each shard, as source or target (0: none).",
                "s",
                [
                    Query(
                        f"max by (instance) (engram_shard_move_oldest_seconds{{{SHARD}}})",
                        "{{instance}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Streams rerouted",
                "Client streams that followed their space to its new owner, per second.",
                "ops",
                [
                    Query(
                        f"sum(rate(engram_streaming_reroutes_total{{{GATEWAY}}}[{RATE}]))",
                        "reroutes",
                    )
                ],
            )
        )
        .with_row(dash_b.Row("Load"))
        .with_panel(
            timeseries(
                "Per-space ingest (top 10)",
                "Observations acknowledged per second, by memory space: the load moves spread.",
                "ops",
                [
                    Query(
                        "topk(10, sum by (memory_space) (rate(engram_streaming_observations_total"
                        f"{{{GATEWAY}}}[{RATE}])))",
                        "{{memory_space}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries(
                "Rows per shard",
                "Visible observations each shard holds: how evenly the spaces are spread.",
                "short",
                [Query(f"sum by (instance) (engram_shard_rows{{{SHARD}}})", "{{instance}}")],
            )
        )
    )
