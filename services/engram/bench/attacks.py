"""Attacks on a cluster with API keys and TLS on, and what each one got.

``python -m engram.bench.attacks [--json PATH] [--flood-seconds 10]`` starts a local cluster
that asks for keys and serves TLS (as ``engram bench --auth --tls`` does), makes keys for two
tenants and a few broken ones, tries each attack below over the real wire and prints a table:
the attack, the answer a safe server gives, what this one gave, and whether that is it. Then a
flood: one key pushes far beyond its observations/s limit while another key writes at a steady
rate, and the steady writer's acks are measured with and without the flood beside it.

Every row is an observation, not an assertion of this module: ``tests/security`` runs it and
checks that every row came out as expected.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import socket
import ssl
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import websockets
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engram.bench.access import own_cluster
from engram.common import keys, tls
from engram.internal.v1 import shard_pb2, shard_pb2_grpc
from engram.launcher.cluster import LocalCluster
from engram.v1 import streaming_pb2 as pb
from engram.v1 import streaming_pb2_grpc
from engram_client import TLS, EngramClient, StreamEvent

DIM = 16
AUTH_TIMEOUT_S = 2.0
FLOOD_LIMIT = 5_000  # observations/s of the flooding key
STEADY_RATE = 2_000  # observations/s of the measured key (batches of 100)
ENV = {"ENGRAM_AUTH_TIMEOUT_S": str(AUTH_TIMEOUT_S), "ENGRAM_KEYS_RELOAD_S": "0.5"}


@dataclass
class Row:
    attack: str
    expected: str
    got: str = ""
    ok: bool = False


@dataclass
class Target:
    grpc: str
    ws: str
    ca_file: str
    keys_file: Path
    shard: str
    keys: dict[str, str] = field(default_factory=dict)  # role -> plaintext key

    def channel(self, ca_file: str | None = None) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(self.grpc, tls.client_credentials(ca_file or self.ca_file))

    def ssl(self) -> ssl.SSLContext:
        return tls.client_ssl_context(self.ca_file)


def _vectors(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype("<f4").tobytes()


def _batch(n: int, seed: int = 0) -> pb.ObservationBatch:
    return pb.ObservationBatch(dim=DIM, vectors=_vectors(n, seed))


def _meta(key: str | None) -> tuple[tuple[str, str], ...] | None:
    return None if key is None else (("authorization", f"Bearer {key}"),)


def _code(exc: grpc.aio.AioRpcError) -> str:
    """A call's end as ``STATUS (the error code it names)``, or ``STATUS: details``."""
    details = exc.details() or ""
    code = details.split(":", 1)[0]
    return f"{exc.code().name} ({code})" if code.isupper() else f"{exc.code().name}: {details}"


async def _first(call: grpc.aio.StreamStreamCall, wait_s: float = 10.0) -> str:
    """What a stream answered first: a response kind, or the status that ended it."""
    try:
        resp = await asyncio.wait_for(call.read(), wait_s)
    except grpc.aio.AioRpcError as exc:
        return f"call ended {_code(exc)}"
    if resp is grpc.aio.EOF:
        return "stream ended without a status"
    kind = resp.WhichOneof("result")
    if kind == "error":
        return f"in-band {pb.ErrorCode.Name(resp.error.code)}"
    return kind


async def _stream(t: Target, key: str | None, *first: pb.ObservationRequest) -> str:
    async with t.channel() as ch:
        call = streaming_pb2_grpc.EngramStreamStub(ch).ObserveStream(metadata=_meta(key))
        for msg in first:
            await call.write(msg)
        got = await _first(call)
        call.cancel()
        return got


def _init(space: str, session: str = "", api_key: str = "") -> pb.ObservationRequest:
    return pb.ObservationRequest(
        memory_space_id=space, session_id=session, init=pb.StreamInit(api_key=api_key)
    )


# ---------------------------------------------------------------------------- the attacks


async def no_key(t: Target) -> str:
    return await _stream(t, None, _init("tenant-a-notes"))


