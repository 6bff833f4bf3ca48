"""Recalls on a client stream, answered in-band (chunks carrying the request's request_id).

``_recall`` checks the request and the key's recall budget when it arrives, then runs the
recall in the background, so the batches after it are not held behind it; the session id goes
with it to the shard (a SESSION recall reads this session's acknowledged writes).
:func:`recall_span` is the gateway's span of one recall, also used by the public service's
``RecallStream`` (``service.py``).

A part of :class:`~engram.gateway.stream.ClientStream` (see that module).
"""

from __future__ import annotations

import time

from opentelemetry.context import Context
from opentelemetry.trace import Span

from engram.common import metrics, tracing, validation
from engram.contract.errors import EngramError
from engram.gateway import auth
from engram.gateway.stream_state import StreamState
from engram.v1 import streaming_pb2 as pb


class Recalls(StreamState):
    def _recall(self, req: pb.RecallRequest) -> None:
        validation.recall(req, self.gw.settings.limits)
        if self.principal is not None:
            auth.take_recall(self.principal)
        self._spawn(self._do_recall(req))

    async def _do_recall(self, req: pb.RecallRequest) -> None:
        started = time.perf_counter()
        span = recall_span(self.space, req, self._trace_parent) if tracing.active else None
        parent = tracing.traceparent(span) if span is not None else ""
        try:
            async for chunk in self.gw.shards.recall(self.space, req, self.session_id, parent):
                self._send(pb.ObservationResponse(recall=chunk))
        except EngramError as exc:
            if span is not None:
                tracing.fail(span, exc)
            self._error(exc, request_id=req.request_id)
            return
        if span is not None:
            span.end()
        metrics.recall_latency.observe(time.perf_counter() - started)


def recall_span(space: str, req: pb.RecallRequest, parent: Context | None) -> Span | None:
    """A sampled recall's span on the gateway (None if unsampled); the caller ends it."""
    span = tracing.start("engram.gateway.recall", parent)
    if span is not None:
        span.set_attributes(
            {
                "engram.memory_space": space,
                "engram.recall.k": req.k,
                "engram.recall.consistency": pb.Consistency.Name(req.consistency),
            }
        )
    return span
