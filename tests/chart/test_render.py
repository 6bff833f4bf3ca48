"""Every value set renders, lints clean, and every object it renders is valid.

Built-in kinds are validated by ``kubernetes_validate`` in strict mode (an unknown field is an
error) for the oldest Kubernetes the chart supports (1.28: the shards read their ordinal from
the ``apps.kubernetes.io/pod-index`` label) and the newest it knows; custom objects against
their CRDs' ``openAPIV3Schema`` (the EngramCluster and KopfPeering against the chart's own
``crds/``, ServiceMonitor and PrometheusRule against prometheus-operator's, vendored in
``schemas/``). An object of a kind no validator knows fails the test, so none slips through.
"""

from __future__ import annotations

import base64
import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate missing: make chart-deps"
)
helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk missing: make chart-deps")

HERE = Path(__file__).resolve().parent
CRDS = HERE.parents[1] / "helm" / "engram-stream" / "crds"
VENDORED = HERE / "schemas"
KUBE_VERSIONS = ["1.28.0", "1.37.0"]
CUSTOM_GROUPS = ("monitoring.coreos.com/", "engramstream.io/", "kopf.dev/")
# Gateway API: no CRD schema here; checked by hand in test_gateway_api_routes.
GATEWAY_API = "gateway.networking.k8s.io/v1"


def _openapi_for_jsonschema(schema: Any) -> Any:
    """A CRD's openAPIV3Schema for Python's jsonschema: unknown fields forbidden wherever the
    CRD lists the fields (as the API server prunes/rejects them), and Go's ``^(?i)...``
    regex, which Python rejects, written ``(?i)^...``."""
    if isinstance(schema, dict):
        out = {k: _openapi_for_jsonschema(v) for k, v in schema.items()}
        if isinstance(out.get("pattern"), str) and out["pattern"].startswith("^(?i)"):
            out["pattern"] = "(?i)^" + out["pattern"][len("^(?i)") :]
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_openapi_for_jsonschema(v) for v in schema]
    return schema


def _crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> schema, from the chart's CRDs and the vendored ones."""
    out = {}
    for path in [*sorted(CRDS.glob("*.yaml")), *sorted(VENDORED.glob("*.yaml"))]:
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                schema = _openapi_for_jsonschema(version["schema"]["openAPIV3Schema"])
                # the API server's own fields of every object
                schema["properties"].update(
                    apiVersion={"type": "string"},
                    kind={"type": "string"},
                    metadata={"type": "object"},
                )
                out[(f"{spec['group']}/{version['name']}", spec["names"]["kind"])] = schema
    return out


SCHEMAS = _crd_schemas()


def test_lint_strict(chart, scenario: str) -> None:
    for kube in KUBE_VERSIONS:
        report = helm_python.lint(
            chart.CHART,
            values=chart.SCENARIOS[scenario],
            strict=True,
            namespace=chart.NAMESPACE,
            kube_version=f"v{kube}",
        )
        problems = [m for m in report["messages"] if m["severity"] >= 2] + report["errors"]
        assert not problems, f"helm lint (strict, Kubernetes {kube}): {problems}"


@pytest.mark.parametrize("kube", KUBE_VERSIONS)
def test_builtin_objects_valid(manifests: list[dict[str, Any]], kube: str) -> None:
    for doc in manifests:
        if doc["apiVersion"].startswith(CUSTOM_GROUPS) or doc["apiVersion"] == GATEWAY_API:
            continue
        where = f"{doc['kind']} {doc['metadata']['name']}"
        try:
            kubernetes_validate.validate(doc, kube, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = "/".join(str(p) for p in exc.path)
            pytest.fail(f"{where} is invalid for Kubernetes {kube} at {path}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{where}: Kubernetes {kube} has no {doc['apiVersion']} {doc['kind']}")


def test_custom_objects_valid(manifests: list[dict[str, Any]]) -> None:
    for doc in manifests:
        if not doc["apiVersion"].startswith(CUSTOM_GROUPS):
            continue
        schema = SCHEMAS.get((doc["apiVersion"], doc["kind"]))
        where = f"{doc['kind']} {doc['metadata']['name']}"
        assert schema is not None, f"{where}: no CRD for {doc['apiVersion']} {doc['kind']}"
        errors = sorted(
            jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path)
        )
        assert not errors, f"{where}: " + "; ".join(
            f"{'/'.join(map(str, e.path))}: {e.message}" for e in errors
        )


