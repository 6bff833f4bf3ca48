"""The chart's pods really start the services: each rendered pod runs as a local process.

:class:`LocalKubelet` plays the kubelet and the cluster's network for the rendered Redis, shard
and gateway pods: exactly the container's command/args (the image's ``/opt/engram/bin/python``
is ``.venv/bin/python`` here, its ``redis-server`` the machine's) and env, with ``$(VAR)``
expanded as the kubelet does (only variables defined earlier in the list), downward-API fields
filled (the pod's name, namespace and labels, ``apps.kubernetes.io/pod-index`` included),
Secrets read from the rendered ones (and from those a user would make by hand, given to the
kubelet). Each pod's container ports become free local ports; an address
``<pod>.<service>...:<port>`` or ``<service>...:<port>`` resolves, through the rendered
Services (port -> targetPort -> containerPort), to the local port of the pod it names, as
cluster DNS would; a value equal to one of the container's own ports is that port; volume
mount paths are directories of the test, and a Secret volume's directory holds its Secret's
keys as files (mode ``defaultMode``), as the kubelet writes them. Then the probes are called as
the kubelet calls them (gRPC health, HTTP or HTTPS GET without verifying the certificate, TCP
connect), ``engram demo --verify`` streams through the gateway's Service with an API key (the
chart turns authentication on by default), and SIGTERM must end every service with exit code 0.
Requests without a key, or to a shard without the internal token, must be refused; a second
run turns TLS on both sides (``tls``, ``internalTls``) from Secrets a user would make.

A wrong variable name, port or Service name in the chart leaves a process listening elsewhere,
a probe unanswered or an address unresolved: the test fails.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engram.common import keys
from engram.internal.v1 import shard_pb2, shard_pb2_grpc
from engram.launcher import procs
from engram.launcher.redis_server import find_redis_server
from engram.v1 import streaming_pb2, streaming_pb2_grpc

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
IMAGE_BIN = "/opt/engram/bin/"
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_ADDRESS = re.compile(r"([A-Za-z0-9][A-Za-z0-9.-]*):([0-9]{1,5})\b")
_LABEL_FIELD = re.compile(r"metadata\.labels\['([^']+)'\]")


def expand(value: str, defined: dict[str, str]) -> str:
    """The kubelet's ``$(VAR)``: replaced when VAR is defined, ``$$`` escapes, else kept."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return defined.get(m[1], m.group(0))

    return _VAR.sub(sub, value)


@dataclass
class Pod:
    name: str
    labels: dict[str, str]
    spec: dict[str, Any]
    root: Path
    ports: dict[int, int] = field(default_factory=dict)  # containerPort -> local port
    proc: subprocess.Popen[bytes] | None = None

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.spec["containers"]
        return container

    def port(self, ref: int | str) -> int:
        """Local port of a container port given by number or name (as probes give it)."""
        for p in self.container.get("ports", []):
            if ref in (p["containerPort"], p.get("name")):
                return self.ports[p["containerPort"]]
        raise AssertionError(f"{self.name}: no container port {ref!r}")

    @property
    def log(self) -> Path:
        return self.root / f"{self.name}.log"


