"""A client stream's deletes, and the end of its session when its space is dropped.

A ``delete`` (by ids and/or a time range, checked by :func:`engram.gateway.forget.delete_request`)
is answered with ``deleted`` once its tombstone is durable. It is sent to the shard only after
every batch this stream forwarded before it is answered
(:class:`~engram.gateway.forget.AnsweredBefore`), so a stream can delete what it has just
written. Its errors are answered in-band with its request_id.

When the shard answers SPACE_DROPPED (on the Append stream, or to the stream following a move),
``_space_dropped`` answers every batch in flight with it (or the stream, if none is) and fails
every waiting delete, ends the session and keeps the stream open for a new init, which on the
same name starts an empty space; until that init, every message is answered SPACE_DROPPED too
(batches the client pipelined before it learnt of the drop).

A part of :class:`~engram.gateway.stream.ClientStream` (see that module).
"""

from __future__ import annotations

import asyncio

from engram.common import tracing
from engram.contract.errors import EngramError, SessionError
from engram.gateway import forget
from engram.gateway.stream_state import StreamState
from engram.v1 import streaming_pb2 as pb


class Forgetting(StreamState):
    def _delete(self, req: pb.DeleteRequest) -> None:
        if req.memory_space_id and req.memory_space_id.strip() != self.space:
            raise SessionError(
                f"this stream's session belongs to memory space {self.space!r}, "
                f"not {req.memory_space_id!r}: delete elsewhere with the unary Delete call",
                code=pb.SPACE_MISMATCH,
            )
        checked = forget.delete_request(req, self.space, self.gw.settings.limits)
        self._spawn(self._do_delete(checked, self._deletes.wait(self._sent)))

    async def _do_delete(self, req: pb.DeleteRequest, before: asyncio.Future[None]) -> None:
        """Waits for the batches forwarded before the delete, then asks the shard."""
        try:
            await before
            answer = await self.gw.shards.delete(self.space, req)
        except EngramError as exc:
            self._error(exc, request_id=req.request_id)
            return
        answer.request_id = req.request_id
        self._send(pb.ObservationResponse(deleted=answer))

    def _space_dropped(self) -> None:
        """The shard dropped this stream's space: every batch in flight is answered with
        SPACE_DROPPED, the session ends and the stream stays open for a new init (which, on
        the same name, starts an empty space)."""
        err = SessionError(
            f"memory space {self.space!r} was dropped: session {self.session_id!r} ended with "
            "it and nothing unacknowledged was stored; send an init to go on (a new session "
            "on the name starts an empty space)",
            code=pb.SPACE_DROPPED,
        )
        if not self._sent:
            self._error(err)
        for seq in sorted(self._sent):
            sent = self._sent.pop(seq)
            if sent.span is not None:
                tracing.fail(sent.span, err)
            self._error(err, seq)
        self._deletes.fail(err)
        self._dropped = err
        if self._append is not None:
            self._append.cancel()
        if self._shard_reader is not None:  # it may be the task running this: let it end
            self._tasks.add(self._shard_reader)
            self._shard_reader.add_done_callback(self._tasks.discard)
        self._append = self._shard_reader = None
        self.session_id, self.space, self.dim = "", "", 0
        self.next_expected, self.last_acked, self._rejected_from = 1, 0, None
