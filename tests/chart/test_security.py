"""What the chart renders for authentication, TLS and the internal secret.

API keys are on by default: the gateways get ``ENGRAM_KEYS_FILE`` naming ``keys.json`` in a
mounted Secret (the user's ``auth.existingSecret`` or one rendered from ``auth.keysJson``). The
internal token is a Secret every shard, gateway and the operator mount
(``ENGRAM_INTERNAL_TOKEN_FILE``). TLS on either side mounts the named Secret and switches the
probes, ServiceMonitor and Ingress backends. Each file variable is followed to its file: the
path must fall under a mount of a Secret volume (a directory, never ``subPath``, so changed
keys and certificates reach the running pod) holding that key.

Not testable offline: that the chart keeps its internal token across upgrades. ``lookup``
returns nothing without a cluster (here, as in ``helm template``), so every render here makes
a new token; ``test_internal_token`` checks only what surrounds the lookup.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

helm_python = pytest.importorskip("helm_python", reason="helm-python-sdk missing: make chart-deps")

PODS = (("Deployment", "gateway"), ("StatefulSet", "shard"), ("Deployment", "operator"))
TLS = {"tls": {"enabled": True, "secretName": "engram-gateway-tls"}}
INTERNAL_TLS = {"internalTls": {"enabled": True, "secretName": "engram-internal-tls"}}
NO_KEYS = {"version": 1, "keys": []}


def _pods(chart, docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """component -> pod spec."""
    return {part: chart.one(docs, kind, part)["spec"]["template"] for kind, part in PODS}


def _file(pod: dict[str, Any], variable: str, env: dict[str, Any]) -> tuple[str, str]:
    """(Secret name, key) of the file a variable names, through the container's mounts."""
    path = env[variable]
    (container,) = pod["spec"]["containers"]
    for mount in container["volumeMounts"]:
        if path.startswith(mount["mountPath"] + "/"):
            assert "subPath" not in mount, f"{variable}: subPath mounts never see updates"
            assert mount.get("readOnly") is True, variable
            (volume,) = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
            assert "secret" in volume, f"{variable}: {mount['name']} is not a Secret volume"
            return volume["secret"]["secretName"], path[len(mount["mountPath"]) + 1 :]
    raise AssertionError(f"{variable}={path} is under no mount")


def _secret(chart, docs: list[dict[str, Any]], name: str) -> dict[str, str]:
    (found,) = [d for d in chart.find(docs, "Secret") if d["metadata"]["name"] == name]
    return {k: base64.b64decode(v).decode() for k, v in found["data"].items()}


def test_auth_is_on_by_default_with_no_key(chart) -> None:
    docs = chart.render({})
    pods = _pods(chart, docs)
    gateway = pods["gateway"]
    env = chart.env_of(gateway["spec"]["containers"][0])
    name, key = _file(gateway, "ENGRAM_KEYS_FILE", env)
    assert (name, key) == ("engram-engram-stream-api-keys", "keys.json")
    assert json.loads(_secret(chart, docs, name)[key]) == NO_KEYS
    for part in ("shard", "operator"):
        assert "ENGRAM_KEYS_FILE" not in chart.env_of(pods[part]["spec"]["containers"][0])
    # keys are reloaded in place: a new key must not roll the gateways
    assert not any("api-keys" in a for a in gateway["metadata"]["annotations"])
    notes = chart.render_files({})["engram-stream/templates/NOTES.txt"]
    assert "holds NO key" in notes and "engram keys create --keys-file keys.json" in notes
    assert "--api-key" in notes


