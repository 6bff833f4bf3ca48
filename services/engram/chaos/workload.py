"""The steady mixed workload of a chaos run: writers, recallers and visibility probes.

* :class:`Writer` — one session on one memory space through the real Python client: batches
  of varied size (1 to 500 observations) with a short think time, a few deliberately invalid
  ones (zero or NaN vectors, which must be refused and never stored). The client resumes the
  session by itself after disconnects; when a stream dies for good the writer opens a new
  session (a new *generation*). Every batch and its outcome go to the :class:`Ledger`.
* :class:`Recaller` — standalone recalls at one consistency level (EVENTUAL, BOUNDED, SESSION,
  STRONG) or recalls on a writer's stream; an error is a failed operation, never a crash. Every
  hit is checked against the deletes acknowledged before the recall was sent
  (:func:`~engram.chaos.deletes.note_resurrected`).
* :class:`Visibility` — samples acknowledged observations and recalls them (EVENTUAL) until
  they show up: the time from the ack to the first recall that returns them.

The deletes are :class:`~engram.chaos.deletes.Deleter`'s; a writer offers it each acknowledged
batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
import numpy as np

from engram.chaos.deletes import Deleter, note_resurrected
from engram.chaos.ledger import BatchRecord, Ledger
from engram.contract.errors import EngramError
from engram.v1 import streaming_pb2 as pb
from engram_client import Ack, EngramClient, ObservationStream, StreamEvent

log = logging.getLogger("engram.chaos.workload")

# Error codes a client causes itself (expected answers to the invalid batches).
CLIENT_CODES = frozenset(
    pb.ErrorCode.Name(c)
    for c in (
        pb.ZERO_VECTOR,
        pb.NON_FINITE_VALUE,
        pb.WRONG_DIMENSION,
        pb.INVALID_ARGUMENT,
        pb.EMPTY_BATCH,
        pb.BAD_VECTOR_BLOB,
        pb.LENGTH_MISMATCH,
    )
)
RECALL_LEVELS = ("eventual", "bounded", "session", "strong")
_LEVEL = {
    "eventual": pb.EVENTUAL,
    "bounded": pb.BOUNDED,
    "session": pb.SESSION,
    "strong": pb.STRONG,
}


@dataclass(frozen=True)
class WorkloadShape:
    dim: int = 32
    # Pause between two sends of one writer, seconds.
    think_s: tuple[float, float] = (0.05, 0.25)
    # Share of batches that are deliberately invalid.
    invalid_rate: float = 0.01
    # Pause between two recalls of one recaller, seconds.
    recall_every_s: tuple[float, float] = (0.1, 0.3)
    recall_timeout_s: float = 5.0
    # Share of the acknowledged observations that are deleted (by id) while the run goes on.
    delete_share: float = 0.1
    # Pause between two deletes, seconds.
    delete_every_s: tuple[float, float] = (0.1, 0.4)
    # Most ids one delete names.
    delete_max_ids: int = 200
    # A batch's rows are deleted no sooner than this after its ack, seconds.
    delete_after_s: float = 0.5
    # A delete not answered is sent again (same request id) for this long, seconds.
    delete_retry_s: float = 30.0
    # Deadline of one delete call, seconds.
    delete_timeout_s: float = 10.0


def batch_size(rng: random.Random) -> int:
    """Mostly small batches, some medium, a few large."""
    r = rng.random()
    if r < 0.6:
        return rng.randint(1, 20)
    if r < 0.95:
        return rng.randint(21, 200)
    return rng.randint(201, 500)


class Writer:
    def __init__(
        self,
        wid: int,
        space: str,
        client: EngramClient,
        ledger: Ledger,
        shape: WorkloadShape,
        seed: int,
        visibility: Visibility | None,
        deleter: Deleter | None = None,
    ) -> None:
        self.wid = wid
        self.space = space
        self.client = client
        self.ledger = ledger
        self.shape = shape
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)
        self.visibility = visibility
        self.deleter = deleter
        self.generation = 0
        self.stream: ObservationStream | None = None
        self._pending: set[asyncio.Future[Ack]] = set()

    @property
    def session_id(self) -> str:
        return self.stream.session_id if self.stream is not None else ""

    async def run(self, stop: asyncio.Event) -> None:
        """Writes until ``stop`` is set (:meth:`drain` then waits for the last acks)."""
        while not stop.is_set():
            try:
                self.stream = await self.client.open_stream(self.space, on_event=self._on_event)
            except EngramError as exc:
                self.ledger.count("writer_open_failed")
                self.ledger.op("stream", False)
                log.warning("writer %d: cannot open a stream: %s", self.wid, exc)
                await _sleep_or_stop(stop, 1.0)
                continue
            session = f"w{self.wid}.{self.generation}"
            try:
                await self._write(session, stop)
            except EngramError as exc:  # the stream died for good: start a new session
                self.ledger.count("stream_fatal")
                log.warning("writer %d: session %s ended: %s", self.wid, session, exc)
                self.generation += 1
                self.stream = None

    async def _write(self, session: str, stop: asyncio.Event) -> None:
        assert self.stream is not None
        index = 0
        while not stop.is_set():
            n = batch_size(self.rng)
            invalid = self.rng.random() < self.shape.invalid_rate
            vectors = self.np_rng.standard_normal((n, self.shape.dim)).astype(np.float32)
            if invalid:
                row = self.rng.randrange(n)
                vectors[row] = 0.0 if self.rng.random() < 0.5 else np.nan
            rec = self.ledger.new_batch(session, index, self.space, n, invalid)
            index += 1
            ids = self.ledger.ids(rec)
            contents = [f"{session} batch {rec.index} item {i}" for i in range(n)]
            try:
                fut = await self.stream.send(vectors, ids=ids, contents=contents)
            except EngramError:
                rec.state, rec.done_at = "unsent", time.monotonic()
                raise
            rec.state = "pending"
            self._pending.add(fut)
            probe = vectors[0] if not invalid else None
            fut.add_done_callback(lambda f, r=rec, v=probe: self._settled(f, r, v))
            await _sleep_or_stop(stop, self.rng.uniform(*self.shape.think_s))

    def _settled(
        self, fut: asyncio.Future[Ack], rec: BatchRecord, probe: np.ndarray | None
    ) -> None:
        self._pending.discard(fut)
        now = time.monotonic()
        rec.done_at = now
        if fut.cancelled():
            rec.state = "failed"
            return
        exc = fut.exception()
        if exc is None:
            rec.state = "acked"
            ack = fut.result()
            if ack.duplicate:
                self.ledger.count("acked_as_duplicate")
            if rec.invalid:
                self.ledger.count("invalid_acked")
                rec.detail = "an invalid batch was acknowledged"
                return
            self.ledger.op("write", True, (now - rec.sent_at) * 1000, now)
            if self.deleter is not None:
                self.deleter.offer(rec, probe)
            if probe is not None and self.visibility is not None:
                self.visibility.offer(self.space, self.ledger.ids(rec)[0], probe, rec.sent_at, now)
            return
        rec.detail = str(exc)
        if isinstance(exc, EngramError) and not exc.retryable:
            rec.state = "rejected" if rec.invalid else "error"
            if rec.invalid:
                self.ledger.op("reject", True, t=now)
            else:
                self.ledger.count("valid_batch_refused")
                self.ledger.op("write", False, t=now)
        else:
            rec.state = "failed"
            self.ledger.op("write", False, t=now)

    def _on_event(self, ev: StreamEvent) -> None:
        if ev.kind in ("connected", "resumed"):
            self.ledger.op("stream", True)
            if ev.kind == "resumed":
                self.ledger.count("resumes")
        elif ev.kind == "disconnected":
            self.ledger.op("stream", False)
            self.ledger.op("stream_down", False)
            self.ledger.count("disconnects")
            self.ledger.example("disconnect", ev.detail[:300])
        elif ev.kind == "rejected":  # admission control: resent after retry-after
            self.ledger.count("rejected_for_now")
            self.ledger.op("write", False)
        elif ev.kind == "error":
            code = ev.detail.split(":", 1)[0]
            if code in CLIENT_CODES:
                return  # the expected refusal of an invalid batch
            self.ledger.count(f"error:{code}")
            self.ledger.errors.append((time.monotonic(), code))
            self.ledger.example("stream_error", ev.detail[:300])
            if code != "SEQUENCE_GAP":
                self.ledger.op("write", False)

    async def drain(self, within_s: float) -> None:
        """Waits up to ``within_s`` for every outstanding batch, then ends the stream."""
        if self.stream is None:
            return
        pending = [f for f in self._pending if not f.done()]
        if pending:
            await asyncio.wait(pending, timeout=within_s)
        if any(not f.done() for f in self._pending):
            self.ledger.count("undrained_streams")
            return  # closing would wait for them again
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.stream.close(), 10)


class Recaller:
    """Recalls at one consistency level ("stream": on a writer's stream) until stopped."""

    def __init__(
        self,
        level: str,
        client: EngramClient,
        writers: Sequence[Writer],
        ledger: Ledger,
        shape: WorkloadShape,
        seed: int,
    ) -> None:
        self.level = level
        self.client = client
        self.writers = writers
        self.ledger = ledger
        self.shape = shape
        self.rng = random.Random(seed)
        self.np_rng = np.random.default_rng(seed)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            writer = self.rng.choice(self.writers)
            cue = self.np_rng.standard_normal(self.shape.dim).astype(np.float32)
            started = time.monotonic()
            try:
                await asyncio.wait_for(self._one(writer, cue), self.shape.recall_timeout_s)
                ok = True
            except (TimeoutError, grpc.aio.AioRpcError, EngramError) as exc:
                ok = False
                self.ledger.count(f"recall_error:{_describe(exc)}")
                self.ledger.example(f"recall_{self.level}", _details(exc))
            now = time.monotonic()
            self.ledger.op(f"recall_{self.level}", ok, (now - started) * 1000, now)
            await _sleep_or_stop(stop, self.rng.uniform(*self.shape.recall_every_s))

    async def _one(self, writer: Writer, cue: np.ndarray) -> None:
        if self.level == "stream":
            if writer.stream is None:
                raise EngramError("no stream open yet")
            sent = time.monotonic()
            result = await writer.stream.recall(cue, k=10)
            where = f"a stream recall on {writer.space}"
            note_resurrected(self.ledger, where, [h.id for h in result.hits], sent)
            return
        req = pb.StreamingRecallRequest(
            memory_space_id=writer.space,
            cue=cue.tolist(),
            max_results=10,
            consistency=_LEVEL[self.level],
            deadline_ms=int(self.shape.recall_timeout_s * 1000),
        )
        if self.level == "session":
            req.session_id = writer.session_id
        sent = time.monotonic()
        ids: list[str] = []
        async for chunk in self.client.stub.RecallStream(req, timeout=self.shape.recall_timeout_s):
            ids.extend(m.id for m in chunk.results)
        note_resurrected(self.ledger, f"a {self.level} recall on {writer.space}", ids, sent)


class Visibility:
    """Measures ack -> visible for sampled observations (at most ``concurrent`` at a time)."""

    def __init__(
        self,
        client: EngramClient,
        ledger: Ledger,
        *,
        every_s: float = 0.2,
        concurrent: int = 2,
        give_up_s: float = 30.0,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.every_s = every_s
        self.concurrent = concurrent
        self.give_up_s = give_up_s
        self._last = 0.0
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def offer(
        self, space: str, oid: str, vector: np.ndarray, sent_at: float, acked_at: float
    ) -> None:
        busy = len(self._tasks) >= self.concurrent
        if self._closed or busy or acked_at - self._last < self.every_s:
            return
        self._last = acked_at
        task = asyncio.ensure_future(self._probe(space, oid, vector, sent_at, acked_at))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _probe(
        self, space: str, oid: str, vector: np.ndarray, sent_at: float, acked_at: float
    ) -> None:
        req = pb.StreamingRecallRequest(
            memory_space_id=space, cue=vector.tolist(), max_results=10, consistency=pb.EVENTUAL
        )
        while time.monotonic() - acked_at < self.give_up_s:
            try:
                async for chunk in self.client.stub.RecallStream(req, timeout=2.0):
                    if any(m.id == oid for m in chunk.results):
                        now = time.monotonic()
                        self.ledger.visibility.append(
                            (now, (now - acked_at) * 1000, (now - sent_at) * 1000)
                        )
                        return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.005)
        self.ledger.visibility_timeouts += 1

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code().name
    if isinstance(exc, EngramError):
        return pb.ErrorCode.Name(exc.code)
    return type(exc).__name__


def _details(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name}: {exc.details()}"[:300]
    return f"{type(exc).__name__}: {exc}"[:300]