def test_crd_schema_catches_a_bad_engramcluster(chart) -> None:
    """The validation above can fail: a shard count below 1 breaks the CRD's schema."""
    doc = copy.deepcopy(chart.one(chart.render({}), "EngramCluster"))
    doc["spec"]["shards"] = 0
    schema = SCHEMAS[("engramstream.io/v1alpha1", "EngramCluster")]
    assert list(jsonschema.Draft7Validator(schema).iter_errors(doc))


def test_every_workload_is_restricted(manifests: list[dict[str, Any]]) -> None:
    """Pod Security "restricted" on every pod and container, init containers included."""
    for doc in manifests:
        if doc["kind"] == "CronJob":
            pod = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif doc["kind"] in ("StatefulSet", "Deployment"):
            pod = doc["spec"]["template"]["spec"]
        else:
            continue
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in pod["containers"] + pod.get("initContainers", []):
            sc = c["securityContext"]
            where = f"{doc['metadata']['name']}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["runAsNonRoot"] is True, where
            assert sc["capabilities"]["drop"] == ["ALL"], where
            assert "add" not in sc["capabilities"], where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where
            assert c["resources"]["requests"], where


def test_shards_match_the_count(chart, manifests: list[dict[str, Any]], scenario: str) -> None:
    count = chart.SCENARIOS[scenario].get("shards", {}).get("count", 2)
    sts = chart.one(manifests, "StatefulSet", "shard")
    assert sts["spec"]["replicas"] == count
    assert sts["spec"]["podManagementPolicy"] == "Parallel"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] == "Retain"
    for kind, component in (("StatefulSet", "shard"), ("Deployment", "gateway")):
        pod = chart.one(manifests, kind, component)["spec"]["template"]["spec"]
        assert chart.env_of(pod["containers"][0])["ENGRAM_SHARD_COUNT"] == str(count)
    clusters = chart.find(manifests, "EngramCluster")
    if chart.SCENARIOS[scenario].get("operator", {}).get("enabled", True):
        assert [c["spec"]["shards"] for c in clusters] == [count]
        spec = clusters[0]["spec"]
        assert spec["workloads"]["shardStatefulSet"] == sts["metadata"]["name"]
        assert spec["workloads"]["shardService"] == sts["spec"]["serviceName"]
        gateway = chart.one(manifests, "Deployment", "gateway")["metadata"]["name"]
        assert spec["workloads"]["gatewayDeployment"] == gateway
    else:
        assert clusters == []
        assert chart.find(manifests, "Deployment", "operator") == []
    service = chart.one(manifests, "Service", "shard")["spec"]
    assert service["clusterIP"] == "None" and service["publishNotReadyAddresses"] is True


def test_shards_serve_recalls_on_a_port_of_their_own(
    chart, manifests: list[dict[str, Any]]
) -> None:
    """The recall port, 50062: the container declares it (named ``recall``) and the shard
    listens on it; its advertised address is left to the shard, which takes the host of
    ENGRAM_SHARD_ADVERTISE (the pod's name under the headless Service); the Service lists it
    and the NetworkPolicy admits to it the peers it admits to the main port."""
    sts = chart.one(manifests, "StatefulSet", "shard")
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": 50061, "recall": 50062, "http": 9090}
    env = chart.env_of(container)
    assert env["ENGRAM_SHARD_LISTEN"] == "0.0.0.0:50061"
    assert env["ENGRAM_SHARD_RECALL_LISTEN"] == "0.0.0.0:50062"
    assert "ENGRAM_SHARD_RECALL_ADVERTISE" not in env
    service = chart.one(manifests, "Service", "shard")
    assert env["ENGRAM_SHARD_ADVERTISE"].startswith(f"$(POD_NAME).{service['metadata']['name']}.")
    listed = {
        p["name"]: (p["port"], p["targetPort"], p["appProtocol"]) for p in service["spec"]["ports"]
    }
    assert listed == {
        "grpc": (50061, "grpc", "grpc"),
        "recall": (50062, "recall", "grpc"),
        "http": (9090, "http", "http"),
    }
    for policy in chart.find(manifests, "NetworkPolicy", "shard"):  # none with it disabled
        (rpc, _metrics) = policy["spec"]["ingress"]
        assert {p["port"] for p in rpc["ports"]} == {"grpc", "recall"}


