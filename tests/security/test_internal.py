"""Shards accept only the cluster's own callers: the shared secret (engram-internal-token) on
every call but health checks, and optionally mTLS (a client certificate signed by the CA).

The first tests run a shard's server stack (``internal.server_interceptors`` and
``internal.add_port`` around a small Shard servicer) in this process; the last ones run real
clusters: a move between two shards that require the token and mTLS, and ``engram status``
and ``engram move`` finding the token through the cluster's data directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engram.common import grpcutil, internal
from engram.common.settings import SecuritySettings, SettingsError
from engram.common.tls import TlsError
from engram.control.moves import move_space, shard_stats, spaces_of
from engram.internal.v1 import shard_pb2 as ipb
from engram.internal.v1 import shard_pb2_grpc
from engram.v1 import streaming_pb2 as pb
from engram.v1 import streaming_pb2_grpc

TOKEN = "s3cret-token-of-this-test"


class _Shard(shard_pb2_grpc.ShardServicer):
    """Answers Stats (unary) and Scan (a stream) so both call kinds can be refused."""

    async def Stats(self, request: ipb.StatsRequest, context: Any) -> ipb.StatsResponse:
        return ipb.StatsResponse(shard_id=7)

    async def Scan(
        self, request: ipb.ScanRequest, context: Any
    ) -> AsyncIterator[pb.ListObservationsResponse]:
        yield pb.ListObservationsResponse(ids=["x"])


@contextlib.asynccontextmanager
async def _shard_server(security: SecuritySettings) -> AsyncIterator[str]:
    """A Shard service behind the shard's own security stack; yields its address."""
    server = grpc.aio.server(interceptors=internal.server_interceptors(security))
    shard_pb2_grpc.add_ShardServicer_to_server(_Shard(), server)
    grpcutil.add_health_and_reflection(server, ["engram.internal.v1.Shard"])
    port = internal.add_port(server, "127.0.0.1:0", security)
    assert port
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def _token_file(tmp_path: Path, value: str = TOKEN) -> str:
    path = tmp_path / "token"
    path.write_text(value + "\n")
    return str(path)


def _sync_stats(address: str, security: SecuritySettings) -> int:
    """Shard.Stats over a blocking channel (run it in a thread: the server is on this loop)."""
    with internal.sync_channel(address, security=security) as channel:
        return int(shard_pb2_grpc.ShardStub(channel).Stats(ipb.StatsRequest(), timeout=5).shard_id)


def _rewrite(path: str, text: str) -> None:
    Path(path).write_text(text)
    os.utime(path, ns=(1, 1))  # a different mtime even within the clock's resolution


def _mode_and_text(path: str) -> tuple[int, str]:
    return stat.S_IMODE(os.stat(path).st_mode), Path(path).read_text()


async def _stats(channel: grpc.aio.Channel, **kwargs: Any) -> ipb.StatsResponse:
    return await shard_pb2_grpc.ShardStub(channel).Stats(ipb.StatsRequest(), timeout=5, **kwargs)


