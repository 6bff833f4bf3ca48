"""Fixtures of the integration suites: clusters whose launcher runs in a process of its own.

A :class:`LocalCluster` spawns (and restarts) its services from the process that embeds it,
with a ``preexec_fn`` that forces a plain ``fork()``. In a test process that uses gRPC (or
numpy's threaded BLAS) such a fork can crash the child before it execs, or deadlock the test
process (see ``test_restart_spawn.py``). So these suites run each cluster through
:class:`ClusterProcess`: a small launcher process that owns a ``LocalCluster`` and obeys
commands (kill, wait until restarted, pid, ...) sent as JSON lines on its stdin. Tests speak to
the services over the network as any client would.

* ``shared_cluster``: one cluster per test module (tests must not disturb each other: each
  writes to memory spaces of its own). A module configures it with ``CLUSTER_ENV`` (extra
  ``ENGRAM_*`` variables, e.g. smaller limits) and ``CLUSTER_SHARDS`` (default 2).
* ``fresh_cluster(**kwargs)``: a factory of per-test clusters, for destructive tests.
* ``gateway_channel``: an asyncio gRPC channel to the shared cluster's gateway.
* ``space_id``: a memory space id no other test uses.

Every cluster is stopped at teardown; when a test failed, the tails of its logs are printed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from engram.launcher import procs

_LAUNCHER = r"""
import json, sys, time
from engram.launcher.cluster import LocalCluster
from engram.launcher.supervisor import Policy


