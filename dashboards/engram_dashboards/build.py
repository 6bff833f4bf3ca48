"""Compiles the dashboards to ``dashboards/*.json`` and copies the alert rules to the chart.

``python -m engram_dashboards.build`` writes them; ``--check`` writes nothing and exits 1
naming every file that differs from what the code produces (the tests run the same check).
The chart's ``files/alerts.yaml`` is ``dashboards/alerts.yaml`` under a header saying so: the
chart's PrometheusRule embeds it, and the rule file stays the one source.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder

from engram_dashboards import moves, overview, shard

DASHBOARDS_DIR = Path(__file__).resolve().parent.parent
REPO = DASHBOARDS_DIR.parent
ALERTS = DASHBOARDS_DIR / "alerts.yaml"
CHART_ALERTS = REPO / "helm" / "engram-stream" / "files" / "alerts.yaml"
CHART_HEADER = (
    "# Generated from dashboards/alerts.yaml by `make dashboards`: edit that file, not this one.\n"
)

# file name -> the function that builds it
DASHBOARDS: dict[str, Callable[[], dash_b.Dashboard]] = {
    "overview.json": overview.dashboard,
    "shard.json": shard.dashboard,
    "moves.json": moves.dashboard,
}


def render_dashboard(build: Callable[[], dash_b.Dashboard]) -> str:
    """The dashboard as Grafana's JSON model, its panels (rows included) numbered from 1."""
    board = build().build()
    for number, panel in enumerate(board.panels or [], 1):
        panel.id_val = number
    return json.dumps(board, cls=JSONEncoder, indent=2, sort_keys=True) + "\n"


def outputs() -> dict[Path, str]:
    """Every generated file and the text it must hold."""
    files = {DASHBOARDS_DIR / name: render_dashboard(fn) for name, fn in DASHBOARDS.items()}
    files[CHART_ALERTS] = CHART_HEADER + ALERTS.read_text()
    return files


def stale() -> list[Path]:
    """The generated files that are missing or differ from what the code produces."""
    return [p for p, text in outputs().items() if not p.exists() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale()
        for path in bad:
            print(f"stale: {path.relative_to(REPO)} (run `make dashboards`)", file=sys.stderr)
        return 1 if bad else 0
    for path, text in outputs().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
