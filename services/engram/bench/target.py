"""The cluster under test: one started here with :class:`LocalCluster`, or a running one.

For a cluster started here every PID and shard address is known. For ``--target`` the
``cluster.json`` of ``--cluster-dir`` supplies them when its gateway is the target; otherwise
only client-side figures can be measured (process RSS/CPU and the index backlog are reported as
missing, with the reason).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engram.bench.access import Access, own_cluster
from engram.bench.config import BenchConfig
from engram.common import settings as engram_settings
from engram.common.settings import SecuritySettings
from engram.launcher import secure
from engram.launcher.cluster import LocalCluster


@dataclass
class Target:
    address: str
    shard_count: int
    shard_addresses: dict[int, str] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    data_dir: Path | None = None
    cluster: LocalCluster | None = None
    env: dict[str, str] = field(default_factory=dict)
    note: str = ""
    access: Access = field(default_factory=Access)  # the API key and CA its clients use

    @property
    def index_settings(self) -> engram_settings.IndexSettings:
        return engram_settings.load(self.env).shard.index

    @property
    def shard_security(self) -> SecuritySettings | None:
        """How the benchmark reaches the shards: the cluster's token and mTLS (from its
        cluster.json when attached), None for this process's own settings."""
        if self.cluster is not None:
            return self.cluster.security.internal
        if self.data_dir is None:
            return None
        try:
            info = json.loads((self.data_dir / "cluster.json").read_text())
        except (OSError, ValueError):
            return None
        return secure.from_cluster_file(info).internal

    def refresh_pids(self) -> None:
        if self.cluster is not None:
            self.pids = {name: self.cluster.pid(name) for name in self.cluster.names}

    def describe(self) -> dict[str, Any]:
        return {
            "gateway": self.address,
            "started_here": self.cluster is not None,
            "shards": self.shard_count,
            "shard_addresses": {str(k): v for k, v in self.shard_addresses.items()},
            "pids": self.pids,
            "env": self.env,
            "note": self.note,
            **self.access.describe(),
        }

    def stop(self) -> None:
        if self.cluster is not None:
            self.cluster.stop()


def start_own(cfg: BenchConfig, data_dir: Path, extra_env: dict[str, str] | None = None) -> Target:
    """``extra_env``: variables for the services beyond ``--cluster-env`` (tracing's). With
    ``--auth`` / ``--tls`` the keys file and the certificate are made in ``data_dir``."""
    env = {**dict(kv.split("=", 1) for kv in cfg.cluster_env), **(extra_env or {})}
    engram_settings.load({**os.environ, **env})  # refuse bad settings before starting
    access, security = own_cluster(cfg.auth, cfg.tls, data_dir / "security")
    cluster = LocalCluster(data_dir, shards=cfg.shards, gateways=cfg.gateways, env=env, **security)
    cluster.start()
    t = Target(
        address=cluster.gateway_address,
        shard_count=cfg.shards,
        shard_addresses={i: cluster.shard_address(i) for i in range(cfg.shards)},
        data_dir=data_dir,
        cluster=cluster,
        env=env,
        access=access,
    )
    t.refresh_pids()
    return t


def attach(cfg: BenchConfig) -> Target:
    access = Access(cfg.api_key, cfg.ca_file)
    path = Path(cfg.cluster_dir) / "cluster.json"
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        info = {}
    if info.get("gateway") != cfg.target:
        return Target(
            address=cfg.target,
            shard_count=cfg.shards,
            note=f"no cluster.json for {cfg.target} in {cfg.cluster_dir}: process RSS/CPU and "
            "the index backlog are not measured; shard count assumed "
            f"{cfg.shards} (--shards)",
            access=access,
        )
    procs = info.get("processes", [])
    shards = {
        int(p["name"].split("-", 1)[1]): p["grpc"]
        for p in procs
        if p.get("role") == "shard" and p.get("grpc")
    }
    return Target(
        address=cfg.target,
        shard_count=int(info.get("shard_count") or len(shards) or cfg.shards),
        shard_addresses=shards,
        pids={p["name"]: int(p["pid"]) for p in procs if p.get("pid")},
        data_dir=Path(info["data_dir"]) if info.get("data_dir") else None,
        note=f"attached to the cluster of {path}",
        access=access,
    )
