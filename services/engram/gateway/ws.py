"""The WebSocket endpoint ``/v1/stream`` on the gateway's HTTP port.

One WebSocket connection is one client stream: its frames are turned into the same
``ObservationRequest`` messages a gRPC client sends and fed to the same
:class:`~engram.gateway.stream.ClientStream` (session store, sequencing, validation, routing),
so a session opened over gRPC resumes over WebSocket and the other way round. Text frames are
JSON (:mod:`engram.gateway.ws_frames`); binary frames are serialized ``ObservationRequest``
messages, exactly what gRPC carries. Server frames are JSON text.

Connection hygiene: a ``heartbeat`` frame every ``ENGRAM_WS_HEARTBEAT_S`` (the init ack tells the
client the interval, and clients send theirs at the same pace); no frame from the client for
``ENGRAM_WS_IDLE_TIMEOUT_S`` closes the connection (1008). Frames larger than the gRPC message
limit close it with 1009 (the websockets library enforces ``max_size``). A ``close`` frame ends
the stream after every forwarded batch is answered: a final ``status`` frame (state ``closed``),
then close code 1000. When the stream must end because a shard is unreachable, an ``error``
frame is followed by close code 1013 (try again later: resume the session on a new connection).
Bad frames are answered with ``error`` frames and the connection stays open.

API keys (on when ``ENGRAM_KEYS_FILE`` is set): a handshake's ``Authorization: Bearer <key>``
header is checked before the upgrade (:meth:`WebSocketEndpoint.handshake`; a key that is not
accepted gets HTTP 401 with a short reason). Without the header (browsers cannot set one) the
connection must authenticate with its first frame, an ``init`` carrying ``api_key``. Until it
has, the server is listening at a low limit: frames over ``ENGRAM_PREAUTH_MAX_BYTES`` close the
connection (1009; the server is started with that limit and raises it per connection once the
key is accepted), any other frame than init, or a key not accepted, is answered with an
``error`` frame ``unauthenticated`` and close 1008, and so is silence: a connection not
authenticated within ``ENGRAM_AUTH_TIMEOUT_S`` is closed (1008) even if it sends heartbeats.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from engram.common import tracing
from engram.contract import errors
from engram.gateway import auth, ws_frames
from engram.gateway.auth import Principal
from engram.gateway.context import GatewayContext
from engram.gateway.service import parse
from engram.gateway.stream import ClientStream, Incoming, StreamAbort
from engram.v1 import streaming_pb2 as pb

log = logging.getLogger("engram.gateway.ws")

PATH = "/v1/stream"

# WebSocket close codes (RFC 6455 section 7.4.1); those of a stream ended by an error are the
# contract's (engram.contract.errors.CODES).
NORMAL = 1000
GOING_AWAY = 1001
POLICY = errors.WS_POLICY
TOO_BIG = 1009
SERVER_ERROR = errors.WS_SERVER_ERROR


def close_reason(text: str) -> str:
    """A close reason fits in 123 bytes of UTF-8."""
    data = text.encode()
    if len(data) <= 123:
        return text
    return data[:120].decode(errors="ignore") + "..."


class WebSocketEndpoint:
    """The connection handler given to the HTTP server (``start_http(ws_handler=...)``)."""

    def __init__(self, gw: GatewayContext) -> None:
        self.gw = gw
        # the library logs every connection's open and close at INFO: too much at scale
        logging.getLogger("websockets.server").setLevel(logging.WARNING)
        self.heartbeat_s = gw.settings.gateway.ws_heartbeat_s
        self.idle_timeout_s = gw.settings.gateway.ws_idle_timeout_s
        self.max_frame_bytes = gw.settings.limits.grpc_max_message_bytes
        self.auth = gw.auth
        self.auth_timeout_s = gw.settings.security.auth_timeout_s
        # the server's limit on incoming frames: low until a connection authenticates
        self.initial_max_size = (
            gw.settings.security.preauth_max_bytes if gw.auth.enabled else self.max_frame_bytes
        )
        # principals of handshakes that carried an accepted key, until the connection starts
        self._principals: weakref.WeakKeyDictionary[ServerConnection, Principal] = (
            weakref.WeakKeyDictionary()
        )
        self.connections = 0
        log.info(
            "WebSocket endpoint %s: heartbeat %g s, idle timeout %g s, frames up to %d bytes, "
            "JSON parser %s",
            PATH,
            self.heartbeat_s,
            self.idle_timeout_s,
            self.max_frame_bytes,
            ws_frames.JSON_PARSER,
        )

    def handshake(self, conn: ServerConnection, request: Request) -> Response | None:
        """The HTTP server's ``ws_check``: a header key is checked before the upgrade (401 if
        it is not accepted); without one the connection authenticates with its init frame."""
        if not self.auth.enabled:
            return None
        key = auth.bearer(request.headers.raw_items())
        if key is None:
            return None
        try:
            principal = self.auth.authenticate(key, "websocket", peer_of(conn))
        except errors.AuthenticationError as exc:
            response = conn.respond(HTTPStatus.UNAUTHORIZED, f"unauthenticated: {exc.message}\n")
            response.headers["WWW-Authenticate"] = 'Bearer realm="engram"'
            return response
        self._principals[conn] = principal
        self.authenticated(conn)
        return None

    def authenticated(self, conn: ServerConnection) -> None:
        """The connection's key was accepted: frames up to the normal limit from now on."""
        conn.protocol.max_message_size = self.max_frame_bytes

    async def __call__(self, conn: ServerConnection) -> None:
        self.connections += 1
        try:
            await _Connection(self, conn).run()
        finally:
            self.connections -= 1


