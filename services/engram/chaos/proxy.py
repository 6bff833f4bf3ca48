"""A fault-injecting TCP proxy: placed between the gateway and a shard by the chaos harness.

Each :class:`FaultProxy` listens on 127.0.0.1 and forwards every connection to one upstream
address. Its :class:`Mode` decides what happens to the bytes:

* ``pass``       forward as they come;
* ``delay``      deliver every chunk ``delay_ms`` after it arrived (order kept, like added
                 network latency: throughput stays, every round trip gets slower);
* ``reset``      abort every open connection with a TCP RST, and reset new ones at once;
* ``blackhole``  forward nothing and stop reading (the kernel buffers fill, as in a partition
                 that TCP would survive); new connections are held, not connected upstream.
                 When the mode changes back, held bytes flow on.

:class:`ProxyHost` runs any number of proxies on an event loop in its own thread, so a busy
harness loop does not add latency of its own, and changes their modes from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

log = logging.getLogger("engram.chaos.proxy")

HOST = "127.0.0.1"
_CHUNK = 64 * 1024
_MODES = ("pass", "delay", "reset", "blackhole")


RECALL = "-recall"  # suffix of the name of the proxy to a shard's recall port


@dataclass(frozen=True)
class Mode:
    kind: str = "pass"
    delay_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in _MODES:
            raise ValueError(f"proxy mode must be one of {', '.join(_MODES)}, not {self.kind!r}")
        if self.delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {self.delay_ms}")

    def __str__(self) -> str:
        return f"delay {self.delay_ms:g} ms" if self.kind == "delay" else self.kind


PASS = Mode()


@dataclass
class ProxyStats:
    connections: int = 0
    resets: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


def _rst(writer: asyncio.StreamWriter) -> None:
    """Closes the connection with a TCP RST (SO_LINGER 0), not a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Conn:
    client: asyncio.StreamWriter
    handler: asyncio.Task[None] | None
    upstream: asyncio.StreamWriter | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def reset(self) -> None:
        for w in (self.client, self.upstream):
            if w is not None:
                _rst(w)
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    """One listening port forwarding to ``upstream``; lives on one event loop."""

    def __init__(self, name: str, upstream: str, port: int = 0) -> None:
        self.name = name
        self.upstream = upstream
        self.port = port
        self.mode = PASS
        self.stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._conns: set[_Conn] = set()
        self._open = asyncio.Event()  # set unless blackholed
        self._open.set()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, HOST, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        # Resetting ends every handler (held ones wake up and see the mode); handlers are not
        # cancelled: asyncio's stream server logs an error for a cancelled handler.
        handlers = [c.handler for c in self._conns if c.handler is not None]
        self.set_mode(Mode("reset"))
        if handlers:
            await asyncio.wait(handlers, timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    def set_mode(self, mode: Mode) -> None:
        old, self.mode = self.mode, mode
        if mode.kind == "blackhole":
            self._open.clear()
        else:
            self._open.set()
        if mode.kind == "reset":
            for conn in list(self._conns):
                conn.reset()
                self.stats.resets += 1
        if old != mode:
            log.info("proxy %s -> %s: %s", self.name, self.upstream, mode)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(writer, asyncio.current_task())  # type: ignore[arg-type]
        self._conns.add(conn)
        self.stats.connections += 1
        try:
            if self.mode.kind == "reset":
                self.stats.resets += 1
                _rst(writer)
                return
            await self._open.wait()
            if self.mode.kind == "reset":  # the mode changed while the connection was held
                _rst(writer)
                return
            host, _, port = self.upstream.rpartition(":")
            try:
                up_reader, up_writer = await asyncio.open_connection(host, int(port))
            except OSError:
                _rst(writer)
                return
            conn.upstream = up_writer
            conn.tasks = [
                asyncio.create_task(self._pump(reader, up_writer, up=True)),
                asyncio.create_task(self._pump(up_reader, writer, up=False)),
            ]
            done, _ = await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_EXCEPTION)
            if any(not t.cancelled() and t.exception() is not None for t in done):
                conn.reset()  # one direction broke: the connection is gone both ways
            await asyncio.gather(*conn.tasks, return_exceptions=True)
        finally:
            self._conns.discard(conn)
            for w in (conn.client, conn.upstream):
                if w is not None and not w.transport.is_closing():
                    w.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        """Copies one direction; chunks go through a queue so that delays keep their order.

        Returns after forwarding an EOF; raises when either side fails."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read_side() -> None:
            while True:
                await self._open.wait()
                data = await reader.read(_CHUNK)
                due = time.monotonic()
                if self.mode.kind == "delay":
                    due += self.mode.delay_ms / 1000
                queue.put_nowait((due, data))
                if not data:
                    return

        tasks = [
            asyncio.create_task(read_side()),
            asyncio.create_task(self._send(queue, writer, up=up)),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # raises the side's error
            await tasks[1]  # the reader saw EOF: let the sender flush and forward it
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _send(
        self, queue: asyncio.Queue[tuple[float, bytes]], writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._open.wait()
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            if up:
                self.stats.bytes_up += len(data)
            else:
                self.stats.bytes_down += len(data)
            await writer.drain()


class ProxyHost:
    """Runs proxies on an event loop in a daemon thread; every method is thread-safe."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="chaos-proxy")
        self._thread.daemon = True
        self._proxies: dict[str, FaultProxy] = {}
        self._started = False

    def start(self) -> ProxyHost:
        if not self._started:
            self._thread.start()
            self._started = True
        return self

    def add(self, name: str, upstream: str, port: int = 0) -> FaultProxy:
        """Starts a proxy to ``upstream``; returns it (its ``address`` is where it listens)."""
        proxy = self._call(self._add(name, upstream, port))
        return proxy

    async def _add(self, name: str, upstream: str, port: int) -> FaultProxy:
        proxy = FaultProxy(name, upstream, port)
        await proxy.start()
        self._proxies[name] = proxy
        return proxy

    def get(self, name: str) -> FaultProxy:
        return self._proxies[name]

    @property
    def names(self) -> list[str]:
        return list(self._proxies)

    def set_mode(self, names: str | Iterable[str], mode: Mode) -> None:
        targets = [names] if isinstance(names, str) else list(names)

        async def apply() -> None:
            for name in targets:
                self._proxies[name].set_mode(mode)

        self._call(apply())

    def stats(self) -> dict[str, ProxyStats]:
        return {name: p.stats for name, p in self._proxies.items()}

    def stop(self) -> None:
        if not self._started:
            return

        async def close_all() -> None:
            for proxy in self._proxies.values():
                await proxy.close()

        with contextlib.suppress(Exception):
            self._call(close_all(), timeout=5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        if not self._thread.is_alive():
            self._loop.close()
        self._started = False

    def _call(self, coro: object, timeout: float = 10.0) -> object:
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        return future.result(timeout)
