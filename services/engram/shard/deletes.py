"""Deleting rows of one memory space: resolving what to delete, the WAL record, applying it.

Runs on the shard's event loop, in the same order as the write path::

    resolve_delete  ids (IdIndex) and a time range (timestamps) -> rows, already, not_found
    begin_delete    WalRecord.delete{rows} queued behind the batches before it (group commit)
    (WAL thread)    durable
    _applied        in WAL order with batches: tombstones (one new delete sequence) -> answer

Rows are resolved before the record is written, so replay (recovery, a move) applies the
record without looking anything up (:class:`~engram.shard.tombstones.Tombstones.apply`). A
delete names only rows visible when it is resolved. Deleting a row twice is a no-op, counted
in ``already_deleted``; a delete whose rows are all deleted already is answered at once, with
nothing written.

A checkpoint must not trim a WAL segment holding a delete record that is not applied yet (its
tombstones would be in neither the checkpoint nor the WAL): it waits for
:meth:`Deletes.deletes_settled` before it takes the tombstones and rotates the WAL.

Called by the shard's gRPC service (``Delete``) and by retention.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from engram.contract.errors import NotOwnerError, StorageError
from engram.internal.v1 import shard_pb2 as ipb
from engram.shard.sessions import now_us
from engram.shard.writes import WritePath


@dataclass(frozen=True)
class DeleteResult:
    """The answer to one delete, once it is durable and applied."""

    deleted: int  # rows this delete made invisible
    already_deleted: int  # named by id, but deleted before
    not_found: int  # ids the space does not hold
    lsn: int  # the space's visible LSN when the delete took effect
    committed_at_us: int


class Deletes(WritePath):
    """A part of :class:`~engram.shard.space.Space` built on the write path: a delete is a
    WAL record like a batch, and a failed one fails the space's writes the same way."""

    @property
    def deleted_count(self) -> int:
        """Rows deleted (their LSNs stay taken)."""
        return self.tombstones.count

    @property
    def live_count(self) -> int:
        """Rows visible and not deleted."""
        return self.visible - self.tombstones.count

    def resolve_delete(
        self, ids: Sequence[str], since_us: int | None = None, until_us: int | None = None
    ) -> tuple[np.ndarray, int, int]:
        """The visible live rows to delete: those holding one of ``ids``, and (if a bound is
        given) those whose time is in ``[since_us, until_us)``; with how many ids name only
        deleted rows (``already``) and how many no row at all (``not_found``)."""
        visible = self.visible
        parts: list[np.ndarray] = []
        already = not_found = 0
        if ids:
            wanted = list(dict.fromkeys(ids))  # each id counted once
            found = self.id_index.find(self.ids, visible, wanted)
            not_found = len(wanted) - len(found)
            if found:
                by_id = [np.asarray(rows, np.int64) for rows in found.values()]
                dead = [self.tombstones.deleted(rows) for rows in by_id]
                already = sum(1 for d in dead if d.all())
                parts += [rows[~d] for rows, d in zip(by_id, dead, strict=True)]
        if since_us is not None or until_us is not None:
            ts = self.timestamps_us.view()[:visible]
            keep = np.ones(visible, bool)
            if since_us is not None:
                keep &= ts >= since_us
            if until_us is not None:
                keep &= ts < until_us
            rows = np.flatnonzero(keep)
            parts.append(rows[~self.tombstones.deleted(rows)])
        rows = np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        return rows.astype(np.uint64), already, not_found

    def begin_delete(
        self,
        rows: np.ndarray,
        request_id: str = "",
        *,
        already: int = 0,
        not_found: int = 0,
    ) -> asyncio.Future[DeleteResult]:
        """Deletes ``rows`` (from :meth:`resolve_delete`); the future resolves once the record
        is durable and the rows are invisible. ``already`` and ``not_found`` (from the resolve)
        are added to the answer. Raises at once if the space is fenced (NOT_OWNER) or its WAL
        is failing (STORAGE_FAILURE): nothing is queued then."""
        loop = self._require_loop()
        if self.fenced_why:
            raise NotOwnerError(self.fenced_why)
        if self._recovering or self.wal.failed:
            raise StorageError(
                f"memory space {self.name!r} cannot make deletes durable right now (WAL "
                "failure); nothing was deleted: retry later"
            )
        result: asyncio.Future[DeleteResult] = loop.create_future()
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        if len(rows) and (rows[0] < 0 or rows[-1] >= self.visible):
            raise ValueError(f"rows to delete must be visible rows [0, {self.visible})")
        rows = rows[~self.tombstones.deleted(rows)]
        if not len(rows):
            result.set_result(DeleteResult(0, already, not_found, self.visible, now_us()))
            return result
        record = ipb.WalRecord(
            delete=ipb.WalDelete(rows=rows.astype("<u8").tobytes(), request_id=request_id)
        )
        wal_fut = self.wal.append(record.SerializeToString(), self._next_row)
        self._inflight += 1
        self.deletes_inflight.add(wal_fut)

        def applied(f: asyncio.Future[None]) -> None:
            self._inflight -= 1
            self.deletes_inflight.discard(f)
            if f.cancelled() or f.exception() is not None:
                if not result.done():
                    exc = f.exception() if not f.cancelled() else None
                    result.set_exception(
                        exc
                        if isinstance(exc, StorageError)
                        else StorageError(f"WAL write of a delete failed: {exc}")
                    )
                self._on_failure()
                return
            new = self.tombstones.apply(rows)
            if not result.done():  # done: cancelled, its caller went away
                result.set_result(
                    DeleteResult(
                        deleted=new,
                        already_deleted=already + (len(rows) - new),
                        not_found=not_found,
                        lsn=self.visible,
                        committed_at_us=now_us(),
                    )
                )

        wal_fut.add_done_callback(applied)
        return result

    async def deletes_settled(self) -> None:
        """Returns once no delete is between its WAL record and its tombstones (event loop)."""
        while self.deletes_inflight:
            await asyncio.gather(*self.deletes_inflight, return_exceptions=True)
