"""Values: bad ones fail the install naming the value; good ones map to ENGRAM_* variables.

Helm checks values against ``values.schema.json`` before it renders anything, so a typo or an
out-of-range setting fails ``helm install`` with the value's path. Each service setting in the
schema says which ``ENGRAM_*`` variable it sets (its description starts with the name): its
range must be the one the services enforce (``engram.common.settings``), and setting it must
put exactly that variable into the pods that read it. No pod gets an ``ENGRAM_*`` variable
the services do not declare.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from engram.common.settings import catalog

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk missing: make chart-deps")

SCHEMA = Path(__file__).resolve().parents[2] / "helm" / "engram-stream" / "values.schema.json"

BAD_VALUES = [
    ({"shards": {"count": -1}}, "/shards/count"),
    ({"shards": {"count": 0}}, "/shards/count"),
    ({"shards": {"cuont": 3}}, "cuont"),
    ({"gateways": {"service": {"grpcport": 1}}}, "grpcport"),
    ({"shards": {"storage": {"data": {"size": "lots"}}}}, "/shards/storage/data/size"),
    ({"shards": {"storage": {"wal": {"size": "10 GB"}}}}, "/shards/storage/wal/size"),
    ({"shards": {"hnsw": {"m": 1000}}}, "/shards/hnsw/m"),
    ({"shards": {"memoryBudget": "a lot"}}, "/shards/memoryBudget"),
    ({"settings": {"logLevel": "LOUD"}}, "/settings/logLevel"),
    ({"redis": {"enabled": False}}, "/redis/external/url"),
    (
        {"redis": {"enabled": False, "external": {"url": "redis://u:pw@r:6379"}}},
        "/redis/external/url",
    ),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"tls": {"enabled": True}}, "/tls/secretName"),
    ({"internalTls": {"enabled": True, "secretName": ""}}, "/internalTls/secretName"),
    ({"auth": {"existingSecret": "Keys_Of_Mine"}}, "/auth/existingSecret"),
    ({"auth": {"keyMaxRecallsPerSecond": -1}}, "/auth/keyMaxRecallsPerSecond"),
    ({"internalAuth": {"enabeld": False}}, "enabeld"),
]


@pytest.mark.parametrize(("values", "named"), BAD_VALUES, ids=[n for _, n in BAD_VALUES])
def test_bad_values_fail_naming_the_value(chart, values: dict[str, Any], named: str) -> None:
    with pytest.raises(helm_python.HelmValuesError) as info:
        chart.render_files(values)
    assert named in str(info.value)


def _schema_settings() -> dict[str, tuple[tuple[str, ...], dict[str, Any]]]:
    """ENGRAM_* name -> (values path, schema node), from the schema's descriptions."""
    schema = json.loads(SCHEMA.read_text())
    out: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {}

    def walk(node: dict[str, Any], path: tuple[str, ...]) -> None:
        match = re.match(r"(ENGRAM_[A-Z0-9_]+): ", node.get("description", ""))
        if match:
            assert match[1] not in out, f"{match[1]} is set by two values"
            out[match[1]] = (path, node)
        for key, child in node.get("properties", {}).items():
            walk(child, (*path, key))

    walk(schema, ())
    return out


SETTINGS = _schema_settings()
CATALOG = {entry.env: entry.setting for entry in catalog()}
# Which pods read a setting under each top-level key (the others must not get it).
READERS = {
    "settings": {"shard", "gateway"},
    "shards": {"shard"},
    "gateways": {"gateway"},
    "auth": {"gateway"},  # the per-key limits
}
# Routing needs the same shard count in gateways and shards.
READ_BY_ALL = {"ENGRAM_SHARD_COUNT"}


def _nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    out: Any = value
    for key in reversed(path):
        out = {key: out}
    return out


def _sample(node: dict[str, Any]) -> Any:
    """A valid value other than the service's default, from the schema's own range."""
    types = node.get("type", [])
    if "enum" in node:
        return [c for c in node["enum"] if c not in (None, "INFO")][0]
    if "pattern" in node:
        return "3GiB"
    if "integer" in types:
        return int(node.get("maximum", 3))
    if "number" in types:
        return float(node.get("maximum", 2.5))
    return "engram-test"


def test_every_mapped_setting_is_declared_with_its_range() -> None:
    assert len(SETTINGS) >= 20
    for env, (path, node) in SETTINGS.items():
        declared = CATALOG.get(env)
        assert declared is not None, f"{'.'.join(path)} maps to {env}, which no service reads"
        if declared.kind == "size":  # a string: its form by the pattern, its range at start
            assert node["pattern"], env
            continue
        if declared.lo is not None:
            assert node.get("minimum") == declared.lo, f"{env}: minimum differs"
        if declared.hi is not None:
            assert node.get("maximum") == declared.hi, f"{env}: maximum differs"
        if declared.choices:
            assert set(node["enum"]) - {None} == set(declared.choices), env


@pytest.mark.parametrize("env", sorted(SETTINGS))
def test_each_setting_reaches_its_pods(chart, env: str) -> None:
    path, node = SETTINGS[env]
    value = _sample(node)
    docs = chart.render(_nest(path, value))
    readers = {"shard", "gateway"} if env in READ_BY_ALL else READERS[path[0]]
    for kind, component in (("StatefulSet", "shard"), ("Deployment", "gateway")):
        container = chart.one(docs, kind, component)["spec"]["template"]["spec"]["containers"][0]
        env_map = chart.env_of(container)
        if component in readers:
            expected = (
                str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
            )
            assert env_map.get(env) == expected, f"{'.'.join(path)}={value!r} -> {component}"
        else:
            assert env not in env_map, f"{env} set on the {component}s, which do not read it"


def test_unset_settings_leave_the_service_default(chart) -> None:
    docs = chart.render({})
    container = chart.one(docs, "StatefulSet", "shard")["spec"]["template"]["spec"]["containers"][0]
    env_map = chart.env_of(container)
    assert "ENGRAM_HNSW_M" not in env_map and "ENGRAM_MEMORY_BUDGET" not in env_map


def test_pods_use_only_declared_variables(chart, manifests: list[dict[str, Any]]) -> None:
    for doc in manifests:
        if doc["kind"] not in ("StatefulSet", "Deployment"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            for name in chart.env_of(container):
                if name.startswith("ENGRAM_"):
                    assert name in CATALOG, f"{doc['metadata']['name']}: {name} is read by nothing"


def test_large_integers_stay_integers(chart) -> None:
    """Helm reads values files' numbers as floats; 17179869184 must not become 1.7e+10."""
    docs = chart.render({"shards": {"wal": {"segmentBytes": 17179869184}}})
    container = chart.one(docs, "StatefulSet", "shard")["spec"]["template"]["spec"]["containers"][0]
    assert chart.env_of(container)["ENGRAM_WAL_SEGMENT_BYTES"] == "17179869184"
