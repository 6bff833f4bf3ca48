"""docs/kubernetes.md's values table is the one ``helm/values_table.py`` makes from the schema."""

from __future__ import annotations

import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_values_table_is_fresh() -> None:
    generator = runpy.run_path(str(REPO / "helm" / "values_table.py"))
    page = (REPO / "docs" / "kubernetes.md").read_text()
    assert generator["rewrite"](page) == page, (
        "docs/kubernetes.md's values table is stale: run `make chart-docs`"
    )


def test_values_table_lists_every_setting() -> None:
    generator = runpy.run_path(str(REPO / "helm" / "values_table.py"))
    table = generator["table"]()
    for name in ("`shards.count`", "`ENGRAM_SHARD_COUNT`", "`shards.hnsw.m`", "`ENGRAM_HNSW_M`"):
        assert name in table
