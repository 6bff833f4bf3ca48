"""Errors of Engram Stream, and how each reaches a client.

::

    EngramError                      base; carries an ErrorCode and a message
    ├── ClientError                  the request is wrong; resending it fails again
    │   ├── ValidationError          bad batch, vector, space id, k, ...
    │   ├── SequenceError            gap: carries the expected sequence number
    │   └── SessionError             unknown session, not initialised, space mismatch
    └── ServerError                  the server could not do it now; retrying later may work
        ├── UnavailableError         a shard is down or unreachable
        ├── NotOwnerError            the shard does not own the space (assignment moved)
        └── StorageError             the WAL could not make data durable; nothing was acked
    SettingsError                    invalid configuration at start-up (not sent to clients)

``ErrorCode`` values are the protocol's (``engram.v1.ErrorCode``). :func:`to_proto` turns an
error into the in-band ``StreamError``; ``GRPC_STATUS`` maps codes to gRPC status codes for
calls that fail as a whole (unary RPCs, streams the transport must end).
"""

from __future__ import annotations

import grpc

from engram.v1 import streaming_pb2 as pb

Code = pb.ErrorCode


class SettingsError(ValueError):
    """A setting is missing or out of range; the message names the variable."""


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


def from_proto(err: pb.StreamError) -> EngramError:
    """Rebuilds an error received in-band (from a shard, or by a client)."""
    if err.code == pb.SEQUENCE_GAP:
        return SequenceError(err.message, expected=err.expected_sequence)
    cls: type[EngramError]
    if err.code in (pb.UNKNOWN_SESSION, pb.NOT_INITIALIZED, pb.SPACE_MISMATCH):
        cls = SessionError
    elif err.code == pb.SHARD_UNAVAILABLE:
        cls = UnavailableError
    elif err.code == pb.NOT_OWNER:
        cls = NotOwnerError
    elif err.code == pb.STORAGE_FAILURE:
        cls = StorageError
    elif err.retryable or err.code >= 50:
        cls = ServerError
    else:
        cls = ValidationError
    return cls(err.message, code=err.code)


# gRPC status for a call that fails as a whole with this code.
GRPC_STATUS: dict[int, grpc.StatusCode] = {
    pb.MALFORMED_MESSAGE: grpc.StatusCode.INVALID_ARGUMENT,
    pb.NOT_INITIALIZED: grpc.StatusCode.FAILED_PRECONDITION,
    pb.ALREADY_INITIALIZED: grpc.StatusCode.FAILED_PRECONDITION,
    pb.INVALID_SPACE_ID: grpc.StatusCode.INVALID_ARGUMENT,
    pb.SPACE_MISMATCH: grpc.StatusCode.INVALID_ARGUMENT,
    pb.UNKNOWN_SESSION: grpc.StatusCode.NOT_FOUND,
    pb.SEQUENCE_GAP: grpc.StatusCode.OUT_OF_RANGE,
    pb.EMPTY_BATCH: grpc.StatusCode.INVALID_ARGUMENT,
    pb.WRONG_DIMENSION: grpc.StatusCode.INVALID_ARGUMENT,
    pb.BAD_VECTOR_BLOB: grpc.StatusCode.INVALID_ARGUMENT,
    pb.LENGTH_MISMATCH: grpc.StatusCode.INVALID_ARGUMENT,
    pb.NON_FINITE_VALUE: grpc.StatusCode.INVALID_ARGUMENT,
    pb.ZERO_VECTOR: grpc.StatusCode.INVALID_ARGUMENT,
    pb.BATCH_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    pb.K_OUT_OF_RANGE: grpc.StatusCode.INVALID_ARGUMENT,
    pb.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    pb.MISSING_OPERATION: grpc.StatusCode.INVALID_ARGUMENT,
    pb.SHARD_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    pb.NOT_OWNER: grpc.StatusCode.UNAVAILABLE,
    pb.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    pb.STORAGE_FAILURE: grpc.StatusCode.UNAVAILABLE,
    pb.INTERNAL: grpc.StatusCode.INTERNAL,
    pb.CREDITS_EXCEEDED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    pb.STREAM_PAUSED: grpc.StatusCode.FAILED_PRECONDITION,
    pb.CONSISTENCY_TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(err: EngramError) -> grpc.StatusCode:
    return GRPC_STATUS.get(err.code, grpc.StatusCode.INTERNAL)