def test_keys_from_values_or_the_users_secret(chart) -> None:
    keys = {
        "version": 1,
        "keys": [
            {
                "id": "3f9a1c0b7d2e",
                "name": "team-a",
                "sha256": "ab" * 32,
                "scopes": ["write:team-a-*", "read:team-a-*"],
                "created": "2026-12-05T21:00:00Z",
                "expires": None,
                "revoked": None,
                "max_observations_per_s": 0,
                "max_recalls_per_s": 0,
            }
        ],
    }
    text = json.dumps(keys)
    docs = chart.render({"auth": {"keysJson": text}})
    assert _secret(chart, docs, "engram-engram-stream-api-keys")["keys.json"] == text
    assert (
        "holds NO key"
        not in chart.render_files({"auth": {"keysJson": text}})["engram-stream/templates/NOTES.txt"]
    )

    docs = chart.render(chart.SCENARIOS["own-secrets"])
    assert not chart.find(docs, "Secret", "api-keys")
    assert not chart.find(docs, "Secret", "internal-token")
    pods = _pods(chart, docs)
    env = chart.env_of(pods["gateway"]["spec"]["containers"][0])
    assert _file(pods["gateway"], "ENGRAM_KEYS_FILE", env) == ("team-keys", "keys.json")
    assert env["ENGRAM_KEY_MAX_OBSERVATIONS_PER_S"] == "5000"
    for pod in pods.values():
        env = chart.env_of(pod["spec"]["containers"][0])
        assert _file(pod, "ENGRAM_INTERNAL_TOKEN_FILE", env) == ("engram-token", "token")
        # the user's token: no chart token to checksum
        assert "checksum/internal-token" not in pod["metadata"]["annotations"]


@pytest.mark.parametrize(
    ("keys_json", "says"),
    [
        ("{not json", "auth.keysJson is not JSON"),
        ('{"keys": {}}', "auth.keysJson must be a keys file"),
        ('{"version": 2, "keys": []}', "auth.keysJson must be a keys file"),
    ],
)
def test_a_bad_keys_file_fails_the_install(chart, keys_json: str, says: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=says):
        chart.render_files({"auth": {"keysJson": keys_json}})


def test_internal_token(chart) -> None:
    docs = chart.render({})
    (secret,) = chart.find(docs, "Secret", "internal-token")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    token = _secret(chart, docs, secret["metadata"]["name"])["token"]
    assert token.isalnum() and len(token) == 48
    for part, pod in _pods(chart, docs).items():
        env = chart.env_of(pod["spec"]["containers"][0])
        assert _file(pod, "ENGRAM_INTERNAL_TOKEN_FILE", env) == (
            secret["metadata"]["name"],
            "token",
        )
        assert "checksum/internal-token" in pod["metadata"]["annotations"], part
    # offline, lookup finds nothing: each render makes a new token (a cluster keeps the first)
    again = chart.render_files({"networkPolicy": {"enabled": False}})
    assert (
        base64.b64encode(token.encode()).decode()
        not in again["engram-stream/templates/internal-token-secret.yaml"]
    )


def test_auth_off(chart) -> None:
    docs = chart.render(chart.SCENARIOS["auth-off"])
    assert not chart.find(docs, "Secret", "api-keys")
    assert not chart.find(docs, "Secret", "internal-token")
    for part, pod in _pods(chart, docs).items():
        container = pod["spec"]["containers"][0]
        assert not [k for k in chart.env_of(container) if "KEY" in k and k != "ENGRAM_KEY_PREFIX"]
        assert "ENGRAM_INTERNAL_TOKEN_FILE" not in chart.env_of(container), part
        assert not [v for v in pod["spec"].get("volumes", []) if "secret" in v], part
    # the limits belong to keys: without auth they are not set
    docs = chart.render({"auth": {"enabled": False, "keyMaxRecallsPerSecond": 10}})
    env = chart.env_of(_pods(chart, docs)["gateway"]["spec"]["containers"][0])
    assert "ENGRAM_KEY_MAX_RECALLS_PER_S" not in env
    notes = chart.render_files(chart.SCENARIOS["auth-off"])["engram-stream/templates/NOTES.txt"]
    assert "Authentication is OFF" in notes