async def malformed_key(t: Target) -> str:
    return await _stream(t, "hello", _init("tenant-a-notes"))


async def unknown_key(t: Target) -> str:
    forged, _ = keys.create_key([keys.parse_scope("write:*")])
    return await _stream(t, forged, _init("tenant-a-notes"))


async def revoked_key(t: Target) -> str:
    stored = keys.load_keys(t.keys_file)
    key_id = keys.key_id_of(t.keys["revoked"])
    assert key_id is not None
    before = await _stream(t, t.keys["revoked"], _init("tenant-a-notes"))
    keys.save_keys(t.keys_file, keys.revoke(stored, key_id))
    await asyncio.sleep(1.5)  # the gateway checks the file every 0.5 s here
    after = await _stream(t, t.keys["revoked"], _init("tenant-a-notes"))
    return f"before: {before}; 1.5 s after revoking: {after}"


async def expired_key(t: Target) -> str:
    return await _stream(t, t.keys["expired"], _init("tenant-a-notes"))


async def other_tenants_session(t: Target) -> str:
    async with t.channel() as ch:
        call = streaming_pb2_grpc.EngramStreamStub(ch).ObserveStream(metadata=_meta(t.keys["a"]))
        await call.write(_init("tenant-a-notes"))
        resp = await asyncio.wait_for(call.read(), 10)
        session = resp.init_ack.session_id
        call.cancel()
    return await _stream(t, t.keys["b"], _init("", session=session))


async def other_tenants_space_recall(t: Target) -> str:
    async with t.channel() as ch:
        stub = streaming_pb2_grpc.EngramStreamStub(ch)
        req = pb.StreamingRecallRequest(
            memory_space_id="tenant-a-notes", cue=[1.0] * DIM, max_results=5
        )
        try:
            async for _ in stub.RecallStream(req, metadata=_meta(t.keys["b"]), timeout=10):
                return "results"
        except grpc.aio.AioRpcError as exc:
            return f"call ended {_code(exc)}"
    return "no results, no error"


async def other_tenants_space_init(t: Target) -> str:
    """Tenant b inits on a's space, then on its own: the stream goes on."""
    async with t.channel() as ch:
        call = streaming_pb2_grpc.EngramStreamStub(ch).ObserveStream(metadata=_meta(t.keys["b"]))
        await call.write(_init("tenant-a-notes"))
        first = await _first(call)
        await call.write(_init("tenant-b-notes"))
        then = await _first(call)
        call.cancel()
    return f"{first}; then an init on its own space: {then}"


async def write_with_read_key(t: Target) -> str:
    async with t.channel() as ch:
        call = streaming_pb2_grpc.EngramStreamStub(ch).ObserveStream(
            metadata=_meta(t.keys["reader"])
        )
        await call.write(_init("tenant-a-notes"))
        opened = await _first(call)
        await call.write(pb.ObservationRequest(sequence_number=1, batch=_batch(10)))
        write = await _first(call)
        await call.write(
            pb.ObservationRequest(recall=pb.RecallRequest(request_id="r", cue=[1.0] * DIM, k=3))
        )
        recall = await _first(call)
        call.cancel()
    return f"{opened}; a batch: {write}; then a recall: {recall}"


async def oversized_before_auth_grpc(t: Target) -> str:
    blob = pb.ObservationRequest(memory_space_id="tenant-a-notes", batch=_batch(16_000))
    return f"{blob.ByteSize() // 1024} KiB first message: " + await _stream(t, None, blob)


async def _ws_close(conn: Any, wait_s: float) -> str:
    try:
        while True:
            await asyncio.wait_for(conn.recv(), wait_s)
    except websockets.ConnectionClosed as exc:
        rcvd = exc.rcvd
        return f"closed {rcvd.code} ({rcvd.reason})" if rcvd else "closed without a code"
    except TimeoutError:
        return f"still open after {wait_s:g} s"