class LocalKubelet:
    """``secrets``: name -> {key: value} of Secrets the user made (``kubectl create secret``)."""

    def __init__(
        self,
        docs: list[dict[str, Any]],
        root: Path,
        namespace: str,
        secrets: dict[str, dict[str, str]] | None = None,
    ) -> None:
        self.docs = docs
        self.root = root
        self.namespace = namespace
        self.pods: list[Pod] = []
        self.secrets = {
            d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d["data"].items()}
            for d in docs
            if d["kind"] == "Secret"
        }
        self.secrets.update(secrets or {})
        self.services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}

    # ------------------------------------------------------------------ pods

    def schedule(self, workload: dict[str, Any]) -> list[Pod]:
        """The pods the workload's controller would make (a Deployment: one)."""
        template = workload["spec"]["template"]
        name = workload["metadata"]["name"]
        if workload["kind"] == "StatefulSet":
            names = [f"{name}-{i}" for i in range(workload["spec"]["replicas"])]
        else:
            names = [f"{name}-local0"]
        made = []
        for index, pod_name in enumerate(names):
            labels = dict(template["metadata"]["labels"])
            if workload["kind"] == "StatefulSet":
                labels["apps.kubernetes.io/pod-index"] = str(index)
                labels["statefulset.kubernetes.io/pod-name"] = pod_name
            pod = Pod(pod_name, labels, template["spec"], self.root)
            for p in pod.container.get("ports", []):
                pod.ports[p["containerPort"]] = procs.free_port()
            made.append(pod)
        self.pods.extend(made)
        return made

    def _field(self, pod: Pod, path: str) -> str:
        if path == "metadata.name":
            return pod.name
        if path == "metadata.namespace":
            return self.namespace
        if path == "status.podIP":
            return "127.0.0.1"
        label = _LABEL_FIELD.fullmatch(path)
        if label:
            assert label[1] in pod.labels, f"{pod.name}: no label {label[1]} for {path}"
            return pod.labels[label[1]]
        raise AssertionError(f"{pod.name}: downward-API field {path} is not simulated")

    def environment(self, pod: Pod) -> dict[str, str]:
        defined: dict[str, str] = {}
        for var in pod.container.get("env", []):
            if "value" in var:
                value = expand(var["value"], defined)
            elif "fieldRef" in var["valueFrom"]:
                value = self._field(pod, var["valueFrom"]["fieldRef"]["fieldPath"])
            else:
                ref = var["valueFrom"]["secretKeyRef"]
                value = self.secrets[ref["name"]][ref["key"]]
            defined[var["name"]] = value
        return {k: self.network(pod, v) for k, v in defined.items()}

    def argv(self, pod: Pod, env: dict[str, str]) -> list[str]:
        c = pod.container
        # the image's ENTRYPOINT is tini, which only forwards signals: the args run as given
        words = [expand(w, env) for w in [*c.get("command", []), *c.get("args", [])]]
        program = words[0].removeprefix(IMAGE_BIN)
        if program in ("python", "engram", "kopf"):
            words[0] = str(VENV_BIN / program)
        elif program == "redis-server":
            words[0] = find_redis_server()
        else:
            raise AssertionError(f"{pod.name}: no local stand-in for the image's {program}")
        return [words[0], *(self.network(pod, w) for w in words[1:])]

    # ------------------------------------------------------------------ network

    def _resolve(self, host: str, port: int) -> int:
        """Local port behind ``host:port`` as cluster DNS and the Services would route it."""
        suffixes = (f".{self.namespace}.svc.cluster.local", f".{self.namespace}.svc", "")
        for suffix in suffixes:
            if suffix and not host.endswith(suffix):
                continue
            name = host.removesuffix(suffix) if suffix else host
            pod_name, _, service = name.rpartition(".")
            if pod_name and service in self.services:  # a pod under a headless Service
                (pod,) = [p for p in self.pods if p.name == pod_name]
                return pod.port(port)
            if name in self.services:
                return self._service_port(self.services[name], port)
        raise AssertionError(f"{host}:{port} resolves to no pod or Service of the release")

    def _service_port(self, service: dict[str, Any], port: int) -> int:
        (spec,) = [p for p in service["spec"]["ports"] if p["port"] == port]
        selector = service["spec"]["selector"]
        backends = [p for p in self.pods if selector.items() <= p.labels.items()]
        assert backends, f"Service {service['metadata']['name']} selects no running pod"
        return backends[0].port(spec.get("targetPort", port))

    def volume_dir(self, pod: Pod, volume: str) -> Path:
        """Where a pod's volume lives here (one directory per pod and volume)."""
        local = self.root / pod.name / volume
        local.mkdir(parents=True, exist_ok=True)
        return local

    def mount_secrets(self, pod: Pod) -> None:
        """Each Secret volume's keys as files in its directory, as the kubelet writes them."""
        for volume in pod.spec.get("volumes", []):
            if "secret" not in volume:
                continue
            source = volume["secret"]
            name = source["secretName"]
            assert name in self.secrets, f"{pod.name}: Secret {name} does not exist"
            data = self.secrets[name]
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            local = self.volume_dir(pod, volume["name"])
            for item in items:
                assert item["key"] in data, f"{pod.name}: Secret {name} has no key {item['key']}"
                target = local / item["path"]
                target.write_text(data[item["key"]])
                target.chmod(item.get("mode", source.get("defaultMode", 0o644)))

    def network(self, pod: Pod, value: str) -> str:
        """A value as the process must see it here: addresses, own ports, mounted paths."""
        for mount in pod.container.get("volumeMounts", []):
            path = mount["mountPath"]
            if value == path or value.startswith(path + "/"):
                return str(self.volume_dir(pod, mount["name"])) + value[len(path) :]
        if value.isdigit() and int(value) in pod.ports:
            return str(pod.ports[int(value)])
        if value == "0.0.0.0":
            return "127.0.0.1"

        def sub(m: re.Match[str]) -> str:
            host, port = m[1], int(m[2])
            if host == "127.0.0.1":  # mapped already (an argument's $(VAR) of a mapped value)
                return m.group(0)
            if host == "0.0.0.0":
                assert port in pod.ports, f"{pod.name} listens on {port}, not a container port"
                return f"127.0.0.1:{pod.ports[port]}"
            return f"127.0.0.1:{self._resolve(host, port)}"

        return _ADDRESS.sub(sub, value)

    def address(self, host: str, port: int) -> str:
        return f"127.0.0.1:{self._resolve(host, port)}"

    # ------------------------------------------------------------------ lifecycle

    def start(self, pod: Pod) -> None:
        self.mount_secrets(pod)
        env = self.environment(pod)
        argv = self.argv(pod, env)
        # the image's PATH; nothing of the test's own environment leaks in
        base = {"PATH": f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
        pod.proc = procs.spawn(argv, env={**base, **env}, log_path=pod.log, cwd=self.root)

    def probe(self, pod: Pod, probe: dict[str, Any]) -> bool:
        timeout = probe.get("timeoutSeconds", 1)
        try:
            if "grpc" in probe:
                target = f"127.0.0.1:{pod.port(probe['grpc']['port'])}"
                with grpc.insecure_channel(target) as channel:
                    reply = health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(service=probe["grpc"].get("service", "")),
                        timeout=timeout,
                    )
                return reply.status == health_pb2.HealthCheckResponse.SERVING
            if "httpGet" in probe:
                get = probe["httpGet"]
                scheme = get.get("scheme", "HTTP").lower()
                url = f"{scheme}://127.0.0.1:{pod.port(get['port'])}{get.get('path', '/')}"
                # the kubelet checks no certificate of an HTTPS probe
                context = ssl._create_unverified_context() if scheme == "https" else None
                with urllib.request.urlopen(url, timeout=timeout, context=context) as rsp:
                    return 200 <= rsp.status < 400
            if "tcpSocket" in probe:
                port = pod.port(probe["tcpSocket"]["port"])
                with socket.create_connection(("127.0.0.1", port), timeout=timeout):
                    return True
        except (grpc.RpcError, OSError, urllib.error.URLError):
            return False
        raise AssertionError(f"{pod.name}: probe kind not simulated: {probe}")

    def wait_ready(self, pod: Pod, deadline_s: float = 60.0) -> None:
        """Startup probe until it passes, then readiness and liveness must pass."""
        c = pod.container
        first = c.get("startupProbe") or c.get("readinessProbe")
        assert first, f"{pod.name} has no startup or readiness probe"
        end = time.monotonic() + deadline_s
        while not self.probe(pod, first):
            assert pod.proc is not None and pod.proc.poll() is None, (
                f"{pod.name} exited ({pod.proc.returncode if pod.proc else '?'}):\n"
                + procs.log_tail(pod.log)
            )
            assert time.monotonic() < end, f"{pod.name} never passed {first}:\n" + procs.log_tail(
                pod.log
            )
            time.sleep(0.2)
        for kind in ("readinessProbe", "livenessProbe"):
            if kind in c:
                assert self.probe(pod, c[kind]), f"{pod.name}: {kind} failed:\n" + procs.log_tail(
                    pod.log
                )

    def terminate(self, pod: Pod) -> int | None:
        grace = min(pod.spec.get("terminationGracePeriodSeconds", 30), 30)
        return procs.stop(pod.proc, timeout=grace) if pod.proc is not None else None

    def kill_all(self) -> None:
        for pod in self.pods:
            if pod.proc is not None and pod.proc.poll() is None:
                procs.send(pod.proc, signal.SIGKILL)
                pod.proc.wait()


