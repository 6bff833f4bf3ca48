"""One memory space on a shard: sequencing, durability, tiers, recall, checkpoints, recovery.

The write path runs on the shard's event loop and is strictly ordered::

    begin_append  validate -> check the session's sequence -> assign LSNs -> queue the WAL record
    (WAL thread)  group commit: write + fdatasync
    _publish      in WAL order: metadata, fresh tier, visible LSN, session high-water mark -> ack

Rows are numbered from 0 in LSN order (row = LSN - 1). Rows ``[0, indexed)`` are in the HNSW
tier, rows ``[indexed, visible)`` in the fresh tier; a recall searches both and merges. The
shard's builder thread moves rows into the index (:meth:`index_step`) and writes checkpoints
(:meth:`checkpoint`), after which WAL segments the checkpoint covers are deleted.

Session high-water marks are kept twice: ``_assigned`` (queued) and ``_durable`` (fsynced).
Duplicates are answered from them; a WAL failure rolls ``_assigned`` back to ``_durable`` and
LSN assignment back to ``visible``, so nothing that was not acked leaves a trace.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engram.common import validation, wire
from engram.common.settings import AdmissionSettings, IndexSettings, LimitSettings, WalSettings
from engram.contract.errors import (
    ConsistencyTimeout,
    NotOwnerError,
    SequenceError,
    SessionError,
    StorageError,
)
from engram.internal.v1 import shard_pb2 as ipb
from engram.shard import checkpoint as ckpt
from engram.shard.admission import AdmissionController, lane_of
from engram.shard.columns import StringColumn
from engram.shard.fresh import (
    BLOCK_ROWS,
    LIST_STEP,
    Block,
    FreshTier,
    Partitioning,
    list_block,
    scan,
)
from engram.shard.index import HnswTier
from engram.shard.wal import Wal, WalFaults
from engram.v1 import streaming_pb2 as pb

log = logging.getLogger("engram.shard.space")


@dataclass(frozen=True)
class AppendResult:
    sequence_number: int
    first_lsn: int
    count: int
    duplicate: bool
    committed_at_us: int
    first_id: str


@dataclass(frozen=True)
class Snapshot:
    """What a recall sees: rows below ``visible``; the fresh blocks hold ``[indexed, visible)``."""

    visible: int
    indexed: int
    blocks: list[Block]
    hnsw: HnswTier | None
    consistency: int = pb.EVENTUAL
    waited_us: int = 0
    staleness_us: int = 0


@dataclass(frozen=True)
class Filters:
    """Recall filters; None means no bound."""

    min_score: float | None = None
    since_us: int | None = None
    until_us: int | None = None
    min_confidence: float | None = None

    @classmethod
    def of(cls, r: pb.RecallRequest) -> Filters:
        return cls(
            min_score=r.min_score if r.HasField("min_score") else None,
            since_us=r.since_us if r.HasField("since_us") else None,
            until_us=r.until_us if r.HasField("until_us") else None,
            min_confidence=r.min_confidence if r.HasField("min_confidence") else None,
        )

    @property
    def on_rows(self) -> bool:
        return (self.since_us, self.until_us, self.min_confidence) != (None, None, None)


class _Grow:
    """A numpy array that grows by doubling; ``view()`` is the filled part."""

    def __init__(self, dtype: str) -> None:
        self._data = np.empty(1024, dtype=dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.n + len(values)
        if need > len(self._data):
            bigger = np.empty(max(need, 2 * len(self._data)), dtype=self._data.dtype)
            bigger[: self.n] = self._data[: self.n]
            self._data = bigger
        self._data[self.n : need] = values
        self.n = need

    def view(self) -> np.ndarray:
        return self._data[: self.n]


@dataclass
class _Pending:
    session_id: str
    seq: int
    first_row: int
    vectors: np.ndarray  # as sent; normalised on their way into the fresh tier
    norms: np.ndarray
    ids: list[str]
    contents: list[str]
    confidences: np.ndarray
    timestamps_us: np.ndarray
    result: asyncio.Future[AppendResult]
    lane: int
    nbytes: int


def now_us() -> int:
    return time.time_ns() // 1000


class Space:
    def __init__(
        self,
        name: str,
        directory: Path,
        *,
        wal: WalSettings,
        index: IndexSettings,
        limits: LimitSettings,
        faults: WalFaults | None = None,
        admission: AdmissionController | None = None,
    ) -> None:
        self.name = name
        # shared by every space of the shard; a space on its own gets an unlimited one
        self.admission = admission or AdmissionController(
            AdmissionSettings(memory_budget_bytes=1 << 50)
        )
        self.directory = directory
        self._index_settings = index
        self._limits = limits
        self._ckpt_dir = directory / "ckpt"
        self.wal_dir = Path(wal.directory) / name if wal.directory else directory / "wal"
        self.wal = Wal(self.wal_dir, segment_bytes=wal.segment_bytes, faults=faults)
        self.dim = 0
        self.visible = 0  # rows durable and visible to recall
        self._next_row = 0  # next row to assign
        self.fresh: FreshTier | None = None
        self.hnsw: HnswTier | None = None
        self.ids = StringColumn()
        self.contents = StringColumn()
        self.confidences = _Grow("float32")
        self.timestamps_us = _Grow("int64")
        self._assigned: dict[str, int] = {}
        self._durable: dict[str, int] = {}
        self._waiters: dict[str, list[tuple[int, asyncio.Future[AppendResult]]]] = defaultdict(list)
        self._opening: dict[str, asyncio.Future[int]] = {}
        self._inflight = 0
        self._recovering = False
        # moving out: why writes are refused (NOT_OWNER) from the fence on; empty otherwise
        self.fenced_why = ""
        # while positive, no checkpoint is written (a move is copying the current one), and
        # checkpoint_lock is held while one is written
        self.checkpoint_holds = 0
        self.checkpoint_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.checkpoint_rows = 0
        self._checkpoint_index_file = ""
        self._checkpoint_meta: list[str] = []
        self.last_checkpoint = time.monotonic()
        # the fresh tier's quantiser, learnt once the backlog is large (again if rows drift)
        self.partitioning: Partitioning | None = None
        # un-indexed rows per priority lane, as runs of (end_row, lane, published_at)
        self._lane_runs: deque[tuple[int, int, float]] = deque()
        self._session_rows: dict[str, int] = {}  # rows visible when the session's last batch was
        self._visibility_waiters: list[tuple[int, asyncio.Future[None]]] = []
        # staleness bound of BOUNDED recalls, seconds
        self.bounded_staleness_s = 0.1
        self.lane_backlog: dict[int, int] = defaultdict(int)
        self._runs_lock = threading.Lock()  # the loop appends runs, the builder drops them
        self.last_write = 0.0  # monotonic time rows were last published
        self.last_recall = 0.0  # monotonic time a recall last started

    # ------------------------------------------------------------------ recovery

    def recover(self) -> None:
        """Loads the checkpoint and replays the WAL; runs before the space serves anything."""
        self._ckpt_dir.mkdir(parents=True, exist_ok=True)
        manifest = ckpt.read_manifest(self._ckpt_dir)
        removed = ckpt.remove_unreferenced(self._ckpt_dir, manifest)
        if removed:
            log.warning(
                "space %s: removed files of an unfinished checkpoint: %s", self.name, removed
            )
        if manifest is not None and manifest.rows:
            self._load_checkpoint(manifest)
        replayed = 0
        for _end_lsn, payload in self.wal.replay():
            replayed += self._replay_record(ipb.WalRecord.FromString(payload))
        self._assigned = dict(self._durable)
        self._next_row = self.visible
        if self.backlog():
            self._add_run(self.visible, pb.PRIORITY_NORMAL, self.backlog())
            self.admission.loaded(self.backlog() * self.dim * 4)
        log.info(
            "space %s recovered: %d rows (%d from checkpoint, %d replayed), %d sessions",
            self.name,
            self.visible,
            self.checkpoint_rows,
            replayed,
            len(self._durable),
        )

    def _replay_record(self, rec: ipb.WalRecord) -> int:
        """Applies one durable WAL record; returns the rows it added."""
        if rec.HasField("session_open"):
            self._durable.setdefault(rec.session_open.session_id, 0)
            return 0
        return self._replay_batch(rec.batch)

    def apply_record(self, payload: bytes, end_lsn: int) -> asyncio.Future[None]:
        """A record copied from another shard's WAL (a move into this shard, before the space
        serves): appended to this WAL and applied as recovery would; the future resolves once
        it is durable here."""
        fut = self.wal.append(payload, end_lsn)
        before = self.visible
        rec = ipb.WalRecord.FromString(payload)
        self._replay_record(rec)
        sid = rec.session_open.session_id if rec.HasField("session_open") else rec.batch.session_id
        self._assigned[sid] = self._durable[sid]
        self._next_row = self.visible
        if self.visible > before:
            n = self.visible - before
            self._add_run(self.visible, pb.PRIORITY_NORMAL, n)
            self.admission.loaded(n * self.dim * 4)
        return fut

    @property
    def ckpt_dir(self) -> Path:
        return self._ckpt_dir

    async def fence(self, why: str) -> int:
        """Refuses every write from now on (NOT_OWNER, saying ``why``), waits until the writes
        in flight have settled and closes the WAL's segment; returns the last LSN."""
        self.fenced_why = why
        while self._inflight or self._opening:  # noqa: ASYNC110 (rare; no event counts them)
            await asyncio.sleep(0.001)
        await self.wal.close_segment()
        return self.visible

    def unfence(self) -> None:
        self.fenced_why = ""

    def disk_bytes(self) -> int:
        """Bytes of the checkpoint and the WAL on disk."""
        total = 0
        for directory in (self._ckpt_dir, self.wal_dir):
            with contextlib.suppress(OSError):
                total += sum(e.stat().st_size for e in os.scandir(directory) if e.is_file())
        return total

    def _load_checkpoint(self, manifest: ckpt.Manifest) -> None:
        self.dim = manifest.dim
        self.hnsw = HnswTier(
            manifest.dim, self._index_settings, str(self._ckpt_dir / manifest.index_file)
        )
        for name in manifest.meta_files:
            chunk = ckpt.read_meta(self._ckpt_dir, name)
            self.ids.extend(chunk.ids)
            self.contents.extend(chunk.contents)
            self.confidences.extend(np.frombuffer(chunk.confidences, "<f4"))
            self.timestamps_us.extend(np.frombuffer(chunk.timestamps_us, "<i8"))
        if len(self.ids) != manifest.rows or self.hnsw.count != manifest.rows:
            raise StorageError(
                f"checkpoint of space {self.name} is inconsistent: manifest says {manifest.rows} "
                f"rows, metadata has {len(self.ids)}, index has {self.hnsw.count}"
            )
        self.visible = manifest.rows
        self._durable = dict(manifest.sessions)
        self.checkpoint_rows = manifest.rows
        self._checkpoint_index_file = manifest.index_file
        self._checkpoint_meta = list(manifest.meta_files)
        self.fresh = FreshTier(manifest.dim, manifest.rows)

    def _replay_batch(self, rec: ipb.WalBatch) -> int:
        sid = rec.session_id
        self._durable[sid] = max(self._durable.get(sid, 0), rec.sequence_number)
        b = rec.batch
        first = rec.first_lsn - 1
        n = len(b.vectors) // (4 * b.dim)
        if first + n <= self.visible:
            return 0  # already in the checkpoint
        skip = self.visible - first
        if skip < 0:
            raise StorageError(
                f"WAL of space {self.name} jumps from row {self.visible} to {first}: "
                "rows are missing"
            )
        if self.dim == 0:
            self._fix_dim(b.dim)
        vectors = np.frombuffer(b.vectors, "<f4").reshape(n, b.dim)[skip:]
        self._make_visible(
            _normalise(vectors),
            list(b.ids)[skip:],
            list(b.contents)[skip:] if b.contents else [""] * (n - skip),
            np.frombuffer(b.confidences, "<f4")[skip:],
            np.frombuffer(b.timestamps_us, "<i8")[skip:],
        )
        return n - skip

    def _fix_dim(self, dim: int) -> None:
        self.dim = dim
        self.fresh = FreshTier(dim, self.visible)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.wal.start(loop)

    async def close(self) -> None:
        await self.wal.close()

    # ----------------------------------------------------------------- sessions

    def session_mark(self, session_id: str) -> int | None:
        return self._durable.get(session_id)

    @property
    def session_count(self) -> int:
        return len(self._durable)

    def open_session(self, session_id: str, create: bool) -> asyncio.Future[int]:
        """Resolves to the session's durable high-water mark, registering it if ``create``."""
        loop = self._require_loop()
        if self.fenced_why:
            raise NotOwnerError(self.fenced_why)
        fut: asyncio.Future[int] = loop.create_future()
        if session_id in self._durable:
            fut.set_result(self._durable[session_id])
            return fut
        if session_id in self._opening:
            return self._opening[session_id]
        if not create:
            fut.set_exception(
                SessionError(f"session {session_id!r} is unknown in memory space {self.name!r}")
            )
            return fut
        self._check_writable()
        record = ipb.WalRecord(session_open=ipb.WalSessionOpen(session_id=session_id))
        self._assigned[session_id] = 0
        self._opening[session_id] = fut
        self._inflight += 1
        wal_fut = self.wal.append(record.SerializeToString(), self._next_row)

        def done(f: asyncio.Future[None]) -> None:
            self._inflight -= 1
            self._opening.pop(session_id, None)
            if f.cancelled() or f.exception() is not None:
                self._assigned.pop(session_id, None)
                fut.set_exception(_storage_error(f))
                self._on_failure()
            else:
                self._durable.setdefault(session_id, 0)
                fut.set_result(self._durable[session_id])

        wal_fut.add_done_callback(done)
        return fut

    # -------------------------------------------------------------------- writes

    def begin_append(
        self, session_id: str, seq: int, batch: pb.ObservationBatch
    ) -> asyncio.Future[AppendResult]:
        """Starts appending a batch; the future resolves once it is durable and visible.

        Raises at once (before anything is queued) for bad input, an unknown session, a
        sequence gap or a WAL that is recovering from a failure.
        """
        loop = self._require_loop()
        if session_id not in self._assigned:
            raise SessionError(f"session {session_id!r} is unknown in memory space {self.name!r}")
        assigned = self._assigned[session_id]
        if seq == 0:
            raise validation.ValidationError(
                "sequence_number is missing: batches are numbered 1, 2, 3, ...",
                code=pb.INVALID_ARGUMENT,
            )
        if seq <= assigned:
            return self._duplicate(session_id, seq)
        if seq != assigned + 1:
            raise SequenceError(
                f"sequence number {seq} skips ahead: expected {assigned + 1}", expected=assigned + 1
            )
        self._check_writable()
        checked = validation.batch(batch, self._limits, self.dim)
        n = checked.n
        lane = lane_of(batch.priority)
        nbytes = batch.ByteSize()
        self.admission.admit(lane, n, nbytes)  # raises OverloadedError: nothing is consumed
        if self.dim == 0:
            self._fix_dim(checked.dim)
        if not batch.ids:
            batch.ids.extend([f"{session_id}/{seq}/{i}" for i in range(n)])
        committed = now_us()
        if not batch.timestamps_us:
            batch.timestamps_us = np.full(n, committed, "<i8").tobytes()
        if not batch.confidences:
            batch.confidences = np.full(n, validation.DEFAULT_CONFIDENCE, "<f4").tobytes()
        else:
            conf = np.clip(np.frombuffer(batch.confidences, "<f4"), 0.0, 1.0)
            batch.confidences = conf.astype("<f4").tobytes()
        first_row = self._next_row
        record = batch_record(session_id, seq, first_row + 1, batch)
        result: asyncio.Future[AppendResult] = loop.create_future()
        pending = _Pending(
            session_id=session_id,
            seq=seq,
            first_row=first_row,
            vectors=checked.vectors,
            norms=np.sqrt(checked.sq_norms),
            ids=list(batch.ids),
            contents=list(batch.contents) if batch.contents else [""] * n,
            confidences=np.frombuffer(batch.confidences, "<f4"),
            timestamps_us=np.frombuffer(batch.timestamps_us, "<i8"),
            result=result,
            lane=lane,
            nbytes=nbytes,
        )
        wal_fut = self.wal.append(record, first_row + n)
        self._next_row += n
        self._assigned[session_id] = seq
        self._inflight += 1
        wal_fut.add_done_callback(lambda f: self._publish(pending, f))
        return result

    def _duplicate(self, session_id: str, seq: int) -> asyncio.Future[AppendResult]:
        fut: asyncio.Future[AppendResult] = self._require_loop().create_future()
        if seq <= self._durable.get(session_id, 0):
            fut.set_result(AppendResult(seq, 0, 0, True, now_us(), ""))
        else:
            self._waiters[session_id].append((seq, fut))
        return fut

    def _publish(self, p: _Pending, wal_fut: asyncio.Future[None]) -> None:
        """Runs on the loop, in WAL order, when the batch's record is durable (or failed)."""
        self._inflight -= 1
        n = len(p.vectors)
        if wal_fut.cancelled() or wal_fut.exception() is not None:
            self.admission.settle(p.lane, n, p.nbytes, 0)
            err = _storage_error(wal_fut)
            p.result.set_exception(err)
            self._fail_waiters(p.session_id, err)
            self._on_failure()
            return
        assert p.first_row == self.visible, (p.first_row, self.visible)
        self.last_write = time.monotonic()
        self._make_visible(p.vectors, p.ids, p.contents, p.confidences, p.timestamps_us, p.norms)
        self._add_run(self.visible, p.lane, n)
        self.admission.settle(p.lane, n, p.nbytes, n * self.dim * 4)
        self._durable[p.session_id] = p.seq
        self._session_rows[p.session_id] = self.visible
        if self._visibility_waiters:
            self._wake_visibility()
        p.result.set_result(
            AppendResult(p.seq, p.first_row + 1, n, False, now_us(), p.ids[0] if p.ids else "")
        )
        waiters = self._waiters.get(p.session_id)
        if waiters:
            still = []
            for seq, fut in waiters:
                if seq <= p.seq:
                    if not fut.done():
                        fut.set_result(AppendResult(seq, 0, 0, True, now_us(), ""))
                else:
                    still.append((seq, fut))
            self._waiters[p.session_id] = still

    def _make_visible(
        self,
        vectors: np.ndarray,
        ids: list[str],
        contents: list[str],
        confidences: np.ndarray,
        timestamps_us: np.ndarray,
        norms: np.ndarray | None = None,
    ) -> None:
        """Publishes rows: normalised ``vectors``, or raw ones with their ``norms``."""
        assert self.fresh is not None
        self.ids.extend(ids)
        self.contents.extend(contents)
        self.confidences.extend(confidences)
        self.timestamps_us.extend(timestamps_us)
        self.fresh.append(vectors, norms)
        self.visible += len(vectors)

    def _fail_waiters(self, session_id: str, err: Exception) -> None:
        for _seq, fut in self._waiters.pop(session_id, []):
            if not fut.done():
                fut.set_exception(err)

    def _check_writable(self) -> None:
        if self.fenced_why:
            raise NotOwnerError(self.fenced_why)
        if self._recovering or self.wal.failed:
            raise StorageError(
                f"memory space {self.name!r} cannot make writes durable right now (WAL failure); "
                "nothing was stored: retry later"
            )

    def _on_failure(self) -> None:
        """After a failed WAL round: roll back once every in-flight record has settled."""
        if not self._recovering:
            log.error(
                "space %s: WAL write failed; refusing writes until the WAL recovers", self.name
            )
        self._recovering = True
        if self._inflight == 0:
            # nothing is in flight: what is not durable is gone, so retries must not wait on it
            self._next_row = self.visible
            self._assigned = dict(self._durable)
            for sid in list(self._waiters):
                self._fail_waiters(
                    sid, StorageError("the WAL failed before this batch was durable")
                )
            self._try_reset()

    def _try_reset(self) -> None:
        try:
            self.wal.reset()
        except StorageError as exc:
            log.warning("space %s: WAL still failing (%s); retrying in 1 s", self.name, exc)
            self._require_loop().call_later(1.0, self._try_reset)
            return
        self._next_row = self.visible
        self._assigned = dict(self._durable)
        for sid in list(self._waiters):
            self._fail_waiters(sid, StorageError("the WAL failed before this batch was durable"))
        if self.visible == 0 and self.hnsw is None:
            self.dim = 0
            self.fresh = None
        self._recovering = False
        log.info("space %s: WAL recovered; accepting writes again", self.name)

    def _require_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise RuntimeError(f"space {self.name} was not started")
        return self._loop

    # -------------------------------------------------------------------- recall

    def snapshot(self, consistency: int = pb.EVENTUAL, waited_us: int = 0) -> Snapshot:
        # Order matters: the builder may create the index and drop fresh blocks between these
        # reads. Taking the blocks before the index means a dropped block's rows are in the
        # index we read next (rows leave the fresh tier only once indexed).
        visible = self.visible
        blocks = self.fresh.snapshot() if self.fresh is not None else []
        hnsw = self.hnsw
        indexed = hnsw.count if hnsw is not None else 0
        behind_since = self.wal.durable_since(visible)
        staleness = int((time.monotonic() - behind_since) * 1e6) if behind_since else 0
        return Snapshot(visible, indexed, blocks, hnsw, consistency, waited_us, staleness)

    async def consistent_snapshot(
        self, consistency: int, session_id: str = "", deadline_s: float = 5.0
    ) -> Snapshot:
        """A snapshot that meets ``consistency``, waiting for it up to ``deadline_s``.

        EVENTUAL: now. BOUNDED: now if the newest durable write not yet visible is younger
        than the bound, else everything durable at arrival. STRONG: everything durable (so
        everything acknowledged anywhere) at arrival. SESSION: everything the session has had
        acknowledged. Raises ConsistencyTimeout rather than answer from a staler snapshot.
        """
        level = consistency or pb.BOUNDED
        started = time.perf_counter()
        waited_us = 0
        durable, _ = self.wal.durable_lsn
        target = 0
        if level == pb.STRONG:
            target = durable
        elif level == pb.BOUNDED:
            behind_since = self.wal.durable_since(self.visible)
            if behind_since and time.monotonic() - behind_since > self.bounded_staleness_s:
                target = durable
        elif level == pb.SESSION:
            if session_id and session_id not in self._durable:
                raise SessionError(
                    f"session {session_id!r} is unknown in memory space {self.name!r}"
                )
            target = self._session_rows.get(session_id, self.visible if session_id else 0)
        if target > self.visible:
            fut: asyncio.Future[None] = self._require_loop().create_future()
            self._visibility_waiters.append((target, fut))
            try:
                await asyncio.wait_for(fut, deadline_s)
            except TimeoutError:
                raise ConsistencyTimeout(
                    f"memory space {self.name!r} did not make LSN {target} visible within "
                    f"{deadline_s * 1000:.0f} ms ({pb.Consistency.Name(level)}); "
                    f"visible: {self.visible}"
                ) from None
            waited_us = max(1, int((time.perf_counter() - started) * 1e6))
        return self.snapshot(level, waited_us)

    def _wake_visibility(self) -> None:
        still = []
        for target, fut in self._visibility_waiters:
            if fut.done():
                continue
            if self.visible >= target:
                fut.set_result(None)
            else:
                still.append((target, fut))
        self._visibility_waiters = still

    def _row_filter(self, f: Filters):  # type: ignore[no-untyped-def]
        if not f.on_rows:
            return None
        conf = self.confidences.view()
        ts = self.timestamps_us.view()

        def accept(rows: np.ndarray) -> np.ndarray:
            keep = np.ones(len(rows), dtype=bool)
            if f.since_us is not None:
                keep &= ts[rows] >= f.since_us
            if f.until_us is not None:
                keep &= ts[rows] < f.until_us
            if f.min_confidence is not None:
                keep &= conf[rows] >= f.min_confidence
            return keep

        return accept

    def recall(
        self, snap: Snapshot, cue: np.ndarray, k: int, filters: Filters | float | None = None
    ) -> pb.RecallResponse:
        """Top-``k`` of the snapshot by cosine similarity; runs in a worker thread."""
        started = time.perf_counter()
        self.last_recall = time.monotonic()
        if not isinstance(filters, Filters):
            filters = Filters(min_score=filters)
        min_score = filters.min_score
        out = pb.RecallResponse(snapshot_sequence=snap.visible)
        out.metadata.indexed_count = snap.indexed
        out.metadata.fresh_count = snap.visible - snap.indexed
        out.metadata.consistency = snap.consistency
        out.metadata.waited_us = snap.waited_us
        out.metadata.staleness_us = snap.staleness_us
        if snap.visible == 0:
            return out
        if cue.shape[0] != self.dim:
            raise validation.ValidationError(
                f"cue has {cue.shape[0]} values but memory space {self.name!r} holds vectors of "
                f"dimension {self.dim}",
                code=pb.WRONG_DIMENSION,
            )
        q = (cue / np.linalg.norm(cue)).astype(np.float32)
        accept = self._row_filter(filters)
        parts_rows, parts_scores = [], []
        t_index = time.perf_counter()
        if snap.hnsw is not None and snap.indexed:
            rows, scores = snap.hnsw.search(q, k, limit_row=snap.visible, accept=accept)
            parts_rows.append(rows)
            parts_scores.append(scores)
        t_fresh = time.perf_counter()
        rows, scores = scan(snap.blocks, q, snap.indexed, snap.visible, k, accept)
        parts_rows.append(rows)
        parts_scores.append(scores)
        t_merge = time.perf_counter()
        rows = np.concatenate(parts_rows)
        scores = np.concatenate(parts_scores)
        keep = rows < snap.visible
        rows, scores = rows[keep], scores[keep]
        rows, first = np.unique(rows, return_index=True)
        scores = scores[first]
        order = np.argsort(-scores, kind="stable")[:k]
        conf = self.confidences.view()
        ts = self.timestamps_us.view()
        for row, score in zip(rows[order].tolist(), scores[order].tolist(), strict=True):
            if min_score is not None and score < min_score:
                break
            m = out.results.add(
                id=self.ids[row],
                content=self.contents[row],
                score=score,
                confidence=float(conf[row]),
                lsn=row + 1,
            )
            m.when.FromMicroseconds(int(ts[row]))
        done = time.perf_counter()
        out.metadata.latency_us = int((done - started) * 1e6)
        out.metadata.index_us = int((t_fresh - t_index) * 1e6)
        out.metadata.fresh_us = int((t_merge - t_fresh) * 1e6)
        return out

    def scan_ids(self, chunk: int) -> list[tuple[list[str], range]]:
        """Every visible id in LSN order, in chunks of (ids, lsns)."""
        visible = self.visible
        return [
            (self.ids[lo : min(lo + chunk, visible)], range(lo + 1, min(lo + chunk, visible) + 1))
            for lo in range(0, visible, chunk)
        ]

    # ------------------------------------------------------------------ builder

    def backlog(self) -> int:
        indexed = self.hnsw.count if self.hnsw is not None else 0
        return self.visible - indexed

    def _add_run(self, end_row: int, lane: int, n: int) -> None:
        with self._runs_lock:
            runs = self._lane_runs
            if runs and runs[-1][1] == lane:
                runs[-1] = (end_row, lane, runs[-1][2])
            else:
                runs.append((end_row, lane, time.monotonic()))
            self.lane_backlog[lane] += n

    def _drop_runs(self, indexed: int, previous: int) -> None:
        """Moves the lane accounting past rows ``[previous, indexed)`` (builder thread)."""
        with self._runs_lock:
            runs = self._lane_runs
            row = previous
            while runs and row < indexed:
                end, lane, _since = runs[0]
                take = min(end, indexed) - row
                self.lane_backlog[lane] -= take
                row += take
                if end <= indexed:
                    runs.popleft()

    def top_lane(self) -> int | None:
        """The most urgent priority among the un-indexed rows (HIGH=1 ... LOW=3)."""
        lanes = [lane for lane, n in self.lane_backlog.items() if n > 0]
        return min(lanes) if lanes else None

    def oldest_low_since(self) -> float | None:
        with self._runs_lock:
            for _end, lane, since in self._lane_runs:
                if lane == pb.PRIORITY_LOW:
                    return since
        return None

    def partition_step(self) -> bool:
        """Lists one fresh block's unlisted rows if the backlog is large (partitioner thread):
        full blocks first, then the block being filled once it grew by ``LIST_STEP`` rows.
        Learns the space's quantiser from the first full block, and again from a full block
        whose rows fit it clearly worse than the rows it was learnt from. True if it worked."""
        settings = self._index_settings
        fresh = self.fresh
        if fresh is None or self.backlog() < settings.fresh_partition_rows:
            return False
        blocks = fresh.snapshot()
        todo = [b for b in blocks if b.full and _unlisted(b) and b.drifted_at != b.filled]
        # a block whose rows fitted badly as it filled waits until it is full to be learnt from
        todo += [
            b
            for b in blocks
            if not b.full and not b.drifted_at and b.filled - _listed(b) >= LIST_STEP
        ]
        for block in todo:
            p = self.partitioning
            learnable = block.full and len(block.data) == BLOCK_ROWS
            if p is None and not learnable:
                continue  # no quantiser yet: it is learnt from a full block
            filled = block.filled
            rows = block.data[:filled]
            if p is None or (learnable and block.drifted_at):
                if p is not None:
                    log.info(
                        "space %s: rows %d.. fitted the fresh-tier quantiser worse as they "
                        "arrived: learning a new one",
                        self.name,
                        block.first_row,
                    )
                p, leaf = self._learn(rows)  # no assigning it to the old one first, in vain
                list_block(block, p, leaf)
                return True
            listing = block.listing
            start = listing.covered if listing is not None and listing.partitioning is p else 0
            leaf, sims = p.assign(rows[start:filled])
            if float(sims.mean()) < p.fit - settings.fresh_refit_drop:
                if not learnable:  # scanned exactly until it is full, then learnt from
                    block.drifted_at = filled
                    continue
                log.info(
                    "space %s: rows %d.. fit the fresh-tier quantiser worse (%.3f, learnt "
                    "%.3f): learning a new one",
                    self.name,
                    block.first_row,
                    float(sims.mean()),
                    p.fit,
                )
                p, leaf = self._learn(rows)
                start = 0
            if start:
                assert listing is not None
                leaf = np.concatenate([listing.leaf, leaf])
            list_block(block, p, leaf)
            return True
        return False

    def _learn(self, rows: np.ndarray) -> tuple[Partitioning, np.ndarray]:
        s = self._index_settings
        p, leaf = Partitioning.learn_and_assign(rows, s.fresh_lists, s.fresh_nprobe)
        self.partitioning = p
        return p, leaf

    def prepare_spare(self) -> None:
        """Readies the fresh tier's next block off the event loop (partitioner thread), while
        writes are arriving."""
        if self.fresh is not None and time.monotonic() - self.last_write < 1.0:
            self.fresh.prepare_spare()

    def release_idle_memory(self) -> None:
        """Once the backlog is gone (builder thread): frees the spare block, and has the event
        loop retire the fresh tier's last block if every row in it is indexed."""
        if self.fresh is None:
            return
        self.fresh.release_spare()
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the process is stopping
                loop.call_soon_threadsafe(self.retire_indexed_tail)

    def retire_indexed_tail(self) -> None:
        """Event loop: see :meth:`FreshTier.retire_tail`."""
        if self.fresh is not None and self.hnsw is not None:
            self.fresh.retire_tail(self.hnsw.count)

    def index_step(self, max_rows: int, threads: int | None = None) -> int:
        """Moves up to ``max_rows`` rows from the fresh tier into HNSW; builder thread only."""
        if self.fresh is None:
            return 0
        if self.hnsw is None:
            self.hnsw = HnswTier(self.dim, self._index_settings)
        lo = self.hnsw.count
        hi = min(self.visible, lo + max_rows)
        if hi <= lo:
            return 0
        self.hnsw.add(self.fresh.rows(lo, hi), lo, threads)
        self.fresh.drop_below(hi)
        self._drop_runs(hi, lo)
        self.admission.indexed((hi - lo) * self.dim * 4)
        return hi - lo

    def checkpoint_due(self) -> bool:
        if self.checkpoint_holds:
            return False
        indexed = self.hnsw.count if self.hnsw is not None else 0
        new = indexed - self.checkpoint_rows
        if new <= 0:
            return False
        if new >= self._index_settings.checkpoint_every:
            return True
        return time.monotonic() - self.last_checkpoint >= self._index_settings.checkpoint_interval_s

    def checkpoint(self) -> int:
        """Writes a checkpoint of the indexed rows and drops the WAL it covers; builder thread.

        Returns the number of rows the checkpoint holds (0: held back by a move).
        """
        with self.checkpoint_lock:
            if self.checkpoint_holds:
                return 0
            return self._checkpoint()

    def _checkpoint(self) -> int:
        assert self.hnsw is not None and self._loop is not None
        loop = self._loop
        rows = self.hnsw.count

        async def prepare() -> tuple[dict[str, int], int]:
            # sessions still being opened may fail: let them settle, then record durable ones
            while self._opening:
                await asyncio.gather(*self._opening.values(), return_exceptions=True)
            return dict(self._durable), self.wal.rotate()

        sessions, closed = asyncio.run_coroutine_threadsafe(prepare(), loop).result()
        lo = self.checkpoint_rows
        meta = list(self._checkpoint_meta)
        if rows > lo:
            meta.append(
                ckpt.write_meta(
                    self._ckpt_dir,
                    lo,
                    rows,
                    self.ids[lo:rows],
                    self.contents[lo:rows],
                    self.confidences.view()[lo:rows].copy(),
                    self.timestamps_us.view()[lo:rows].copy(),
                )
            )
        index_file = f"hnsw-{rows:012d}.bin"
        hnsw = self.hnsw
        ckpt.write_atomic(self._ckpt_dir / index_file, lambda tmp: hnsw.save(str(tmp)))
        manifest = ckpt.Manifest(
            rows=rows,
            dim=self.dim,
            index_file=index_file,
            meta_files=meta,
            sessions=sessions,
            created_us=now_us(),
        )
        ckpt.write_manifest(self._ckpt_dir, manifest)
        old_index = self._checkpoint_index_file
        self.checkpoint_rows, self._checkpoint_index_file = rows, index_file
        self._checkpoint_meta = meta
        self.last_checkpoint = time.monotonic()
        if old_index and old_index != index_file:
            (self._ckpt_dir / old_index).unlink(missing_ok=True)

        async def trim() -> int:
            return self.wal.delete_through(rows, closed + 1)

        deleted = asyncio.run_coroutine_threadsafe(trim(), loop).result()
        log.info(
            "space %s: checkpoint at %d rows; %d WAL segments deleted", self.name, rows, deleted
        )
        return rows