async def oversized_before_auth_ws(t: Target) -> str:
    async with websockets.connect(t.ws, ssl=t.ssl(), max_size=None) as conn:
        await conn.send(b"\0" * (1 << 20))
        return "1 MiB frame before auth: " + await _ws_close(conn, 10)


async def ws_never_authenticates(t: Target) -> str:
    started = time.monotonic()
    async with websockets.connect(t.ws, ssl=t.ssl()) as conn:
        got = await _ws_close(conn, AUTH_TIMEOUT_S + 10)
    return f"{got} after {time.monotonic() - started:.1f} s"


async def slow_loris_ws(t: Target) -> str:
    """A WebSocket handshake sent one byte a second after TLS: how long the server waits."""
    host, port = t.ws.removeprefix("wss://").split("/", 1)[0].rsplit(":", 1)
    request = f"GET /v1/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n".encode()
    reader, writer = await asyncio.open_connection(host, int(port), ssl=t.ssl())
    started = time.monotonic()
    try:
        for i in range(len(request)):
            writer.write(request[i : i + 1])
            await writer.drain()
            with contextlib.suppress(TimeoutError):
                if await asyncio.wait_for(reader.read(1024), 1.0) == b"":
                    return (
                        f"connection closed by the server after {time.monotonic() - started:.0f} s"
                    )
        return f"still open after {time.monotonic() - started:.0f} s"
    except (ConnectionError, ssl.SSLError) as exc:
        return f"connection reset by the server after {time.monotonic() - started:.0f} s ({exc})"
    finally:
        writer.close()


async def _silent_tcp(address: str, label: str) -> str:
    """A TCP connection to a TLS port that never starts TLS: how long the server keeps it."""
    host, port = address.rsplit(":", 1)
    loop = asyncio.get_running_loop()
    sock = socket.create_connection((host, int(port)))
    sock.setblocking(False)
    started = time.monotonic()
    try:
        data = await asyncio.wait_for(loop.sock_recv(sock, 1), 130)  # gRPC's default: 120 s
        what = "closed" if data == b"" else "answered"
        return f"{label}: {what} by the server after {time.monotonic() - started:.0f} s"
    except TimeoutError:
        return f"{label}: still open after 130 s"
    except ConnectionError:
        return f"{label}: reset by the server after {time.monotonic() - started:.0f} s"
    finally:
        sock.close()


async def silent_tcp_grpc(t: Target) -> str:
    return await _silent_tcp(t.grpc, "gRPC port")


async def silent_tcp_http(t: Target) -> str:
    return await _silent_tcp(t.ws.removeprefix("wss://").split("/", 1)[0], "WebSocket port")


async def shard_without_token(t: Target) -> str:
    async with grpc.aio.insecure_channel(t.shard) as ch:
        stub = shard_pb2_grpc.ShardStub(ch)
        answers = []
        for label, meta in (
            ("no token", None),
            ("a wrong token", (("engram-internal-token", "x"),)),
        ):
            try:
                await stub.Stats(shard_pb2.StatsRequest(), metadata=meta, timeout=5)
                answers.append(f"{label}: Stats answered")
            except grpc.aio.AioRpcError as exc:
                answers.append(f"{label}: {exc.code().name}")
        health = await health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        answers.append(
            f"health check: {health_pb2.HealthCheckResponse.ServingStatus.Name(health.status)}"
        )
    return "; ".join(answers)


async def crafted_append_to_shard(t: Target) -> str:
    """An internal Append for tenant a's space straight to the shard, without the token."""
    async with grpc.aio.insecure_channel(t.shard) as ch:
        call = shard_pb2_grpc.ShardStub(ch).Append()
        await call.write(
            shard_pb2.AppendRequest(
                memory_space_id="tenant-a-notes",
                session_id="s-x",
                sequence_number=1,
                batch=_batch(5),
            )
        )
        try:
            resp = await asyncio.wait_for(call.read(), 10)
            return f"answered: {resp}"
        except grpc.aio.AioRpcError as exc:
            return f"call ended {exc.code().name}"


