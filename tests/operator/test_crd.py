"""The CRD is a structural schema that takes the example resource and refuses bad ones."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "helm" / "engram-stream" / "crds" / "engramclusters.yaml"
EXAMPLE = ROOT / "operator" / "examples" / "engramcluster.yaml"


def closed(schema: Any) -> Any:
    """The schema as the API server applies it to unknown fields: refused (as kubectl's
    strict field validation does) wherever the schema does not preserve them."""
    if isinstance(schema, dict):
        out = {k: closed(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out:
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [closed(v) for v in schema]
    return schema


def walk(schema: Any) -> list[dict[str, Any]]:
    found = []
    if isinstance(schema, dict):
        found.append(schema)
        for v in schema.values():
            found += walk(v)
    elif isinstance(schema, list):
        for v in schema:
            found += walk(v)
    return found


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return dict(yaml.safe_load(CRD.read_text()))


def schema_of(crd: dict[str, Any]) -> dict[str, Any]:
    return dict(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def test_the_contract(crd: dict[str, Any]) -> None:
    spec = crd["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["kind"]) == (
        "engramstream.io", "Namespaced", "EngramCluster",
    )  # fmt: skip
    assert spec["names"]["plural"] == "engramclusters" and "ec" in spec["names"]["shortNames"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"] for c in version["additionalPrinterColumns"]}
    assert {"Shards", "Ready", "Phase", "Age"} <= columns


def test_structural_typed_everywhere_and_nothing_preserved(crd: dict[str, Any]) -> None:
    schema = schema_of(crd)
    for node in walk(schema["properties"]["spec"]) + walk(schema["properties"]["status"]):
        if "properties" in node or "items" in node:
            assert "type" in node, node
        assert "x-kubernetes-preserve-unknown-fields" not in node


def test_the_example_validates(crd: dict[str, Any]) -> None:
    jsonschema.validate(yaml.safe_load(EXAMPLE.read_text()), closed(schema_of(crd)))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("shards",), 0),
        (("shards",), "four"),
        (("storage", "size"), "lots"),
        (("rebalance", "trigger"), 0.5),
        (("bogus",), 1),
        (("workloads", "shardStatefulSet"), ""),
    ],
)
def test_bad_resources_are_refused(crd: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    doc = copy.deepcopy(yaml.safe_load(EXAMPLE.read_text()))
    node = doc["spec"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, closed(schema_of(crd)))


def test_the_peering_crd() -> None:
    crd = yaml.safe_load((CRD.parent / "kopfpeerings.yaml").read_text())["spec"]
    assert (crd["group"], crd["scope"], crd["names"]["kind"]) == (
        "kopf.dev",
        "Namespaced",
        "KopfPeering",
    )