def test_redis_in_cluster_or_external(chart) -> None:
    inside = chart.render({})
    secret = chart.one(inside, "Secret", "redis")
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    assert password.isalnum() and len(password) == 32
    gateway = chart.one(inside, "Deployment", "gateway")["spec"]["template"]["spec"]
    env = chart.env_of(gateway["containers"][0])
    assert env["REDIS_PASSWORD"]["secretKeyRef"]["name"] == secret["metadata"]["name"]
    assert env["ENGRAM_REDIS_URL"] == (
        "redis://:$(REDIS_PASSWORD)@engram-engram-stream-redis.engram.svc.cluster.local:6379/0"
    )
    names = [e["name"] for e in gateway["containers"][0]["env"]]
    assert names.index("REDIS_PASSWORD") < names.index("ENGRAM_REDIS_URL")  # for $(VAR)

    outside = chart.render(chart.SCENARIOS["external-redis"])
    assert not chart.find(outside, "StatefulSet", "redis")
    assert not chart.find(outside, "Secret", "redis")
    shard = chart.one(outside, "StatefulSet", "shard")["spec"]["template"]["spec"]
    env = chart.env_of(shard["containers"][0])
    assert env["REDIS_PASSWORD"]["secretKeyRef"] == {"name": "engram-redis", "key": "password"}
    assert env["ENGRAM_REDIS_URL"] == "redis://:$(REDIS_PASSWORD)@redis.example.internal:6379/2"
    cluster = chart.one(outside, "EngramCluster")["spec"]["redis"]
    assert cluster == {
        "url": "redis://redis.example.internal:6379/2",
        "passwordSecret": {"name": "engram-redis", "key": "password"},
    }
    no_password = chart.render({"redis": {"enabled": False, "external": {"url": "redis://r:6379"}}})
    env = chart.env_of(
        chart.one(no_password, "Deployment", "gateway")["spec"]["template"]["spec"]["containers"][0]
    )
    assert env["ENGRAM_REDIS_URL"] == "redis://r:6379" and "REDIS_PASSWORD" not in env


def test_tracing_only_when_a_collector_is_named(chart) -> None:
    def pods(values: dict[str, Any]) -> list[dict[str, Any]]:
        docs = chart.render(values)
        return [
            chart.env_of(chart.one(docs, kind, part)["spec"]["template"]["spec"]["containers"][0])
            for kind, part in (("Deployment", "gateway"), ("StatefulSet", "shard"))
        ]

    assert all(not any(k.startswith("OTEL_") for k in env) for env in pods({}))
    for env in pods({"tracing": {"endpoint": "http://collector:4317", "sampleRatio": 0.05}}):
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4317"
        assert env["OTEL_TRACES_SAMPLER"] == "parentbased_traceidratio"
        assert env["OTEL_TRACES_SAMPLER_ARG"] == "0.05"
    with pytest.raises(Exception, match="tracing/endpoint"):
        chart.render({"tracing": {"endpoint": "collector:4317"}})


