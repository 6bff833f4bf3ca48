"""Fixtures for the gateway's unit tests: a client stream against an in-memory shard and control
plane. Nothing here starts a process or opens a socket.

* ``fake_shard``: a :class:`FakeShard`, the gateway's ``Shards`` interface in memory. It keeps
  each session's marks like a shard (a duplicate is re-acknowledged, a gap is answered with the
  expected number, answers come in write order) and lets a test hold acks (``hold`` /
  ``release``), refuse the next batch (``reject_next``), push a status (``push_status``), break
  every append stream (``break_streams``: what was not yet acknowledged is lost, as in a crash),
  make the shard unreachable (``down``) or move a space (``fence``: batches get NOT_OWNER and
  sessions wait, as while a move commits; ``moved``: the space is served again, by its "new
  owner", which holds the same data). Deletes resolve ids and time ranges against the
  acknowledged observations (recalls and scans leave deleted ones out; ``deletes`` records
  each request, ``fail_next_delete`` answers the next one with an error); ``drop_space`` and
  ``set_retention`` keep what a shard would.
* ``control``: a :class:`~engram.control.memory.MemoryControlStore`.
* ``gateway``: a ``GatewayContext`` over both, with 4 credits per stream.
* ``open_stream()``: a :class:`StreamDriver` running one ``ClientStream``: ``init``, ``batch``,
  ``flow``, ``send`` feed it; ``next`` / ``response`` read what it yields; ``quiet`` checks it
  yields nothing; ``finished`` waits for its end. Every stream is stopped at teardown, and the
  test fails if a task it started is still running or an append stream is still open.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from engram.common.settings import load
from engram.contract.errors import (
    EngramError,
    NotOwnerError,
    OverloadedError,
    SessionError,
    UnavailableError,
)
from engram.control.memory import MemoryControlStore
from engram.gateway.context import GatewayContext
from engram.gateway.service import parse
from engram.gateway.shards import OpenedSession
from engram.gateway.stream import ClientStream, Incoming, StreamAbort
from engram.internal.v1 import shard_pb2 as ipb
from engram.v1 import streaming_pb2 as pb

CREDITS = 4
WAIT_S = 2.0  # longest wait for something the stream should yield (it takes milliseconds)
Item = pb.ObservationResponse | StreamAbort


@dataclass
class _Session:
    assigned: int = 0  # highest sequence number taken (durable or not)
    durable: int = 0  # highest sequence number acknowledged


@dataclass
class _Space:
    dim: int = 0
    rows: int = 0  # LSNs handed out
    sessions: dict[str, _Session] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)  # acknowledged observations, in LSN order
    times: list[int] = field(default_factory=list)  # their times (us), in the same order
    deleted: set[int] = field(default_factory=set)  # rows (LSN - 1) deleted
    retention: pb.Retention = field(default_factory=pb.Retention)

    def live(self) -> list[tuple[int, str]]:
        """(row, id) of the observations not deleted, in LSN order."""
        return [(row, i) for row, i in enumerate(self.ids) if row not in self.deleted]


@dataclass
class _Answer:
    response: ipb.AppendResponse
    on_durable: Callable[[], None] | None = None  # set: waits while the shard holds acks


class FakeShard:
    def __init__(self) -> None:
        self.spaces: dict[str, _Space] = {}
        self.writes: list[tuple[str, int]] = []  # (session, sequence) of every batch written
        self.recalls: list[tuple[str, str]] = []  # (space, session) of every recall
        self.streams: list[FakeAppendStream] = []  # open append streams
        self.holding = False
        self.down = False
        self._rejections: deque[tuple[int, str]] = deque()
        self.fenced: dict[str, asyncio.Event] = {}  # space -> set once its move committed
        self.refreshes = 0
        self.deletes: list[tuple[str, pb.DeleteRequest]] = []  # (space, request) of each delete
        self._delete_errors: deque[EngramError] = deque()

    # ------------------------------------------------------------- test controls

    def add_session(self, space: str, session_id: str, *, mark: int = 0, dim: int = 0) -> None:
        s = self.spaces.setdefault(space, _Space())
        s.dim = s.dim or dim
        s.sessions[session_id] = _Session(mark, mark)

    def store(self, space: str, ids: list[str], times_us: list[int]) -> None:
        """Observations the space holds, acknowledged (as if a stream had written them)."""
        s = self.spaces.setdefault(space, _Space())
        s.ids.extend(ids)
        s.times.extend(times_us)
        s.rows += len(ids)

    def mark(self, space: str, session_id: str) -> int:
        return self.spaces[space].sessions[session_id].durable

    def hold(self) -> None:
        self.holding = True

    def release(self) -> None:
        self.holding = False
        for stream in self.streams:
            stream.flush()

    def reject_next(self, retry_after_ms: int = 250, reason: str = "memory_budget") -> None:
        self._rejections.append((retry_after_ms, reason))

    def push_status(self, status: pb.StreamStatus) -> None:
        for stream in self.streams:
            stream.answer(_Answer(ipb.AppendResponse(status=status)))

    def break_streams(self) -> None:
        for stream in list(self.streams):
            stream.fail(UnavailableError("the shard stream failed: UNAVAILABLE connection reset"))
        self.holding = False
        for space in self.spaces.values():
            for session in space.sessions.values():
                session.assigned = session.durable

    def fail_next_delete(self, err: EngramError) -> None:
        self._delete_errors.append(err)

    def fence(self, space: str) -> None:
        self.fenced[space] = asyncio.Event()

    def moved(self, space: str) -> None:
        self.fenced.pop(space).set()

    # ------------------------------------------------------- the Shards interface

    async def refresh(self) -> None:
        self.refreshes += 1

    def _reachable(self, space: str) -> None:
        if self.down:
            raise UnavailableError(f"the shard of memory space {space!r} did not answer: DOWN")

    async def open_session(
        self, space: str, session_id: str, *, create: bool, timeout_s: float = 10.0
    ) -> OpenedSession:
        self._reachable(space)
        if space in self.fenced:  # as GrpcShards: follow the move for up to timeout_s
            try:
                await asyncio.wait_for(self.fenced[space].wait(), timeout_s)
            except TimeoutError:
                raise NotOwnerError(f"memory space {space!r} is moving") from None
        s = self.spaces.setdefault(space, _Space())
        if session_id not in s.sessions:
            if not create:
                raise SessionError(f"session {session_id!r} is unknown in memory space {space!r}")
            s.sessions[session_id] = _Session()
        return OpenedSession(last_sequence=s.sessions[session_id].durable, dim=s.dim)

    async def open_append(
        self, space: str, session_id: str, *, timeout_s: float | None = None
    ) -> FakeAppendStream:
        self._reachable(space)
        stream = FakeAppendStream(self, space, session_id)
        self.streams.append(stream)
        return stream

    async def recall(
        self, space: str, req: pb.RecallRequest, session_id: str = "", traceparent: str = ""
    ) -> AsyncIterator[pb.RecallResponse]:
        self._reachable(space)
        self.recalls.append((space, session_id))
        s = self.spaces.get(space, _Space())
        found = [pb.Memory(id=i, lsn=row + 1, score=1.0) for row, i in s.live()][: req.k]
        yield pb.RecallResponse(results=found, snapshot_sequence=len(s.ids))

    async def scan(
        self, space: str, chunk_size: int = 0
    ) -> AsyncIterator[pb.ListObservationsResponse]:
        self._reachable(space)
        s = self.spaces.get(space, _Space())
        live = s.live()
        size = chunk_size or 10_000
        for lo in range(0, len(live), size):
            part = live[lo : lo + size]
            yield pb.ListObservationsResponse(
                ids=[i for _, i in part], lsns=[row + 1 for row, _ in part], dim=s.dim
            )

    async def delete(self, space: str, request: pb.DeleteRequest) -> pb.DeleteResponse:
        """As ``Space.resolve_delete`` + ``begin_delete``: only acknowledged rows are named."""
        self._reachable(space)
        if space in self.fenced:  # as GrpcShards: NOT_OWNER is followed to the new owner
            await self.fenced[space].wait()
        self.deletes.append((space, request))
        if self._delete_errors:
            raise self._delete_errors.popleft()
        s = self.spaces.get(space, _Space())
        rows: set[int] = set()
        already = not_found = 0
        for obs_id in request.ids:
            named = [row for row, i in enumerate(s.ids) if i == obs_id]
            if not named:
                not_found += 1
            elif all(row in s.deleted for row in named):
                already += 1
            rows.update(named)
        if request.HasField("since_us") or request.HasField("until_us"):
            lo = request.since_us if request.HasField("since_us") else -(1 << 63)
            hi = request.until_us if request.HasField("until_us") else 1 << 63
            rows.update(row for row, t in enumerate(s.times) if lo <= t < hi)
        fresh = rows - s.deleted
        s.deleted |= fresh
        answer = pb.DeleteResponse(
            request_id=request.request_id,
            deleted=len(fresh),
            already_deleted=already,
            not_found=not_found,
            lsn=len(s.ids),
        )
        answer.committed_at.GetCurrentTime()
        return answer

    async def drop_space(self, space: str) -> int:
        self._reachable(space)
        dropped = self.spaces.pop(space, None)
        return len(dropped.live()) if dropped is not None else 0

    async def set_retention(self, space: str, retention: pb.Retention) -> pb.Retention:
        self._reachable(space)
        self.spaces.setdefault(space, _Space()).retention.CopyFrom(retention)
        return retention

    def begin(self, space: str, session_id: str, seq: int, batch: pb.ObservationBatch) -> _Answer:
        """What the shard answers to batch ``seq`` (``shard/space.py::begin_append``)."""
        s = self.spaces[space]
        if space in self.fenced:
            err = NotOwnerError(f"memory space {space!r} is moving")
            return _Answer(ipb.AppendResponse(sequence_number=seq, error=err.to_proto()))
        session = s.sessions.get(session_id)
        if session is None:
            err = SessionError(f"session {session_id!r} is unknown in memory space {space!r}")
            return _Answer(ipb.AppendResponse(sequence_number=seq, error=err.to_proto()))
        if seq <= session.assigned:
            dup = ipb.AppendResponse(sequence_number=seq, duplicate=True, committed_at_us=_now())
            return _Answer(dup, None if seq <= session.durable else lambda: None)
        if seq != session.assigned + 1:
            gap = pb.StreamError(code=pb.SEQUENCE_GAP, expected_sequence=session.assigned + 1)
            return _Answer(ipb.AppendResponse(sequence_number=seq, error=gap))
        if self._rejections:
            retry_after_ms, reason = self._rejections.popleft()
            err = OverloadedError("over the memory budget", retry_after_ms=retry_after_ms)
            refused = ipb.AppendResponse(
                sequence_number=seq,
                rejected=True,
                retry_after_ms=retry_after_ms,
                reject_reason=reason,
                error=err.to_proto(),
            )
            return _Answer(refused)
        n = len(batch.vectors) // (4 * batch.dim)
        ids = list(batch.ids) or [f"{session_id}/{seq}/{i}" for i in range(n)]
        s.dim = s.dim or batch.dim
        session.assigned = seq
        ack = ipb.AppendResponse(
            sequence_number=seq,
            first_lsn=s.rows + 1,
            count=n,
            committed_at_us=_now(),
            first_id=ids[0],
        )
        s.rows += n

        times = np.frombuffer(batch.timestamps_us, dtype="<i8").tolist() or [_now()] * n

        def durable() -> None:
            session.durable = seq
            s.ids.extend(ids)
            s.times.extend(times)

        return _Answer(ack, durable)


class FakeAppendStream:
    def __init__(self, shard: FakeShard, space: str, session_id: str) -> None:
        self.shard = shard
        self.space = space
        self.session_id = session_id
        self._pending: deque[_Answer] = deque()  # answers in write order, not yet sent
        self._out: asyncio.Queue[ipb.AppendResponse | EngramError | None] = asyncio.Queue()
        self._closed = False

    async def write(self, sequence: int, batch: pb.ObservationBatch, traceparent: str = "") -> None:
        if self._closed:
            raise UnavailableError("writing to the shard failed: the stream is closed")
        self.shard.writes.append((self.session_id, sequence))
        self.answer(self.shard.begin(self.space, self.session_id, sequence, batch))

    async def responses(self) -> AsyncIterator[ipb.AppendResponse]:
        while (item := await self._out.get()) is not None:
            if isinstance(item, EngramError):
                raise item
            yield item

    def cancel(self) -> None:
        self._end(None)

    def answer(self, answer: _Answer) -> None:
        self._pending.append(answer)
        self.flush()

    def flush(self) -> None:
        while self._pending and not (self.shard.holding and self._pending[0].on_durable):
            answer = self._pending.popleft()
            if answer.on_durable is not None:
                answer.on_durable()
            self._out.put_nowait(answer.response)

    def fail(self, err: EngramError) -> None:
        self._end(err)

    def _end(self, last: EngramError | None) -> None:
        if not self._closed:
            self._closed = True
            self._pending.clear()
            self._out.put_nowait(last)
            self.shard.streams.remove(self)


def _now() -> int:
    return time.time_ns() // 1000


class StreamDriver:
    """Feeds one ClientStream and collects what it yields."""

    def __init__(self, gw: GatewayContext) -> None:
        self.stream = ClientStream(gw)
        self._requests: asyncio.Queue[Incoming | None] = asyncio.Queue()
        self._received: asyncio.Queue[Item | None] = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def _incoming(self) -> AsyncIterator[Incoming]:
        while (item := await self._requests.get()) is not None:
            yield item

    async def _run(self) -> None:
        async for item in self.stream.run(self._incoming()):
            self._received.put_nowait(item)
        self._received.put_nowait(None)

    # ------------------------------------------------------------ client -> stream

    def send(self, msg: pb.ObservationRequest) -> None:
        self._requests.put_nowait(Incoming(msg, msg.ByteSize()))

    def send_bytes(self, data: bytes) -> None:
        self._requests.put_nowait(parse(data))

    def init(self, space: str = "alpha", session_id: str = "") -> None:
        self.send(
            pb.ObservationRequest(
                memory_space_id=space, session_id=session_id, init=pb.StreamInit()
            )
        )

    def batch(self, seq: int, *, n: int = 2, dim: int = 4, space: str = "") -> None:
        vectors = np.arange(1, n * dim + 1, dtype="<f4").tobytes()
        ids = [f"b{seq}-{i}" for i in range(n)]
        batch = pb.ObservationBatch(dim=dim, vectors=vectors, ids=ids)
        self.send(pb.ObservationRequest(memory_space_id=space, sequence_number=seq, batch=batch))

    def flow(self, action: int, rate: int = 0) -> None:
        flow = pb.FlowControl(action=action, preferred_rate=rate)  # type: ignore[arg-type]
        self.send(pb.ObservationRequest(flow=flow))

    def end(self) -> None:
        """The client stops sending."""
        self._requests.put_nowait(None)

    # ------------------------------------------------------------ stream -> client

    async def next(self) -> Item:
        item = await asyncio.wait_for(self._received.get(), WAIT_S)
        assert item is not None, "the stream ended"
        return item

    async def response(self, kind: str) -> pb.ObservationResponse:
        """The next item, which must be a response carrying ``kind`` (ack, error, ...)."""
        item = await self.next()
        assert isinstance(item, pb.ObservationResponse), item
        assert item.WhichOneof("result") == kind, item
        return item

    async def quiet(self, seconds: float = 0.05) -> None:
        await asyncio.sleep(seconds)
        assert self._received.empty(), f"unexpected: {self._received.get_nowait()}"

    async def finished(self) -> None:
        item = await asyncio.wait_for(self._received.get(), WAIT_S)
        assert item is None, f"expected the end of the stream, got {item}"

    async def stop(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
def fake_shard() -> FakeShard:
    return FakeShard()


@pytest.fixture
def control() -> MemoryControlStore:
    return MemoryControlStore()


@pytest.fixture
def gateway(fake_shard: FakeShard, control: MemoryControlStore) -> GatewayContext:
    settings = load({"ENGRAM_MAX_IN_FLIGHT_BATCHES": str(CREDITS)})
    return GatewayContext(settings, control, fake_shard)


@pytest.fixture
async def open_stream(
    gateway: GatewayContext, fake_shard: FakeShard
) -> AsyncIterator[Callable[[], StreamDriver]]:
    drivers: list[StreamDriver] = []

    def make() -> StreamDriver:
        drivers.append(StreamDriver(gateway))
        return drivers[-1]

    before = asyncio.all_tasks()
    yield make
    for driver in drivers:
        await driver.stop()
    for _ in range(5):  # cancelled tasks finish within a few turns of the loop
        await asyncio.sleep(0)
    left = asyncio.all_tasks() - before - {asyncio.current_task()}
    assert not left, f"tasks left running: {left}"
    assert not fake_shard.streams, "an append stream was left open"
