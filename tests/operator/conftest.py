"""The operator under a real kopf runtime against kmock, with the test as the cluster's kubelet.

* ``kmock_options`` selects :class:`Emulator`: kmock 0.8 neither bumps
  ``metadata.resourceVersion`` nor answers a failed JSON-patch ``test`` with 409, and kopf
  guards its finalizer patches with such a test.
* ``api``: the emulator with the CRDs of ``helm/engram-stream/crds`` declared, the built-in
  kinds loaded, a kubeconfig pointing at it ($KUBECONFIG, which the operator's login handler
  reads) and a client (:class:`Api`) to create and patch objects as ``kubectl`` would.
* :func:`operator` runs ``kopf run -m engram_operator`` in a thread (KopfRunner) and stops it
  from a thread, so kmock's event loop keeps serving meanwhile.
* :class:`Kubelet` plays the StatefulSet controller and the kubelet: it keeps one pod per
  replica, with a status made by a callback (from fake shards, or from real processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import aiohttp.web
import attrs
import jsonpatch
import kmock
import pytest
import yaml
from kopf.testing import KopfRunner

from engram_operator.spec import GROUP, PLURAL, VERSION

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "helm" / "engram-stream" / "crds"
NS = "engram"
STS = "engram-shard"
DEPLOY = "engram-gateway"
EC = f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}"
PODS = f"/api/v1/namespaces/{NS}/pods"
APPS = f"/apis/apps/v1/namespaces/{NS}"

_versions = itertools.count(1)


@attrs.define(kw_only=True)
class Emulator(kmock.KubernetesEmulator):
    """kmock's emulator with resource versions and JSON-patch ``test`` conflicts. kmock 0.8
    cannot parse the path of the namespace list (``/api/v1/namespaces``), which kopf lists
    and watches: it is answered here with the test's one namespace and a quiet watch."""

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        if raw_request.path.rstrip("/") != "/api/v1/namespaces":
            return await super().__call__(raw_request)
        if raw_request.query.get("watch") != "true":
            namespace = {"metadata": {"name": NS}}
            listing = {"metadata": {"resourceVersion": "1"}, "items": [namespace]}
            return aiohttp.web.json_response(listing)
        response = aiohttp.web.StreamResponse()
        await response.prepare(raw_request)
        await asyncio.Event().wait()  # until the client goes away (the task is cancelled)
        return response

    async def _handle(self, request: Any) -> Any:
        action = request.action
        if request.resource is not None and action in (kmock.action.CREATE, kmock.action.UPDATE):
            data = request.data
            version = str(next(_versions))
            if isinstance(data, list):
                key = (request.resource, request.namespace, request.name)
                current = self.objects[key].raw if key in self.objects else {}
                tests = [op for op in data if op.get("op") == "test"]
                try:
                    jsonpatch.apply_patch(dict(current), tests)
                except jsonpatch.JsonPatchException:
                    raise kmock.KubernetesError(status=409, reason="Conflict") from None
                data = [*data, {"op": "add", "path": "/metadata/resourceVersion", "value": version}]
            elif isinstance(data, dict):
                meta = {**(data.get("metadata") or {}), "resourceVersion": version}
                if action == kmock.action.CREATE and "name" not in meta and "generateName" in meta:
                    meta["name"] = f"{meta['generateName']}{version}"  # how Events are named
                data = {**data, "metadata": meta}
            object.__setattr__(request, "data", data)  # frozen: kmock keeps this very request
        return await super()._handle(request)


@pytest.fixture
def kmock_options(kmock_options: dict[str, Any]) -> dict[str, Any]:
    return {**kmock_options, "cls": Emulator}