class _Connection:
    def __init__(self, endpoint: WebSocketEndpoint, conn: ServerConnection) -> None:
        self.endpoint = endpoint
        self.conn = conn
        parent = None
        if tracing.active and tracing.client_context and conn.request is not None:
            parent = tracing.parent_from_headers(conn.request.headers.raw_items())
        self.peer = peer_of(conn)
        self.stream = ClientStream(
            endpoint.gw,
            parent,
            principal=endpoint._principals.pop(conn, None),
            transport="websocket",
            peer=self.peer,
            on_authenticated=lambda _principal: endpoint.authenticated(conn),
        )
        self.last_rx = time.monotonic()
        self.close_requested = False

    async def run(self) -> None:
        keepalive = asyncio.create_task(self._keepalive())
        deadline = None
        if self.stream.principal is None:
            deadline = asyncio.create_task(self._auth_deadline())
        code, reason = NORMAL, "stream ended"
        try:
            async with contextlib.aclosing(self.stream.run(self._requests())) as responses:
                async for item in responses:
                    if isinstance(item, StreamAbort):
                        code, reason = await self._abort(item)
                        break
                    await self._respond(item)
            if self.close_requested and code == NORMAL:
                await self._closed_status()
                reason = "closed at the client's request; every batch answered"
        except ConnectionClosed:
            return
        except Exception:
            log.exception("WebSocket stream of session %s failed", self.stream.session_id or "-")
            code, reason = SERVER_ERROR, "internal error on the gateway"
        finally:
            keepalive.cancel()
            if deadline is not None:
                deadline.cancel()
            await asyncio.gather(
                keepalive, *([deadline] if deadline else []), return_exceptions=True
            )
        await self.conn.close(code, close_reason(reason))

    async def _auth_deadline(self) -> None:
        """Closes a connection that has not authenticated within ENGRAM_AUTH_TIMEOUT_S."""
        timeout = self.endpoint.auth_timeout_s
        await asyncio.sleep(timeout)
        if self.stream.principal is None:
            auth.audit_failure("websocket", self.peer, "timeout")
            await self.conn.close(POLICY, f"not authenticated within {timeout:g} s")

    # ------------------------------------------------------------------ client -> server

    async def _requests(self) -> AsyncIterator[Incoming]:
        """The connection's frames as the ClientStream's requests (bad frames answered here)."""
        while True:
            try:
                data = await self.conn.recv()
            except ConnectionClosed as exc:
                if self.stream.principal is None and exc.sent and exc.sent.code == TOO_BIG:
                    auth.audit_failure("websocket", self.peer, "too_large")
                return
            self.last_rx = time.monotonic()
            if isinstance(data, bytes):
                incoming = parse(data)
                op = incoming.message.WhichOneof("operation") if incoming.message else None
            else:
                try:
                    kind, req = ws_frames.decode_text(data)
                except ws_frames.FrameError as exc:
                    await self._send(
                        ws_frames.error_frame(
                            exc.code,
                            exc.message,
                            session_id=self.stream.session_id,
                            sequence_number=exc.sequence_number,
                            request_id=exc.request_id,
                        )
                    )
                    continue
                if req is None:  # a client heartbeat: activity, nothing to forward
                    continue
                incoming = Incoming(req, req.ByteSize())
                op = req.WhichOneof("operation")
            if op == "close":
                self.close_requested = True
                if not self.stream.session_id:  # nothing to drain: close right away
                    return
            yield incoming

    # ------------------------------------------------------------------ server -> client

    async def _send(self, text: str) -> None:
        await self.conn.send(text)

    async def _respond(self, resp: pb.ObservationResponse) -> None:
        extra: dict[str, Any] | None = None
        if resp.HasField("init_ack"):
            ep = self.endpoint
            extra = {
                "heartbeat_s": ep.heartbeat_s,
                "idle_timeout_s": ep.idle_timeout_s,
                "max_frame_bytes": ep.max_frame_bytes,
            }
        await self._send(ws_frames.encode_response(resp, extra))

    async def _closed_status(self) -> None:
        status = pb.StreamStatus(
            state=pb.StreamStatus.CLOSED,
            message="closed at the client's request; every batch answered",
            last_acked_sequence=self.stream.last_acked,
        )
        resp = pb.ObservationResponse(status=status, session_id=self.stream.session_id)
        resp.server_timestamp.GetCurrentTime()
        await self._send(ws_frames.encode_response(resp))

    async def _abort(self, abort: StreamAbort) -> tuple[int, str]:
        err = abort.error
        with contextlib.suppress(ConnectionClosed):
            await self._send(
                ws_frames.error_frame(
                    err.code,
                    err.message,
                    session_id=self.stream.session_id,
                    retryable=err.retryable,
                )
            )
        return errors.info(err.code).ws_close, err.message

    async def _keepalive(self) -> None:
        """Heartbeat frames every heartbeat_s; closes with 1008 after idle_timeout_s of silence."""
        ep = self.endpoint
        next_beat = time.monotonic() + ep.heartbeat_s
        try:
            while True:
                now = time.monotonic()
                idle_at = self.last_rx + ep.idle_timeout_s
                if now >= idle_at:
                    log.info(
                        "closing idle WebSocket (session %s): no frame for %g s",
                        self.stream.session_id or "-",
                        ep.idle_timeout_s,
                    )
                    await self.conn.close(
                        POLICY, f"idle timeout: no frame for {ep.idle_timeout_s:g} s"
                    )
                    return
                if now >= next_beat:
                    await self._send(
                        ws_frames.heartbeat_frame(self.stream.session_id, self.stream.last_acked)
                    )
                    next_beat = now + ep.heartbeat_s
                await asyncio.sleep(max(0.0, min(next_beat, idle_at) - time.monotonic()) + 0.001)
        except ConnectionClosed:
            return


def peer_of(conn: ServerConnection) -> str:
    """``host:port`` of the client (for audit lines)."""
    address = conn.remote_address
    if isinstance(address, tuple) and len(address) >= 2:
        return f"{address[0]}:{address[1]}"
    return str(address or "-")
