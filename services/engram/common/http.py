"""The HTTP port of a service: ``/metrics`` and ``/healthz`` (and, on the gateway, WebSocket).

Built on the ``websockets`` server so the gateway can serve WebSocket streams on the same port;
plain GETs are answered in ``process_request`` before any handshake.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from ssl import SSLContext

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

Health = Callable[[], Awaitable[tuple[bool, str]]]


def _response(status: int, reason: str, body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return Response(status, reason, headers, body)


async def start_http(
    host: str,
    port: int,
    health: Health,
    ws_handler: Callable[[ServerConnection], Awaitable[None]] | None = None,
    *,
    ws_path: str | None = None,
    max_size: int | None = 2**20,
    routes: Callable[[str], tuple[bytes, str] | None] | None = None,
    ssl: SSLContext | None = None,
    ws_check: Callable[[ServerConnection, Request], Response | None] | None = None,
) -> Server:
    """Serves /metrics, /healthz (200 or 503 with the reason) and, if given, WebSocket.

    ``ws_path``: the only path that takes a WebSocket handshake (None: any); ``max_size``:
    largest incoming WebSocket message (larger ones close the connection with 1009);
    ``routes``: path -> (body, content type) for static GETs (None when not one of its paths);
    ``ssl``: serve HTTPS/WSS with this context (``engram.common.tls.server_ssl_context``);
    ``ws_check``: called with each WebSocket handshake on ``ws_path``; a Response refuses it
    (the gateway's API key check: 401 before upgrading).
    """

    async def process_request(conn: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == "/metrics":
            return _response(200, "OK", generate_latest(), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            ok, detail = await health()
            body = (detail or ("ok" if ok else "unhealthy")).encode() + b"\n"
            return _response(
                200 if ok else 503,
                "OK" if ok else "Service Unavailable",
                body,
                "text/plain; charset=utf-8",
            )
        if routes is not None and (found := routes(path)) is not None:
            return _response(200, "OK", found[0], found[1])
        if ws_handler is None or request.headers.get("Upgrade", "").lower() != "websocket":
            return _response(404, "Not Found", b"not found\n", "text/plain; charset=utf-8")
        if ws_path is not None and path != ws_path:
            body = f"no WebSocket endpoint at {path}; use {ws_path}\n".encode()
            return _response(404, "Not Found", body, "text/plain; charset=utf-8")
        return ws_check(conn, request) if ws_check is not None else None

    async def reject(conn: ServerConnection) -> None:
        await conn.close(1008, "no WebSocket endpoint here")

    return await serve(
        ws_handler or reject,
        host,
        port,
        process_request=process_request,
        compression=None,
        max_size=max_size,
        ssl=ssl,
    )