class Api:
    """Creates, reads and patches objects in the emulator, as kubectl would."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.session = aiohttp.ClientSession()

    async def call(self, method: str, path: str, body: Any = None, patch: str = "merge") -> Any:
        headers = {
            "Content-Type": f"application/{patch}-patch+json"
            if method == "PATCH"
            else "application/json"
        }
        data = None if body is None else json.dumps(body)
        async with self.session.request(method, self.url + path, data=data, headers=headers) as rsp:
            if rsp.status == 404:
                return None
            assert rsp.status < 400, f"{method} {path}: {rsp.status} {await rsp.text()}"
            return await rsp.json(content_type=None)

    async def create(self, path: str, obj: Mapping[str, Any]) -> Any:
        return await self.call("POST", path, obj)

    async def get(self, path: str) -> Any:
        return await self.call("GET", path)

    async def patch(self, path: str, body: Mapping[str, Any]) -> Any:
        return await self.call("PATCH", path, body)

    async def delete(self, path: str) -> Any:
        return await self.call("DELETE", path)

    async def items(self, path: str) -> list[dict[str, Any]]:
        return list(((await self.get(path)) or {}).get("items") or [])

    async def cluster(self, name: str = "engram") -> dict[str, Any]:
        return dict(await self.get(f"{EC}/{name}") or {})

    async def events(self) -> list[dict[str, Any]]:
        return await self.items(f"/api/v1/namespaces/{NS}/events")

    async def wait(
        self, check: Callable[[dict[str, Any]], bool], what: str, seconds: float = 30.0,
        name: str = "engram",
    ) -> dict[str, Any]:  # fmt: skip
        """Polls the EngramCluster until ``check(obj)`` holds; fails naming ``what``."""
        deadline = time.monotonic() + seconds
        obj: dict[str, Any] = {}
        while time.monotonic() < deadline:
            obj = await self.cluster(name)
            if obj and check(obj):
                return obj
            await asyncio.sleep(0.2)
        raise AssertionError(
            f"timed out waiting for {what}; status: "
            + json.dumps(obj.get("status"), indent=1)[:3000]
        )

    async def wait_event(self, reason: str, seconds: float = 10.0) -> dict[str, Any]:
        """Waits for an Event with this reason (kopf posts them from a queue)."""
        deadline = time.monotonic() + seconds
        while True:
            found = [e for e in await self.events() if e.get("reason") == reason]
            if found:
                return found[-1]
            seen = [(e.get("reason"), e["metadata"].get("name")) for e in await self.events()]
            assert time.monotonic() < deadline, f"no {reason} Event; seen: {seen}"
            await asyncio.sleep(0.2)

    async def wait_gone(self, name: str = "engram", seconds: float = 30.0) -> None:
        """Waits until the EngramCluster is deleted (its finalizer released)."""
        deadline = time.monotonic() + seconds
        while await self.cluster(name):
            assert time.monotonic() < deadline, "the EngramCluster was never released"
            await asyncio.sleep(0.2)


def condition(obj: Mapping[str, Any], kind: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or ():
        if c.get("type") == kind:
            return dict(c)
    return {}


def is_true(obj: Mapping[str, Any], kind: str, reason: str | None = None) -> bool:
    c = condition(obj, kind)
    return c.get("status") == "True" and (reason is None or c.get("reason") == reason)


async def start_api(emulator: Any, kubeconfig: Path) -> Api:
    """Declares the CRDs and the built-in kinds in ``emulator``, writes a kubeconfig for it
    (point $KUBECONFIG at it for the operator) and returns a client."""
    with warnings.catch_warnings():  # kmock 0.8 reads its bundle with a deprecated call
        warnings.simplefilter("ignore", DeprecationWarning)
        emulator.resources.load_bundled()
    for crd_file in ("engramclusters.yaml", "kopfpeerings.yaml"):
        crd = yaml.safe_load((CRDS / crd_file).read_text())["spec"]
        for version in crd["versions"]:
            emulator.resources[f"{crd['group']}/{version['name']}/{crd['names']['plural']}"] = (
                kmock.ResourceInfo(
                    kind=crd["names"]["kind"],
                    namespaced=True,
                    verbs={"get", "list", "watch", "create", "patch", "update", "delete"},
                    subresources=set(version.get("subresources") or ()),
                )
            )
    server = {"server": str(emulator.url), "insecure-skip-tls-verify": True}
    context = {"cluster": "kmock", "user": "test", "namespace": NS}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kmock", "cluster": server}],
        "users": [{"name": "test", "user": {"token": "test"}}],
        "contexts": [{"name": "kmock", "context": context}],
        "current-context": "kmock",
    }
    await asyncio.to_thread(kubeconfig.write_text, yaml.safe_dump(config))
    return Api(str(emulator.url))


@pytest.fixture
async def api(kmock: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Api]:
    client = await start_api(kmock, tmp_path / "kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    monkeypatch.delenv("ENGRAM_REDIS_URL", raising=False)
    try:
        yield client
    finally:
        await client.session.close()


def cluster_resource(redis_url: str, shards: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "EngramCluster",
        "metadata": {"name": "engram", "namespace": NS, "generation": 1},
        "spec": {
            "shards": shards,
            "workloads": {
                "shardStatefulSet": STS,
                "shardService": STS,
                "gatewayDeployment": DEPLOY,
            },
            "redis": {"url": redis_url},
            "keyPrefix": "engram",
            **spec,
        },
    }


async def install_workloads(api: Api, replicas: int) -> None:
    """What the chart installs: the shard StatefulSet and the gateway Deployment."""
    await api.create(
        f"{APPS}/statefulsets",
        {
            "metadata": {"name": STS, "namespace": NS},
            "spec": {"replicas": replicas, "serviceName": STS},
        },
    )
    await api.create(
        f"{APPS}/deployments",
        {
            "metadata": {"name": DEPLOY, "namespace": NS},
            "spec": {"replicas": 1},
            "status": {"availableReplicas": 1},
        },
    )


@contextlib.asynccontextmanager
async def operator(peering: str = "") -> AsyncIterator[KopfRunner]:
    """``kopf run ... -m engram_operator`` in a thread for the duration of the block."""
    mode = f"--peering={peering}" if peering else "--standalone"
    argv = ["run", mode, f"--namespace={NS}", "-m", "engram_operator"]
    runner = KopfRunner(argv, reraise=False, timeout=60)
    await asyncio.to_thread(runner.__enter__)
    try:
        yield runner
    finally:
        await asyncio.to_thread(runner.__exit__, None, None, None)


def pod_status(ready: bool, restarts: int = 0, waiting: str = "") -> dict[str, Any]:
    state = {"waiting": {"reason": waiting}} if waiting else {"running": {}}
    return {
        "phase": "Running",
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "containerStatuses": [{"name": "shard", "restartCount": restarts, "state": state}],
    }


# A pod's status from its ordinal and incarnation (1 for the first pod, 2 after a deletion...).
PodState = Callable[[int, int], Awaitable[dict[str, Any]]]


class Kubelet:
    """The StatefulSet controller and the kubelet: one pod per replica (ordinals 0..n-1),
    each pod's status from ``state(ordinal, incarnation)``; a deleted pod is made again."""

    def __init__(self, api: Api, state: PodState, interval: float = 0.2) -> None:
        self.api = api
        self.state = state
        self.interval = interval
        self.incarnations: dict[int, int] = {}
        self.replicas_seen: list[int] = []
        self._task: asyncio.Task[None] | None = None

    async def sync(self) -> None:
        sts = await self.api.get(f"{APPS}/statefulsets/{STS}")
        replicas = int(sts["spec"]["replicas"])
        if not self.replicas_seen or self.replicas_seen[-1] != replicas:
            self.replicas_seen.append(replicas)
        pods = {p["metadata"]["name"]: p for p in await self.api.items(PODS)}
        for name in sorted(pods):
            ordinal = int(name.rsplit("-", 1)[1])
            if ordinal >= replicas:
                await self.api.delete(f"{PODS}/{name}")
        for i in range(replicas):
            name = f"{STS}-{i}"
            if name not in pods:
                self.incarnations[i] = self.incarnations.get(i, 0) + 1
            status = await self.state(i, self.incarnations[i])
            if name not in pods:
                meta = {
                    "name": name,
                    "namespace": NS,
                    "creationTimestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                }
                await self.api.create(PODS, {"metadata": meta, "spec": {}, "status": status})
            elif pods[name].get("status") != status:
                await self.api.patch(f"{PODS}/{name}", {"status": status})

    async def _run(self) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> Kubelet:
        await self.sync()
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