async def plaintext_client(t: Target) -> str:
    async with grpc.aio.insecure_channel(t.grpc) as ch:
        call = streaming_pb2_grpc.EngramStreamStub(ch).ObserveStream(metadata=_meta(t.keys["a"]))
        await call.write(_init("tenant-a-notes"))
        return await _first(call, 10)


async def untrusted_server_cert(t: Target, other_ca: str) -> str:
    async with t.channel(ca_file=other_ca) as ch:
        call = streaming_pb2_grpc.EngramStreamStub(ch).ObserveStream(metadata=_meta(t.keys["a"]))
        await call.write(_init("tenant-a-notes"))
        return await _first(call, 10)


# ------------------------------------------------------------------------------ the flood


async def _steady(client: EngramClient, space: str, seconds: float) -> dict[str, float]:
    """Batches of 100 at STEADY_RATE; each one's send-to-ack latency."""
    stream = await client.open_stream(space)
    latencies: list[float] = []
    interval = 100 / STEADY_RATE
    start = time.perf_counter()
    pending: list[asyncio.Task[None]] = []

    async def timed(fut: asyncio.Future[Any], sent: float) -> None:
        await fut
        latencies.append(time.perf_counter() - sent)

    i = 0
    while time.perf_counter() - start < seconds:
        sent = time.perf_counter()
        fut = await stream.send_batch(_batch(100, seed=i))
        pending.append(asyncio.create_task(timed(fut, sent)))
        i += 1
        await asyncio.sleep(max(0.0, start + i * interval - time.perf_counter()))
    await asyncio.gather(*pending)
    elapsed = time.perf_counter() - start
    await stream.close()
    ms = np.array(latencies) * 1000
    return {
        "acked_per_s": round(100 * len(latencies) / elapsed),
        "ack_p50_ms": round(float(np.percentile(ms, 50)), 1),
        "ack_p99_ms": round(float(np.percentile(ms, 99)), 1),
    }


async def _flood(client: EngramClient, space: str, stop: asyncio.Event) -> dict[str, float]:
    """Batches of 1,000 as fast as the credits allow on four streams."""
    rejected = 0

    def on_event(ev: StreamEvent) -> None:
        nonlocal rejected
        rejected += ev.kind == "rejected"

    acked = 0
    start = time.perf_counter()

    async def one(n: int) -> None:
        nonlocal acked
        stream = await client.open_stream(f"{space}-{n}", on_event=on_event, target_latency_ms=0)
        futs = []
        while not stop.is_set():
            futs.append(await stream.send_batch(_batch(1000, seed=n)))
            futs = [f for f in futs if not f.done() or (acked := acked + 1000) < 0]
        await stream.close()

    await asyncio.gather(*(one(n) for n in range(4)))
    return {
        "acked_per_s": round(acked / (time.perf_counter() - start)),
        "limit_per_s": FLOOD_LIMIT,
        "rejections": rejected,
    }


async def flood(t: Target, seconds: float) -> dict[str, Any]:
    tls_opt = TLS.from_files(ca_file=t.ca_file)
    async with (
        EngramClient(t.grpc, api_key=t.keys["a"], tls=tls_opt) as steady,
        EngramClient(t.grpc, api_key=t.keys["flood"], tls=tls_opt) as noisy,
    ):
        alone = await _steady(steady, "tenant-a-steady", seconds)
        stop = asyncio.Event()
        flooding = asyncio.create_task(_flood(noisy, "tenant-f-flood", stop))
        await asyncio.sleep(1.0)
        beside = await _steady(steady, "tenant-a-steady", seconds)
        stop.set()
        flooded = await flooding
    return {"steady_alone": alone, "steady_beside_flood": beside, "flood": flooded}


# ---------------------------------------------------------------------------------- a run

Attack = Callable[[Target], Awaitable[str]]
Judge = Callable[[str], bool]


