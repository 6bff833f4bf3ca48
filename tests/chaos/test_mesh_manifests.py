"""The chaos-mesh experiments in chaos/mesh/ against chaos-mesh's own CRD schemas.

Every document is validated against the ``openAPIV3Schema`` of its kind and version, taken
from the CustomResourceDefinitions in ``<repo>/../shared/schemas/chaos-mesh`` (skipped where
that folder is absent), in strict mode: an unknown field is an error, as with
``kubectl apply --validate=strict``. The rest needs no schema: selectors use the chart's
labels, IOChaos targets the WAL volume, the workflow chains the experiments for 10 minutes
and every local fault kind has a Kubernetes counterpart.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from engram.chaos.faults import KINDS

REPO = Path(__file__).resolve().parents[2]
MESH = REPO / "chaos" / "mesh"
SCHEMAS = REPO.parent / "shared" / "schemas" / "chaos-mesh"

NAMESPACE = "engram"
LABELS = {"app.kubernetes.io/name": "engram-stream", "app.kubernetes.io/instance": "engram"}
COMPONENTS = {"gateway", "shard", "redis", "operator"}
WAL_VOLUME = "/var/lib/engram/wal"
SPEC_FIELDS = {  # workflow template field holding each kind's spec
    "PodChaos": "podChaos",
    "NetworkChaos": "networkChaos",
    "IOChaos": "ioChaos",
    "StressChaos": "stressChaos",
}
_DURATION = re.compile(r"^(?:\d+(?:\.\d+)?(?:ns|us|µs|ms|s|m|h))+$")
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(MESH.glob("*.yaml")):
        for k, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc is not None:
                docs.append((f"{path.name}#{k}", doc))
    return docs


DOCS = _documents()
IDS = [name for name, _ in DOCS]


def seconds(duration: str) -> float:
    assert _DURATION.match(duration), f"{duration!r} is not a Go duration (e.g. 30s, 1m30s)"
    return sum(float(n) * _UNIT_S[u] for n, u in _PART.findall(duration))


def _strict(schema: Any) -> Any:
    """The schema with unknown fields forbidden wherever the CRD lists the fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    out = {}
    for path in SCHEMAS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = version["schema"]["openAPIV3Schema"]
            out[(f"{group}/{version['name']}", kind)] = _strict(copy.deepcopy(schema))
    return out


@pytest.fixture(scope="module")
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    if not SCHEMAS.is_dir():
        pytest.skip(
            f"chaos-mesh CRD schemas not found at {SCHEMAS} (they come with the shared "
            "reference data next to the repository, not with it); schema validation skipped"
        )
    return _crd_schemas()


