"""Chaos suites: the short local chaos run and the chaos-mesh experiments."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "chaos: a run of the chaos harness against a real local cluster (part of `make test`)",
    )