def attacks(other_ca: str) -> list[tuple[str, str, Attack, Judge]]:
    """(attack, the safe answer, how to try it, whether what it got is that answer)."""

    async def untrusted(t: Target) -> str:
        return await untrusted_server_cert(t, other_ca)

    def has(*parts: str) -> Judge:
        return lambda got: all(p in got for p in parts)

    return [
        ("no key", "UNAUTHENTICATED", no_key, has("UNAUTHENTICATED")),
        ("malformed key", "UNAUTHENTICATED", malformed_key, has("UNAUTHENTICATED")),
        (
            "well-formed key the server never issued",
            "UNAUTHENTICATED",
            unknown_key,
            has("UNAUTHENTICATED"),
        ),
        (
            "revoked key (revoked while the gateway runs)",
            "accepted before, UNAUTHENTICATED after, no restart",
            revoked_key,
            lambda g: g.startswith("before: init_ack") and g.endswith("UNAUTHENTICATED)"),
        ),
        ("expired key", "UNAUTHENTICATED", expired_key, has("UNAUTHENTICATED")),
        (
            "another tenant's session id on resume",
            "PERMISSION_DENIED",
            other_tenants_session,
            has("PERMISSION_DENIED"),
        ),
        (
            "another tenant's space in a recall",
            "PERMISSION_DENIED",
            other_tenants_space_recall,
            has("PERMISSION_DENIED"),
        ),
        (
            "another tenant's space in an init",
            "in-band PERMISSION_DENIED, stream usable",
            other_tenants_space_init,
            has("in-band PERMISSION_DENIED", "init_ack"),
        ),
        (
            "write with a read-only key",
            "in-band PERMISSION_DENIED, stream usable",
            write_with_read_key,
            has("init_ack", "a batch: in-band PERMISSION_DENIED", "recall: recall"),
        ),
        (
            "oversized gRPC message before auth",
            "UNAUTHENTICATED",
            oversized_before_auth_grpc,
            has("UNAUTHENTICATED"),
        ),
        (
            "oversized WebSocket frame before auth",
            "closed 1009",
            oversized_before_auth_ws,
            has("closed 1009"),
        ),
        (
            "WebSocket that never authenticates",
            f"closed 1008 after ~{AUTH_TIMEOUT_S:g} s",
            ws_never_authenticates,
            has("closed 1008"),
        ),
        (
            "slow-loris WebSocket handshake (1 byte/s)",
            "closed within the 10 s open timeout",
            slow_loris_ws,
            lambda g: "by the server" in g and int(g.split()[-2]) <= 15,
        ),
        (
            "TCP connection to the gRPC port that never starts TLS",
            "closed within the 10 s handshake timeout",
            silent_tcp_grpc,
            lambda g: "by the server" in g and int(g.split()[-2]) <= 15,
        ),
        (
            "TCP connection to the WebSocket port that never starts TLS",
            "closed within the 10 s handshake timeout",
            silent_tcp_http,
            lambda g: "by the server" in g and int(g.split()[-2]) <= 15,
        ),
        (
            "call to a shard without the internal secret",
            "UNAUTHENTICATED; health answers",
            shard_without_token,
            has("no token: UNAUTHENTICATED", "wrong token: UNAUTHENTICATED", "SERVING"),
        ),
        (
            "crafted Append to a shard",
            "UNAUTHENTICATED",
            crafted_append_to_shard,
            has("UNAUTHENTICATED"),
        ),
        (
            "plaintext client against TLS",
            "fails (UNAVAILABLE)",
            plaintext_client,
            has("UNAVAILABLE"),
        ),
        ("client trusting another CA", "fails (UNAVAILABLE)", untrusted, has("UNAVAILABLE")),
    ]


def _make_keys(keys_file: Path, ca_dir: Path) -> dict[str, str]:
    stored = keys.load_keys(keys_file)
    made: dict[str, str] = {}
    scope = keys.parse_scope
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)
    specs: dict[str, dict[str, Any]] = {
        "a": {"scopes": [scope("write:tenant-a-*"), scope("read:tenant-a-*")]},
        "b": {"scopes": [scope("write:tenant-b-*"), scope("read:tenant-b-*")]},
        "reader": {"scopes": [scope("read:tenant-a-*")]},
        "revoked": {"scopes": [scope("write:tenant-a-*")]},
        "expired": {"scopes": [scope("write:tenant-a-*")], "expires": past},
        "flood": {"scopes": [scope("write:tenant-f-*")], "max_observations_per_s": FLOOD_LIMIT},
    }
    for role, spec in specs.items():
        key, entry = keys.create_key(name=f"attacks {role}", taken=stored, **spec)
        stored[entry.id] = entry
        made[role] = key
    keys.save_keys(keys_file, stored)
    return made


