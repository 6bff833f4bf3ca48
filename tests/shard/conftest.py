"""Shared harness of the engram.shard.space tests.

With ``--import-mode=importlib`` test modules cannot import each other, so everything shared is
reached through fixtures:

* ``harness``: a :class:`Harness` on the test's ``tmp_path``. It creates spaces (recovered and
  started on the running loop), restarts them on the same directory and closes every space it
  made at teardown, so no WAL committer thread outlives a test.
* ``ledger``: a fresh :class:`Ledger`, the model of what a space must hold: every acknowledged
  batch, its ids and (normalised) vectors, in LSN order. ``ledger.check(space)`` compares the
  space with the model: visible count, ids in LSN order, session marks and the stored vectors of
  both tiers (so ids can never silently drift from their vectors).
* ``kit``: this module itself, for its helpers (``make_batch``, ``all_ids``, ``retry_append``,
  ``Ledger``, ``Harness``...).
* ``no_leaked_committers`` (``tests/conftest.py``, on every test): fails a test that leaves a
  WAL committer thread running.
* ``gated_faults``: a :class:`GatedFaults`, a WalFaults that can hold one fsync until released
  (to keep a batch in flight for as long as a test needs) and optionally fail it.
"""

from __future__ import annotations

import asyncio
import errno
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from engram.common.settings import IndexSettings, LimitSettings, WalSettings
from engram.contract.errors import StorageError
from engram.corpus import Corpus
from engram.shard.space import AppendResult, Space
from engram.shard.wal import WalFaults
from engram.v1 import streaming_pb2 as pb

DIM = 16
_CORPORA: dict[int, Corpus] = {}
_BLOCKS: dict[tuple[int, int], np.ndarray] = {}
_BLOCK = 1024


def corpus(dim: int = DIM) -> Corpus:
    if dim not in _CORPORA:
        _CORPORA[dim] = Corpus(dim)
    return _CORPORA[dim]