def test_tls_on_the_gateways(chart) -> None:
    docs = chart.render(chart.SCENARIOS["tls"])
    pods = _pods(chart, docs)
    gateway = pods["gateway"]
    container = gateway["spec"]["containers"][0]
    env = chart.env_of(container)
    assert _file(gateway, "ENGRAM_TLS_CERT", env) == ("engram-gateway-tls", "tls.crt")
    assert _file(gateway, "ENGRAM_TLS_KEY", env) == ("engram-gateway-tls", "tls.key")
    for part in ("shard", "operator"):
        assert "ENGRAM_TLS_CERT" not in chart.env_of(pods[part]["spec"]["containers"][0])
    # the kubelet's gRPC probe speaks no TLS: both gateway probes are HTTPS GETs of /healthz
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {
            "path": "/healthz",
            "port": "http",
            "scheme": "HTTPS",
        }
    shard = pods["shard"]["spec"]["containers"][0]
    assert shard["readinessProbe"]["grpc"] == {"port": 50061}  # shards unchanged

    by_name = {d["metadata"]["name"]: d for d in chart.find(docs, "Ingress")}
    grpc = by_name["engram-engram-stream-gateway-grpc"]["metadata"]["annotations"]
    http = by_name["engram-engram-stream-gateway-http"]["metadata"]["annotations"]
    assert grpc["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPCS"
    assert http["nginx.ingress.kubernetes.io/backend-protocol"] == "HTTPS"
    monitors = {
        m["metadata"]["labels"]["app.kubernetes.io/component"]: m["spec"]["endpoints"][0]
        for m in chart.find(docs, "ServiceMonitor")
    }
    assert monitors["gateway"]["scheme"] == "https"
    assert monitors["gateway"]["tlsConfig"] == {"insecureSkipVerify": True}
    assert "scheme" not in monitors["shard"]
    ports = {
        p["name"]: p["appProtocol"] for p in chart.one(docs, "Service", "gateway")["spec"]["ports"]
    }
    assert ports == {"grpc": "grpc", "http": "https"}
    policies = sorted(json.dumps(p["spec"]) for p in chart.find(docs, "NetworkPolicy"))
    assert policies == sorted(
        json.dumps(p["spec"]) for p in chart.find(chart.render({}), "NetworkPolicy")
    )
    notes = chart.render_files(chart.SCENARIOS["tls"])["engram-stream/templates/NOTES.txt"]
    assert "--ca ca.crt" in notes


def test_internal_tls_everywhere(chart) -> None:
    docs = chart.render(INTERNAL_TLS)
    for part, pod in _pods(chart, docs).items():
        env = chart.env_of(pod["spec"]["containers"][0])
        for variable, file in (
            ("ENGRAM_INTERNAL_TLS_CA", "ca.crt"),
            ("ENGRAM_INTERNAL_TLS_CERT", "tls.crt"),
            ("ENGRAM_INTERNAL_TLS_KEY", "tls.key"),
        ):
            assert _file(pod, variable, env) == ("engram-internal-tls", file), part
        assert "ENGRAM_TLS_CERT" not in env, part
    shard = _pods(chart, docs)["shard"]["spec"]["containers"][0]
    # gRPC wants a client certificate the kubelet has not got: the shard's probes ask /healthz
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert shard[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    gateway = _pods(chart, docs)["gateway"]["spec"]["containers"][0]
    assert gateway["readinessProbe"]["grpc"] == {"port": 50051}  # its public port is plaintext


def test_secret_files_are_readable_by_the_pods_group_only(chart) -> None:
    docs = chart.render({**TLS, **INTERNAL_TLS})
    for part, pod in _pods(chart, docs).items():
        assert pod["spec"]["securityContext"]["fsGroup"] == 10001
        for volume in pod["spec"]["volumes"]:
            if "secret" in volume:
                assert volume["secret"]["defaultMode"] == 0o440, (part, volume["name"])
