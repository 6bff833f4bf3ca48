"""What the client raises: the contract's error types, and the client's own.

Every error carries the protocol's ``code`` (``engram.v1.ErrorCode``), a ``message`` and
``retryable`` (whether the same request, sent again later, may succeed)::

    EngramError
    ├── ClientError          the request is at fault (ValidationError, SessionError,
    │                        SequenceError, FlowControlError)
    ├── ServerError          the server could not do it now (UnavailableError, NotOwnerError,
    │                        StorageError, OverloadedError, ConsistencyTimeout)
    └── StreamFailedError    the client's own stream machinery failed (a bug: report it)

A stream settles what it can by itself (resends after a reconnect, a retry-after or a
resync); a future fails only with what the application must decide about.
"""

from __future__ import annotations

from engram.contract.errors import (
    ClientError,
    ConsistencyTimeout,
    EngramError,
    FlowControlError,
    NotOwnerError,
    OverloadedError,
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


__all__ = [
    "ClientError",
    "ConsistencyTimeout",
    "EngramError",
    "FlowControlError",
    "NotOwnerError",
    "OverloadedError",
    "SequenceError",
    "ServerError",
    "SessionError",
    "StorageError",
    "StreamFailedError",
    "UnavailableError",
    "ValidationError",
]
