"""API keys at a real gateway (gRPC and WebSocket): who is refused, what a key may touch, the
per-key limits, reloads of the keys file and the audit lines.

One cluster for the module, started with ``ENGRAM_KEYS_FILE`` pointing at a keys file written
by :mod:`engram.common.keys`. Tenant ``a`` owns the memory spaces ``ta-*``, tenant ``b`` the
``tb-*`` ones; each test uses spaces of its own. Clients are the raw generated gRPC stubs and a
raw ``websockets`` client, so what is checked is the wire.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from engram.common import keys
from engram.launcher.cluster import LocalCluster
from engram.v1 import streaming_pb2 as pb
from engram.v1 import streaming_pb2_grpc

pytestmark = pytest.mark.cluster

TIMEOUT_S = 15.0
PREAUTH_MAX_BYTES = 2048
AUTH_TIMEOUT_S = 1.5
DIM = 8

# role -> scopes (and options) of the keys made for the module
ROLES: dict[str, dict[str, Any]] = {
    "a": {"scopes": ["read:ta-*", "write:ta-*"]},
    "a_write_only": {"scopes": ["write:ta-*"]},
    "a_read_only": {"scopes": ["read:ta-*"]},
    "b": {"scopes": ["read:tb-*", "write:tb-*"]},
    "a_admin": {"scopes": ["admin:ta-*"]},
    "expired": {"scopes": ["admin:*"], "expires": dt.datetime(2020, 1, 1, tzinfo=dt.UTC)},
    "to_revoke": {"scopes": ["read:ta-*", "write:ta-*"]},
    "limited": {
        "scopes": ["read:tl-*", "write:tl-*"],
        "max_observations_per_s": 20,
        "max_recalls_per_s": 1,
    },
}


@dataclass
class Keyed:
    cluster: LocalCluster
    keys_file: Path
    plain: dict[str, str]  # role -> the key
    ids: dict[str, str]  # role -> key id

    def gateway_log(self) -> str:
        return self.cluster.log_path("gateway").read_text(errors="replace")


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Keyed]:
    root = tmp_path_factory.mktemp("auth")
    keys_file = root / "keys.json"
    entries: dict[str, keys.KeyEntry] = {}
    plain, ids = {}, {}
    for role, spec in ROLES.items():
        key, entry = keys.create_key(
            [keys.parse_scope(s) for s in spec["scopes"]],
            name=role,
            expires=spec.get("expires"),
            max_observations_per_s=spec.get("max_observations_per_s", 0),
            max_recalls_per_s=spec.get("max_recalls_per_s", 0),
        )
        entries[entry.id] = entry
        plain[role], ids[role] = key, entry.id
    keys.save_keys(keys_file, entries)
    cluster = LocalCluster(
        root / "cluster",
        shards=1,
        env={
            "ENGRAM_KEYS_FILE": str(keys_file),
            "ENGRAM_KEYS_RELOAD_S": "0.1",
            "ENGRAM_AUTH_TIMEOUT_S": str(AUTH_TIMEOUT_S),
            "ENGRAM_PREAUTH_MAX_BYTES": str(PREAUTH_MAX_BYTES),
        },
    )
    cluster.start()
    try:
        yield Keyed(cluster, keys_file, plain, ids)
    finally:
        cluster.stop()


def space(tenant: str) -> str:
    return f"t{tenant}-{uuid.uuid4().hex[:16]}"


def vectors(n: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype("<f4")
    return v


def batch(n: int, seed: int = 0) -> pb.ObservationBatch:
    return pb.ObservationBatch(dim=DIM, vectors=vectors(n, seed).tobytes())


def _altered(key: str) -> str:
    """``key`` with its last character changed: well-formed, never accepted."""
    return key[:-1] + ("A" if not key.endswith("A") else "B")


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


# ------------------------------------------------------------------------------ gRPC helpers


@pytest.fixture
async def stub(keyed: Keyed) -> AsyncIterator[streaming_pb2_grpc.EngramStreamStub]:
    async with grpc.aio.insecure_channel(keyed.cluster.gateway_address) as channel:
        yield streaming_pb2_grpc.EngramStreamStub(channel)


async def read(call: grpc.aio.StreamStreamCall) -> pb.ObservationResponse:
    resp = await asyncio.wait_for(call.read(), TIMEOUT_S)
    assert resp is not grpc.aio.EOF, "the gateway ended the stream"
    return resp


async def read_until(call: grpc.aio.StreamStreamCall, kind: str) -> pb.ObservationResponse:
    while True:
        resp = await read(call)
        if resp.WhichOneof("result") == kind:
            return resp
        assert resp.WhichOneof("result") == "status", f"expected {kind}, got {resp}"


async def ended_with(call: grpc.aio.StreamStreamCall) -> grpc.aio.AioRpcError:
    """The error that ends ``call`` (every response before it must be a status)."""
    with pytest.raises(grpc.aio.AioRpcError) as info:
        while True:
            resp = await asyncio.wait_for(call.read(), TIMEOUT_S)
            assert resp is not grpc.aio.EOF, "the stream ended without an error"
            assert resp.WhichOneof("result") == "status", resp
    return info.value


async def open_stream(
    stub: streaming_pb2_grpc.EngramStreamStub, key: str, space_id: str
) -> tuple[grpc.aio.StreamStreamCall, pb.StreamInitAck]:
    call = stub.ObserveStream(metadata=bearer(key))
    await call.write(pb.ObservationRequest(memory_space_id=space_id, init=pb.StreamInit()))
    resp = await read_until(call, "init_ack")
    return call, resp.init_ack


async def recall_call_error(
    stub: streaming_pb2_grpc.EngramStreamStub, key: str | None, space_id: str
) -> grpc.aio.AioRpcError:
    request = pb.StreamingRecallRequest(memory_space_id=space_id, cue=[1.0] * DIM, max_results=3)
    call = stub.RecallStream(request, metadata=bearer(key) if key else None)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    return info.value


# ------------------------------------------------------------------------------ gRPC


async def test_grpc_refuses_no_key_wrong_key_and_expired_key(keyed: Keyed, stub) -> None:  # type: ignore[no-untyped-def]
    s = space("a")
    err = await recall_call_error(stub, None, s)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "required" in err.details()
    listing = stub.ListObservations(pb.ListObservationsRequest(memory_space_id=s))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in listing:
            pass
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED

    good = keyed.plain["a"]
    wrong = good[:-4] + ("AAAA" if not good.endswith("AAAA") else "BBBB")
    for key, words in (
        (wrong, "is not known"),
        ("sk-nonsense", "not of the form"),
        (keyed.plain["expired"], "expired"),
    ):
        call = stub.ObserveStream(metadata=bearer(key))  # refused before any message is read
        err = await ended_with(call)
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err
        assert words in err.details() and key not in err.details()

    call = stub.ObserveStream()  # no metadata key: the first message must be a keyed init
    await call.write(pb.ObservationRequest(sequence_number=1, batch=batch(1)))
    err = await ended_with(call)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "api_key" in err.details()


async def test_grpc_init_api_key_authenticates_without_metadata(keyed: Keyed, stub) -> None:  # type: ignore[no-untyped-def]
    s = space("a")
    call = stub.ObserveStream()
    init = pb.StreamInit(api_key=keyed.plain["a"])
    await call.write(pb.ObservationRequest(memory_space_id=s, init=init))
    await read_until(call, "init_ack")
    await call.write(pb.ObservationRequest(sequence_number=1, batch=batch(3)))
    ack = await read_until(call, "ack")
    assert ack.ack.status == pb.ObservationAck.ACCEPTED and ack.ack.count == 3
    await call.done_writing()

    call = stub.ObserveStream()
    init = pb.StreamInit(api_key=keyed.plain["b"])  # a valid key, but not for ta-*
    await call.write(pb.ObservationRequest(memory_space_id=s, init=init))
    err = await read_until(call, "error")
    assert err.error.code == pb.PERMISSION_DENIED and s in err.error.message
    call.cancel()


async def test_grpc_oversized_message_before_auth_is_refused(keyed: Keyed, stub) -> None:  # type: ignore[no-untyped-def]
    call = stub.ObserveStream()
    big = pb.ObservationRequest(
        memory_space_id=space("a"),
        session_id="s-" + "x" * (2 * PREAUTH_MAX_BYTES),
        init=pb.StreamInit(api_key=keyed.plain["a"]),
    )
    await call.write(big)
    err = await ended_with(call)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert f"the limit is {PREAUTH_MAX_BYTES} bytes" in err.details()


async def test_scopes_are_checked_in_band_and_the_stream_goes_on(keyed: Keyed, stub) -> None:  # type: ignore[no-untyped-def]
    s = space("a")
    call, _ = await open_stream(stub, keyed.plain["a_write_only"], s)
    await call.write(pb.ObservationRequest(sequence_number=1, batch=batch(2)))
    assert (await read_until(call, "ack")).ack.status == pb.ObservationAck.ACCEPTED
    recall = pb.RecallRequest(request_id="r1", cue=[1.0] * DIM, k=2)
    await call.write(pb.ObservationRequest(recall=recall))
    err = await read_until(call, "error")
    assert err.error.code == pb.PERMISSION_DENIED and err.error.request_id == "r1"
    assert "'read'" in err.error.message and s in err.error.message
    await call.write(pb.ObservationRequest(sequence_number=2, batch=batch(2, seed=1)))
    ack = await read_until(call, "ack")
    assert ack.sequence_number == 2 and ack.ack.status == pb.ObservationAck.ACCEPTED
    await call.done_writing()

    call, _ = await open_stream(stub, keyed.plain["a_read_only"], s)
    await call.write(pb.ObservationRequest(sequence_number=3, batch=batch(1)))
    err = await read_until(call, "error")
    assert err.error.code == pb.PERMISSION_DENIED and err.sequence_number == 3
    assert "'write'" in err.error.message
    await call.write(
        pb.ObservationRequest(recall=pb.RecallRequest(request_id="r2", cue=[1.0] * DIM, k=2))
    )
    result = await read_until(call, "recall")
    assert result.recall.request_id == "r2" and len(result.recall.results) == 2
    await call.done_writing()


async def test_another_tenants_space_and_session_are_refused(keyed: Keyed, stub) -> None:  # type: ignore[no-untyped-def]
    sa, sb = space("a"), space("b")
    call, ack = await open_stream(stub, keyed.plain["a"], sa)
    await call.write(pb.ObservationRequest(sequence_number=1, batch=batch(2)))
    await read_until(call, "ack")
    await call.done_writing()
    session_a = ack.session_id

    call = stub.ObserveStream(metadata=bearer(keyed.plain["b"]))
    await call.write(pb.ObservationRequest(memory_space_id=sa, init=pb.StreamInit()))
    err = await read_until(call, "error")
    assert err.error.code == pb.PERMISSION_DENIED and sa in err.error.message
    for resume in (
        pb.ObservationRequest(session_id=session_a, init=pb.StreamInit()),
        pb.ObservationRequest(session_id=session_a, memory_space_id=sb, init=pb.StreamInit()),
    ):
        await call.write(resume)
        err = await read_until(call, "error")
        assert err.error.code == pb.PERMISSION_DENIED, err
        assert sa not in err.error.message, "the other tenant's space is named"
    # the stream is still usable: it may init again, for a space of its own
    await call.write(pb.ObservationRequest(memory_space_id=sb, init=pb.StreamInit()))
    await read_until(call, "init_ack")
    await call.done_writing()

    err = await recall_call_error(stub, keyed.plain["b"], sa)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED and sa in err.details()
    listing = stub.ListObservations(
        pb.ListObservationsRequest(memory_space_id=sa), metadata=bearer(keyed.plain["b"])
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in listing:
            pass
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_a_read_key_cannot_delete_and_a_write_key_cannot_drop(keyed: Keyed, stub) -> None:  # type: ignore[no-untyped-def]
    s = space("a")
    call, _ = await open_stream(stub, keyed.plain["a"], s)
    await call.write(pb.ObservationRequest(sequence_number=1, batch=batch(2)))
    assert (await read_until(call, "ack")).ack.count == 2
    await call.done_writing()

    async def refused(role: str, method: str, request: Any) -> str:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await getattr(stub, method)(request, metadata=bearer(keyed.plain[role]), timeout=10)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED, info.value
        return info.value.details() or ""

    delete = pb.DeleteRequest(memory_space_id=s, since_us=0)
    assert "no 'write' scope" in await refused("a_read_only", "Delete", delete)
    assert "no 'write' scope" in await refused("b", "Delete", delete)  # another tenant's space
    drop = pb.DropSpaceRequest(memory_space_id=s)
    assert "no 'admin' scope" in await refused("a", "DropSpace", drop)
    retention = pb.SetRetentionRequest(memory_space_id=s, retention=pb.Retention(max_rows=1))
    assert "no 'admin' scope" in await refused("a", "SetRetention", retention)

    read_call, _ = await open_stream(stub, keyed.plain["a_read_only"], s)  # in-band on a stream
    await read_call.write(pb.ObservationRequest(delete=pb.DeleteRequest(request_id="d", ids=["x"])))
    err = (await read_until(read_call, "error")).error
    assert (err.code, err.request_id) == (pb.PERMISSION_DENIED, "d")
    await read_call.done_writing()

    listing = stub.ListObservations(
        pb.ListObservationsRequest(memory_space_id=s), metadata=bearer(keyed.plain["a"])
    )
    assert sum([len(chunk.ids) async for chunk in listing]) == 2  # nothing was forgotten
    dropped = await stub.DropSpace(drop, metadata=bearer(keyed.plain["a_admin"]), timeout=30)
    assert dropped.observations == 2


async def test_revoked_key_is_refused_after_a_reload_without_restart(keyed: Keyed, stub) -> None:  # type: ignore[no-untyped-def]
    key, key_id = keyed.plain["to_revoke"], keyed.ids["to_revoke"]
    s = space("a")
    call, _ = await open_stream(stub, key, s)
    await call.write(pb.ObservationRequest(sequence_number=1, batch=batch(2)))
    await read_until(call, "ack")

    keys.save_keys(keyed.keys_file, keys.revoke(keys.load_keys(keyed.keys_file), key_id))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT_S
    while True:  # the gateway reloads every 0.1 s; no restart
        request = pb.StreamingRecallRequest(memory_space_id=s, cue=[1.0] * DIM, max_results=1)
        try:
            async for _ in stub.RecallStream(request, metadata=bearer(key)):
                pass
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED, exc
            assert "revoked" in exc.details()
            break
        assert loop.time() < deadline, "the revoked key is still accepted"
        await asyncio.sleep(0.1)
    new = stub.ObserveStream(metadata=bearer(key))
    assert (await ended_with(new)).code() == grpc.StatusCode.UNAUTHENTICATED
    # the stream opened before the revocation ends at its next message
    await call.write(pb.ObservationRequest(sequence_number=2, batch=batch(2)))
    err = await ended_with(call)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.details()
    log = keyed.gateway_log()
    assert "audit event=keys_reloaded" in log and f"revoked={key_id}" in log


async def test_per_key_rate_limits(keyed: Keyed, stub) -> None:  # type: ignore[no-untyped-def]
    """``limited`` may send 20 observations/s and 1 recall/s; key ``a`` is not held back."""
    call, _ = await open_stream(stub, keyed.plain["limited"], space("l"))
    other, _ = await open_stream(stub, keyed.plain["a"], space("a"))
    await call.write(pb.ObservationRequest(sequence_number=1, batch=batch(20)))
    assert (await read_until(call, "ack")).ack.status == pb.ObservationAck.ACCEPTED
    await call.write(pb.ObservationRequest(sequence_number=2, batch=batch(20, seed=2)))
    refused = await read_until(call, "ack")
    assert refused.sequence_number == 2 and refused.ack.status == pb.ObservationAck.REJECTED
    assert refused.ack.retry_after_ms > 0 and "20 observations/s" in refused.ack.message

    for seq in (1, 2, 3):  # the other key is not limited by the first one's budget
        await other.write(pb.ObservationRequest(sequence_number=seq, batch=batch(20, seed=seq)))
        ack = await read_until(other, "ack")
        assert ack.ack.status == pb.ObservationAck.ACCEPTED, ack

    wait_ms = refused.ack.retry_after_ms
    for _ in range(5):  # after the wait it names, the same sequence number is taken
        await asyncio.sleep(wait_ms / 1000)
        await call.write(pb.ObservationRequest(sequence_number=2, batch=batch(20, seed=2)))
        ack = await read_until(call, "ack")
        assert ack.sequence_number == 2
        if ack.ack.status == pb.ObservationAck.ACCEPTED:
            break
        wait_ms = ack.ack.retry_after_ms
    else:
        pytest.fail("the batch was never accepted after waiting retry_after_ms")

    cue = [1.0] * DIM
    for rid in ("r1", "r2"):
        await call.write(
            pb.ObservationRequest(recall=pb.RecallRequest(request_id=rid, cue=cue, k=1))
        )
    answers = {}
    while len(answers) < 2:
        resp = await read(call)
        kind = resp.WhichOneof("result")
        if kind == "recall":
            answers[resp.recall.request_id] = resp
        elif kind == "error":
            answers[resp.error.request_id] = resp
    limited = [r for r in answers.values() if r.WhichOneof("result") == "error"]
    assert len(limited) == 1, answers
    assert limited[0].error.code == pb.RATE_LIMITED and limited[0].error.retry_after_ms > 0
    err = await recall_call_error(stub, keyed.plain["limited"], space("l"))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "recalls/s" in err.details()
    await call.done_writing()
    await other.done_writing()


# ------------------------------------------------------------------------------ WebSocket


def ws_url(keyed: Keyed) -> str:
    return f"ws://127.0.0.1:{keyed.cluster.http_port}/v1/stream"


@pytest.fixture
async def ws_open(keyed: Keyed) -> AsyncIterator[Any]:
    opened: list[ClientConnection] = []

    async def open_ws(key: str | None = None) -> ClientConnection:
        headers = {"Authorization": f"Bearer {key}"} if key else None
        conn = await connect(
            ws_url(keyed), additional_headers=headers, open_timeout=10, max_size=None
        )
        opened.append(conn)
        return conn

    try:
        yield open_ws
    finally:
        for conn in opened:
            await conn.close()


async def frame(conn: ClientConnection) -> dict[str, Any]:
    while True:
        data = await asyncio.wait_for(conn.recv(), TIMEOUT_S)
        got = json.loads(data)
        if got["type"] != "heartbeat":
            return got


async def closed(conn: ClientConnection) -> tuple[int | None, str | None, list[dict[str, Any]]]:
    frames = []
    async with asyncio.timeout(TIMEOUT_S):
        try:
            while True:
                frames.append(json.loads(await conn.recv()))
        except ConnectionClosed:
            pass
    return conn.close_code, conn.close_reason, frames


async def test_ws_header_key_is_checked_at_the_handshake(keyed: Keyed, ws_open) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(InvalidStatus) as info:
        await ws_open(keyed.plain["expired"])
    assert info.value.response.status_code == 401
    assert b"expired" in info.value.response.body

    conn = await ws_open(keyed.plain["a"])
    s = space("a")
    await conn.send(json.dumps({"type": "init", "memory_space_id": s}))
    assert (await frame(conn))["type"] == "init_ack"
    big = vectors(200).tolist()  # well over the limit before authentication
    await conn.send(json.dumps({"type": "batch", "sequence_number": 1, "vectors": big}))
    ack = await frame(conn)
    assert ack["type"] == "ack" and ack["status"] == "accepted" and ack["count"] == 200


async def test_ws_init_frame_key(keyed: Keyed, ws_open) -> None:  # type: ignore[no-untyped-def]
    conn = await ws_open()
    s = space("a")
    init = {"type": "init", "memory_space_id": s, "api_key": keyed.plain["a"]}
    await conn.send(json.dumps(init))
    assert (await frame(conn))["type"] == "init_ack"
    big = vectors(200).tolist()  # the frame limit was raised once the key was accepted
    await conn.send(json.dumps({"type": "batch", "sequence_number": 1, "vectors": big}))
    ack = await frame(conn)
    assert ack["type"] == "ack" and ack["status"] == "accepted", ack

    conn = await ws_open()
    await conn.send(json.dumps({**init, "api_key": _altered(keyed.plain["a"])}))
    code, reason, frames = await closed(conn)
    assert code == 1008, (code, reason)
    assert frames and frames[-1]["type"] == "error" and frames[-1]["code"] == "unauthenticated"

    conn = await ws_open()  # anything but an init before authentication
    await conn.send(json.dumps({"type": "batch", "sequence_number": 1, "vectors": [[1.0] * DIM]}))
    code, _, frames = await closed(conn)
    assert code == 1008 and frames[-1]["code"] == "unauthenticated"


async def test_ws_oversized_frame_before_auth_closes(keyed: Keyed, ws_open) -> None:  # type: ignore[no-untyped-def]
    conn = await ws_open()
    padding = "x" * (2 * PREAUTH_MAX_BYTES)
    await conn.send(
        json.dumps({"type": "init", "memory_space_id": padding[:10]} | {"pad": padding})
    )
    code, _, _ = await closed(conn)
    assert code == 1009


async def test_ws_auth_timeout(keyed: Keyed, ws_open) -> None:  # type: ignore[no-untyped-def]
    """A connection that only sends heartbeats (a slow loris) is closed at the deadline."""
    conn = await ws_open()

    async def beat() -> None:
        while True:
            await conn.send(json.dumps({"type": "heartbeat"}))
            await asyncio.sleep(0.2)

    beating = asyncio.create_task(beat())
    try:
        code, reason, _ = await closed(conn)
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
    assert code == 1008 and reason is not None and "not authenticated within" in reason


# ------------------------------------------------------------------------------ audit


async def test_audit_lines_name_the_failure_never_the_key(keyed: Keyed, stub, ws_open) -> None:  # type: ignore[no-untyped-def]
    wrong = _altered(keyed.plain["b"])
    err = await recall_call_error(stub, wrong, space("b"))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    await recall_call_error(stub, None, space("b"))
    with pytest.raises(InvalidStatus):
        await ws_open(keyed.plain["expired"])
    want = [
        "transport=grpc peer=ipv4:127.0.0.1:",
        f"key_id={keyed.ids['b']} reason=unknown",
        "key_id=- reason=missing",
        "transport=websocket peer=127.0.0.1:",
        f"key_id={keyed.ids['expired']} reason=expired",
    ]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT_S
    while True:
        lines = [x for x in keyed.gateway_log().splitlines() if "audit event=auth_failed" in x]
        missing = [w for w in want if not any(w in line for line in lines)]
        if not missing:
            break
        assert loop.time() < deadline, f"no audit line with {missing}: {lines}"
        await asyncio.sleep(0.1)
    log = keyed.gateway_log()
    for key in (*keyed.plain.values(), wrong):
        assert key not in log
        assert keys.key_hash(key) not in log
