"""Helpers of the security suites.

* ``certificates``: leaf certificates (for 127.0.0.1 and localhost) made by a private CA
  (trustme), as files: nothing is read from or trusted by the machine.
* ``traffic``: writes batches through a gateway with the raw gRPC stub and lists a space back
  (:class:`Traffic`), for clusters whose gateway speaks TLS or wants a key.
* ``admin_key``: a keys file (the contract's format) holding one ``admin:*`` key, and the key.
* ``engram_cli``: runs ``python -m engram.cli ARGS`` without any ``ENGRAM_*`` variable (what
  it needs of a cluster it must find in the data directory); returns (exit code, stdout).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import secrets
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
import trustme

from engram.v1 import streaming_pb2 as pb
from engram.v1 import streaming_pb2_grpc

READ_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class CertFiles:
    """PEM files of one leaf certificate: its chain, its key, and the CA that signed it."""

    cert: str
    key: str
    ca: str


class Certificates:
    """``certificates``: issues leaf certificates (for 127.0.0.1 and localhost) into files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.ca = trustme.CA()
        self.ca_file = root / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._issued = 0

    def issue(self, name: str = "", *, ca: trustme.CA | None = None) -> CertFiles:
        """A new leaf certificate signed by ``ca`` (default: this CA), as files."""
        self._issued += 1
        name = name or f"leaf-{self._issued}"
        signer = ca or self.ca
        leaf = signer.issue_cert("127.0.0.1", "localhost", organization_unit_name=name)
        cert, key = self.root / f"{name}.crt", self.root / f"{name}.key"
        cert.write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        ca_file = self.ca_file
        if ca is not None:
            ca_file = self.root / f"{name}-ca.pem"
            ca.cert_pem.write_to_path(str(ca_file))
        return CertFiles(str(cert), str(key), str(ca_file))


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """One CA per test module (each leaf it issues has a name and files of its own)."""
    return Certificates(tmp_path_factory.mktemp("certs"))


class Traffic:
    """``traffic``: a stream of sequenced batches through a gateway, and the space read back."""

    @staticmethod
    async def write(
        channel: grpc.aio.Channel,
        space: str,
        batches: int,
        *,
        per_batch: int = 10,
        dim: int = 8,
        tag: str = "obs",
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> list[str]:
        """Writes ``batches`` batches on one new session; returns the acknowledged ids."""
        call = streaming_pb2_grpc.EngramStreamStub(channel).ObserveStream(metadata=metadata)
        await call.write(pb.ObservationRequest(memory_space_id=space, init=pb.StreamInit()))
        first = await Traffic._read(call)
        assert first.WhichOneof("result") == "init_ack", first
        rng = np.random.default_rng(len(space))
        acked: list[str] = []
        for seq in range(1, batches + 1):
            ids = [f"{tag}-{seq}-{i}" for i in range(per_batch)]
            vectors = rng.standard_normal((per_batch, dim)).astype("<f4").tobytes()
            batch = pb.ObservationBatch(dim=dim, vectors=vectors, ids=ids)
            await call.write(pb.ObservationRequest(sequence_number=seq, batch=batch))
            resp = await Traffic._read(call)
            assert resp.WhichOneof("result") == "ack", resp
            assert resp.ack.status == pb.ObservationAck.ACCEPTED, resp
            acked += ids
        await call.done_writing()
        return acked

    @staticmethod
    async def list_ids(
        channel: grpc.aio.Channel,
        space: str,
        metadata: tuple[tuple[str, str], ...] | None = None,
    ) -> list[str]:
        stub = streaming_pb2_grpc.EngramStreamStub(channel)
        req = pb.ListObservationsRequest(memory_space_id=space)
        ids: list[str] = []
        async for chunk in stub.ListObservations(req, metadata=metadata, timeout=READ_TIMEOUT_S):
            ids += chunk.ids
        return ids

    @staticmethod
    async def _read(call: grpc.aio.StreamStreamCall) -> pb.ObservationResponse:
        resp = await asyncio.wait_for(call.read(), READ_TIMEOUT_S)
        assert resp is not grpc.aio.EOF, "the gateway ended the stream"
        assert isinstance(resp, pb.ObservationResponse)
        return resp


@pytest.fixture
def traffic() -> type[Traffic]:
    return Traffic


@pytest.fixture(scope="module")
def admin_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    key_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    key = f"ek_{key_id}_{secret}"
    entry = {
        "id": key_id,
        "name": "security tests",
        "sha256": hashlib.sha256(key.encode()).hexdigest(),
        "scopes": ["admin:*"],
        "created": "2026-12-05T21:00:00Z",
        "expires": None,
        "revoked": None,
        "max_observations_per_s": 0,
        "max_recalls_per_s": 0,
    }
    path.write_text(json.dumps({"version": 1, "keys": [entry]}))
    path.chmod(0o600)
    return path, key


@pytest.fixture
def engram_cli() -> Callable[..., Awaitable[tuple[int, str]]]:
    async def run(*args: str | Path) -> tuple[int, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ENGRAM_")}
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engram.cli",
            *map(str, args),
            stdout=asyncio.subprocess.PIPE,
            env=env,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode is not None
        return proc.returncode, out.decode()

    return run
