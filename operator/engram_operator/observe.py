"""What the cluster looks like now: the shard pods, the StatefulSet, heartbeats and Stats.

:func:`observe` reads, and only reads: the shard pods and StatefulSet from the Kubernetes API
(:mod:`.kube`), every shard's heartbeat and advertised address from Redis (through the
control package's :class:`~engram.control.store.ControlStore`), and each reachable shard's
``Stats`` over gRPC (:func:`~engram.control.moves.shard_stats`). :func:`pod_view` turns a
pod object into the few facts the decisions use; it is pure, so the tests feed it dicts.
"""

from __future__ import annotations

import datetime
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from engram.control.moves import shard_stats
from engram.control.store import ControlStore
from engram.internal.v1 import shard_pb2 as ipb
from engram_operator.kube import Kube
from engram_operator.spec import ClusterSpec


@dataclass(frozen=True)
class PodView:
    name: str
    # The pod's Ready condition is True.
    ready: bool
    # Kubernetes phase: Pending, Running, Succeeded, Failed, Unknown.
    phase: str
    # Container restarts the kubelet made (all containers).
    restarts: int
    # Why a container waits (CrashLoopBackOff, ImagePullBackOff...), else "".
    waiting: str
    # Being deleted.
    terminating: bool
    # When the pod was created (wall clock), 0 if unknown.
    created: float


@dataclass(frozen=True)
class Observation:
    at: float
    # The StatefulSet's spec.replicas; None: the StatefulSet is missing.
    replicas: int | None
    pods: Mapping[int, PodView]
    # Seconds since each registered shard's last heartbeat.
    heartbeat_age: Mapping[int, float]
    addresses: Mapping[int, str]
    stats: Mapping[int, ipb.StatsResponse]
    redis_error: str = ""
    # The gateway Deployment's available replicas; None: the Deployment is missing.
    gateways_available: int | None = None
    errors: tuple[str, ...] = field(default=())


def timestamp(text: str | None) -> float:
    """An RFC 3339 time from the API as a Unix time (0 when absent or malformed)."""
    if not text:
        return 0.0
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def pod_view(pod: Mapping[str, Any]) -> PodView:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or ()}
    containers = status.get("containerStatuses") or ()
    waiting = ""
    for c in containers:
        reason = ((c.get("state") or {}).get("waiting") or {}).get("reason")
        if reason:
            waiting = str(reason)
    return PodView(
        name=str(meta.get("name", "")),
        ready=conditions.get("Ready") == "True",
        phase=str(status.get("phase") or "Pending"),
        restarts=sum(int(c.get("restartCount") or 0) for c in containers),
        waiting=waiting,
        terminating=bool(meta.get("deletionTimestamp")),
        created=timestamp(meta.get("creationTimestamp")),
    )


def shard_pods(statefulset: str, pods: list[Mapping[str, Any]]) -> dict[int, PodView]:
    """The StatefulSet's pods by ordinal (``<statefulset>-<ordinal>``), which is the shard id."""
    pattern = re.compile(rf"^{re.escape(statefulset)}-(\d+)$")
    out: dict[int, PodView] = {}
    for pod in pods:
        m = pattern.match(str((pod.get("metadata") or {}).get("name", "")))
        if m:
            out[int(m.group(1))] = pod_view(pod)
    return out


async def observe(
    kube: Kube, namespace: str, spec: ClusterSpec, store: ControlStore
) -> Observation:
    now = time.time()
    errors: list[str] = []
    apps = f"/apis/apps/v1/namespaces/{namespace}"
    sts = await kube.get(f"{apps}/statefulsets/{spec.shard_statefulset}")
    replicas = None if sts is None else int((sts.get("spec") or {}).get("replicas", 1))
    if sts is None:
        errors.append(f"the shard StatefulSet {spec.shard_statefulset!r} does not exist")
    pods = await kube.list(f"/api/v1/namespaces/{namespace}/pods")
    deploy = await kube.get(f"{apps}/deployments/{spec.gateway_deployment}")
    if deploy is None:
        errors.append(f"the gateway Deployment {spec.gateway_deployment!r} does not exist")
    available = None if deploy is None else (deploy.get("status") or {}).get("availableReplicas")
    redis_error = ""
    try:
        registered = await store.registered()
    except Exception as exc:  # Redis down: report it, observe the rest
        registered = {}
        redis_error = f"Redis is unreachable: {exc}"
    ages = {i: max(0.0, now - info.heartbeat_us / 1e6) for i, info in registered.items()}
    addresses = {i: info.address for i, info in registered.items()}
    stats = await shard_stats(addresses) if addresses else {}
    return Observation(
        at=now,
        replicas=replicas,
        pods=shard_pods(spec.shard_statefulset, pods),
        heartbeat_age=ages,
        addresses=addresses,
        stats=stats,
        redis_error=redis_error,
        gateways_available=None if deploy is None else int(available or 0),
        errors=tuple(errors),
    )