def _demo_key() -> tuple[str, str]:
    """A key for the demo's spaces and the keys file holding it, as ``engram keys create``
    makes them."""
    scopes = [keys.parse_scope("write:demo-*"), keys.parse_scope("read:demo-*")]
    key, entry = keys.create_key(scopes, name="chart test")
    return key, keys.dump_keys([entry])


def _start_all(chart, kubelet: LocalKubelet, docs: list[dict[str, Any]]) -> list[Pod]:
    """Redis, the shards, then the gateway, each ready before the next; [gateway, *shards]."""
    (redis,) = kubelet.schedule(chart.one(docs, "StatefulSet", "redis"))
    shards = kubelet.schedule(chart.one(docs, "StatefulSet", "shard"))
    (gateway,) = kubelet.schedule(chart.one(docs, "Deployment", "gateway"))
    kubelet.start(redis)
    kubelet.wait_ready(redis)
    for shard in shards:
        kubelet.start(shard)
    for shard in shards:
        kubelet.wait_ready(shard)
    kubelet.start(gateway)
    kubelet.wait_ready(gateway)
    return [gateway, *shards]


def _terminate_cleanly(kubelet: LocalKubelet, pods: list[Pod]) -> None:
    """SIGTERM each pod in turn: each must drain and exit 0."""
    for pod in pods:
        code = kubelet.terminate(pod)
        assert code == 0, f"{pod.name} ended with {code} on SIGTERM:\n" + procs.log_tail(pod.log)


