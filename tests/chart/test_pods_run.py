"""The chart's pods really start the services: each rendered pod runs as a local process.

:class:`LocalKubelet` plays the kubelet and the cluster's network for the rendered Redis, shard
and gateway pods: exactly the container's command/args (the image's ``/opt/engram/bin/python``
is ``.venv/bin/python`` here, its ``redis-server`` the machine's) and env, with ``$(VAR)``
expanded as the kubelet does (only variables defined earlier in the list), downward-API fields
filled (the pod's name, namespace and labels, ``apps.kubernetes.io/pod-index`` included),
Secrets read from the rendered ones. Each pod's container ports become free local ports; an
address ``<pod>.<service>...:<port>`` or ``<service>...:<port>`` resolves, through the rendered
Services (port -> targetPort -> containerPort), to the local port of the pod it names, as
cluster DNS would; a value equal to one of the container's own ports is that port; volume
mount paths are directories of the test. Then the probes are called as the kubelet calls them
(gRPC health, HTTP GET, TCP connect), ``engram demo --verify`` streams through the gateway's
Service, and SIGTERM must end every service with exit code 0.

A wrong variable name, port or Service name in the chart leaves a process listening elsewhere,
a probe unanswered or an address unresolved: the test fails.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import socket
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

from engram.launcher import procs
from engram.launcher.redis_server import find_redis_server

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
    def __init__(self, docs: list[dict[str, Any]], root: Path, namespace: str) -> None:
        self.docs = docs
        self.root = root
        self.namespace = namespace
        self.pods: list[Pod] = []
        self.secrets = {
            d["metadata"]["name"]: {k: base64.b64decode(v).decode() for k, v in d["data"].items()}
            for d in docs
            if d["kind"] == "Secret"
        }
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

    def network(self, pod: Pod, value: str) -> str:
        """A value as the process must see it here: addresses, own ports, mounted paths."""
        for mount in pod.container.get("volumeMounts", []):
            path = mount["mountPath"]
            if value == path or value.startswith(path + "/"):
                local = self.root / pod.name / mount["name"]
                local.mkdir(parents=True, exist_ok=True)
                return str(local) + value[len(path) :]
        if value.isdigit() and int(value) in pod.ports:
            return str(pod.ports[int(value)])
        if value == "0.0.0.0":
            return "127.0.0.1"

        def sub(m: re.Match[str]) -> str:
            host, port = m[1], int(m[2])
            if host == "0.0.0.0":
                assert port in pod.ports, f"{pod.name} listens on {port}, not a container port"
                return f"127.0.0.1:{pod.ports[port]}"
            return f"127.0.0.1:{self._resolve(host, port)}"

        return _ADDRESS.sub(sub, value)

    def address(self, host: str, port: int) -> str:
        return f"127.0.0.1:{self._resolve(host, port)}"

    # ------------------------------------------------------------------ lifecycle

    def start(self, pod: Pod) -> None:
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
                url = f"http://127.0.0.1:{pod.port(get['port'])}{get.get('path', '/')}"
                with urllib.request.urlopen(url, timeout=timeout) as rsp:
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


def test_rendered_pods_serve_a_verified_demo(chart, tmp_path: Path) -> None:
    docs = chart.render({})
    kubelet = LocalKubelet(docs, tmp_path, chart.NAMESPACE)
    (redis,) = kubelet.schedule(chart.one(docs, "StatefulSet", "redis"))
    shards = kubelet.schedule(chart.one(docs, "StatefulSet", "shard"))
    (gateway,) = kubelet.schedule(chart.one(docs, "Deployment", "gateway"))
    assert len(shards) == 2
    try:
        kubelet.start(redis)
        kubelet.wait_ready(redis)
        for shard in shards:
            kubelet.start(shard)
        for shard in shards:
            kubelet.wait_ready(shard)
        kubelet.start(gateway)
        kubelet.wait_ready(gateway)

        service = chart.one(docs, "Service", "gateway")
        name = service["metadata"]["name"]
        host = f"{name}.{chart.NAMESPACE}.svc.cluster.local"
        ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
        http = kubelet.address(host, ports["http"])
        with urllib.request.urlopen(f"http://{http}/healthz", timeout=5) as rsp:
            assert b"redis reachable" in rsp.read()
        demo = subprocess.run(
            [str(VENV_BIN / "engram"), "demo", "--target", kubelet.address(host, ports["grpc"])]
            + ["--spaces", "2", "--count", "4000", "--dim", "16", "--batch", "500", "--verify"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        assert "verify OK" in demo.stdout, demo.stdout[-3000:]

        for pod in (gateway, *shards):
            code = kubelet.terminate(pod)
            assert code == 0, f"{pod.name} ended with {code} on SIGTERM:\n" + procs.log_tail(
                pod.log
            )
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
