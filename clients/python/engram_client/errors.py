"""What the client raises: the contract's error types, and the client's own.

Every error carries the protocol's ``code`` (``engram.v1.ErrorCode``), a ``message`` and
``retryable`` (whether the same request, sent again later, may succeed)::

    EngramError
    ├── ClientError          the request is at fault (ValidationError, SessionError,
    │                        SequenceError, FlowControlError, AuthenticationError,
    │                        PermissionDeniedError)
    ├── ServerError          the server could not do it now (UnavailableError, NotOwnerError,
    │                        StorageError, OverloadedError, RateLimitedError,
    │                        ConsistencyTimeout)
    └── StreamFailedError    the client's own stream machinery failed (a bug: report it)

A stream settles what it can by itself (resends after a reconnect, a retry-after or a
resync); a future fails only with what the application must decide about. A batch refused
with OVERLOADED or RATE_LIMITED is resent after its ``retry_after_ms``; a recall refused so
raises :class:`OverloadedError` / :class:`RateLimitedError` with ``retry_after_ms`` set (0 when
the server named no time). A missing or wrong API key raises :class:`AuthenticationError`, a
key that does not cover the space :class:`PermissionDeniedError`: neither is retried.
"""

from __future__ import annotations

import re

import grpc

from engram.contract import errors as contract
from engram.contract.errors import (
    AuthenticationError,
    ClientError,
    ConsistencyTimeout,
    EngramError,
    FlowControlError,
    NotOwnerError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitedError,
    SequenceError,
    ServerError,
    SessionError,
    StorageError,
    UnavailableError,
    ValidationError,
)
from engram.v1 import streaming_pb2 as pb


class StreamFailedError(EngramError):
    """The client's stream runner failed unexpectedly; every pending future gets this."""

    code = pb.INTERNAL


# Statuses that say who refused the call even when its details are not ours (a proxy, or a
# gateway refusing before its own handlers run).
_BY_STATUS: dict[grpc.StatusCode, type[EngramError]] = {
    grpc.StatusCode.UNAUTHENTICATED: AuthenticationError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
}
# Trailing metadata a gateway may name the wait of a refused call in (milliseconds).
RETRY_AFTER_KEY = "retry-after-ms"
_AFTER = re.compile(r"(?:retry|resend) after (\d+) ms")


def from_rpc_error(exc: grpc.aio.AioRpcError, what: str = "the gateway") -> EngramError:
    """The typed error of a call that failed as a whole (see
    :func:`engram.contract.errors.from_rpc_error`), and also: an UNAUTHENTICATED or
    PERMISSION_DENIED status is typed by its status, and a retry-after in the trailing
    metadata is kept."""
    err = contract.from_rpc_error(exc, what)
    cls = _BY_STATUS.get(exc.code())
    if cls is not None and not isinstance(err, cls):
        err = cls(f"{what} refused the call: {exc.details() or exc.code().name}")
    if isinstance(err, OverloadedError | RateLimitedError) and not err.retry_after_ms:
        err.retry_after_ms = _retry_after_ms(exc)
    return err


def _retry_after_ms(exc: grpc.aio.AioRpcError) -> int:
    """From the trailing metadata, else the message ("... retry after 250 ms"), else 0."""
    for key, value in exc.trailing_metadata() or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0, int(value))
            except (TypeError, ValueError):
                break
    m = _AFTER.search(exc.details() or "")
    return int(m.group(1)) if m else 0


__all__ = [
    "AuthenticationError",
    "ClientError",
    "ConsistencyTimeout",
    "EngramError",
    "FlowControlError",
    "NotOwnerError",
    "OverloadedError",
    "PermissionDeniedError",
    "RateLimitedError",
    "SequenceError",
    "ServerError",
    "SessionError",
    "StorageError",
    "StreamFailedError",
    "UnavailableError",
    "ValidationError",
    "from_rpc_error",
]
