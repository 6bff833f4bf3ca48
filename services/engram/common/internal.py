"""Calls among services: the shared secret every call to a shard carries, and optional mTLS.

Shards accept only the cluster's own processes (gateways, other shards, the operator, the
``engram`` tools). Two mechanisms, either or both:

* ``ENGRAM_INTERNAL_TOKEN_FILE``: a secret every call to a shard carries as metadata
  ``engram-internal-token``. Shards refuse a call without it (UNAUTHENTICATED), compared in
  constant time, except ``grpc.health.v1.Health/*`` (kubelets and the launcher probe health
  with nothing). The file is read again when it changes (looked at most every
  ``TOKEN_CHECK_S``), so a rotated Secret is taken without a restart; during a rotation a
  caller and a shard may briefly disagree.
* ``ENGRAM_INTERNAL_TLS_CA`` / ``_CERT`` / ``_KEY``: shards serve TLS and require a client
  certificate signed by the CA; every internal caller presents its own.

Everything that talks to a shard opens its channel here (:func:`aio_channel`,
:func:`sync_channel`); shards listen through :func:`add_port` and
:func:`server_interceptors`. ``security=None`` means the process's own settings, read from
the environment once.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from engram.common import settings
from engram.common.settings import SecuritySettings, SettingsError
from engram.common.tls import TlsError, load_pair, read_pem

log = logging.getLogger("engram.internal")

TOKEN_HEADER = "engram-internal-token"
EXEMPT_PREFIX = "/grpc.health.v1.Health/"
TOKEN_CHECK_S = 2.0
TOKEN_VAR = "ENGRAM_INTERNAL_TOKEN_FILE"

Options = Sequence[tuple[str, Any]] | None


class InternalSecurityError(SettingsError):
    """The token file is missing, unreadable or empty; the message names the variable."""


class TokenFile:
    """The secret held in a file, read again when the file changes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen = self._stat()
        self._value = self._read()
        self._checked = time.monotonic()

    def _stat(self) -> tuple[int, int, int]:
        try:
            st = os.stat(self.path)
        except OSError:
            return (-1, -1, -1)
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> str:
        try:
            with open(self.path, encoding="utf-8") as f:
                value = f.read().strip()
        except FileNotFoundError:
            raise InternalSecurityError(f"{TOKEN_VAR}={self.path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise InternalSecurityError(
                f"{TOKEN_VAR}={self.path}: cannot read it ({why})"
            ) from None
        if not value:
            raise InternalSecurityError(f"{TOKEN_VAR}={self.path}: the file is empty")
        return value

    def value(self) -> str:
        """The current secret (a changed file that cannot be read keeps the previous one)."""
        now = time.monotonic()
        if now - self._checked < TOKEN_CHECK_S:
            return self._value
        with self._lock:
            self._checked = now
            seen = self._stat()
            if seen != self._seen:
                self._seen = seen
                try:
                    self._value = self._read()
                    log.info("internal token reloaded from %s", self.path)
                except InternalSecurityError as exc:
                    log.warning("internal token not reloaded, keeping the current one: %s", exc)
        return self._value


_own: SecuritySettings | None = None
_tokens: dict[str, TokenFile] = {}
_tokens_lock = threading.Lock()


def own_security() -> SecuritySettings:
    """This process's security settings, read from the environment once."""
    global _own
    if _own is None:
        _own = settings.load().security
    return _own


def _resolve(security: SecuritySettings | None) -> SecuritySettings:
    return own_security() if security is None else security


def token_file(security: SecuritySettings | None = None) -> TokenFile | None:
    """The (shared) reader of the token file, None when no token is configured."""
    path = _resolve(security).internal_token_file
    if not path:
        return None
    with _tokens_lock:
        found = _tokens.get(path)
        if found is None:
            found = _tokens[path] = TokenFile(path)
        return found


def _mtls(security: SecuritySettings) -> tuple[bytes, bytes, bytes] | None:
    """(CA, key, certificate) PEM bytes, None when internal mTLS is off; raises
    :class:`~engram.common.tls.TlsError` naming the variable of a bad file."""
    if not security.internal_tls_ca:
        return None
    ca = read_pem(security.internal_tls_ca, "ENGRAM_INTERNAL_TLS_CA")
    if b"-----BEGIN CERTIFICATE-----" not in ca:
        raise TlsError(f"ENGRAM_INTERNAL_TLS_CA={security.internal_tls_ca}: not a PEM certificate")
    pair = load_pair(
        security.internal_tls_cert,
        security.internal_tls_key,
        "ENGRAM_INTERNAL_TLS_CERT",
        "ENGRAM_INTERNAL_TLS_KEY",
    )
    return ca, pair.key, pair.cert


# --------------------------------------------------------------------------- callers


def _with_token(metadata: Any, token: str) -> list[tuple[str, Any]]:
    return [*(metadata or ()), (TOKEN_HEADER, token)]


class _AioToken:
    """Adds the token to every call of an aio channel (one subclass per kind of call: an aio
    channel files each interceptor under the first kind it is an instance of)."""

    def __init__(self, token: TokenFile) -> None:
        self._token = token

    def _details(self, d: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*_with_token(d.metadata, self._token.value()))
        return d._replace(metadata=metadata)  # type: ignore[attr-defined,no-any-return]


class _AioUnaryUnary(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, d: Any, request: Any) -> Any:
        return await continuation(self._details(d), request)


class _AioUnaryStream(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, d: Any, request: Any) -> Any:
        return await continuation(self._details(d), request)


class _AioStreamUnary(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, d: Any, requests: Any) -> Any:
        return await continuation(self._details(d), requests)