def batch_record(session_id: str, seq: int, first_lsn: int, batch: pb.ObservationBatch) -> bytes:
    """``WalRecord(batch=WalBatch(session_id, seq, first_lsn, batch)).SerializeToString()``,
    the same bytes, without copying ``batch`` into a new message first (that copy of a 1.5 MB
    batch was two thirds of the 0.53 ms it took, on the event loop)."""
    head = ipb.WalBatch(session_id=session_id, sequence_number=seq, first_lsn=first_lsn)
    wal_batch = wire.with_message(head, ipb.WalBatch.BATCH_FIELD_NUMBER, batch)
    return wire.field(ipb.WalRecord.BATCH_FIELD_NUMBER, wal_batch)


def _listed(block: Block) -> int:
    return block.listing.covered if block.listing is not None else 0


def _unlisted(block: Block) -> bool:
    return _listed(block) < block.filled


def _normalise(vectors: np.ndarray) -> np.ndarray:
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
    return (vectors / norms[:, None]).astype(np.float32, copy=False)


def _storage_error(f: asyncio.Future[None] | concurrent.futures.Future[None]) -> StorageError:
    if f.cancelled():
        return StorageError("the write was cancelled before it was durable")
    exc = f.exception()
    return exc if isinstance(exc, StorageError) else StorageError(f"WAL write failed: {exc}")