def _refused(call: Any) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def _assert_refused_without_credentials(gateway_target: str, shard: Pod, token: str) -> None:
    """No key, or a wrong one, gets UNAUTHENTICATED from the gateway; a call to a shard
    without the internal token gets UNAUTHENTICATED, with it an answer (the shard read the
    token from the file the chart mounted)."""
    recall = streaming_pb2.StreamingRecallRequest(
        memory_space_id="demo-0", cue=[0.1] * 16, max_results=1
    )
    wrong = "ek_000000000000_" + "A" * 43
    with grpc.insecure_channel(gateway_target) as channel:
        stub = streaming_pb2_grpc.EngramStreamStub(channel)
        assert _refused(lambda: list(stub.RecallStream(recall, timeout=10))) == (
            grpc.StatusCode.UNAUTHENTICATED
        ), "a recall without an API key was not refused"
        metadata = [("authorization", f"Bearer {wrong}")]
        assert _refused(lambda: list(stub.RecallStream(recall, timeout=10, metadata=metadata))) == (
            grpc.StatusCode.UNAUTHENTICATED
        ), "a recall with a wrong API key was not refused"
    with grpc.insecure_channel(f"127.0.0.1:{shard.port('grpc')}") as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        assert _refused(lambda: stub.Stats(shard_pb2.StatsRequest(), timeout=10)) == (
            grpc.StatusCode.UNAUTHENTICATED
        ), "a shard answered a call without the internal token"
        stub.Stats(
            shard_pb2.StatsRequest(), timeout=10, metadata=[("engram-internal-token", token)]
        )


def _recall_on_the_recall_port(shard: Pod, metadata: list[tuple[str, str]]) -> int:
    """Results of a recall of demo-0 sent to the shard's ``recall`` port."""
    request = shard_pb2.ShardRecallRequest(
        memory_space_id="demo-0", recall=streaming_pb2.RecallRequest(cue=[0.1] * 16, k=1)
    )
    with grpc.insecure_channel(f"127.0.0.1:{shard.port('recall')}") as channel:
        stub = shard_pb2_grpc.ShardStub(channel)
        replies = stub.Recall(request, timeout=10, metadata=metadata)
        return sum(len(reply.results) for reply in replies)


def _assert_recall_port_needs_the_token(shards: list[Pod], token: str) -> None:
    """Every shard's recall port refuses a recall without the internal token; with it, the
    shard that holds demo-0 answers there."""
    results = 0
    for shard in shards:
        assert _refused(lambda s=shard: _recall_on_the_recall_port(s, [])) == (
            grpc.StatusCode.UNAUTHENTICATED
        ), f"{shard.name}'s recall port answered a recall without the internal token"
        try:
            results += _recall_on_the_recall_port(shard, [("engram-internal-token", token)])
        except grpc.RpcError as exc:  # demo-0 lives on another shard
            assert exc.code() != grpc.StatusCode.UNAUTHENTICATED, exc
    assert results > 0, "no shard's recall port answered a recall of demo-0"


