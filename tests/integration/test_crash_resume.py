"""Crashes and dropped connections while the Python client streams: no loss, no duplicates.

Each test starts a fresh two-shard cluster, streams a corpus of 64-dimensional vectors (batches
of 500) into memory spaces owned by both shards, and breaks something mid-stream: kill -9 of a
shard, of the gateway or of Redis (the launcher restarts each, Redis empty), or a cut of the
TCP connection between client and gateway. The client resumes by itself. At the end every
batch sent has been acknowledged, every acknowledged id is stored exactly once, LSNs run
1..n without gaps, and recalls of a sample of the stored vectors find them.

Each cluster is a per-test ``make_cluster`` one (kills and restarts go through its launcher),
and all vectors are computed before the streams start.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import numpy as np

from engram.control.assignment import default_shard
from engram.control.restarts import Policy
from engram.corpus import Corpus
from engram.launcher.cluster import HOST, LocalCluster
from engram_client import EngramClient, ObservationStream, StreamEvent

DIM = 64
BATCH = 500
TIMEOUT_S = 120.0
RECALL_SAMPLE = 25


def space_on_shard(shard: int, prefix: str, shards: int = 2) -> str:
    """A space id the default assignment gives to ``shard``."""
    for i in range(1000):
        name = f"{prefix}-{i}"
        if default_shard(name, shards) == shard:
            return name
    raise AssertionError(f"no space for shard {shard}")


class Progress:
    """Observations acked so far by a group of writers; tasks can wait for a mark."""

    def __init__(self) -> None:
        self.acked = 0
        self._marks: list[tuple[int, asyncio.Event]] = []

    def add(self, n: int) -> None:
        self.acked += n
        for mark, event in self._marks:
            if self.acked >= mark:
                event.set()

    async def reached(self, mark: int) -> None:
        event = asyncio.Event()
        self._marks.append((mark, event))
        self.add(0)
        await event.wait()


@dataclass
class Writer:
    """Streams rows ``offset .. offset + count`` of the corpus into one space, and records acks."""

    space: str
    offset: int
    count: int
    corpus: Corpus
    acked: list[str] = field(default_factory=list)
    events: list[StreamEvent] = field(default_factory=list)
    stream: ObservationStream | None = None
    progress: Progress = field(default_factory=Progress)
    vectors: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.vectors = self.corpus.vectors(self.offset, self.count)

    def id_of(self, row: int) -> str:
        return f"{self.space}:{row}"

    async def open(self, client: EngramClient, session_id: str = "") -> ObservationStream:
        self.stream = await client.open_stream(
            self.space, session_id=session_id, on_event=self.events.append
        )
        return self.stream

    async def write(self, lo: int = 0, hi: int | None = None) -> None:
        """Sends rows ``lo .. hi`` and waits until every batch is acknowledged."""
        assert self.stream is not None
        hi = self.count if hi is None else hi
        futures = []
        for start in range(lo, hi, BATCH):
            stop = min(start + BATCH, hi)
            ids = [self.id_of(r) for r in range(start, stop)]
            fut = await self.stream.send(self.vectors[start:stop], ids=ids)
            fut.add_done_callback(lambda f, ids=ids: self._settled(f, ids))
            futures.append(fut)
        results = await asyncio.gather(*futures, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        assert failed == [], f"{self.space}: batches failed: {failed[:3]}"

    def _settled(self, fut: asyncio.Future[object], ids: list[str]) -> None:
        if not fut.cancelled() and fut.exception() is None:
            self.acked.extend(ids)
            self.progress.add(len(ids))

    async def close(self) -> None:
        assert self.stream is not None
        await self.stream.close()

    @property
    def reconnects(self) -> int:
        assert self.stream is not None
        return self.stream.reconnects

    def kinds(self) -> Counter[str]:
        return Counter(e.kind for e in self.events)


async def verify(client: EngramClient, writer: Writer, rows: int | None = None) -> None:
    """Every acked id stored exactly once, nothing else, LSNs 1..n; a sample is recallable."""
    rows = writer.count if rows is None else rows
    ids: list[str] = []
    lsns: list[int] = []
    async for chunk_ids, chunk_lsns in client.list_observations(writer.space):
        ids.extend(chunk_ids)
        lsns.extend(chunk_lsns)
    dups = {i: c for i, c in Counter(ids).items() if c > 1}
    assert dups == {}, f"{writer.space}: {len(dups)} ids stored more than once"
    assert lsns == list(range(1, len(lsns) + 1)), f"{writer.space}: LSNs have gaps"
    assert len(writer.acked) == rows, f"{writer.space}: {len(writer.acked)} of {rows} acked"
    missing = set(writer.acked) - set(ids)
    assert not missing, f"{writer.space}: {len(missing)} acked ids lost, e.g. {sorted(missing)[:3]}"
    unexpected = set(ids) - set(writer.acked)
    assert not unexpected, f"{writer.space}: {len(unexpected)} ids stored but never acked"
    assert len(ids) == rows

    sample = np.random.default_rng(len(writer.space)).choice(rows, RECALL_SAMPLE, replace=False)
    wrong = []
    for row in sample.tolist():
        result = await client.recall(writer.space, writer.vectors[row], k=5)
        if not result.hits or result.hits[0].id != writer.id_of(row):
            wrong.append((row, result.hits[0].id if result.hits else None))
        elif result.hits[0].score < 0.999:
            wrong.append((row, result.hits[0].score))
    assert wrong == [], f"{writer.space}: recall did not find its own vectors: {wrong}"


async def run_with_fault(
    writers: list[Writer], fault: Callable[[], Awaitable[None]], when_acked: int
) -> None:
    """Runs the writers to the end; ``fault`` runs once they acked ``when_acked`` in all."""
    assert all(w.progress is writers[0].progress for w in writers)

    async def trigger() -> None:
        await writers[0].progress.reached(when_acked)
        await fault()

    await asyncio.wait_for(
        asyncio.gather(trigger(), *(w.write() for w in writers)), timeout=TIMEOUT_S
    )


def two_writers(prefix: str, per_space: int) -> list[Writer]:
    corpus, progress = Corpus(DIM), Progress()
    return [
        Writer(
            space_on_shard(shard, prefix), shard * per_space, per_space, corpus, progress=progress
        )
        for shard in (0, 1)
    ]


def wait_restarted(cluster: LocalCluster, name: str, old_pid: int, timeout: float) -> int:
    """Waits until the launcher replaced ``old_pid`` and the successor is healthy; its PID."""
    deadline = time.monotonic() + timeout
    while cluster.pid(name) == old_pid:
        if cluster.state(name).given_up or time.monotonic() > deadline:
            raise RuntimeError(f"{name} was not restarted within {timeout} s")
        time.sleep(0.02)
    cluster.wait_healthy(name, max(0.1, deadline - time.monotonic()))
    return cluster.pid(name)


async def restart_by_kill(cluster: LocalCluster, name: str) -> int:
    """kill -9 ``name``, wait until the launcher's replacement is healthy; returns the old PID."""
    old = await asyncio.to_thread(cluster.kill, name, signal.SIGKILL)
    await asyncio.to_thread(wait_restarted, cluster, name, old, 60)
    return old


