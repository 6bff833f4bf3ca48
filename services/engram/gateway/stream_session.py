"""Opening a client stream's session: ``init``, a new session or a resumed one.

A new session gets a fresh id on the space the init names. A resumed one (the init names a
``session_id``) finds its space in the control-plane store, or takes it from the init when the
store does not know the session (Redis is a cache: the shard holds the truth). The key needs
``read`` or ``write`` on the space; a resumed session of a space the key does not cover is
refused without naming that space (its name is the other tenant's). The owning shard opens the
session and names its durable high-water mark: sequencing goes on right after it, and the init
ack carries it (``initial_sequence``) so the client resends exactly what is not durable.

A part of :class:`~engram.gateway.stream.ClientStream` (see that module).
"""

from __future__ import annotations

import contextlib
import uuid

from engram.common import validation
from engram.contract.errors import PermissionDeniedError, SessionError
from engram.control.store import SessionRecord
from engram.gateway import auth
from engram.gateway.stream_state import StreamState
from engram.v1 import streaming_pb2 as pb


class SessionOpening(StreamState):
    async def _init(self, msg: pb.ObservationRequest) -> None:
        if self.session_id:
            raise SessionError(
                f"the stream is already initialised (session {self.session_id})",
                code=pb.ALREADY_INITIALIZED,
            )
        resume = bool(msg.session_id)
        if resume:
            record = await self._lookup(msg.session_id)
            space = record.space if record else ""
            if space and not self._may_open(space):
                # the other space is not named: its name is the other tenant's
                raise PermissionDeniedError(
                    f"{self._who()} does not cover the memory space of session {msg.session_id!r}"
                )
            if msg.memory_space_id:
                requested = validation.space_id(msg.memory_space_id)
                if space and requested != space:
                    raise SessionError(
                        f"session {msg.session_id!r} belongs to memory space {space!r}, "
                        f"not {requested!r}",
                        code=pb.SPACE_MISMATCH,
                    )
                space = requested
            if not space:
                raise SessionError(
                    f"session {msg.session_id!r} is unknown (name its memory space to resume it)"
                )
            session_id = msg.session_id
        else:
            space = validation.space_id(msg.memory_space_id)
            session_id = "s-" + uuid.uuid4().hex
        if not self._may_open(space):
            raise PermissionDeniedError(
                f"{self._who()} has neither a 'read' nor a 'write' scope for memory space {space!r}"
            )
        opened = await self.gw.shards.open_session(space, session_id, create=not resume)
        self.session_id, self.space, self.dim = session_id, space, opened.dim
        self._dropped = None
        self.next_expected = opened.last_sequence + 1
        self.last_acked = opened.last_sequence
        with contextlib.suppress(Exception):  # Redis is a cache: the shard holds the truth
            await self.gw.store.put_session(
                SessionRecord(session_id, space, "active", self.last_acked),
                self.gw.settings.gateway.session_ttl_s,
            )
        limits = self.gw.settings.limits
        ack = pb.StreamInitAck(
            session_id=session_id,
            initial_sequence=opened.last_sequence,
            max_in_flight_batches=limits.max_in_flight_batches,
            max_batch_size=limits.max_batch_observations,
            dim=opened.dim,
            resumed=resume,
        )
        ack.capabilities.supports_backpressure = True
        ack.capabilities.supports_snapshot_isolation = True
        ack.capabilities.queue_capacity = limits.max_in_flight_batches
        self._send(pb.ObservationResponse(init_ack=ack))

    def _may_open(self, space: str) -> bool:
        """An init needs read or write on its space."""
        p = self.principal
        return p is not None and (p.allows(auth.READ, space) or p.allows(auth.WRITE, space))

    def _who(self) -> str:
        return self.principal.describe() if self.principal is not None else "this client"

    async def _lookup(self, session_id: str) -> SessionRecord | None:
        try:
            return await self.gw.store.get_session(session_id)
        except Exception:
            return None  # Redis down: resume from the shard alone