def test_rendered_pods_serve_a_verified_demo(chart, tmp_path: Path) -> None:
    """Authentication on (the chart's default), with the keys file in auth.keysJson."""
    key, keys_file = _demo_key()
    docs = chart.render({"auth": {"keysJson": keys_file}})
    kubelet = LocalKubelet(docs, tmp_path, chart.NAMESPACE)
    try:
        gateway, *shards = _start_all(chart, kubelet, docs)
        assert len(shards) == 2
        env = kubelet.environment(gateway)
        assert json.loads(Path(env["ENGRAM_KEYS_FILE"]).read_text()) == json.loads(keys_file)

        service = chart.one(docs, "Service", "gateway")
        name = service["metadata"]["name"]
        host = f"{name}.{chart.NAMESPACE}.svc.cluster.local"
        ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        http = kubelet.address(host, ports["http"])
        with urllib.request.urlopen(f"http://{http}/healthz", timeout=5) as rsp:
            assert b"redis reachable" in rsp.read()
        target = kubelet.address(host, ports["grpc"])
        demo = subprocess.run(
            [str(VENV_BIN / "engram"), "demo", "--target", target, "--api-key", key]
            + ["--spaces", "2", "--count", "4000", "--dim", "16", "--batch", "500", "--verify"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        assert "verify OK" in demo.stdout, demo.stdout[-3000:]

        token = kubelet.secrets[chart.one(docs, "Secret", "internal-token")["metadata"]["name"]]
        _assert_refused_without_credentials(target, shards[0], token["token"])
        _assert_recall_port_needs_the_token(shards, token["token"])

        _terminate_cleanly(kubelet, [gateway, *shards])
    finally:
        kubelet.kill_all()


def test_a_misnamed_variable_fails_its_probe(chart, tmp_path: Path) -> None:
    """The test above can fail: with ENGRAM_SHARD_HTTP_PORT misspelt, the shard serves no
    HTTP port (its default is none), and the kubelet's liveness probe finds nothing."""
    docs = chart.render({"shards": {"count": 1}})
    shard_set = chart.one(docs, "StatefulSet", "shard")
    for var in shard_set["spec"]["template"]["spec"]["containers"][0]["env"]:
        if var["name"] == "ENGRAM_SHARD_HTTP_PORT":
            var["name"] = "ENGRAM_SHARD_HTTP_PROT"
    kubelet = LocalKubelet(docs, tmp_path, chart.NAMESPACE)
    (redis,) = kubelet.schedule(chart.one(docs, "StatefulSet", "redis"))
    (shard,) = kubelet.schedule(shard_set)
    try:
        kubelet.start(redis)
        kubelet.wait_ready(redis)
        kubelet.start(shard)
        with pytest.raises(AssertionError, match="livenessProbe failed"):
            kubelet.wait_ready(shard)
    finally:
        kubelet.kill_all()


def test_rendered_pods_with_tls_on_both_sides(chart, tmp_path: Path) -> None:
    """tls and internalTls on, from Secrets the user made (certificates of a test CA): the
    gateway's HTTPS probes and the shards' /healthz probes pass, the demo streams over TLS with
    a key, and a shard refuses a caller without a client certificate. The kubelet here routes
    every address to 127.0.0.1, so the certificates name it beside the cluster's names."""
    trustme = pytest.importorskip("trustme")
    public, internal = trustme.CA(), trustme.CA()
    gateway_cert = public.issue_cert("127.0.0.1", "engram-engram-stream-gateway.engram.svc")
    shard_cert = internal.issue_cert(
        "127.0.0.1", "*.engram-engram-stream-shard.engram.svc.cluster.local"
    )
    secrets = {
        "engram-gateway-tls": {
            "tls.crt": "".join(p.bytes().decode() for p in gateway_cert.cert_chain_pems),
            "tls.key": gateway_cert.private_key_pem.bytes().decode(),
        },
        "engram-internal-tls": {
            "ca.crt": internal.cert_pem.bytes().decode(),
            "tls.crt": "".join(p.bytes().decode() for p in shard_cert.cert_chain_pems),
            "tls.key": shard_cert.private_key_pem.bytes().decode(),
        },
    }
    ca_file = tmp_path / "public-ca.crt"
    public.cert_pem.write_to_path(str(ca_file))
    key, keys_file = _demo_key()
    docs = chart.render(
        {
            "auth": {"keysJson": keys_file},
            "tls": {"enabled": True, "secretName": "engram-gateway-tls"},
            "internalTls": {"enabled": True, "secretName": "engram-internal-tls"},
        }
    )
    kubelet = LocalKubelet(docs, tmp_path, chart.NAMESPACE, secrets=secrets)
    try:
        gateway, *shards = _start_all(chart, kubelet, docs)
        assert "httpGet" in gateway.container["readinessProbe"]  # HTTPS: probed above
        service = chart.one(docs, "Service", "gateway")
        host = f"{service['metadata']['name']}.{chart.NAMESPACE}.svc.cluster.local"
        ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        target = kubelet.address(host, ports["grpc"])
        demo = subprocess.run(
            [str(VENV_BIN / "engram"), "demo", "--target", target, "--api-key", key]
            + ["--ca", str(ca_file), "--spaces", "1", "--count", "2000", "--dim", "16"]
            + ["--batch", "500", "--verify"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        assert "verify OK" in demo.stdout, demo.stdout[-3000:]
        with grpc.insecure_channel(f"127.0.0.1:{shards[0].port('grpc')}") as channel:
            stub = shard_pb2_grpc.ShardStub(channel)
            assert _refused(lambda: stub.Stats(shard_pb2.StatsRequest(), timeout=5)) == (
                grpc.StatusCode.UNAVAILABLE
            ), "a shard answered plaintext gRPC with internalTls on"
        assert _refused(lambda: _recall_on_the_recall_port(shards[0], [])) == (
            grpc.StatusCode.UNAVAILABLE
        ), "a shard's recall port answered plaintext gRPC with internalTls on"
        _terminate_cleanly(kubelet, [gateway, *shards])
    finally:
        kubelet.kill_all()


def test_the_backup_jobs_pod_backs_up_the_running_cluster(chart, tmp_path: Path) -> None:
    """The CronJob's pod (backup.destination pvc) run once against the pods started here: it
    finds the shards in Redis, calls them with the mounted internal token and writes every
    demo space into its volume under the run's UTC time."""
    key, keys_file = _demo_key()
    docs = chart.render({"auth": {"keysJson": keys_file}, "backup": {"enabled": True}})
    kubelet = LocalKubelet(docs, tmp_path, chart.NAMESPACE)
    try:
        gateway, *shards = _start_all(chart, kubelet, docs)
        service = chart.one(docs, "Service", "gateway")
        host = f"{service['metadata']['name']}.{chart.NAMESPACE}.svc.cluster.local"
        port = {p["name"]: p["port"] for p in service["spec"]["ports"]}["grpc"]
        demo = subprocess.run(
            [str(VENV_BIN / "engram"), "demo", "--target", kubelet.address(host, port)]
            + ["--api-key", key, "--spaces", "2", "--count", "1000", "--dim", "16"]
            + ["--batch", "500"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]

        cron = chart.one(docs, "CronJob", "backup")
        job = {"kind": "Job", "metadata": cron["metadata"], "spec": cron["spec"]["jobTemplate"]}
        job["spec"] = {"template": cron["spec"]["jobTemplate"]["spec"]["template"]}
        (pod,) = kubelet.schedule(job)
        kubelet.start(pod)
        assert pod.proc is not None
        code = pod.proc.wait(timeout=120)
        assert code == 0, procs.log_tail(pod.log)
        (run,) = kubelet.volume_dir(pod, "backups").iterdir()  # one run, named by its time
        assert re.fullmatch(r"[0-9]{8}T[0-9]{6}Z", run.name), run.name
        backed_up = {d.name for d in run.iterdir() if (d / "backup.json").is_file()}
        assert {"demo-0", "demo-1"} <= backed_up, procs.log_tail(pod.log)  # and the canaries'
        for space in ("demo-0", "demo-1"):
            manifest = json.loads((run / space / "backup.json").read_text())
            assert manifest["lsn"] > 0, manifest
        _terminate_cleanly(kubelet, [gateway, *shards])
    finally:
        kubelet.kill_all()
