"""The errors a caller of Engram Stream can see, and how each travels on the wire.

::

    EngramError                      base: an ErrorCode, a message, whether a resend may succeed
    ├── ClientError                  the request is at fault
    │   ├── ValidationError          bad batch, vector, space id, k, ...   resending fails again
    │   ├── SessionError             unknown session, not initialised, space mismatch   fails again
    │   ├── SequenceError            a gap: resend from ``expected``, not this number
    │   ├── FlowControlError         credits exceeded, stream paused: resend after an ack / RESUME
    │   ├── AuthenticationError      no API key, or an unknown, revoked or expired one
    │   └── PermissionDeniedError    the key does not cover the space for the operation
    └── ServerError                  the server could not do it now: a later resend may succeed
        ├── UnavailableError         a shard is down, unreachable or recovering
        ├── NotOwnerError            the shard does not own the space (it moved): re-route
        ├── StorageError             the WAL could not make the batch durable; nothing was acked
        ├── OverloadedError          admission control refused the batch: resend after retry_after
        ├── RateLimitedError         the API key's rate limit: resend after retry_after
        └── ConsistencyTimeout       the snapshot did not reach the recall's level in time

``retryable`` is the wire's ``StreamError.retryable``: whether the *same* message, sent again
later, may succeed. It is True for flow control (a later resend is taken) and every server
error, False for the rest of the client's faults.

:data:`CODES` is the one table from an ``ErrorCode`` to its class, the gRPC status of a call
that fails as a whole with it, and the WebSocket close code of a stream that must end with it.
:func:`from_proto` rebuilds an error received in-band, :func:`from_rpc_error` one that ended a
call (details ``"CODE_NAME: message"``, as :func:`abort_details` writes them; the wait of a
refused call also in the trailing metadata :func:`retry_after_metadata` writes).
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from engram.v1 import streaming_pb2 as pb


class EngramError(Exception):
    code: int = pb.INTERNAL
    retryable: bool = False

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_proto(self) -> pb.StreamError:
        return pb.StreamError(code=self.code, message=self.message, retryable=self.retryable)

    def __str__(self) -> str:
        return f"{pb.ErrorCode.Name(self.code)}: {self.message}"


class ClientError(EngramError):
    code = pb.INVALID_ARGUMENT


class ValidationError(ClientError):
    pass


class SessionError(ClientError):
    code = pb.UNKNOWN_SESSION


class SequenceError(ClientError):
    code = pb.SEQUENCE_GAP

    def __init__(self, message: str, *, expected: int) -> None:
        super().__init__(message)
        self.expected = expected

    def to_proto(self) -> pb.StreamError:
        err = super().to_proto()
        err.expected_sequence = self.expected
        return err


class FlowControlError(ClientError):
    """The client sent more than flow control allows right now; the same batch is taken once
    an ack frees a credit (``CREDITS_EXCEEDED``) or the stream is resumed (``STREAM_PAUSED``)."""

    code = pb.CREDITS_EXCEEDED
    retryable = True


class AuthenticationError(ClientError):
    """No API key where one is required, or one the server does not accept (unknown, revoked,
    expired). The message never repeats the key."""

    code = pb.UNAUTHENTICATED


class PermissionDeniedError(ClientError):
    """The key is valid but does not cover this memory space for this operation."""

    code = pb.PERMISSION_DENIED


class ServerError(EngramError):
    code = pb.INTERNAL
    retryable = True


class UnavailableError(ServerError):
    code = pb.SHARD_UNAVAILABLE


class NotOwnerError(ServerError):
    code = pb.NOT_OWNER


class StorageError(ServerError):
    code = pb.STORAGE_FAILURE

    def to_proto(self) -> pb.StreamError:
        err = super().to_proto()
        err.retry_after_ms = 1000  # the shard retries its WAL about once a second
        return err


class OverloadedError(ServerError):
    """Refused by admission control: nothing stored, the sequence number is not consumed;
    ``reason`` names the limit (memory_budget, lane_full, shed_low, ...)."""

    code = pb.OVERLOADED

    def __init__(self, message: str, *, reason: str = "", retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_ms = retry_after_ms

    def to_proto(self) -> pb.StreamError:
        err = super().to_proto()
        err.retry_after_ms = self.retry_after_ms
        return err


class RateLimitedError(ServerError):
    """The API key's observations/s or recalls/s limit: nothing was done; resend after
    ``retry_after_ms``."""

    code = pb.RATE_LIMITED

    def __init__(self, message: str, *, retry_after_ms: int = 0) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms

    def to_proto(self) -> pb.StreamError:
        err = super().to_proto()
        err.retry_after_ms = self.retry_after_ms
        return err


class ConsistencyTimeout(ServerError):
    code = pb.CONSISTENCY_TIMEOUT


# WebSocket close codes (RFC 6455 section 7.4.1) of a stream that must end with an error.
WS_POLICY = 1008  # the client's fault: do not resume with the same messages
WS_SERVER_ERROR = 1011
WS_TRY_AGAIN_LATER = 1013  # resume the session on a new connection


@dataclass(frozen=True)
class CodeInfo:
    # The class an error with this code is rebuilt as.
    error: type[EngramError]
    # Status of a gRPC call that fails as a whole with this code.
    grpc_status: grpc.StatusCode
    # Close code of a WebSocket connection that must end with this code.
    ws_close: int


_S = grpc.StatusCode
CODES: dict[int, CodeInfo] = {
    pb.MALFORMED_MESSAGE: CodeInfo(ValidationError, _S.INVALID_ARGUMENT, WS_POLICY),
    pb.NOT_INITIALIZED: CodeInfo(SessionError, _S.FAILED_PRECONDITION, WS_POLICY),
    pb.ALREADY_INITIALIZED: CodeInfo(SessionError, _S.FAILED_PRECONDITION, WS_POLICY),
    pb.INVALID_SPACE_ID: CodeInfo(ValidationError, _S.INVALID_ARGUMENT, WS_POLICY),
    pb.SPACE_MISMATCH: CodeInfo(SessionError, _S.INVALID_ARGUMENT, WS_POLICY),
    pb.UNKNOWN_SESSION: CodeInfo(SessionError, _S.NOT_FOUND, WS_POLICY),
    pb.SEQUENCE_GAP: CodeInfo(SequenceError, _S.OUT_OF_RANGE, WS_POLICY),
    pb.EMPTY_BATCH: CodeInfo(ValidationError, _S.INVALID_ARGUMENT, WS_POLICY),
    pb.WRONG_DIMENSION: CodeInfo(ValidationError, _S.INVALID_ARGUMENT, WS_POLICY),
    pb.BAD_VECTOR_BLOB: CodeInfo(ValidationError, _S.INVALID_ARGUMENT, WS_POLICY),
    pb.LENGTH_MISMATCH: CodeInfo(ValidationError, _S.INVALID_ARGUMENT, WS_POLICY),
    pb.NON_FINITE_VALUE: CodeInfo(ValidationError, _S.INVALID_ARGUMENT, WS_POLICY),
    pb.ZERO_VECTOR: CodeInfo(ValidationError, _S.INVALID_ARGUMENT, WS_POLICY),
    pb.BATCH_TOO_LARGE: CodeInfo(ValidationError, _S.RESOURCE_EXHAUSTED, WS_POLICY),
    pb.K_OUT_OF_RANGE: CodeInfo(ValidationError, _S.INVALID_ARGUMENT, WS_POLICY),
    pb.INVALID_ARGUMENT: CodeInfo(ValidationError, _S.INVALID_ARGUMENT, WS_POLICY),
    pb.MISSING_OPERATION: CodeInfo(ValidationError, _S.INVALID_ARGUMENT, WS_POLICY),
    pb.CREDITS_EXCEEDED: CodeInfo(FlowControlError, _S.RESOURCE_EXHAUSTED, WS_TRY_AGAIN_LATER),
    pb.STREAM_PAUSED: CodeInfo(FlowControlError, _S.FAILED_PRECONDITION, WS_TRY_AGAIN_LATER),
    pb.SPACE_DROPPED: CodeInfo(SessionError, _S.NOT_FOUND, WS_POLICY),
    pb.UNAUTHENTICATED: CodeInfo(AuthenticationError, _S.UNAUTHENTICATED, WS_POLICY),
    pb.PERMISSION_DENIED: CodeInfo(PermissionDeniedError, _S.PERMISSION_DENIED, WS_POLICY),
    pb.SHARD_UNAVAILABLE: CodeInfo(UnavailableError, _S.UNAVAILABLE, WS_TRY_AGAIN_LATER),
    pb.NOT_OWNER: CodeInfo(NotOwnerError, _S.UNAVAILABLE, WS_TRY_AGAIN_LATER),
    pb.OVERLOADED: CodeInfo(OverloadedError, _S.RESOURCE_EXHAUSTED, WS_TRY_AGAIN_LATER),
    pb.STORAGE_FAILURE: CodeInfo(StorageError, _S.UNAVAILABLE, WS_TRY_AGAIN_LATER),
    pb.INTERNAL: CodeInfo(ServerError, _S.INTERNAL, WS_SERVER_ERROR),
    pb.CONSISTENCY_TIMEOUT: CodeInfo(ConsistencyTimeout, _S.DEADLINE_EXCEEDED, WS_TRY_AGAIN_LATER),
    pb.RATE_LIMITED: CodeInfo(RateLimitedError, _S.RESOURCE_EXHAUSTED, WS_TRY_AGAIN_LATER),
}
_UNKNOWN = CodeInfo(ServerError, _S.INTERNAL, WS_SERVER_ERROR)


def info(code: int) -> CodeInfo:
    """The table's row for ``code`` (an unknown code is an internal server error)."""
    return CODES.get(code, _UNKNOWN)


