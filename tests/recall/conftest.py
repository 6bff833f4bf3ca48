"""Shared harness of the recall-correctness suites (``tests/recall``).

With ``--import-mode=importlib`` test modules cannot import each other, so shared helpers are
reached through the ``kit`` fixture (this module). What is here:

* :class:`Harness`: makes :class:`~engram.shard.space.Space` objects on a directory (recovered,
  started on the running loop), restarts them on the same directory, closes all at the end.
* :func:`exact_scores` / :func:`assert_exact_topk`: the reference answer (numpy, float64 over
  the normalised float32 vectors the space stores) and the comparison of a recall with it that
  allows ties: same length, each returned score equal to its row's exact score, scores
  best-first and, position by position, equal to the exact top-k scores.

End-to-end tests use the clusters of ``tests/conftest.py``: ``shared_cluster`` (configured by
the module's ``CLUSTER_SHARDS``; tests write to spaces of their own, named by ``space_id``)
and, when destructive (kill -9), ``make_cluster``.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from engram.common.settings import IndexSettings, LimitSettings, WalSettings
from engram.corpus import Corpus
from engram.shard.space import Space
from engram.v1 import streaming_pb2 as pb

TOL = 1e-4
_CORPORA: dict[tuple[int, int], Corpus] = {}


def corpus(dim: int, seed: int = 7) -> Corpus:
    if (dim, seed) not in _CORPORA:
        _CORPORA[dim, seed] = Corpus(dim, seed=seed)
    return _CORPORA[dim, seed]


def normalise(vectors: np.ndarray) -> np.ndarray:
    """As the space normalises rows (float32 result)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors))
    return (vectors / norms[:, None]).astype(np.float32)


def make_batch(
    vectors: np.ndarray,
    ids: Sequence[str],
    *,
    confidences: np.ndarray | None = None,
    timestamps_us: np.ndarray | None = None,
) -> pb.ObservationBatch:
    vectors = np.ascontiguousarray(vectors, dtype="<f4")
    b = pb.ObservationBatch(dim=vectors.shape[1], vectors=vectors.tobytes(), ids=list(ids))
    if confidences is not None:
        b.confidences = np.asarray(confidences, dtype="<f4").tobytes()
    if timestamps_us is not None:
        b.timestamps_us = np.asarray(timestamps_us, dtype="<i8").tobytes()
    return b


def exact_scores(stored: np.ndarray, cue: np.ndarray) -> np.ndarray:
    """Cosine of ``cue`` with every stored (normalised) row, in float64."""
    q = np.asarray(cue, dtype=np.float32)
    q = (q / np.linalg.norm(q)).astype(np.float32)
    return stored.astype(np.float64) @ q.astype(np.float64)


def assert_exact_topk(
    rows: Sequence[int],
    scores: Sequence[float],
    exact: np.ndarray,
    k: int,
    *,
    eligible: np.ndarray | None = None,
    min_score: float | None = None,
    tol: float = TOL,
    what: str = "",
) -> None:
    """``rows``/``scores`` (best first) are the exact top-``k`` of ``exact`` over the eligible
    rows (``exact`` covers exactly the rows of the snapshot), ties allowed."""
    rows = [int(r) for r in rows]
    got = np.asarray(scores, dtype=np.float64)
    n = len(exact)
    mask = np.ones(n, bool) if eligible is None else np.asarray(eligible, bool)
    assert len(set(rows)) == len(rows), f"{what}: a row is returned twice: {rows}"
    assert all(0 <= r < n for r in rows), f"{what}: a row beyond the snapshot ({n}): {rows}"
    assert all(mask[r] for r in rows), f"{what}: a row the filters exclude was returned"
    if len(got) > 1:
        assert np.all(np.diff(got) <= tol), f"{what}: scores are not best-first: {got}"
    np.testing.assert_allclose(
        got, exact[rows] if rows else np.empty(0), atol=tol, err_msg=f"{what}: score of a row"
    )
    candidates = np.sort(exact[mask])[::-1]
    if min_score is not None:
        assert all(s >= min_score - 1e-6 for s in got), f"{what}: a score below min_score"
        lo = min(k, int(np.sum(candidates >= min_score + tol)))
        hi = min(k, int(np.sum(candidates >= min_score - tol)))
        assert lo <= len(rows) <= hi, f"{what}: {len(rows)} results, expected {lo}..{hi}"
    else:
        assert len(rows) == min(k, len(candidates)), (
            f"{what}: {len(rows)} results, expected {min(k, len(candidates))}"
        )
    want = candidates[: len(rows)]
    np.testing.assert_allclose(got, want, atol=tol, err_msg=f"{what}: not the exact top-k")
    if len(rows) == k and k < len(candidates):
        # every eligible row clearly better than the k-th must be there (no tie excuse)
        must = set(np.flatnonzero(mask & (exact > want[-1] + tol)).tolist())
        assert must <= set(rows), f"{what}: rows of the exact top-k are missing: {must - set(rows)}"


def result_rows(res: pb.RecallResponse) -> tuple[list[int], list[float]]:
    return [m.lsn - 1 for m in res.results], [m.score for m in res.results]


class Harness:
    """Makes spaces under ``root`` and closes every one of them at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._open: list[Space] = []
        self._kwargs: dict[int, dict[str, Any]] = {}

    def space(
        self,
        name: str = "space",
        *,
        index: IndexSettings | None = None,
        wal: WalSettings | None = None,
        limits: LimitSettings | None = None,
    ) -> Space:
        kwargs: dict[str, Any] = dict(
            wal=wal or WalSettings(),
            index=index or IndexSettings(),
            limits=limits or LimitSettings(),
        )
        space = Space(name, self.root / name, **kwargs)
        space.recover()
        space.start(asyncio.get_running_loop())
        self._open.append(space)
        self._kwargs[id(space)] = {"name": name, **kwargs}
        return space

    async def restart(self, space: Space) -> Space:
        """Closes ``space`` and opens a new one on its directory (same settings)."""
        kwargs = self._kwargs.pop(id(space))
        if space in self._open:
            self._open.remove(space)
            await space.close()
        return self.space(kwargs.pop("name"), **kwargs)

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


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        await h.close_all()


@pytest.fixture(scope="session")
def kit() -> ModuleType:
    """This module: its helpers for the tests."""
    return sys.modules[__name__]
