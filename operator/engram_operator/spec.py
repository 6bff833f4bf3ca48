"""An ``EngramCluster``'s spec as the operator uses it: one frozen dataclass, read in one place.

The CRD's schema refuses most bad input (``shards`` below 1, unknown fields, wrong types) and
fills the defaults; :func:`parse` checks again what a schema cannot express on every API
server (the rebalancing thresholds' order) and what it cannot know (a storage size the data
does not fit), and raises :class:`SpecError` with the reason the ``Degraded`` condition shows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from engram.control import rebalance as rb
from engram.control import restarts

GROUP = "engramstream.io"
VERSION = "v1alpha1"
PLURAL = "engramclusters"

# Kubernetes quantities (binary and decimal suffixes) of the storage size.
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$")
_FACTORS = {
    None: 1,
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
}  # fmt: skip

# With rebalancing off, balancing thresholds no shard reaches: a plan still drains and fills.
_UNREACHABLE = 1e12


class SpecError(ValueError):
    """The spec cannot be acted on; the message says which field and why."""


@dataclass(frozen=True)
class ClusterSpec:
    # Desired shard count (the StatefulSet's replicas once drained or filled).
    shards: int
    # Observe and report only.
    paused: bool
    shard_statefulset: str
    shard_service: str
    gateway_deployment: str
    redis_url: str
    key_prefix: str
    # Bytes of each shard's volume; None: not given (no capacity check).
    storage_bytes: int | None
    rebalance_enabled: bool
    policy: rb.Policy
    # Seconds between load measurements and rounds.
    interval_s: float
    # A serving pod without a heartbeat this long is stuck.
    heartbeat_timeout_s: float
    # A shard down this long has its spaces moved (when reachable); 0: never.
    move_spaces_after_s: float
    restart_policy: restarts.Policy


def quantity(text: str) -> int:
    """``"20Gi"`` -> 21474836480; raises SpecError when it is not a quantity."""
    m = _QUANTITY.match(text.strip())
    if m is None:
        raise SpecError(f"storage.size {text!r} is not a Kubernetes quantity (e.g. 20Gi)")
    return int(float(m.group(1)) * _FACTORS[m.group(2)])


def parse(spec: Mapping[str, Any], redis_url: str | None = None) -> ClusterSpec:
    """The spec as a :class:`ClusterSpec`; ``redis_url`` (the operator's ENGRAM_REDIS_URL)
    wins over ``spec.redis.url``."""
    shards = spec.get("shards")
    if not isinstance(shards, int) or shards < 1:
        raise SpecError(f"spec.shards must be an integer >= 1, got {shards!r}")
    workloads = spec.get("workloads") or {}
    names = {}
    for key in ("shardStatefulSet", "shardService", "gatewayDeployment"):
        if not workloads.get(key):
            raise SpecError(f"spec.workloads.{key} is missing: the operator needs the name")
        names[key] = str(workloads[key])
    url = redis_url or (spec.get("redis") or {}).get("url")
    if not url:
        raise SpecError("no Redis URL: set spec.redis.url (or the operator's ENGRAM_REDIS_URL)")
    size = (spec.get("storage") or {}).get("size")
    reb = spec.get("rebalance") or {}
    enabled = bool(reb.get("enabled", True))
    trigger = float(reb.get("trigger", 1.25))
    target = float(reb.get("target", 1.2))
    if not (math.isfinite(trigger) and math.isfinite(target)) or not 1 <= target <= trigger:
        raise SpecError(
            f"spec.rebalance: target ({target:g}) must be >= 1 and <= trigger ({trigger:g})"
        )
    try:
        policy = rb.Policy(
            trigger=trigger if enabled else _UNREACHABLE,
            target=target if enabled else _UNREACHABLE,
            space_cooldown_s=float(reb.get("spaceCooldownSeconds", 1800)),
            cluster_cooldown_s=float(reb.get("cooldownSeconds", 300)),
        )
    except ValueError as exc:
        raise SpecError(f"spec.rebalance: {exc}") from None
    restart = spec.get("restart") or {}
    timeout = float(restart.get("heartbeatTimeoutSeconds", 10))
    return ClusterSpec(
        shards=shards,
        paused=bool(spec.get("paused", False)),
        shard_statefulset=names["shardStatefulSet"],
        shard_service=names["shardService"],
        gateway_deployment=names["gatewayDeployment"],
        redis_url=str(url),
        key_prefix=str(spec.get("keyPrefix") or "engram"),
        storage_bytes=quantity(str(size)) if size else None,
        rebalance_enabled=enabled,
        policy=policy,
        interval_s=max(1.0, float(reb.get("intervalSeconds", 30))),
        heartbeat_timeout_s=max(2.0, timeout),
        move_spaces_after_s=max(0.0, float(restart.get("moveSpacesAfterSeconds", 300))),
        # Pod deletions back off from one heartbeat timeout up to ten, and stop after five
        # in ten minutes: the kubelet restarts crashed containers itself.
        restart_policy=restarts.Policy(
            initial_delay_s=timeout, max_delay_s=10 * timeout, max_restarts=5, window_s=600.0
        ),
    )
