"""Rendering the Helm chart ``helm/engram-stream`` offline for its tests.

``helm_python`` carries Helm's Go SDK: it renders and lints without a cluster or a helm binary
(``lookup`` returns nothing, as in ``helm template``). Tests that take a ``scenario`` argument
run once per value set in :data:`SCENARIOS`; ``manifests`` is that scenario's rendered objects.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk missing: make chart-deps")

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "engram-stream"
RELEASE = "engram"
NAMESPACE = "engram"

_EXTERNAL_REDIS = {
    "enabled": False,
    "external": {
        "url": "redis://redis.example.internal:6379/2",
        "passwordSecret": {"name": "engram-redis", "key": "password"},
    },
}

# name -> values (over values.yaml)
SCENARIOS: dict[str, dict[str, Any]] = {
    "default": {},
    "external-redis": {"redis": _EXTERNAL_REDIS},
    "ingress": {"ingress": {"grpc": {"enabled": True}, "websocket": {"enabled": True}}},
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}
    },
    "one-shard": {"shards": {"count": 1, "storage": {"wal": {"enabled": False}}}},
    "eight-shards": {
        "shards": {"count": 8, "memoryBudget": "2GiB", "hnsw": {"m": 32}},
        "gateways": {"autoscaling": {"enabled": False}, "replicas": 3},
    },
    "gateway-api": {"gatewayApi": {"enabled": True, "parentRefs": [{"name": "public"}]}},
    "no-operator": {"operator": {"enabled": False}, "networkPolicy": {"enabled": False}},
    # Security (docs/kubernetes.md, "Security"): API keys and the internal token are on by
    # default; these turn them off, take the user's Secrets, and turn TLS on both sides.
    "auth-off": {"auth": {"enabled": False}, "internalAuth": {"enabled": False}},
    "own-secrets": {
        "auth": {"existingSecret": "team-keys", "keyMaxObservationsPerSecond": 5000},
        "internalAuth": {"existingSecret": "engram-token"},
    },
    "tls": {
        "tls": {"enabled": True, "secretName": "engram-gateway-tls"},
        "ingress": {"grpc": {"enabled": True}, "websocket": {"enabled": True}},
        "metrics": {"serviceMonitor": {"enabled": True}},
    },
    "internal-tls": {"internalTls": {"enabled": True, "secretName": "engram-internal-tls"}},
    # Scheduled backups (docs/operations.md, "Backups"): to a volume, or to a bucket with keys.
    "backup-pvc": {"backup": {"enabled": True, "pvc": {"size": "5Gi", "storageClassName": "fast"}}},
    "backup-s3": {
        "backup": {
            "enabled": True,
            "destination": "s3",
            "s3": {"bucket": "engram-backups", "endpoint": "http://minio.minio:9000"},
        },
        "internalTls": {"enabled": True, "secretName": "engram-internal-tls"},
    },
}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "scenario" in metafunc.fixturenames:
        metafunc.parametrize("scenario", list(SCENARIOS))


@functools.cache
def _chart() -> Any:
    return helm_python.Chart.load(CHART)


def render_files(values: dict[str, Any]) -> dict[str, str]:
    """Template path -> rendered text (NOTES.txt included)."""
    return dict(_chart().render(values=values, name=RELEASE, namespace=NAMESPACE))


@functools.cache
def _render_cached(values_json: str) -> tuple[dict[str, Any], ...]:
    docs: list[dict[str, Any]] = []
    for path, text in sorted(render_files(json.loads(values_json)).items()):
        if path.endswith(".txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    return tuple(docs)


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    """Every object the chart renders for ``values`` (fresh copies: tests may change them)."""
    return json.loads(json.dumps(_render_cached(json.dumps(values, sort_keys=True))))


def find(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> list[dict]:
    return [
        d
        for d in docs
        if d["kind"] == kind
        and (
            component is None
            or d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == component
        )
    ]


def one(docs: list[dict[str, Any]], kind: str, component: str | None = None) -> dict[str, Any]:
    found = find(docs, kind, component)
    assert len(found) == 1, f"expected one {kind} {component or ''}, found {len(found)}"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    """name -> value (or the valueFrom source) of a container's env."""
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


@pytest.fixture
def manifests(scenario: str) -> list[dict[str, Any]]:
    return render(SCENARIOS[scenario])


class ChartKit:
    """The ``chart`` fixture: this module's helpers for the test modules (a conftest's
    functions cannot be imported under ``--import-mode=importlib``)."""

    CHART = CHART
    RELEASE = RELEASE
    NAMESPACE = NAMESPACE
    SCENARIOS = SCENARIOS
    render = staticmethod(render)
    render_files = staticmethod(render_files)
    find = staticmethod(find)
    one = staticmethod(one)
    env_of = staticmethod(env_of)


@pytest.fixture
def chart() -> ChartKit:
    return ChartKit()
