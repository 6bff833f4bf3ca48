"""The dashboards' suites: ``dashboards/`` on the import path (the package ``engram_dashboards``
is run from there, not installed), and what they share, reached through the ``dash`` fixture
(this module; with ``--import-mode=importlib`` test modules cannot import it):

* ``require(tool)``: skips the test when a binary is missing (``make prometheus-deps``);
* ``scrape(address)``: the text of a ``/metrics`` page;
* ``cluster_scrapes(cluster)``: job -> the series names every process of that job exports;
* ``value(text, name, **labels)``: one sample of a scraped page (None if absent);
* ``wait_for(predicate, timeout, what)``: polls until true, fails naming ``what``.
"""

from __future__ import annotations

import shutil
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards"
sys.path.insert(0, str(DASHBOARDS))

from engram_dashboards import prometheus, promql  # noqa: E402


def require(tool: str) -> None:
    """Skips the calling test if ``tool`` is missing (``make prometheus-deps`` installs it)."""
    if shutil.which(tool) is None:
        pytest.skip(f"{tool} not installed: run `make prometheus-deps`")


def scrape(address: str) -> str:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        return str(resp.read().decode())


def cluster_scrapes(cluster: Any) -> dict[str, list[set[str]]]:
    """job -> one set of exported series names per process of that job."""
    found: dict[str, list[set[str]]] = {}
    for job, addresses in prometheus.cluster_targets(cluster.endpoints()).items():
        found[job] = [promql.exported_names(scrape(a)) for a in addresses]
    return found


def value(text: str, name: str, **labels: str) -> float | None:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture
def dash() -> ModuleType:
    return sys.modules[__name__]
