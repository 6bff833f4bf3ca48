"""Following a moved space: a stream's unanswered batches resent, in order, to the new owner.

When the space moves, its old owner answers NOT_OWNER from the fence on. The stream keeps every
batch it forwarded until it is answered (``_sent``), so it then follows the space itself
(``_reroute``): it holds new batches back (``_routed``), finds the new owner through the routing
table (waiting while the move commits, up to ``_REROUTE_S``), reopens the session there and
resends, in order, every batch not yet answered; those the old owner had made durable come back
as duplicates. The client sees only a pause. A space dropped meanwhile ends the session as any
dropped space does; any other failure ends the stream with UNAVAILABLE, and the client resumes.

A part of :class:`~engram.gateway.stream.ClientStream` (see that module).
"""

from __future__ import annotations

import logging
import time

from engram.common import metrics
from engram.contract.errors import EngramError
from engram.gateway.stream_state import StreamState
from engram.v1 import streaming_pb2 as pb

log = logging.getLogger("engram.gateway.stream")

# How long a stream follows a moving space (NOT_OWNER) before it ends with UNAVAILABLE.
_REROUTE_S = 30.0


class MoveFollowing(StreamState):
    def _follow_move(self) -> None:
        if self._reroute_task is None or self._reroute_task.done():
            self._routed.clear()
            self._reroute_task = self._spawn(self._reroute())

    async def _reroute(self) -> None:
        """The space moved: reopen the session at its new owner and resend what is unanswered."""
        started = time.perf_counter()
        old, self._append = self._append, None
        if old is not None:
            old.cancel()
        metrics.stream_reroutes_total.inc()
        try:
            await self.gw.shards.open_session(
                self.space, self.session_id, create=False, timeout_s=_REROUTE_S
            )
            append = await self._shard_stream()
            for seq in sorted(self._sent):
                sent = self._sent[seq]
                await append.write(seq, sent.batch, sent.traceparent)
        except EngramError as exc:
            if exc.code == pb.SPACE_DROPPED:
                self._space_dropped()
            else:
                self._shard_lost(f"following memory space {self.space!r} to its new owner: {exc}")
            return
        finally:
            self._routed.set()
        metrics.reroute_pause.observe(time.perf_counter() - started)
        log.info(
            "session %s followed memory space %s to its new owner in %.0f ms",
            self.session_id,
            self.space,
            (time.perf_counter() - started) * 1000,
        )
