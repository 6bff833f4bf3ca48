"""Several gateway processes on one gRPC port (``LocalCluster(gateways=N)``).

Each gateway is healthy on an HTTP port of its own and listens on the shared gRPC port, where
the kernel spreads new connections over them. Clients write and recall through that port; a
gateway killed with -9 is restarted by the supervisor while writes through the port go on (a
stream whose connection was on it resumes through the port). Only the first gateway runs the
canary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from engram.bench.access import own_cluster
from engram.common.tls import client_ssl_context
from engram.launcher.cluster import HOST, LocalCluster, http_healthy
from engram_client import EngramClient, ObservationStream
from engram_client.connection import CHANNEL_OPTIONS

DIM = 16
BATCH = 50
# A channel of its own per client: by default gRPC shares one connection between the channels
# of a process that have the same target and options.
OWN_CONNECTION = [*CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]


def _listening(pid: int) -> set[int]:
    return {
        c.laddr.port
        for c in psutil.Process(pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }


def _accepted(pid: int, port: int) -> int:
    """Connections process ``pid`` accepted on ``port`` that are still open."""
    return sum(
        1
        for c in psutil.Process(pid).net_connections("tcp")
        if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port
    )


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(kv.split("=", 1) for kv in raw.decode().split("\0") if "=" in kv)


def _wait_restarted(cluster: LocalCluster, name: str, old_pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while cluster.pid(name) == old_pid:
        assert time.monotonic() < deadline, f"{name} was not restarted within {timeout} s"
        time.sleep(0.02)
    cluster.wait_healthy(name, max(0.1, deadline - time.monotonic()))


class Writer:
    """One client with a connection of its own, streaming into one space."""

    def __init__(self, address: str, space: str, seed: int) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=OWN_CONNECTION)
        self.client = EngramClient(address, channel=self.channel)
        self.space = space
        rng = np.random.default_rng(seed)
        self.vectors = rng.standard_normal((10 * BATCH, DIM)).astype(np.float32)
        self.sent = 0
        self.stream: ObservationStream | None = None

    async def write(self) -> None:
        """Sends the next batch and waits for its ack."""
        if self.stream is None:
            self.stream = await self.client.open_stream(self.space)
        lo, hi = self.sent, self.sent + BATCH
        ids = [f"{self.space}:{r}" for r in range(lo, hi)]
        await asyncio.wait_for(await self.stream.send(self.vectors[lo:hi], ids=ids), 60)
        self.sent += BATCH

    async def close(self) -> None:
        if self.stream is not None:
            await self.stream.close()
        await self.channel.close()


def test_a_cluster_needs_a_gateway(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one gateway"):
        LocalCluster(tmp_path, gateways=0)


async def test_gateways_share_the_grpc_port_and_restart_alone(
    make_cluster: Callable[..., LocalCluster], space_id: str
) -> None:
    cluster = make_cluster(shards=1, gateways=2, env={"ENGRAM_CANARY_INTERVAL_S": "0.5"})
    assert cluster.names == ["redis", "shard-0", "gateway", "gateway-1"]
    grpc_port = int(cluster.gateway_address.rsplit(":", 1)[1])
    http = {name: cluster.gateway_http_port(name) for name in cluster.gateway_names}
    assert http["gateway"] == cluster.http_port and http["gateway-1"] != cluster.http_port
    for name, port in http.items():
        assert cluster.healthy(name)
        assert http_healthy(f"{HOST}:{port}")  # its own /healthz
        assert {grpc_port, port} <= _listening(cluster.pid(name))
    info = json.loads(cluster.cluster_file.read_text())
    assert (
        info["gateway"] == cluster.gateway_address and info["http"] == f"{HOST}:{http['gateway']}"
    )
    recorded = {p["name"]: p for p in info["processes"] if p["role"] == "gateway"}
    assert {n: (p["grpc"], p["http"]) for n, p in recorded.items()} == {
        n: (cluster.gateway_address, f"{HOST}:{port}") for n, port in http.items()
    }
    # the canary runs in the first gateway only
    assert _environ(cluster.pid("gateway"))["ENGRAM_CANARY_INTERVAL_S"] == "0.5"
    assert _environ(cluster.pid("gateway-1"))["ENGRAM_CANARY_INTERVAL_S"] == "0"

    # Clients until both gateways hold one: each client's connection lands on one of them.
    on: dict[str, list[Writer]] = {name: [] for name in cluster.gateway_names}
    async with contextlib.AsyncExitStack() as stack:
        for i in range(40):
            before = {n: _accepted(cluster.pid(n), grpc_port) for n in on}
            writer = Writer(cluster.gateway_address, f"{space_id}-{i}", seed=i)
            stack.push_async_callback(writer.close)
            await writer.write()
            gained = [n for n in on if _accepted(cluster.pid(n), grpc_port) > before[n]]
            assert len(gained) == 1, f"client {i}: new connections on {gained}"
            on[gained[0]].append(writer)
            if all(on.values()):
                break
        assert all(on.values()), f"40 clients, all on one gateway: {on}"
        writers = [w for ws in on.values() for w in ws]

        # kill -9 gateway-1: its streams resume through the port while it restarts
        old = cluster.kill("gateway-1", signal.SIGKILL)
        restarted = asyncio.create_task(
            asyncio.to_thread(_wait_restarted, cluster, "gateway-1", old, 60)
        )
        await asyncio.gather(*(w.write() for w in writers))
        await restarted
        assert cluster.pid("gateway-1") != old and cluster.restarts("gateway-1") == 1
        assert cluster.restarts("gateway") == 0 and cluster.healthy("gateway-1")
        assert grpc_port in _listening(cluster.pid("gateway-1"))
        assert http_healthy(f"{HOST}:{http['gateway-1']}")
        await asyncio.gather(*(w.write() for w in writers))
        for w in on["gateway-1"]:
            assert w.stream is not None and w.stream.reconnects >= 1, "it resumed"
        for w in on["gateway"]:
            assert w.stream is not None and w.stream.reconnects == 0, "undisturbed"

        # every acked row is stored once, and recalls through the port find them
        async with EngramClient(cluster.gateway_address) as client:
            for w in writers:
                ids = await client.list_ids(w.space)
                assert sorted(ids) == sorted(f"{w.space}:{r}" for r in range(w.sent))
                row = w.sent - 1
                result = await client.recall(w.space, w.vectors[row], k=1)
                assert result.hits and result.hits[0].id == f"{w.space}:{row}"


def test_tls_gateways_are_checked_over_https(
    make_cluster: Callable[..., LocalCluster], tmp_path: Path
) -> None:
    """With TLS each gateway's HTTP port serves HTTPS: the launcher's probes trust tls_ca."""
    _, security = own_cluster(False, True, tmp_path / "security")
    cluster = make_cluster(shards=1, gateways=2, **security)  # started: both were healthy
    context = client_ssl_context(str(security["tls_ca"]))
    for name in cluster.gateway_names:
        address = f"{HOST}:{cluster.gateway_http_port(name)}"
        assert cluster.healthy(name) and http_healthy(address, context=context)
        assert not http_healthy(address)  # not plain HTTP