class _AioStreamStream(_AioToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, d: Any, requests: Any) -> Any:
        return await continuation(self._details(d), requests)


def _aio_interceptors(token: TokenFile, stream_stream: bool) -> list[grpc.aio.ClientInterceptor]:
    kinds: list[Callable[[TokenFile], grpc.aio.ClientInterceptor]] = [
        _AioUnaryUnary,
        _AioUnaryStream,
        _AioStreamUnary,
    ]
    if stream_stream:
        kinds.append(_AioStreamStream)
    return [kind(token) for kind in kinds]


class _SyncDetails(grpc.ClientCallDetails):
    def __init__(self, d: grpc.ClientCallDetails, metadata: list[tuple[str, Any]]) -> None:
        self.method = d.method
        self.timeout = d.timeout
        self.metadata = metadata
        self.credentials = d.credentials
        self.wait_for_ready = getattr(d, "wait_for_ready", None)
        self.compression = getattr(d, "compression", None)


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the token to every call of a blocking channel."""

    def __init__(self, token: TokenFile) -> None:
        self._token = token

    def _details(self, d: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _SyncDetails(d, _with_token(d.metadata, self._token.value()))

    def intercept_unary_unary(self, continuation: Any, d: Any, request: Any) -> Any:
        return continuation(self._details(d), request)

    def intercept_unary_stream(self, continuation: Any, d: Any, request: Any) -> Any:
        return continuation(self._details(d), request)

    def intercept_stream_unary(self, continuation: Any, d: Any, requests: Any) -> Any:
        return continuation(self._details(d), requests)

    def intercept_stream_stream(self, continuation: Any, d: Any, requests: Any) -> Any:
        return continuation(self._details(d), requests)


def channel_credentials(security: SecuritySettings | None = None) -> grpc.ChannelCredentials | None:
    """mTLS credentials of an internal caller, None when internal mTLS is off."""
    trio = _mtls(_resolve(security))
    if trio is None:
        return None
    ca, key, cert = trio
    return grpc.ssl_channel_credentials(ca, key, cert)


def token_metadata(security: SecuritySettings | None = None) -> tuple[tuple[str, str], ...]:
    """The token as call metadata (empty when no token is configured)."""
    token = token_file(security)
    return () if token is None else ((TOKEN_HEADER, token.value()),)


def aio_channel(
    address: str,
    options: Options = None,
    security: SecuritySettings | None = None,
    *,
    stream_stream_token: bool = True,
) -> grpc.aio.Channel:
    """An asyncio channel to a service (a shard) that carries the token and, when configured,
    presents this process's certificate. Without either it is a plain insecure channel.

    ``stream_stream_token=False`` leaves bidirectional streams out of the interceptor, whose
    queue costs some 10 % per message on a busy stream: their caller passes
    :func:`token_metadata` when it opens one (the gateway's Append streams)."""
    sec = _resolve(security)
    token = token_file(sec)
    interceptors = _aio_interceptors(token, stream_stream_token) if token is not None else None
    creds = channel_credentials(sec)
    if creds is not None:
        return grpc.aio.secure_channel(address, creds, options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options, interceptors=interceptors)


def sync_channel(
    address: str, options: Options = None, security: SecuritySettings | None = None
) -> grpc.Channel:
    """The blocking form of :func:`aio_channel`."""
    sec = _resolve(security)
    creds = channel_credentials(sec)
    if creds is not None:
        channel = grpc.secure_channel(address, creds, options)
    else:
        channel = grpc.insecure_channel(address, options)
    token = token_file(sec)
    return channel if token is None else grpc.intercept_channel(channel, _SyncToken(token))


# --------------------------------------------------------------------------- shards


class _RequireToken(grpc.aio.ServerInterceptor):
    """Refuses every call but health checks that lacks the token."""

    def __init__(self, token: TokenFile) -> None:
        self._token = token

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        details: grpc.HandlerCallDetails,
    ) -> Any:
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT_PREFIX):
            return handler
        why = token_refusal(details.invocation_metadata, self._token)
        return handler if why is None else _refusal(handler, why)


def token_refusal(metadata: Any, token: TokenFile | None) -> str | None:
    """Why a call with ``metadata`` is refused (UNAUTHENTICATED), or None: no token is
    configured, or the call carries it."""
    if token is None:
        return None
    given = ""
    for key, value in metadata or ():
        if key == TOKEN_HEADER:
            given = value if isinstance(value, str) else value.decode("utf-8", "replace")
            break
    if hmac.compare_digest(given.encode(), token.value().encode()):
        return None
    why = "no internal token" if not given else "wrong internal token"
    return f"{why}: this port serves only the cluster's own services ({TOKEN_HEADER})"


def _refusal(handler: grpc.RpcMethodHandler, message: str) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that aborts with UNAUTHENTICATED."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(  # type: ignore[no-any-return]
        refuse,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


def server_interceptors(
    security: SecuritySettings | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """The interceptors a shard's server needs: the token check when a token is configured."""
    token = token_file(_resolve(security))
    return [] if token is None else [_RequireToken(token)]


def add_port(
    server: grpc.aio.Server | grpc.Server, address: str, security: SecuritySettings | None = None
) -> int:
    """Listens on ``address``: TLS requiring a client certificate signed by the internal CA
    when internal mTLS is configured, plaintext otherwise. Returns the port (0: failed)."""
    trio = _mtls(_resolve(security))
    if trio is None:
        return server.add_insecure_port(address)
    ca, key, cert = trio
    creds = grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=True
    )
    return server.add_secure_port(address, creds)
