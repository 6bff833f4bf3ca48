"""How the client reaches a gateway: the channel (plaintext or TLS) and the API key.

::

    EngramClient("gw.example:50051")                                   # plaintext, no key
    EngramClient("gw.example:50051", api_key=key, tls=True)            # the system's CAs
    EngramClient("gw.example:50051", api_key=key, tls=TLS.from_files(ca_file="ca.pem"))

TLS is chosen with ``tls=`` alone (a target is always ``host:port``, never a URL): ``False``
plaintext, ``True`` TLS trusting the system's CAs, or a :class:`TLS` naming the CA to trust, a
client certificate and key (for a gateway that asks for one) and the name to check.

The key travels as gRPC metadata ``authorization: Bearer <key>`` on every call, added by
:class:`AuthorizedStub` rather than a channel interceptor: grpc.aio routes each write of an
intercepted stream-stream call through an extra queue, a cost every batch would pay. The stub
also works on a channel the application made itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from engram.v1 import streaming_pb2_grpc

_MAX_MESSAGE = 64 * 1024 * 1024

CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", _MAX_MESSAGE),
    ("grpc.max_send_message_length", _MAX_MESSAGE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
]


@dataclass(frozen=True)
class TLS:
    """TLS settings of the channel to a gateway (PEM bytes; ``from_files`` reads files)."""

    # CA certificate(s) the gateway's certificate must chain to; None: the system's roots.
    root_certificates: bytes | None = None
    # Client certificate chain and its private key, for a gateway that asks for one; both or
    # neither.
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    # The name the gateway's certificate must carry, when it differs from the target's host
    # (e.g. connecting by IP address to a certificate issued for a DNS name).
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("TLS: a client certificate and its private key go together")

    @classmethod
    def from_files(
        cls,
        ca_file: str | Path | None = None,
        cert_file: str | Path | None = None,
        key_file: str | Path | None = None,
        server_name: str | None = None,
    ) -> TLS:
        """Reads the PEM files now, so a missing or unreadable one fails here, by name."""

        def read(path: str | Path | None, what: str) -> bytes | None:
            if path is None:
                return None
            try:
                return Path(path).read_bytes()
            except OSError as exc:
                raise ValueError(f"TLS: cannot read the {what} {path}: {exc.strerror}") from None

        return cls(
            read(ca_file, "CA file"),
            read(cert_file, "client certificate"),
            read(key_file, "client key"),
            server_name,
        )

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )


def open_channel(
    target: str, tls: TLS | bool = False, options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS
) -> grpc.aio.Channel:
    """A channel to ``target`` (``host:port``): plaintext when ``tls`` is False."""
    if tls is False:
        return grpc.aio.insecure_channel(target, options=list(options))
    settings = TLS() if tls is True else tls
    opts = list(options)
    if settings.server_name:
        opts.append(("grpc.ssl_target_name_override", settings.server_name))
    return grpc.aio.secure_channel(target, settings.credentials(), options=opts)


def key_metadata(api_key: str) -> tuple[tuple[str, str], ...]:
    """The metadata that carries ``api_key``; refuses what could not travel in a header."""
    if not api_key or not api_key.isprintable() or any(c.isspace() for c in api_key):
        raise ValueError("api_key must be a non-empty key without spaces or control characters")
    return (("authorization", f"Bearer {api_key}"),)


class _WithMetadata:
    """One method of a stub, adding fixed metadata in front of the caller's own."""

    def __init__(self, method: Any, metadata: tuple[tuple[str, str], ...]) -> None:
        self._method = method
        self._metadata = metadata

    def __call__(self, *args: Any, metadata: Any = None, **kwargs: Any) -> Any:
        return self._method(*args, metadata=(*self._metadata, *(metadata or ())), **kwargs)


class AuthorizedStub:
    """An ``EngramStreamStub`` whose every call carries ``metadata`` (the API key)."""

    def __init__(
        self, stub: streaming_pb2_grpc.EngramStreamStub, metadata: tuple[tuple[str, str], ...]
    ) -> None:
        for name, method in vars(stub).items():
            setattr(self, name, _WithMetadata(method, metadata))
