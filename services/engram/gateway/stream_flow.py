"""Client flow control on a stream: PAUSE, RESUME, SLOW_DOWN, SPEED_UP, BUFFER_STATUS.

Flow messages are handled the moment they arrive, ahead of batches waiting in the stream's work
queue (``ClientStream._feed``), so a SPEED_UP never waits behind a batch held by SLOW_DOWN.
PAUSE makes the stream refuse batches (STREAM_PAUSED) until RESUME; SLOW_DOWN puts its batches
through a :class:`~engram.gateway.flow.TokenBucket` at the client's preferred rate (half the
current one if it names none); SPEED_UP replaces the bucket with a faster one, or lifts it.
Every flow message is answered with the stream's status.

A part of :class:`~engram.gateway.stream.ClientStream` (see that module).
"""

from __future__ import annotations

from engram.contract.errors import ValidationError
from engram.gateway.flow import TokenBucket
from engram.gateway.stream_state import StreamState
from engram.v1 import streaming_pb2 as pb


class FlowControl(StreamState):
    def _flow(self, flow: pb.FlowControl) -> None:
        """Client flow control: PAUSE / RESUME / SLOW_DOWN / SPEED_UP / BUFFER_STATUS."""
        action = flow.action
        A = pb.FlowControl
        if action == A.PAUSE:
            self._paused = True
        elif action == A.RESUME:
            self._paused = False
        elif action in (A.SLOW_DOWN, A.SPEED_UP):
            old = self._bucket
            if action == A.SLOW_DOWN:
                rate = flow.preferred_rate or max(1, (old.rate if old else 10_000) // 2)
                self._bucket = TokenBucket(rate)
            else:
                self._bucket = TokenBucket(flow.preferred_rate) if flow.preferred_rate else None
            if old is not None:
                old.replaced.set()
        elif action != A.BUFFER_STATUS:
            raise ValidationError(f"unknown flow control action {action}", code=pb.INVALID_ARGUMENT)
        status = self._status(self._shard_status)
        status.message = f"{A.Action.Name(action)}: {status.message}".rstrip(": ")
        self._send(pb.ObservationResponse(status=status))