async def _health(channel: grpc.aio.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    return int(reply.status)


async def test_a_call_without_the_token_is_refused_and_health_still_answers(
    tmp_path: Path,
) -> None:
    sec = SecuritySettings(internal_token_file=_token_file(tmp_path))
    async with _shard_server(sec) as address:
        async with grpc.aio.insecure_channel(address) as plain:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _stats(plain)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "no internal token" in (refused.value.details() or "")
            with pytest.raises(grpc.aio.AioRpcError) as wrong:
                await _stats(plain, metadata=((internal.TOKEN_HEADER, TOKEN + "x"),))
            assert wrong.value.code() == grpc.StatusCode.UNAUTHENTICATED
            # a stream is refused the same way
            with pytest.raises(grpc.aio.AioRpcError) as scan:
                async for _ in shard_pb2_grpc.ShardStub(plain).Scan(ipb.ScanRequest(), timeout=5):
                    pass
            assert scan.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert await _health(plain) == health_pb2.HealthCheckResponse.SERVING
        async with internal.aio_channel(address, security=sec) as channel:
            assert (await _stats(channel)).shard_id == 7
            chunks = shard_pb2_grpc.ShardStub(channel).Scan(ipb.ScanRequest(), timeout=5)
            assert [list(c.ids) async for c in chunks] == [["x"]]  # a stream carries it too
        assert await asyncio.to_thread(_sync_stats, address, sec) == 7
        # a channel whose bidirectional streams carry the token only when the caller passes it
        bare = internal.aio_channel(address, security=sec, stream_stream_token=False)
        async with bare as channel:
            for metadata, code in (
                (None, grpc.StatusCode.UNAUTHENTICATED),
                (internal.token_metadata(sec), grpc.StatusCode.UNIMPLEMENTED),  # let through
            ):
                call = shard_pb2_grpc.ShardStub(channel).Append(metadata=metadata, timeout=5)
                with pytest.raises(grpc.aio.AioRpcError) as append:
                    await call.read()
                assert append.value.code() == code
        # the control plane's helpers carry it too
        assert list(await shard_stats({0: address}, sec)) == [0]
        assert await shard_stats({0: address}) == {}  # this process has no token: refused


async def test_a_changed_token_file_is_taken_without_a_restart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(internal, "TOKEN_CHECK_S", 0.0)
    path = _token_file(tmp_path)
    server_side = SecuritySettings(internal_token_file=path)
    async with _shard_server(server_side) as address:
        old = tmp_path / "old"
        old.write_text(TOKEN)
        caller = SecuritySettings(internal_token_file=str(old))
        async with internal.aio_channel(address, security=caller) as channel:
            assert (await _stats(channel)).shard_id == 7
            _rewrite(path, "rotated-token\n")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _stats(channel)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        rotated = SecuritySettings(internal_token_file=path)
        async with internal.aio_channel(address, security=rotated) as channel:
            assert (await _stats(channel)).shard_id == 7


def test_a_bad_token_file_names_the_variable(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="ENGRAM_INTERNAL_TOKEN_FILE=.*no such file"):
        internal.server_interceptors(SecuritySettings(internal_token_file=str(tmp_path / "no")))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(SettingsError, match="ENGRAM_INTERNAL_TOKEN_FILE=.*empty"):
        internal.TokenFile(str(empty))


def _mtls(files: Any, token: str = "") -> SecuritySettings:
    return SecuritySettings(
        internal_token_file=token,
        internal_tls_ca=files.ca,
        internal_tls_cert=files.cert,
        internal_tls_key=files.key,
    )


async def test_mtls_refuses_a_caller_without_a_client_certificate(
    tmp_path: Path, certificates: Any
) -> None:
    token = _token_file(tmp_path)
    shard = _mtls(certificates.issue("shard"), token)
    async with _shard_server(shard) as address:
        # the right token but no client certificate: the handshake fails
        ca = certificates.ca.cert_pem.bytes()
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        async with grpc.aio.secure_channel(address, creds) as no_cert:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await _stats(no_cert, metadata=((internal.TOKEN_HEADER, TOKEN),))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        # a certificate of another CA: refused as well
        stranger = _mtls(certificates.issue("stranger", ca=type(certificates.ca)()), token)
        stranger = SecuritySettings(
            internal_token_file=token,
            internal_tls_ca=certificates.ca_file,
            internal_tls_cert=stranger.internal_tls_cert,
            internal_tls_key=stranger.internal_tls_key,
        )
        async with internal.aio_channel(address, security=stranger) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as other_ca:
                await _stats(channel)
            assert other_ca.value.code() == grpc.StatusCode.UNAVAILABLE
        # plaintext: refused
        async with grpc.aio.insecure_channel(address) as plain:
            with pytest.raises(grpc.aio.AioRpcError):
                await _stats(plain, metadata=((internal.TOKEN_HEADER, TOKEN),))
        # its own certificate but no token: UNAUTHENTICATED
        caller = certificates.issue("gateway")
        async with internal.aio_channel(address, security=_mtls(caller)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as tokenless:
                await _stats(channel)
            assert tokenless.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
        # certificate and token: served, on both kinds of channel
        async with internal.aio_channel(address, security=_mtls(caller, token)) as channel:
            assert (await _stats(channel)).shard_id == 7
        assert await asyncio.to_thread(_sync_stats, address, _mtls(caller, token)) == 7


def test_mtls_files_are_checked_naming_the_variable(certificates: Any) -> None:
    a, b = certificates.issue("a"), certificates.issue("b")
    mismatched = SecuritySettings(
        internal_tls_ca=a.ca, internal_tls_cert=a.cert, internal_tls_key=b.key
    )
    with pytest.raises(TlsError, match="ENGRAM_INTERNAL_TLS_KEY=.* does not match"):
        internal.channel_credentials(mismatched)
    missing = SecuritySettings(
        internal_tls_ca=a.ca + ".gone", internal_tls_cert=a.cert, internal_tls_key=a.key
    )
    with pytest.raises(TlsError, match="ENGRAM_INTERNAL_TLS_CA=.*no such file"):
        internal.channel_credentials(missing)


# --------------------------------------------------------------------------- real clusters


@pytest.mark.cluster
async def test_a_move_between_shards_with_mtls_and_the_token(
    make_cluster: Any, certificates: Any, traffic: Any
) -> None:
    files = certificates.issue("services")
    env = {
        "ENGRAM_INTERNAL_TLS_CA": files.ca,
        "ENGRAM_INTERNAL_TLS_CERT": files.cert,
        "ENGRAM_INTERNAL_TLS_KEY": files.key,
        "ENGRAM_CANARY_INTERVAL_S": "0",
    }
    cluster = make_cluster(shards=2, env=env, internal_token=True)
    mode, token = _mode_and_text(cluster.security.token_file)
    assert mode == 0o600
    assert len(token.strip()) == 43  # 32 bytes, URL-safe base64
    sec = cluster.security.internal
    addresses = {i: cluster.shard_address(i) for i in range(2)}
    # neither a plain caller nor one with a certificate but no token gets an answer
    assert await shard_stats(addresses) == {}
    assert await shard_stats(addresses, _mtls(files)) == {}
    space = "sec-move-space"
    async with grpc.aio.insecure_channel(cluster.gateway_address) as gateway:
        before = await traffic.write(gateway, space, 5, tag="before")
        owner = spaces_of(await shard_stats(addresses, sec))[space].owner
        # the target shard pulls the space from the source: a call among shards
        result = await move_space(addresses, space, 1 - owner, security=sec)
        assert result.target == 1 - owner
        assert spaces_of(await shard_stats(addresses, sec))[space].owner == 1 - owner
        after = await traffic.write(gateway, space, 3, tag="after")
        assert sorted(await traffic.list_ids(gateway, space)) == sorted(before + after)
        # the new owner's recall port (the gateway's recalls go there) asks for both as well
        recall_port = cluster.shard_recall_address(1 - owner)
        req = ipb.ShardRecallRequest(
            memory_space_id=space, recall=pb.RecallRequest(cue=[1.0] * 8, k=3)
        )
        for security, code in ((_mtls(files), grpc.StatusCode.UNAUTHENTICATED), (sec, None)):
            async with internal.aio_channel(recall_port, security=security) as channel:
                try:
                    chunks = [c async for c in shard_pb2_grpc.ShardStub(channel).Recall(req)]
                    assert code is None and len(chunks[-1].results) == 3, chunks
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == code, exc
        stub = streaming_pb2_grpc.EngramStreamStub(gateway)
        cue = pb.StreamingRecallRequest(memory_space_id=space, cue=[1.0] * 8, max_results=4)
        answer = [c async for c in stub.RecallStream(cue, timeout=30)]
        assert len(answer[-1].results) == 4


@pytest.mark.cluster
async def test_status_and_move_cli_find_the_token_in_the_data_dir(
    make_cluster: Any, admin_key: tuple[Path, str], traffic: Any, engram_cli: Any
) -> None:
    keys_file, api_key = admin_key
    cluster = make_cluster(shards=2, env={"ENGRAM_CANARY_INTERVAL_S": "0"}, keys_file=keys_file)
    assert cluster.security.token_file  # auth on: the shards' secret is on
    sec = cluster.security.internal
    addresses = {i: cluster.shard_address(i) for i in range(2)}
    # a tool without the token is refused by the shards
    assert await shard_stats(addresses) == {}
    space = "sec-cli-space"
    auth = (("authorization", f"Bearer {api_key}"),)
    async with grpc.aio.insecure_channel(cluster.gateway_address) as gateway:
        acked = await traffic.write(gateway, space, 2, metadata=auth)
        owner = spaces_of(await shard_stats(addresses, sec))[space].owner
        # engram status and engram move, with nothing but the data directory
        code, out = await engram_cli("status", "--json", "--data-dir", cluster.data_dir)
        status = json.loads(out)
        assert code == 0 and status["healthy"] and status["auth"] is True, status
        assert status["spaces"][space]["owner"] == f"shard-{owner}"
        code, out = await engram_cli(
            "move", space, "--to", f"shard-{1 - owner}", "--data-dir", cluster.data_dir, "--quiet"
        )
        assert code == 0, out
        assert spaces_of(await shard_stats(addresses, sec))[space].owner == 1 - owner
        assert sorted(await traffic.list_ids(gateway, space, metadata=auth)) == sorted(acked)