def _other_ca(root: Path) -> str:
    import trustme

    path = root / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(path))
    return str(path)


async def _attempt(t: Target, name: str, expected: str, attack: Attack, judge: Judge) -> Row:
    row = Row(name, expected)
    try:
        row.got = await attack(t)
    except grpc.aio.AioRpcError as exc:  # refused before the attack could read an answer
        row.got = f"call ended {_code(exc)}"
    except Exception as exc:  # an attack that breaks is reported, not hidden
        row.got = f"the attack itself failed: {type(exc).__name__}: {exc}"
    row.ok = judge(row.got)
    print(f"{'ok ' if row.ok else 'BAD'} {name}: {row.got}", file=sys.stderr, flush=True)
    return row


async def _run(t: Target, other_ca: str, flood_seconds: float) -> dict[str, Any]:
    # all at once: several wait for a server's timeout (10 s), and none disturbs another
    rows = await asyncio.gather(*(_attempt(t, *a) for a in attacks(other_ca)))
    result: dict[str, Any] = {"rows": [asdict(r) for r in rows]}
    if flood_seconds > 0:
        print(
            f"flood: {flood_seconds:g} s alone, then {flood_seconds:g} s beside a flood",
            file=sys.stderr,
        )
        result["flood"] = await flood(t, flood_seconds)
    return result


def run(root: Path, flood_seconds: float = 10.0) -> dict[str, Any]:
    """Starts a cluster under ``root``, attacks it, stops it; returns the table and flood."""
    _, kwargs = own_cluster(auth=True, tls=True, root=root / "access")
    cluster = LocalCluster(root / "cluster", shards=1, env=ENV, **kwargs)
    ca_file = str(kwargs["tls_ca"])
    made = _make_keys(Path(kwargs["keys_file"]), root)
    with cluster:
        cluster.start()
        target = Target(
            grpc=cluster.gateway_address,
            ws=f"wss://127.0.0.1:{cluster.http_port}/v1/stream",
            ca_file=ca_file,
            keys_file=Path(kwargs["keys_file"]),
            shard=cluster.shard_address(0),
            keys=made,
        )
        return asyncio.run(_run(target, _other_ca(root), flood_seconds))


def markdown(result: dict[str, Any]) -> str:
    lines = ["| attack | a safe answer | what it got | |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(
            f"| {r['attack']} | {r['expected']} | {r['got']} | {'ok' if r['ok'] else 'NOT OK'} |"
        )
    if "flood" in result:
        f = result["flood"]
        fl = f["flood"]
        lines += [
            "",
            f"Flood: a key limited to {fl['limit_per_s']:,} obs/s pushing on 4 streams got "
            f"{fl['acked_per_s']:,} obs/s acked and {fl['rejections']:,} rejections "
            f"with retry-after. Another key writing {STEADY_RATE:,} obs/s beside it:",
            "",
            "| steady key | acked obs/s | ack P50 ms | ack P99 ms |",
            "|---|---|---|---|",
        ]
        for label, key in (("alone", "steady_alone"), ("beside the flood", "steady_beside_flood")):
            s = f[key]
            lines.append(
                f"| {label} | {s['acked_per_s']:,} | {s['ack_p50_ms']} | {s['ack_p99_ms']} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engram.bench.attacks", description=__doc__)
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--flood-seconds", type=float, default=10.0, help="0: no flood")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="engram-attacks-") as tmp:
        result = run(Path(tmp), args.flood_seconds)
    print(markdown(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if all(r["ok"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