def test_ingresses(chart) -> None:
    docs = chart.render(chart.SCENARIOS["ingress"])
    by_name = {d["metadata"]["name"]: d for d in chart.find(docs, "Ingress")}
    grpc, http = (
        by_name["engram-engram-stream-gateway-grpc"],
        by_name["engram-engram-stream-gateway-http"],
    )
    notes = grpc["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert grpc["spec"]["tls"], "gRPC through ingress-nginx needs TLS (HTTP/2)"
    backend = grpc["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert backend["port"] == {"name": "grpc"}
    ws = http["metadata"]["annotations"]
    assert "nginx.ingress.kubernetes.io/backend-protocol" not in ws
    assert int(ws["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    assert int(ws["nginx.ingress.kubernetes.io/proxy-send-timeout"]) >= 3600
    paths = {
        p["path"]: p["backend"]["service"]["port"]
        for p in http["spec"]["rules"][0]["http"]["paths"]
    }
    assert paths["/v1/stream"] == {"name": "http"}
    service = chart.one(docs, "Service", "gateway")
    protocols = {p["name"]: p["appProtocol"] for p in service["spec"]["ports"]}
    assert protocols == {"grpc": "grpc", "http": "http"}


def test_gateway_api_routes(chart) -> None:
    docs = chart.render(chart.SCENARIOS["gateway-api"])
    grpc = chart.one(docs, "GRPCRoute")
    http = chart.one(docs, "HTTPRoute")
    for route in (grpc, http):
        assert route["apiVersion"] == GATEWAY_API
        assert route["spec"]["parentRefs"] == [{"name": "public"}]
    assert grpc["spec"]["rules"][0]["backendRefs"] == [
        {"name": "engram-engram-stream-gateway", "port": 50051}
    ]
    assert http["spec"]["rules"][0]["backendRefs"] == [
        {"name": "engram-engram-stream-gateway", "port": 7432}
    ]
    assert not chart.find(chart.render({}), "GRPCRoute")


def test_monitoring_jobs(chart) -> None:
    docs = chart.render(chart.SCENARIOS["monitoring"])
    jobs = {}
    for monitor in chart.find(docs, "ServiceMonitor"):
        endpoint = monitor["spec"]["endpoints"][0]
        (relabel,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
        component = monitor["metadata"]["labels"]["app.kubernetes.io/component"]
        jobs[component] = relabel["replacement"]
        service = chart.one(docs, "Service", component)
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert (
            monitor["spec"]["selector"]["matchLabels"].items()
            <= service["metadata"]["labels"].items()
        )
    assert jobs == {"shard": "engram-shard", "gateway": "engram-gateway"}
    rule = chart.one(docs, "PrometheusRule")
    alerts = yaml.safe_load((chart.CHART / "files" / "alerts.yaml").read_text())
    assert rule["spec"] == alerts
    assert not chart.find(chart.render({}), "ServiceMonitor")


def test_network_policies(chart) -> None:
    docs = chart.render({})
    policies = {
        p["metadata"]["labels"]["app.kubernetes.io/component"]: p
        for p in chart.find(docs, "NetworkPolicy")
    }
    shard_from = [
        peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
        for peer in policies["shard"]["spec"]["ingress"][0]["from"]
    ]
    assert sorted(shard_from) == ["gateway", "operator", "shard"]
    assert policies["shard"]["spec"]["ingress"][0]["ports"] == [
        {"port": "grpc", "protocol": "TCP"},
        {"port": "recall", "protocol": "TCP"},
    ]
    (redis_rule,) = policies["redis"]["spec"]["ingress"]
    (peer,) = redis_rule["from"]
    assert peer["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "engram-stream",
        "app.kubernetes.io/instance": "engram",
    }


def test_operator_rbac_is_least_privilege(chart) -> None:
    docs = chart.render({})
    role = chart.one(docs, "Role")
    verbs = {
        (group, resource): sorted(rule["verbs"])
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }
    assert verbs[("", "persistentvolumeclaims")] == ["get", "list", "watch"]
    assert verbs[("apps", "deployments")] == ["get", "list", "watch"]
    assert verbs[("apps", "statefulsets/scale")] == ["get", "list", "patch", "watch"]
    assert verbs[("", "pods")] == ["delete", "get", "list", "watch"]
    assert not any("*" in v for v in verbs.values()) and ("", "secrets") not in verbs
    cluster_role = chart.one(docs, "ClusterRole")
    assert all(sorted(r["verbs"]) == ["list", "watch"] for r in cluster_role["rules"])
    operator = chart.one(docs, "Deployment", "operator")["spec"]["template"]["spec"]
    assert operator["serviceAccountName"] == chart.one(docs, "ServiceAccount")["metadata"]["name"]
    args = operator["containers"][0]["args"]
    assert args[:2] == ["kopf", "run"] and "engram_operator" in args
    assert set(chart.env_of(operator["containers"][0])) == {
        "POD_NAMESPACE",
        "REDIS_PASSWORD",
        "ENGRAM_REDIS_URL",
        "ENGRAM_KEY_PREFIX",
        "ENGRAM_INTERNAL_TOKEN_FILE",  # moves call the shards
    }
    for kind, component in (("StatefulSet", "shard"), ("Deployment", "gateway")):
        pod = chart.one(docs, kind, component)["spec"]["template"]["spec"]
        assert pod["automountServiceAccountToken"] is False