# ------------------------------------------------------------------------------ tests


async def test_shard_killed_mid_stream(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster()
    writers = two_writers("shardkill", 20_000)  # 40 K observations, one space per shard
    victim = f"shard-{default_shard(writers[0].space, 2)}"
    old_pid: list[int] = []

    async def kill_shard() -> None:
        old_pid.append(await restart_by_kill(cluster, victim))

    async with EngramClient(cluster.gateway_address) as client:
        for w in writers:
            await w.open(client)
        await run_with_fault(writers, kill_shard, when_acked=15_000)
        for w in writers:
            await w.close()
        assert cluster.pid(victim) != old_pid[0]
        assert cluster.restarts(victim) == 1, "restarted on the first try"
        hit, spared = writers
        assert hit.reconnects >= 1 and hit.kinds()["resumed"] >= 1, "the client resumed"
        assert spared.reconnects == 0, "a stream on the other shard is not disturbed"
        for w in writers:
            await verify(client, w)


async def test_gateway_killed_mid_stream(make_cluster: Callable[..., LocalCluster]) -> None:
    cluster = make_cluster()
    writers = two_writers("gwkill", 15_000)
    old_pid: list[int] = []

    async def kill_gateway() -> None:
        old_pid.append(await restart_by_kill(cluster, "gateway"))

    async with EngramClient(cluster.gateway_address) as client:
        for w in writers:
            await w.open(client)
        await run_with_fault(writers, kill_gateway, when_acked=10_000)
        for w in writers:
            await w.close()
        assert cluster.pid("gateway") != old_pid[0] and cluster.restarts("gateway") == 1
        for w in writers:
            assert w.reconnects >= 1 and w.kinds()["resumed"] >= 1
            await verify(client, w)


async def test_redis_killed_mid_stream(make_cluster: Callable[..., LocalCluster]) -> None:
    # Restarts come 4 s after a crash, so Redis is surely down while the second third is sent.
    cluster = make_cluster(policy=Policy(initial_delay_s=4.0))
    writers = two_writers("rediskill", 15_000)
    late = Writer(space_on_shard(0, "redisdown"), 40_000, 2_000, writers[0].corpus)

    async with EngramClient(cluster.gateway_address) as client:
        for w in writers:
            await w.open(client)
        await asyncio.gather(*(w.write(0, 5_000) for w in writers))

        old_redis = cluster.kill("redis", signal.SIGKILL)
        await asyncio.sleep(0.3)
        assert not await asyncio.to_thread(cluster.healthy, "redis", 0.5)
        # Streams keep going, and new sessions open, while Redis is down.
        await late.open(client)
        await asyncio.gather(late.write(), *(w.write(5_000, 10_000) for w in writers))
        await late.close()
        assert not await asyncio.to_thread(cluster.healthy, "redis", 0.5), "too slow to test"

        assert await asyncio.to_thread(wait_restarted, cluster, "redis", old_redis, 60) != old_redis
        # Redis came back empty; a gateway restart now makes every stream resume with no
        # session record in Redis: the shards hold the sessions' truth.
        await restart_by_kill(cluster, "gateway")
        await asyncio.gather(*(w.write(10_000, 15_000) for w in writers))
        for w in writers:
            assert w.kinds()["resumed"] >= 1
        sessions = [w.stream.session_id for w in writers if w.stream is not None]
        for w in writers:
            await w.close()

        # A brand-new client resumes a session by id: the durable mark comes from the shard.
        resumed = await client.open_stream(writers[0].space, session_id=sessions[0])
        assert resumed.last_acked == 15_000 // BATCH
        await resumed.close()

        for w in [*writers, late]:
            await verify(client, w)


class CuttableProxy:
    """A TCP proxy in front of the gateway whose connections the test can cut."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.cuts = 0
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, HOST, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.accepted += 1
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)
        except OSError:
            writer.transport.abort()
            self._writers.discard(writer)
            self._tasks.discard(task)
            return
        self._writers.add(up_writer)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.transport.abort()
                self._writers.discard(w)
            self._tasks.discard(task)

    def _abort_all(self) -> None:
        for w in list(self._writers):
            w.transport.abort()

    async def cut(self, down_for: float) -> None:
        """Stops listening, resets every connection, and listens again after ``down_for``."""
        assert self._server is not None
        self._server.close()
        self._abort_all()
        await self._server.wait_closed()
        self.cuts += 1
        await asyncio.sleep(down_for)
        await self.start()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._abort_all()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)


async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(1 << 16):
            dst.write(data)
            await dst.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        dst.transport.abort()


async def test_dropped_connection_resumes_without_duplicates_or_gaps(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster()
    gateway_port = int(cluster.gateway_address.rsplit(":", 1)[1])
    proxy = CuttableProxy(gateway_port)
    await proxy.start()
    writers = two_writers("dropped", 15_000)
    try:
        async with EngramClient(proxy.address) as client:
            for w in writers:
                await w.open(client)

            async def cut_twice() -> None:
                await proxy.cut(down_for=0.3)
                await writers[0].progress.reached(20_000)
                await proxy.cut(down_for=0.0)

            await run_with_fault(writers, cut_twice, when_acked=8_000)
            for w in writers:
                await w.close()
            assert proxy.cuts == 2
            assert proxy.accepted >= 3, "the client connected again after each cut"
            for w in writers:
                assert w.reconnects >= 1 and w.kinds()["resumed"] >= 1
                await verify(client, w)
    finally:
        await proxy.stop()


async def test_closing_the_client_settles_pending_batches(
    make_cluster: Callable[..., LocalCluster],
) -> None:
    cluster = make_cluster()
    space = space_on_shard(0, "closing")
    vectors = Corpus(DIM).vectors(0, 10)
    client = EngramClient(cluster.gateway_address)
    stream = await client.open_stream(space)
    cluster.kill("shard-0", signal.SIGSTOP)  # the batch cannot be acked while it is stopped
    try:
        fut = await stream.send(vectors)
        await asyncio.sleep(0.2)
        await client.close()
        done, _ = await asyncio.wait([fut], timeout=3)
    finally:
        cluster.kill("shard-0", signal.SIGCONT)
    with contextlib.suppress(BaseException):
        fut.exception()  # retrieved, whatever it is
    assert done, "a pending batch's future stays unresolved after EngramClient.close()"