def reply(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def wait_restarted(cluster, name, old_pid, timeout):
    # First wait (without any gRPC call of ours) until the supervisor spawned a successor,
    # so no health check of ours runs while it forks; then wait until that one is healthy.
    deadline = time.monotonic() + timeout
    while cluster.pid(name) == old_pid:
        if cluster.state(name).given_up or time.monotonic() > deadline:
            raise RuntimeError(f"{name} was not restarted within {timeout} s")
        time.sleep(0.02)
    cluster.wait_healthy(name, max(0.1, deadline - time.monotonic()))
    return cluster.pid(name)


def handle(cluster, req):
    op, name = req["op"], req.get("name", "")
    if op == "kill":
        return cluster.kill(name, req["sig"])
    if op == "wait_restarted":
        return wait_restarted(cluster, name, req["old_pid"], req["timeout"])
    if op == "wait_healthy":
        return cluster.wait_healthy(name, req["timeout"])
    if op == "pid":
        return cluster.pid(name)
    if op == "restarts":
        return cluster.restarts(name)
    if op == "healthy":
        return cluster.healthy(name, req["timeout"])
    raise ValueError(f"unknown op {op!r}")


cfg = json.loads(sys.argv[1])
cluster = LocalCluster(
    cfg["data_dir"], shards=cfg["shards"], env=cfg["env"], policy=Policy(**cfg["policy"])
)
try:
    cluster.start()
except Exception as exc:
    reply({"error": f"{type(exc).__name__}: {exc}"})
    raise SystemExit(1)
try:
    reply({"ok": {
        "gateway": cluster.gateway_address,
        "http_port": cluster.http_port,
        "redis_url": cluster.redis_url,
        "shards": [cluster.shard_address(i) for i in range(cluster.shards)],
        "shard_http_ports": [cluster.shard_http_port(i) for i in range(cluster.shards)],
    }})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "stop":
            break
        try:
            reply({"ok": handle(cluster, req)})
        except Exception as exc:
            reply({"error": f"{type(exc).__name__}: {exc}"})
finally:
    cluster.stop()
    reply({"ok": "stopped"})
"""


class ClusterProcess:
    """A LocalCluster in a launcher process of its own, with the parts of its API tests use."""

    def __init__(
        self,
        data_dir: Path,
        *,
        shards: int = 2,
        env: dict[str, str] | None = None,
        policy: dict[str, float] | None = None,
        startup_timeout: float = 120.0,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.shards = shards
        self._cfg = {
            "data_dir": str(self.data_dir),
            "shards": shards,
            "env": dict(env or {}),
            "policy": dict(policy or {}),
        }
        self._startup_timeout = startup_timeout
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[str] | None = None
        self._info: dict[str, Any] = {}

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> ClusterProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        with open(self.launcher_log, "a") as log:
            self._proc = subprocess.Popen(
                [sys.executable, "-c", _LAUNCHER, json.dumps(self._cfg)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                cwd=self.data_dir,
            )
        self._info = self._read("start")
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.poll() is None and proc.stdin is not None:
                proc.stdin.write(json.dumps({"op": "stop"}) + "\n")
                proc.stdin.flush()
                proc.stdin.close()
            proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()  # its services get SIGTERM (PR_SET_PDEATHSIG)
            proc.wait()
        finally:
            if proc.stdout is not None:
                proc.stdout.close()

    @property
    def launcher_log(self) -> Path:
        return self.data_dir / "launcher.log"

    @property
    def launcher_pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _read(self, what: str) -> Any:
        assert self._proc is not None and self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            tail = procs.log_tail(self.launcher_log)
            raise RuntimeError(f"the launcher process ended ({what}); its log:\n{tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"launcher: {what}: {reply['error']}")
        return reply["ok"]

    def _call(self, op: str, **args: Any) -> Any:
        with self._lock:
            assert self._proc is not None and self._proc.stdin is not None
            self._proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
            self._proc.stdin.flush()
            return self._read(op)

    # -------------------------------------------------------------- addresses

    @property
    def gateway_address(self) -> str:
        return str(self._info["gateway"])

    @property
    def http_port(self) -> int:
        return int(self._info["http_port"])

    @property
    def redis_url(self) -> str:
        return str(self._info["redis_url"])

    def shard_address(self, shard_id: int) -> str:
        return str(self._info["shards"][shard_id])

    def shard_http_port(self, shard_id: int) -> int:
        return int(self._info["shard_http_ports"][shard_id])

    @property
    def names(self) -> list[str]:
        return ["redis", *(f"shard-{i}" for i in range(self.shards)), "gateway"]

    def log_path(self, name: str) -> Path:
        return self.data_dir / "logs" / f"{name}.log"

    # -------------------------------------------------------------- processes

    def kill(self, name: str, sig: int) -> int:
        """Sends ``sig`` to ``name``; returns its PID (the launcher restarts it if it dies)."""
        return int(self._call("kill", name=name, sig=int(sig)))

    def wait_restarted(self, name: str, old_pid: int, timeout: float = 60.0) -> int:
        """Waits until a successor of ``old_pid`` runs and is healthy; returns its PID."""
        return int(self._call("wait_restarted", name=name, old_pid=old_pid, timeout=timeout))

    def pid(self, name: str) -> int:
        return int(self._call("pid", name=name))

    def restarts(self, name: str) -> int:
        return int(self._call("restarts", name=name))

    def healthy(self, name: str, timeout: float = 1.0) -> bool:
        return bool(self._call("healthy", name=name, timeout=timeout))

    def print_logs(self) -> None:
        for path in [self.launcher_log, *(self.log_path(n) for n in self.names)]:
            tail = procs.log_tail(path, 30)
            if tail:
                print(f"\n----- {path} (last 30 lines) -----\n{tail}")


ClusterFactory = Callable[..., ClusterProcess]


@pytest.fixture(scope="module")
def shared_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ClusterProcess]:
    """A started cluster for the whole module, configured by CLUSTER_ENV / CLUSTER_SHARDS."""
    cluster = ClusterProcess(
        tmp_path_factory.mktemp("shared-cluster"),
        shards=getattr(request.module, "CLUSTER_SHARDS", 2),
        env=dict(getattr(request.module, "CLUSTER_ENV", None) or {}),
    )
    failed_before = request.session.testsfailed
    try:
        cluster.start()
        yield cluster
    finally:
        if request.session.testsfailed > failed_before:
            cluster.print_logs()
        cluster.stop()


@pytest.fixture
def fresh_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ClusterFactory]:
    """Factory of started per-test clusters (``shards``, ``env``, ``policy`` keywords)."""
    clusters: list[ClusterProcess] = []

    def make(**kwargs: Any) -> ClusterProcess:
        cluster = ClusterProcess(tmp_path / f"cluster-{len(clusters)}", **kwargs)
        clusters.append(cluster)
        return cluster.start()

    failed_before = request.session.testsfailed
    try:
        yield make
    finally:
        for cluster in clusters:
            if request.session.testsfailed > failed_before:
                cluster.print_logs()
            cluster.stop()


@pytest.fixture
async def gateway_channel(shared_cluster: ClusterProcess) -> AsyncIterator[grpc.aio.Channel]:
    """An asyncio gRPC channel to the shared cluster's gateway, closed after the test."""
    async with grpc.aio.insecure_channel(shared_cluster.gateway_address) as channel:
        yield channel


@pytest.fixture
def space_id() -> str:
    """A memory space id no other test uses (so counts and LSNs start at 0)."""
    return f"t-{uuid.uuid4().hex[:20]}"
