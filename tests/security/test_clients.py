"""The Python client with API keys and TLS.

Against a fake gateway in this process (a grpc.aio server recording every call's metadata):
the key travels as ``authorization: Bearer`` on every call, TLS trusts the CA it is given (a
trustme CA) and no other, and refusals come back as the client's typed errors (a rate-limited
batch is resent after its retry-after, an unauthenticated stream fails at once instead of
reconnecting). Against a real cluster (``cluster`` tests): the gateway's authentication and TLS
listener seen through the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import trustme

from engram.v1 import streaming_pb2 as pb
from engram.v1 import streaming_pb2_grpc
from engram_client import (
    TLS,
    AuthenticationError,
    EngramClient,
    PermissionDeniedError,
    RateLimitedError,
    StreamEvent,
)
from engram_client.errors import RETRY_AFTER_KEY, UnavailableError

KEY = "ek_0123456789ab_" + "A" * 43
CUE = np.ones(4, dtype=np.float32)


@dataclass
class _Refusal:
    status: grpc.StatusCode
    details: str
    trailing: tuple[tuple[str, str], ...] = ()


@dataclass
class _Gateway(streaming_pb2_grpc.EngramStreamServicer):
    """Records the metadata of every call; refuses calls with ``refusal`` when set; refuses the
    first try of every batch with ``batch_error`` when set."""

    metadata: list[dict[str, str]] = field(default_factory=list)
    refusal: _Refusal | None = None
    batch_error: pb.StreamError | None = None
    batches: list[int] = field(default_factory=list)

    async def _admit(self, context: grpc.aio.ServicerContext) -> None:
        self.metadata.append({k: v for k, v in context.invocation_metadata() or ()})
        if self.refusal is not None:
            context.set_trailing_metadata(self.refusal.trailing)
            await context.abort(self.refusal.status, self.refusal.details)

    async def RecallStream(
        self, request: pb.StreamingRecallRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamingRecallResponse]:
        await self._admit(context)
        yield pb.StreamingRecallResponse(
            results=[pb.Memory(id="m-1", score=0.5)], snapshot_sequence=7
        )

    async def ListObservations(
        self, request: pb.ListObservationsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ListObservationsResponse]:
        await self._admit(context)
        yield pb.ListObservationsResponse(ids=["m-1"], lsns=[1])

    async def ObserveStream(
        self,
        request_iterator: AsyncIterator[pb.ObservationRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ObservationResponse]:
        await self._admit(context)
        async for req in request_iterator:
            if req.HasField("init"):
                ack = pb.StreamInitAck(session_id="s-1", max_in_flight_batches=4)
                yield pb.ObservationResponse(init_ack=ack)
            elif req.HasField("batch"):
                seq = req.sequence_number
                first_try = seq not in self.batches
                self.batches.append(seq)
                if self.batch_error is not None and first_try:
                    yield pb.ObservationResponse(sequence_number=seq, error=self.batch_error)
                    continue
                ack = pb.ObservationAck(status=pb.ObservationAck.ACCEPTED, count=1, first_lsn=seq)
                yield pb.ObservationResponse(sequence_number=seq, ack=ack)
            elif req.HasField("close"):
                return


@contextlib.asynccontextmanager
async def _serve(
    gateway: _Gateway, creds: grpc.ServerCredentials | None = None
) -> AsyncIterator[str]:
    server = grpc.aio.server()
    streaming_pb2_grpc.add_EngramStreamServicer_to_server(gateway, server)
    if creds is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


def _server_creds(ca: trustme.CA, *, client_ca: trustme.CA | None = None) -> grpc.ServerCredentials:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    pair = (cert.private_key_pem.bytes(), cert.cert_chain_pems[0].bytes())
    if client_ca is None:
        return grpc.ssl_server_credentials([pair])
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca.cert_pem.bytes(), require_client_auth=True
    )


# ------------------------------------------------------------------------------ the key


async def test_the_key_goes_with_every_call() -> None:
    gw = _Gateway()
    async with _serve(gw) as address, EngramClient(address, api_key=KEY) as client:
        r = await client.recall("team-a-1", CUE, k=1)
        stream = await client.open_stream("team-a-1")
        await (await stream.send(np.ones((1, 4), dtype=np.float32)))
        await stream.close()
    assert [h.id for h in r.hits] == ["m-1"]
    assert len(gw.metadata) == 2  # RecallStream, ObserveStream
    assert all(md.get("authorization") == f"Bearer {KEY}" for md in gw.metadata), gw.metadata


async def test_no_key_no_header() -> None:
    gw = _Gateway()
    async with _serve(gw) as address, EngramClient(address) as client:
        await client.recall("team-a-1", CUE, k=1)
    assert "authorization" not in gw.metadata[0]


async def test_the_key_goes_on_a_channel_of_ones_own() -> None:
    gw = _Gateway()
    async with _serve(gw) as address, grpc.aio.insecure_channel(address) as channel:
        client = EngramClient(address, api_key=KEY, channel=channel)
        await client.recall("team-a-1", CUE, k=1)
        await client.close()  # leaves the caller's channel open
        await client.stub.RecallStream(pb.StreamingRecallRequest()).read()
    assert [md.get("authorization") for md in gw.metadata] == [f"Bearer {KEY}"] * 2


@pytest.mark.parametrize("bad", ["", " ek_x", "ek x", "ek_x\n"])
def test_a_key_that_cannot_travel_in_a_header_is_refused_at_once(bad: str) -> None:
    with pytest.raises(ValueError, match="api_key"):
        EngramClient("127.0.0.1:1", api_key=bad)


# ------------------------------------------------------------------------------ TLS


async def test_tls_with_the_ca_it_is_given(ca: trustme.CA, ca_file: Path) -> None:
    gw = _Gateway()
    async with _serve(gw, _server_creds(ca)) as address:
        tls = TLS.from_files(ca_file=ca_file)
        async with EngramClient(address, api_key=KEY, tls=tls) as client:
            r = await client.recall("team-a-1", CUE, k=1)
    assert r.snapshot_sequence == 7
    assert gw.metadata[0]["authorization"] == f"Bearer {KEY}"


async def test_tls_refuses_a_server_its_ca_did_not_sign(ca: trustme.CA, tmp_path: Path) -> None:
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    gw = _Gateway()
    async with _serve(gw, _server_creds(ca)) as address:
        for tls in (TLS.from_files(ca_file=other), True):  # another CA; the system's CAs
            async with EngramClient(address, api_key=KEY, tls=tls) as client:
                with pytest.raises(UnavailableError):
                    await client.recall("team-a-1", CUE, k=1, timeout=5)
        async with EngramClient(address, api_key=KEY) as plaintext:
            with pytest.raises(UnavailableError):
                await plaintext.recall("team-a-1", CUE, k=1, timeout=5)
    assert gw.metadata == []  # the key never reached a server the client did not trust


async def test_mutual_tls_with_a_client_certificate(
    ca: trustme.CA, ca_file: Path, tmp_path: Path
) -> None:
    client_ca = trustme.CA()
    leaf = client_ca.issue_cert("engram-client")
    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    gw = _Gateway()
    async with _serve(gw, _server_creds(ca, client_ca=client_ca)) as address:
        tls = TLS.from_files(ca_file=ca_file, cert_file=cert, key_file=key)
        async with EngramClient(address, tls=tls) as client:
            assert (await client.recall("team-a-1", CUE, k=1)).snapshot_sequence == 7
        async with EngramClient(address, tls=TLS.from_files(ca_file=ca_file)) as anonymous:
            with pytest.raises(UnavailableError):
                await anonymous.recall("team-a-1", CUE, k=1, timeout=5)


def test_tls_settings_are_checked_when_made(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="CA file"):
        TLS.from_files(ca_file=tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="go together"):
        TLS(certificate_chain=b"x")
    with pytest.raises(ValueError, match="not both"):
        EngramClient("127.0.0.1:1", tls=True, channel=object())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------ typed errors


@pytest.mark.parametrize(
    ("refusal", "expected"),
    [
        (
            _Refusal(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED: unknown API key"),
            AuthenticationError,
        ),
        # a status alone (a proxy, or a refusal before the gateway's handlers) is typed too
        (_Refusal(grpc.StatusCode.UNAUTHENTICATED, "no key"), AuthenticationError),
        (
            _Refusal(grpc.StatusCode.PERMISSION_DENIED, "the key does not cover team-b-1"),
            PermissionDeniedError,
        ),
    ],
)
async def test_refusals_are_typed(refusal: _Refusal, expected: type[Exception]) -> None:
    gw = _Gateway(refusal=refusal)
    async with _serve(gw) as address, EngramClient(address, api_key=KEY) as client:
        with pytest.raises(expected) as recall:
            await client.recall("team-b-1", CUE, k=1)
        assert not recall.value.retryable  # type: ignore[attr-defined]
        with pytest.raises(expected):
            await client.list_ids("team-b-1")
        # a stream refused so fails at once: reconnecting would not help
        events: list[StreamEvent] = []
        with pytest.raises(expected):
            await asyncio.wait_for(
                client.open_stream("team-b-1", on_event=events.append, reconnect_timeout_s=60),
                timeout=10,
            )
        assert not [e for e in events if e.kind == "disconnected"], events


@pytest.mark.parametrize(
    "refusal",
    [
        _Refusal(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED: key 0123456789ab is over its limit of 5 recalls/s",
            ((RETRY_AFTER_KEY, "250"),),
        ),
        _Refusal(  # the wait named in the message only
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "RATE_LIMITED: key 0123456789ab is over its limit of 5 recalls/s on this gateway: "
            "retry after 250 ms",
        ),
    ],
)
async def test_a_rate_limited_recall_says_when_to_come_back(refusal: _Refusal) -> None:
    async with _serve(_Gateway(refusal=refusal)) as address:
        async with EngramClient(address, api_key=KEY) as client:
            with pytest.raises(RateLimitedError) as err:
                await client.recall("team-a-1", CUE, k=1)
    assert err.value.retryable and err.value.retry_after_ms == 250


async def test_a_rate_limited_batch_is_resent_after_its_retry_after() -> None:
    gw = _Gateway(
        batch_error=pb.StreamError(
            code=pb.RATE_LIMITED, message="over the key's limit", retryable=True, retry_after_ms=50
        )
    )
    events: list[StreamEvent] = []
    async with _serve(gw) as address, EngramClient(address, api_key=KEY) as client:
        stream = await client.open_stream("team-a-1", on_event=events.append)
        ack = await (await stream.send(np.ones((1, 4), dtype=np.float32)))
        await stream.close()
    assert ack.sequence_number == 1 and not ack.duplicate
    assert gw.batches == [1, 1]  # refused once, resent with the same number
    assert [e.kind for e in events].count("rejected") == 1
    assert [e.kind for e in events].count("disconnected") == 0  # no reconnect for it


async def test_a_revoked_key_ends_the_stream_with_the_typed_error() -> None:
    gw = _Gateway(
        batch_error=pb.StreamError(code=pb.UNAUTHENTICATED, message="the key was revoked")
    )
    async with _serve(gw) as address, EngramClient(address, api_key=KEY) as client:
        stream = await client.open_stream("team-a-1")
        fut = await stream.send(np.ones((1, 4), dtype=np.float32))
        with pytest.raises(AuthenticationError):
            await asyncio.wait_for(fut, timeout=10)


# ------------------------------------------------------------------------------ a real cluster


@dataclass(frozen=True)
class _Secured:
    """A cluster asking for keys and serving TLS, with a key for team-a-* and one for team-b-*."""

    target: str
    ca: str
    team_a: str
    team_b: str


@pytest.fixture
def secured(make_cluster: Any, certificates: Any, tmp_path: Path) -> _Secured:
    from engram.common import keys

    made = {
        team: keys.create_key(
            [keys.parse_scope(f"write:{team}-*"), keys.parse_scope(f"read:{team}-*")], name=team
        )
        for team in ("team-a", "team-b")
    }
    keys_file = tmp_path / "keys.json"
    keys.save_keys(keys_file, {entry.id: entry for _, entry in made.values()})
    leaf = certificates.issue("gateway")
    cluster = make_cluster(shards=1, keys_file=keys_file, tls=(leaf.cert, leaf.key), tls_ca=leaf.ca)
    return _Secured(cluster.gateway_address, leaf.ca, made["team-a"][0], made["team-b"][0])


async def test_a_secured_cluster_through_the_client(secured: _Secured, space_id: str) -> None:
    space = f"team-a-{space_id}"[:64]
    tls = TLS.from_files(ca_file=secured.ca)
    vectors = np.random.default_rng(1).standard_normal((20, 8)).astype(np.float32)
    async with EngramClient(secured.target, api_key=secured.team_a, tls=tls) as client:
        stream = await client.open_stream(space)
        await (await stream.send(vectors, ids=[f"o{i}" for i in range(20)]))
        hits = await stream.recall(vectors[3], k=1, consistency="SESSION")
        await stream.close()
        assert [h.id for h in hits.hits] == ["o3"]
        assert sorted(await client.list_ids(space)) == sorted(f"o{i}" for i in range(20))

    async with EngramClient(secured.target, api_key=secured.team_b, tls=tls) as other:
        with pytest.raises(PermissionDeniedError, match=space):
            await other.recall(space, vectors[3], k=1)
        with pytest.raises(PermissionDeniedError):
            await asyncio.wait_for(other.open_stream(space), timeout=10)

    wrong = "ek_0123456789ab_" + "B" * 43
    async with EngramClient(secured.target, api_key=wrong, tls=tls) as stranger:
        with pytest.raises(AuthenticationError):
            await stranger.recall(space, vectors[3], k=1)
        with pytest.raises(AuthenticationError):
            await asyncio.wait_for(stranger.open_stream(space, reconnect_timeout_s=60), 10)
    async with EngramClient(secured.target, tls=tls) as keyless:
        with pytest.raises(AuthenticationError):
            await keyless.list_ids(space)
    async with EngramClient(secured.target, api_key=secured.team_a) as plaintext:
        with pytest.raises(UnavailableError):
            await plaintext.recall(space, vectors[3], k=1, timeout=5)


async def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "engram.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**{k: v for k, v in os.environ.items() if k != "ENGRAM_API_KEY"}, **(env or {})},
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_demo_and_recall_commands_with_a_key_and_a_ca(
    secured: _Secured, space_id: str
) -> None:
    prefix = f"team-a-{space_id}"[:50]
    rc, out = await _cli(
        "demo", "--target", secured.target, "--api-key", secured.team_a, "--ca", secured.ca,
        "--spaces", "1", "--count", "300", "--dim", "8", "--batch", "100", "--prefix", prefix,
        "--verify",
    )  # fmt: skip
    assert rc == 0 and "verify OK" in out, out
    recall = ["recall", "--target", secured.target, "--ca", secured.ca, "--space", f"{prefix}-0"]
    recall += ["--random", "--dim", "8", "--k", "3"]
    rc, out = await _cli(*recall, env={"ENGRAM_API_KEY": secured.team_a})  # the key's default
    assert rc == 0 and out.count(" lsn ") == 3, out
    rc, out = await _cli(*recall, env={"ENGRAM_API_KEY": secured.team_b})
    assert rc == 1 and "PERMISSION_DENIED" in out, out
    rc, out = await _cli(*recall)  # no key at all
    assert rc == 1 and "UNAUTHENTICATED" in out, out
