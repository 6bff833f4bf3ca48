"""How a local cluster is secured, and how the launcher and the ``engram`` tools reach it then.

:class:`ClusterSecurity` is what :class:`~engram.launcher.cluster.LocalCluster` was asked for:
an API keys file (auth on at the gateway), a certificate and key (TLS on the gateway's public
listeners) and the shards' shared secret. The secret is on whenever auth is (shards that accept
anyone would make the gateway's keys moot): the launcher writes a new random token to
``<data_dir>/internal-token`` (mode 0600) at every start and gives every service
``ENGRAM_INTERNAL_TOKEN_FILE``. Internal mTLS (``ENGRAM_INTERNAL_TLS_CA``/``_CERT``/``_KEY``)
is taken from the services' environment as given.

The launcher's own calls (health checks, the rebalancer, ``engram status``, ``engram move
--data-dir``) use :attr:`ClusterSecurity.internal`; ``cluster.json`` records the paths (never a
secret) so that a tool started later finds them (:func:`from_cluster_file`).
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engram.common import internal, settings
from engram.common.settings import SecuritySettings
from engram.common.tls import client_credentials, client_ssl_context

TOKEN_FILE = "internal-token"
_INTERNAL_FIELDS = (
    "internal_token_file",
    "internal_tls_ca",
    "internal_tls_cert",
    "internal_tls_key",
)
# their variables, from the settings' declarations
_INTERNAL_VARS = frozenset(
    e.env for e in settings.catalog() if e.path.removeprefix("security.") in _INTERNAL_FIELDS
)


@dataclass(frozen=True)
class ClusterSecurity:
    keys_file: str = ""  # API keys (auth on at the gateway); empty: off
    tls_cert: str = ""  # the gateway's public certificate chain; empty: plaintext
    tls_key: str = ""
    tls_ca: str = ""  # the CA the launcher trusts for the gateway (empty: the system's)
    token_file: str = ""  # the shards' secret, written by the launcher; empty: none
    # The launcher's settings for calls to shards (token file, mTLS from the services' env).
    internal: SecuritySettings = field(default_factory=SecuritySettings)

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def service_env(self, role: str) -> dict[str, str]:
        """The ``ENGRAM_*`` variables this security adds to a service of ``role``."""
        env = {"ENGRAM_INTERNAL_TOKEN_FILE": self.token_file} if self.token_file else {}
        if role == "gateway":
            if self.keys_file:
                env["ENGRAM_KEYS_FILE"] = self.keys_file
            if self.tls:
                env.update(ENGRAM_TLS_CERT=self.tls_cert, ENGRAM_TLS_KEY=self.tls_key)
        return env

    def write_token(self) -> None:
        """Writes a new random token (32 bytes, URL-safe base64) to :attr:`token_file`."""
        if not self.token_file:
            return
        path = Path(self.token_file)
        tmp = path.with_name(path.name + ".tmp")
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        os.replace(tmp, path)

    def gateway_credentials(self) -> grpc.ChannelCredentials | None:
        """Credentials for the gateway's gRPC port (None: it is plaintext)."""
        return client_credentials(self.tls_ca or None) if self.tls else None

    def gateway_ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context for the gateways' HTTP port (None: it is plain HTTP)."""
        return client_ssl_context(self.tls_ca or None) if self.tls else None

    def record(self) -> dict[str, Any]:
        """What ``cluster.json`` keeps: paths and switches, never a secret."""
        return {
            "keys_file": self.keys_file,
            "tls_cert": self.tls_cert,
            "tls_key": self.tls_key,
            "tls_ca": self.tls_ca,
            "internal": {k: getattr(self.internal, k) for k in _INTERNAL_FIELDS},
        }


def choose(
    data_dir: Path,
    env: Mapping[str, str],
    *,
    keys_file: str | Path | None,
    tls: tuple[str | Path, str | Path] | None,
    tls_ca: str | Path | None,
    internal_token: bool | None,
) -> ClusterSecurity:
    """The security of a cluster from ``LocalCluster``'s arguments and the services' ``env``
    (``ENGRAM_KEYS_FILE`` there turns auth on too). ``internal_token`` None: on iff auth is."""
    keys = str(Path(keys_file).resolve()) if keys_file else env.get("ENGRAM_KEYS_FILE", "")
    if internal_token is None:
        internal_token = bool(keys)
    token = str(data_dir / TOKEN_FILE) if internal_token else ""
    cert, key = (str(Path(p).resolve()) for p in tls) if tls else ("", "")
    own = {k: v for k, v in env.items() if k in _INTERNAL_VARS}
    if token:
        own["ENGRAM_INTERNAL_TOKEN_FILE"] = token
    return ClusterSecurity(
        keys_file=keys,
        tls_cert=cert,
        tls_key=key,
        tls_ca=str(Path(tls_ca).resolve()) if tls_ca else "",
        token_file=token,
        internal=settings.load(own).security,
    )


def from_cluster_file(info: Mapping[str, Any]) -> ClusterSecurity:
    """The security a running cluster recorded in its ``cluster.json`` (a cluster that
    recorded none: the caller's own environment's settings for internal calls)."""
    rec = info.get("security")
    if not rec:
        return ClusterSecurity(internal=internal.own_security())
    sec = dataclasses.replace(SecuritySettings(), **rec.get("internal", {}))
    return ClusterSecurity(
        keys_file=rec.get("keys_file", ""),
        tls_cert=rec.get("tls_cert", ""),
        tls_key=rec.get("tls_key", ""),
        tls_ca=rec.get("tls_ca", ""),
        internal=sec,
    )


def check_health(channel: grpc.Channel, timeout: float) -> bool:
    """Whether the standard gRPC health check (service "") answers SERVING on ``channel``."""
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=timeout
        )
    except grpc.RpcError:
        return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def grpc_healthy(
    address: str, timeout: float = 1.0, credentials: grpc.ChannelCredentials | None = None
) -> bool:
    """Whether a public endpoint (a gateway) is SERVING; ``credentials``: it serves TLS."""
    if credentials is None:
        channel = grpc.insecure_channel(address)
    else:
        channel = grpc.secure_channel(address, credentials)
    with channel:
        return check_health(channel, timeout)


def shard_healthy(address: str, security: SecuritySettings, timeout: float = 1.0) -> bool:
    """Whether a shard is SERVING, asked over the internal channel (mTLS when configured)."""
    with internal.sync_channel(address, security=security) as channel:
        return check_health(channel, timeout)
