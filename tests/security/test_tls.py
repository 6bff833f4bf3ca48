"""TLS on the gateway's public listeners: gRPC and HTTP/WebSocket, reloaded when the files change.

Certificates come from a private CA (``certificates``). The cluster tests run a real cluster
with ``LocalCluster(keys_file=..., tls=...)``: streams over TLS gRPC and WSS, a plaintext client
refused, the certificate replaced while the gateway runs (a fresh client sees the new one, an
open stream carries on), and the start-up errors of bad files, naming the variable.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from websockets.asyncio.client import connect

from engram.common import tls
from engram.common.settings import SecuritySettings, SettingsError
from engram.launcher.cluster import LocalCluster
from engram.v1 import streaming_pb2 as pb
from engram.v1 import streaming_pb2_grpc

RELOAD_S = 0.2


# --------------------------------------------------------------------------- the files


def test_bad_files_are_refused_naming_the_variable(certificates: Any, tmp_path: Path) -> None:
    a, b = certificates.issue("a"), certificates.issue("b")

    def security(cert: str, key: str) -> SecuritySettings:
        return SecuritySettings(tls_cert=cert, tls_key=key)

    with pytest.raises(SettingsError, match=r"ENGRAM_TLS_CERT=.*gone\.pem: no such file"):
        tls.grpc_server_credentials(security(str(tmp_path / "gone.pem"), a.key))
    with pytest.raises(SettingsError, match=r"ENGRAM_TLS_KEY=.* does not match .*ENGRAM_TLS_CERT"):
        tls.server_ssl_context(security(a.cert, b.key))
    with pytest.raises(SettingsError, match=r"ENGRAM_TLS_CERT=.*: not a PEM certificate"):
        tls.grpc_server_credentials(security(a.key, a.key))
    with pytest.raises(SettingsError, match=r"ENGRAM_TLS_KEY=.*: not a PEM private key"):
        tls.grpc_server_credentials(security(a.cert, a.cert))


def test_an_unreadable_key_is_refused_naming_the_variable(
    certificates: Any, tmp_path: Path
) -> None:
    a = certificates.issue("unreadable")
    unreadable = tmp_path / "unreadable.key"
    shutil.copy(a.key, unreadable)
    unreadable.chmod(0)
    if os.access(unreadable, os.R_OK):  # root reads anything
        pytest.skip("this user can read a mode 000 file")
    with pytest.raises(SettingsError, match=r"ENGRAM_TLS_KEY=.*cannot read it"):
        tls.grpc_server_credentials(SecuritySettings(tls_cert=a.cert, tls_key=str(unreadable)))


def test_tls_is_off_without_a_certificate() -> None:
    assert tls.grpc_server_credentials(SecuritySettings()) is None
    assert tls.server_ssl_context(SecuritySettings()) is None


def test_a_replaced_pair_is_taken_only_whole(certificates: Any, tmp_path: Path) -> None:
    a, b = certificates.issue("pa"), certificates.issue("pb")
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    shutil.copy(a.cert, cert)
    shutil.copy(a.key, key)
    files = tls.CertificateFiles(str(cert), str(key), reload_s=0.0)
    assert not files.refresh()  # nothing changed
    shutil.copy(b.cert, cert)  # the certificate first: it does not match the old key
    assert not files.refresh()
    assert files.pair.cert == Path(a.cert).read_bytes()
    shutil.copy(b.key, key)
    assert files.refresh()
    assert files.pair.cert == Path(b.cert).read_bytes()


# --------------------------------------------------------------------------- a TLS cluster


@pytest.fixture(scope="module")
def tls_cluster(
    certificates: Any, admin_key: tuple[Path, str], tmp_path_factory: pytest.TempPathFactory
) -> Any:  # yields (cluster, cert files, api key)
    root = tmp_path_factory.mktemp("tls-cluster")
    leaf = certificates.issue("gateway")
    # the gateway reads copies, so a test can replace them
    cert, key = root / "gateway.crt", root / "gateway.key"
    shutil.copy(leaf.cert, cert)
    shutil.copy(leaf.key, key)
    keys_file, api_key = admin_key
    cluster = LocalCluster(
        root / "data",
        shards=1,
        env={"ENGRAM_TLS_RELOAD_S": str(RELOAD_S), "ENGRAM_CANARY_INTERVAL_S": "0"},
        keys_file=keys_file,
        tls=(cert, key),
        tls_ca=certificates.ca_file,
    )
    try:
        cluster.start()
        yield cluster, (cert, key), api_key
    except BaseException:
        cluster.print_logs()
        raise
    finally:
        cluster.stop()


def _creds(certificates: Any) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=certificates.ca.cert_pem.bytes())


def _server_cert(port: int, alpn: str, ca_file: str) -> bytes:
    """The DER certificate a fresh TLS handshake with 127.0.0.1:``port`` presents."""
    context = ssl.create_default_context(cafile=ca_file)
    context.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
            der = conn.getpeercert(binary_form=True)
    assert der is not None
    return der


def _wait_for_cert(port: int, alpn: str, ca_file: str, expected: bytes) -> None:
    """Fresh handshakes until one presents ``expected`` (the gateway looks every RELOAD_S)."""
    deadline = time.monotonic() + 30
    while _server_cert(port, alpn, ca_file) != expected:
        assert time.monotonic() < deadline, f"port {port} still presents the old certificate"
        time.sleep(RELOAD_S)


def _der(path: str | Path) -> bytes:
    """The DER form of the first (leaf) certificate of a PEM chain file."""
    pem = Path(path).read_text()
    end = "-----END CERTIFICATE-----"
    return ssl.PEM_cert_to_DER_cert(pem[: pem.index(end) + len(end)])


def _port(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


@pytest.mark.cluster
async def test_a_grpc_stream_over_tls(tls_cluster: Any, certificates: Any, traffic: Any) -> None:
    cluster, _, api_key = tls_cluster
    auth = (("authorization", f"Bearer {api_key}"),)
    async with grpc.aio.secure_channel(cluster.gateway_address, _creds(certificates)) as channel:
        acked = await traffic.write(channel, "tls-grpc", 3, metadata=auth)
        assert sorted(await traffic.list_ids(channel, "tls-grpc", metadata=auth)) == sorted(acked)
    # a plaintext client does not get through the handshake
    async with grpc.aio.insecure_channel(cluster.gateway_address) as plain:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await traffic.list_ids(plain, "tls-grpc", metadata=auth)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    # nor a client that does not trust the CA
    stranger = grpc.ssl_channel_credentials(
        root_certificates=type(certificates.ca)().cert_pem.bytes()
    )
    async with grpc.aio.secure_channel(cluster.gateway_address, stranger) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as untrusted:
            await traffic.list_ids(channel, "tls-grpc", metadata=auth)
        assert untrusted.value.code() == grpc.StatusCode.UNAVAILABLE


async def _wss_stream(url: str, context: ssl.SSLContext, api_key: str) -> Any:
    return await connect(
        url,
        ssl=context,
        additional_headers={"Authorization": f"Bearer {api_key}"},
        open_timeout=10,
        compression=None,
    )


async def _recv(conn: Any, kind: str) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            frame = json.loads(await conn.recv())
            if frame["type"] != "heartbeat":
                assert frame["type"] == kind, frame
                return dict(frame)


async def _ws_batch(conn: Any, seq: int, dim: int = 4) -> None:
    vectors = np.random.default_rng(seq).standard_normal((2, dim)).tolist()
    await conn.send(json.dumps({"type": "batch", "sequence_number": seq, "vectors": vectors}))
    ack = await _recv(conn, "ack")
    assert ack["sequence_number"] == seq


@pytest.mark.cluster
async def test_a_websocket_stream_over_tls(tls_cluster: Any, certificates: Any) -> None:
    cluster, _, api_key = tls_cluster
    context = tls.client_ssl_context(certificates.ca_file)
    url = f"wss://127.0.0.1:{cluster.http_port}/v1/stream"
    conn = await _wss_stream(url, context, api_key)
    try:
        await conn.send(json.dumps({"type": "init", "memory_space_id": "tls-wss"}))
        await _recv(conn, "init_ack")
        await _ws_batch(conn, 1)
    finally:
        await conn.close()
    # plain ws:// to the TLS port does not get a WebSocket
    with pytest.raises(Exception):  # noqa: B017 (the library's error for a garbled handshake)
        await connect(url.replace("wss://", "ws://"), open_timeout=5)


@pytest.mark.cluster
async def test_status_reaches_a_tls_cluster(tls_cluster: Any, engram_cli: Any) -> None:
    cluster, _, _ = tls_cluster
    code, out = await engram_cli("status", "--json", "--data-dir", cluster.data_dir)
    status = json.loads(out)
    assert status["tls"] is True and status["auth"] is True
    assert status["healthy"], status


@pytest.mark.cluster
async def test_a_replaced_certificate_is_served_to_new_connections(
    tls_cluster: Any, certificates: Any, traffic: Any
) -> None:
    """Runs last in the module: it leaves the gateway with a new certificate (same CA)."""
    cluster, (cert, key), api_key = tls_cluster
    auth = (("authorization", f"Bearer {api_key}"),)
    grpc_port, http_port = _port(cluster.gateway_address), cluster.http_port
    assert _server_cert(grpc_port, "h2", certificates.ca_file) == _der(cert)
    # streams open before the change
    channel = grpc.aio.secure_channel(cluster.gateway_address, _creds(certificates))
    call = streaming_pb2_grpc.EngramStreamStub(channel).ObserveStream(metadata=auth)
    await call.write(pb.ObservationRequest(memory_space_id="tls-reload", init=pb.StreamInit()))
    assert (await call.read()).WhichOneof("result") == "init_ack"
    context = tls.client_ssl_context(certificates.ca_file)
    url = f"wss://127.0.0.1:{http_port}/v1/stream"
    ws = await _wss_stream(url, context, api_key)
    await ws.send(json.dumps({"type": "init", "memory_space_id": "tls-reload-ws"}))
    await _recv(ws, "init_ack")
    try:
        new = certificates.issue("gateway-renewed")
        # as a Secret volume update does: new files swapped in
        for src, dst in ((new.cert, cert), (new.key, key)):
            shutil.copy(src, f"{dst}.new")
            os.replace(f"{dst}.new", dst)
        expected = _der(new.cert)
        for port, alpn in ((grpc_port, "h2"), (http_port, "http/1.1")):
            await asyncio.to_thread(_wait_for_cert, port, alpn, certificates.ca_file, expected)
        # the streams opened before carry on
        vectors = np.ones((1, 4), "<f4").tobytes()
        batch = pb.ObservationBatch(dim=4, vectors=vectors, ids=["after-reload"])
        await call.write(pb.ObservationRequest(sequence_number=1, batch=batch))
        resp = await call.read()
        assert resp.WhichOneof("result") == "ack", resp
        await _ws_batch(ws, 1)
        # and a fresh client trusting the CA streams as before
        async with grpc.aio.secure_channel(cluster.gateway_address, _creds(certificates)) as fresh:
            assert await traffic.write(fresh, "tls-reload-fresh", 1, metadata=auth)
    finally:
        await ws.close()
        call.cancel()
        await channel.close()


# --------------------------------------------------------------------------- start-up errors


@pytest.mark.cluster
@pytest.mark.parametrize("case", ["missing", "mismatch"])
def test_a_gateway_with_bad_files_exits_naming_the_variable(
    case: str, certificates: Any, tmp_path: Path
) -> None:
    a, b = certificates.issue(f"start-{case}-a"), certificates.issue(f"start-{case}-b")
    cert, key = (str(tmp_path / "none.pem"), a.key) if case == "missing" else (a.cert, b.key)
    env = {
        **os.environ,
        "ENGRAM_TLS_CERT": cert,
        "ENGRAM_TLS_KEY": key,
        "ENGRAM_REDIS_URL": "redis://127.0.0.1:1/0",  # never reached: the files come first
        "ENGRAM_GATEWAY_LISTEN": "127.0.0.1:0",
        "ENGRAM_GATEWAY_HTTP_PORT": "0",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "engram.gateway"], env=env, capture_output=True, timeout=60
    )
    assert proc.returncode != 0
    stderr = proc.stderr.decode()
    wanted = "ENGRAM_TLS_CERT=" if case == "missing" else "ENGRAM_TLS_KEY="
    assert wanted in stderr, stderr
    assert ("no such file" if case == "missing" else "does not match") in stderr, stderr