def grpc_status(err: EngramError) -> grpc.StatusCode:
    return info(err.code).grpc_status


def abort_details(err: EngramError) -> str:
    """The details of a call ended with ``err``; :func:`from_rpc_error` reads them back."""
    return str(err)


# Trailing metadata naming the wait of a refused call (milliseconds).
RETRY_AFTER_KEY = "retry-after-ms"


def retry_after_metadata(err: EngramError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of a call ended with ``err``: its retry-after, if it has one."""
    wait = getattr(err, "retry_after_ms", 0)
    return ((RETRY_AFTER_KEY, str(wait)),) if wait else ()


def from_proto(err: pb.StreamError) -> EngramError:
    """Rebuilds an error received in-band (from a shard, or by a client)."""
    if err.code == pb.SEQUENCE_GAP:
        return SequenceError(err.message, expected=err.expected_sequence)
    if err.code == pb.OVERLOADED:
        return OverloadedError(err.message, retry_after_ms=err.retry_after_ms)
    if err.code == pb.RATE_LIMITED:
        return RateLimitedError(err.message, retry_after_ms=err.retry_after_ms)
    cls = CODES[err.code].error if err.code in CODES else None
    if cls is None:  # a code newer than this table: classify by what the sender said
        cls = ServerError if err.retryable or err.code >= 50 else ValidationError
    return cls(err.message, code=err.code)


def from_rpc_error(
    exc: grpc.aio.AioRpcError | grpc.RpcError, what: str = "the server"
) -> EngramError:
    """The error that ended a call: the server's own (details ``"CODE_NAME: message"``), or
    the transport's as :class:`UnavailableError` naming ``what`` did not answer."""
    call = isinstance(exc, grpc.aio.AioRpcError | grpc.Call)
    code = exc.code() if call else None  # type: ignore[union-attr]
    details = (exc.details() if call else str(exc)) or ""  # type: ignore[union-attr]
    name, _, message = details.partition(": ")
    if name in pb.ErrorCode.keys():
        wait = 0
        for key, value in (exc.trailing_metadata() or ()) if call else ():  # type: ignore[union-attr]
            if key == RETRY_AFTER_KEY and str(value).isdigit():
                wait = int(value)
        return from_proto(
            pb.StreamError(code=pb.ErrorCode.Value(name), message=message, retry_after_ms=wait)
        )
    status = code.name if code is not None else "ERROR"
    return UnavailableError(f"{what} did not answer: {status} {details}".rstrip())