def _selectors(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every (where, selector) in an experiment or in a workflow's templates."""
    found = []

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "selector" and isinstance(value, dict):
                    found.append((f"{where}.selector", value))
                walk(value, f"{where}.{key}")
        elif isinstance(node, list):
            for k, value in enumerate(node):
                walk(value, f"{where}[{k}]")

    walk(doc.get("spec", {}), "spec")
    return found


def _specs(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(kind, spec) of an experiment, or of each chaos template of a workflow."""
    if doc["kind"] != "Workflow":
        return [(doc["kind"], doc["spec"])]
    return [
        (t["templateType"], t[SPEC_FIELDS[t["templateType"]]])
        for t in doc["spec"]["templates"]
        if t["templateType"] in SPEC_FIELDS
    ]


def test_there_are_experiments_of_every_kind() -> None:
    kinds = {doc["kind"] for _, doc in DOCS}
    assert {"PodChaos", "NetworkChaos", "IOChaos", "StressChaos", "Workflow"} <= kinds
    specs = [s for _, doc in DOCS for s in _specs(doc)]
    pod = {
        (s["action"], s["selector"]["labelSelectors"]["app.kubernetes.io/component"])
        for k, s in specs
        if k == "PodChaos"
    }
    assert {("pod-kill", "shard"), ("pod-kill", "gateway"), ("pod-kill", "redis")} <= pod
    net = {s["action"] for k, s in specs if k == "NetworkChaos"}
    assert {"partition", "delay"} <= net
    io = {s["action"] for k, s in specs if k == "IOChaos"}
    assert {"latency", "fault"} <= io
    stress = {key for k, s in specs if k == "StressChaos" for key in s["stressors"]}
    assert {"cpu", "memory"} <= stress


@pytest.mark.parametrize(("name", "doc"), DOCS, ids=IDS)
def test_validates_against_the_crd_schema(
    name: str, doc: dict[str, Any], crd_schemas: dict[tuple[str, str], dict[str, Any]]
) -> None:
    import jsonschema

    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    assert key in crd_schemas, f"{name}: no chaos-mesh CRD for {key}"
    errors = sorted(
        jsonschema.Draft7Validator(crd_schemas[key]).iter_errors(doc), key=lambda e: e.path
    )
    assert not errors, f"{name}:\n" + "\n".join(
        f"  {'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors
    )


@pytest.mark.parametrize(("name", "doc"), DOCS, ids=IDS)
def test_targets_the_release_by_the_chart_labels(name: str, doc: dict[str, Any]) -> None:
    assert doc["metadata"]["namespace"] == NAMESPACE, name
    selectors = _selectors(doc)
    if doc["kind"] != "Workflow" or any(
        t["templateType"] in SPEC_FIELDS for t in doc["spec"]["templates"]
    ):
        assert selectors, f"{name}: no selector"
    for where, sel in selectors:
        assert sel.get("namespaces") == [NAMESPACE], f"{name} {where}: namespaces"
        labels = sel.get("labelSelectors", {})
        for key, value in LABELS.items():
            assert labels.get(key) == value, f"{name} {where}: {key} must be {value!r}"
        assert labels.get("app.kubernetes.io/component") in COMPONENTS, f"{name} {where}"


@pytest.mark.parametrize(("name", "doc"), DOCS, ids=IDS)
def test_io_chaos_hits_the_wal_volume(name: str, doc: dict[str, Any]) -> None:
    for kind, spec in _specs(doc):
        if kind == "IOChaos":
            assert spec["volumePath"] == WAL_VOLUME, name
            assert spec.get("path", WAL_VOLUME).startswith(WAL_VOLUME + "/"), name
            assert spec["selector"]["labelSelectors"]["app.kubernetes.io/component"] == "shard"


@pytest.mark.parametrize(("name", "doc"), DOCS, ids=IDS)
def test_durations_are_go_durations(name: str, doc: dict[str, Any]) -> None:
    for _kind, spec in _specs(doc):
        if "duration" in spec:
            assert seconds(spec["duration"]) > 0, name
    if doc["kind"] == "Workflow":
        for t in doc["spec"]["templates"]:
            assert seconds(t["deadline"]) > 0, f"{name}: template {t['name']}"


def _length(templates: dict[str, dict[str, Any]], name: str, path: tuple[str, ...] = ()) -> float:
    """How long a workflow template runs: Serial = sum, Parallel = max, others = deadline."""
    assert name not in path, f"template cycle through {name}"
    t = templates[name]
    own = seconds(t["deadline"]) if "deadline" in t else float("inf")
    children = t.get("children") or []
    for child in children:
        assert child in templates, f"{name} names an unknown template {child}"
    if t["templateType"] == "Serial":
        total = sum(_length(templates, c, (*path, name)) for c in children)
        assert total <= own, f"{name}: children need {total} s, deadline {own} s"
        return total
    if t["templateType"] == "Parallel":
        return max(_length(templates, c, (*path, name)) for c in children)
    return own


def test_the_workflow_chains_every_experiment_for_ten_minutes() -> None:
    workflows = [doc for _, doc in DOCS if doc["kind"] == "Workflow"]
    assert workflows, "no Workflow in chaos/mesh"
    for wf in workflows:
        templates = {t["name"]: t for t in wf["spec"]["templates"]}
        assert len(templates) == len(wf["spec"]["templates"]), "template names must be unique"
        assert wf["spec"]["entry"] in templates
        assert _length(templates, wf["spec"]["entry"]) == pytest.approx(600.0), "10 minutes"
        used = {t["templateType"] for t in templates.values()}
        assert set(SPEC_FIELDS) <= used, f"the workflow should chain every kind, has {used}"


def test_every_local_fault_kind_has_a_kubernetes_counterpart() -> None:
    mirrored: set[str] = set()
    for _, doc in DOCS:
        note = doc["metadata"].get("annotations", {}).get("chaos.engram.dev/mirrors", "")
        mirrored |= {k for k in note.split(",") if k}
    assert mirrored <= set(KINDS), f"unknown kinds named: {mirrored - set(KINDS)}"
    assert set(KINDS) <= mirrored, f"no chaos-mesh counterpart for {set(KINDS) - mirrored}"
