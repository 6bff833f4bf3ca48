"""The building blocks every dashboard shares.

Every panel is a time series whose queries select targets by ``job`` (``engram-gateway``,
``engram-shard``: the names the chart's ServiceMonitors relabel to and ``make observe``
uses) and, on shard panels, by the dashboard's ``$instance`` variable. Each dashboard has a
``$datasource`` variable (any Prometheus) so it imports into any Grafana unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.models import common as common_m
from grafana_foundation_sdk.models import dashboard as dash_m

GATEWAY = 'job="engram-gateway"'
SHARD = 'job="engram-shard", instance=~"$instance"'
RATE = "$__rate_interval"
DATASOURCE = dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


def quantiles(
    metric: str, selector: str, by: str = "", qs: tuple[float, ...] = (0.5, 0.99)
) -> list[Query]:
    """P50/P99 (``qs``) of a histogram, per ``by`` label (none: the whole selection)."""
    group = f"{by}, le" if by else "le"
    prefix = f"{{{{{by}}}}} " if by else ""
    return [
        Query(
            f"histogram_quantile({q}, sum by ({group}) "
            f"(rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"{prefix}p{round(q * 100)}",
        )
        for q in qs
    ]


def timeseries(
    title: str,
    description: str,
    unit: str,
    queries: list[Query],
    *,
    width: int = 12,
    min_zero: bool = True,
) -> ts_b.Panel:
    """A time-series panel: its queries, unit and a table legend (last, max)."""
    panel = (
        ts_b.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .span(width)
        .height(8)
        .line_width(1)
        .fill_opacity(10)
        .legend(
            common_b.VizLegendOptions()
            .display_mode(common_m.LegendDisplayMode.TABLE)
            .placement(common_m.LegendPlacement.BOTTOM)
            .show_legend(True)
            .calcs(["lastNotNull", "max"])
        )
        .tooltip(common_b.VizTooltipOptions().mode(common_m.TooltipDisplayMode.MULTI))
    )
    if min_zero:
        panel = panel.min(0)
    for ref, query in zip("ABCDEFGH", queries, strict=False):
        panel = panel.with_target(
            prom_b.Dataquery().expr(query.expr).legend_format(query.legend).ref_id(ref)
        )
    return panel


def new_dashboard(
    uid: str, title: str, description: str, *, instance_job: str | None
) -> dash_b.Dashboard:
    """A dashboard with the ``$datasource`` variable and, if ``instance_job`` is given, an
    ``$instance`` variable listing that job's targets."""
    board = (
        dash_b.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["engram-stream"])
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .editable()
        .tooltip(dash_m.DashboardCursorSync.CROSSHAIR)
        .with_variable(
            dash_b.DatasourceVariable("datasource").label("Data source").type("prometheus")
        )
    )
    if instance_job is not None:
        board = board.with_variable(
            dash_b.QueryVariable("instance")
            .label("Instance")
            .datasource(DATASOURCE)
            .query(f'label_values(up{{job="{instance_job}"}}, instance)')
            .refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .multi(True)
            .include_all(True)
            .all_value(".*")
            .current(dash_m.VariableOption(selected=True, text="All", value="$__all"))
        )
    return board