def corpus_vectors(start: int, n: int, dim: int = DIM) -> np.ndarray:
    """Rows ``start .. start + n`` of ``Corpus(dim)``, generated once per 1024-row block."""
    parts = []
    for b in range(start // _BLOCK, (start + n - 1) // _BLOCK + 1):
        if (dim, b) not in _BLOCKS:
            _BLOCKS[(dim, b)] = corpus(dim).vectors(b * _BLOCK, _BLOCK)
        parts.append(_BLOCKS[(dim, b)])
    lo = start - (start // _BLOCK) * _BLOCK
    return np.concatenate(parts)[lo : lo + n].copy()


def normalise(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)


def make_batch(
    vectors: np.ndarray,
    ids: list[str] | None = None,
    contents: list[str] | None = None,
) -> pb.ObservationBatch:
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    b = pb.ObservationBatch(dim=vectors.shape[1], vectors=vectors.tobytes())
    if ids is not None:
        b.ids.extend(ids)
    if contents is not None:
        b.contents.extend(contents)
    return b


def stored_vectors(space: Space) -> np.ndarray:
    """Every visible row's vector as the space holds it (HNSW tier, then fresh tier)."""
    if space.visible == 0:
        return np.empty((0, space.dim), np.float32)
    indexed = space.hnsw.covered if space.hnsw is not None else 0
    parts = []
    if indexed:
        assert space.hnsw is not None
        parts.append(space.hnsw.vectors(np.arange(indexed)))
    if space.visible > indexed:
        assert space.fresh is not None
        parts.append(space.fresh.rows(indexed, space.visible))
    return np.concatenate(parts).astype(np.float32)


def all_ids(space: Space) -> list[str]:
    out: list[str] = []
    expected_lsn = 1
    for ids, lsns in space.scan_ids(997):
        assert list(lsns) == list(range(expected_lsn, expected_lsn + len(ids)))
        expected_lsn += len(ids)
        out.extend(ids)
    return out


def wal_files(space: Space) -> list[str]:
    return sorted(p.name for p in (space.directory / "wal").glob("wal-*.log"))


def ckpt_files(space: Space) -> list[str]:
    return sorted(p.name for p in (space.directory / "ckpt").iterdir())


class GatedFaults(WalFaults):
    """Holds the next fsync (after :meth:`arm`) until :meth:`release`; then passes or fails it."""

    def __init__(self) -> None:
        super().__init__()
        self._armed = False
        self._fail = False
        self.entered = threading.Event()
        self._release = threading.Event()

    def arm(self) -> None:
        self.entered.clear()
        self._release.clear()
        self._armed = True

    def release(self, *, fail: bool = False) -> None:
        self._fail = fail
        self._release.set()

    async def wait_entered(self) -> None:
        """Waits until the committer is held in the armed fsync."""
        assert await asyncio.to_thread(self.entered.wait, 10), "the armed fsync never came"

    def before_sync(self) -> None:
        if self._armed:
            self._armed = False
            self.entered.set()
            if not self._release.wait(30):
                raise OSError(errno.ETIMEDOUT, "gate never released")
            if self._fail:
                self._fail = False
                raise OSError(errno.EIO, "injected: gated fsync failure")
        super().before_sync()


@dataclass
class Pending:
    sid: str
    seq: int
    ids: list[str]
    vectors: np.ndarray  # normalised
    batch: pb.ObservationBatch


@dataclass
class _Acked:
    first_lsn: int
    pending: Pending


@dataclass
class Ledger:
    """The model: acknowledged batches in LSN order and each session's mark."""

    dim: int = DIM
    acked: list[_Acked] = field(default_factory=list)
    marks: dict[str, int] = field(default_factory=dict)
    _offset: int = 0

    def batch(
        self, sid: str, seq: int, n: int, *, explicit_ids: bool = True, tag: str = ""
    ) -> Pending:
        """A new batch of ``n`` distinct corpus vectors (ids ``sid-seq-<tag>i`` or server-made)."""
        raw = corpus_vectors(self._offset, n, self.dim)
        self._offset += n
        ids = [f"{sid}-{seq}-{tag}{i}" for i in range(n)]
        batch = make_batch(raw, ids if explicit_ids else None)
        if not explicit_ids:
            ids = [f"{sid}/{seq}/{i}" for i in range(n)]
        return Pending(sid, seq, ids, normalise(raw), batch)

    def open(self, sid: str) -> None:
        self.marks.setdefault(sid, 0)

    def record(self, p: Pending, result: AppendResult) -> None:
        assert not result.duplicate, (p.sid, p.seq, result)
        assert result.sequence_number == p.seq
        assert result.count == len(p.ids)
        assert result.first_id == p.ids[0]
        assert p.seq == self.marks.get(p.sid, 0) + 1, "acked out of session order"
        self.marks[p.sid] = p.seq
        self.acked.append(_Acked(result.first_lsn, p))

    async def append(self, space: Space, sid: str, seq: int, n: int, **kw: Any) -> AppendResult:
        p = self.batch(sid, seq, n, **kw)
        result = await space.begin_append(sid, seq, p.batch)
        self.record(p, result)
        return result

    def next_seq(self, sid: str) -> int:
        return self.marks.get(sid, 0) + 1

    def ordered(self) -> list[Pending]:
        return [a.pending for a in sorted(self.acked, key=lambda a: a.first_lsn)]

    def ids(self) -> list[str]:
        return [i for p in self.ordered() for i in p.ids]

    def vectors(self) -> np.ndarray:
        parts = [p.vectors for p in self.ordered()]
        return np.concatenate(parts) if parts else np.empty((0, self.dim), np.float32)

    def check(self, space: Space, *, vectors: bool = True) -> None:
        """The space holds exactly the acked batches, once each, in LSN order."""
        expected = self.ids()
        lsn = 1
        for a in sorted(self.acked, key=lambda a: a.first_lsn):
            assert a.first_lsn == lsn, "acked LSNs are not contiguous"
            lsn += len(a.pending.ids)
        got = all_ids(space)
        assert space.visible == len(expected)
        assert len(got) == len(set(got)), "an id is stored twice"
        assert got == expected
        for sid, mark in self.marks.items():
            assert space.session_mark(sid) == mark, sid
        if vectors and expected:
            np.testing.assert_allclose(stored_vectors(space), self.vectors(), atol=1e-6)


class Harness:
    """Makes spaces under ``root`` and closes every one of them at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._open: list[Space] = []
        self._kwargs: dict[int, dict[str, Any]] = {}

    def space(
        self,
        name: str = "space",
        *,
        faults: WalFaults | None = None,
        index: IndexSettings | None = None,
        wal: WalSettings | None = None,
        limits: LimitSettings | None = None,
        start: bool = True,
    ) -> Space:
        kwargs: dict[str, Any] = dict(
            wal=wal or WalSettings(),
            index=index or IndexSettings(),
            limits=limits or LimitSettings(),
        )
        space = Space(name, self.root / name, faults=faults, **kwargs)
        space.recover()
        if start:
            space.start(asyncio.get_running_loop())
        self._open.append(space)
        self._kwargs[id(space)] = {"name": name, **kwargs}
        return space

    async def close(self, space: Space) -> None:
        if space in self._open:
            self._open.remove(space)
            await space.close()

    async def restart(self, space: Space, *, faults: WalFaults | None = None) -> Space:
        """Closes ``space`` and opens a new one on its directory (same settings)."""
        kwargs = self._kwargs.pop(id(space))
        await self.close(space)
        return self.space(kwargs.pop("name"), faults=faults, **kwargs)

    async def close_all(self) -> None:
        errors: list[BaseException] = []
        while self._open:
            space = self._open.pop()
            try:
                await space.close()
            except BaseException as exc:  # close the others regardless
                errors.append(exc)
        if errors:
            raise errors[0]


async def retry_append(
    space: Space, sid: str, seq: int, batch: pb.ObservationBatch, give_up_after: float = 5.0
) -> AppendResult:
    """Appends like a client would while the WAL recovers: retries on StorageError."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + give_up_after
    while True:
        try:
            return await space.begin_append(sid, seq, batch)
        except StorageError:
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.02)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        await h.close_all()


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
def gated_faults() -> GatedFaults:
    return GatedFaults()


@pytest.fixture(scope="session")
def kit() -> ModuleType:
    """This module: its helpers (make_batch, all_ids, retry_append, ...) for the tests."""
    return sys.modules[__name__]
