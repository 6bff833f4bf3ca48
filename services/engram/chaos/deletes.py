"""The deleting side of the chaos workload: deletes by id, and the check of every read.

* :class:`Deleter` — deletes a share (``WorkloadShape.delete_share``) of the acknowledged
  observations, by id, with the public unary ``Delete`` call (the client's
  :meth:`~engram_client.EngramClient.delete`), while the writers go on. It picks
  rows of batches acknowledged at least ``delete_after_s`` ago (old ones, in HNSW, and recent
  ones, still in the fresh tier), each row at most once. A delete whose call fails is sent again
  with the same request id until answered (deleting twice is a no-op) or until
  ``delete_retry_s`` passed; only an answered delete is ``acked`` in the ledger. Some deletes
  name the first row of a batch whose vector the writer kept: once acknowledged, a STRONG recall
  with that vector (the row itself would be the best hit) must not return it.
* :func:`resurrected` — which ids of a read (a recall's hits) had their delete acknowledged
  before the read was sent; the recallers and the probes count those as ``resurrected``.

An answer whose figures do not add up to the ids sent, or that counts acknowledged,
never-deleted ids as ``not_found``, is counted too (``delete_not_found``): such rows were
acknowledged and then not found.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import grpc
import numpy as np

from engram.chaos.ledger import BatchRecord, DeleteRecord, Ledger
from engram.contract.errors import EngramError
from engram.v1 import streaming_pb2 as pb
from engram_client import EngramClient

if TYPE_CHECKING:
    from engram.chaos.workload import WorkloadShape

log = logging.getLogger("engram.chaos.deletes")


def resurrected(ledger: Ledger, ids: Iterable[str], sent_at: float) -> list[str]:
    """The ids among ``ids`` whose delete was acknowledged before ``sent_at``."""
    prefix = f"{ledger.run}."
    out = []
    for oid in ids:
        if not oid.startswith(prefix):
            continue
        g, _, i = oid[len(prefix) :].partition(".")
        try:
            k = ledger.deleted.get((int(g), int(i)))
        except ValueError:
            continue
        if k is None:
            continue
        rec = ledger.deletes[k]
        if rec.state == "acked" and rec.done_at < sent_at:
            out.append(oid)
    return out


def note_resurrected(ledger: Ledger, where: str, ids: Sequence[str], sent_at: float) -> None:
    """Counts (and keeps examples of) the rows of ``ids`` that a read should not have returned."""
    found = resurrected(ledger, ids, sent_at)
    if found:
        ledger.count("resurrected_in_recall", len(found))
        ledger.example("resurrected", f"{where} returned {', '.join(found[:3])} (deleted)")


@dataclass
class _SpaceRows:
    """The acknowledged, valid batches of a space in ack order, and what was deleted of them."""

    batches: list[BatchRecord] = field(default_factory=list)
    acked_at: list[float] = field(default_factory=list)
    probes: dict[int, np.ndarray] = field(default_factory=dict)  # g -> vector of item 0
    acked_rows: int = 0
    deleted_rows: int = 0


class Deleter:
    """Deletes by id on every space of the run until stopped (see the module docstring)."""

    def __init__(
        self,
        client: EngramClient,
        ledger: Ledger,
        spaces: Sequence[str],
        shape: WorkloadShape,
        seed: int,
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.shape = shape
        self.rng = random.Random(seed)
        self.rows = {space: _SpaceRows() for space in spaces}

    def offer(self, rec: BatchRecord, probe: np.ndarray | None) -> None:
        """A writer's batch was acknowledged (called in ack order, from its done callback)."""
        rows = self.rows.get(rec.space)
        if rows is None or rec.invalid:
            return
        rows.batches.append(rec)
        rows.acked_at.append(rec.done_at)
        rows.acked_rows += rec.n
        if probe is not None and len(rows.probes) < 10_000:
            rows.probes[rec.g] = probe

    async def run(self, stop: asyncio.Event) -> None:
        spaces = list(self.rows)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.rng.uniform(*self.shape.delete_every_s))
            if stop.is_set():
                return
            space = self.rng.choice(spaces)
            chosen, probe = self._choose(space)
            if not chosen:
                continue
            rec = self.ledger.new_delete(space, chosen)
            self.rows[space].deleted_rows += len(chosen)
            await self._delete(rec)
            if rec.state == "acked" and probe is not None:
                await self._probe(rec, probe)

    def _choose(self, space: str) -> tuple[list[tuple[int, int]], np.ndarray | None]:
        """Up to ``delete_max_ids`` rows of ``space`` not deleted yet, and a probe vector when
        the first of them is a batch's item 0 whose vector was kept."""
        rows = self.rows[space]
        want = int(rows.acked_rows * self.shape.delete_share) - rows.deleted_rows
        want = min(want, self.shape.delete_max_ids)
        ripe = bisect.bisect_left(rows.acked_at, time.monotonic() - self.shape.delete_after_s)
        if want < 1 or ripe == 0:
            return [], None
        chosen: list[tuple[int, int]] = []
        probe = None
        deleted = self.ledger.deleted
        # a probe first: item 0 of a batch whose vector was kept
        if rows.probes and self.rng.random() < 0.5:
            for _ in range(8):
                rec = rows.batches[self.rng.randrange(ripe)]
                if (rec.g, 0) not in deleted and rec.g in rows.probes:
                    chosen.append((rec.g, 0))
                    probe = rows.probes.pop(rec.g)
                    break
        for _ in range(want * 4):
            if len(chosen) >= want:
                break
            rec = rows.batches[self.rng.randrange(ripe)]
            # a run of neighbours: deletes cluster in real use (one conversation, one document)
            first = self.rng.randrange(rec.n)
            for i in range(first, min(rec.n, first + self.rng.randint(1, 20))):
                if len(chosen) >= want:
                    break
                if (rec.g, i) not in deleted and (rec.g, i) not in chosen:
                    chosen.append((rec.g, i))
        return chosen, probe

    async def _delete(self, rec: DeleteRecord) -> None:
        """Sends ``rec`` until it is answered or its retry time is over."""
        ledger = self.ledger
        request_id = f"{ledger.run}.d{rec.k}"
        ids = [ledger.row_id(g, i) for g, i in rec.rows]
        give_up = rec.sent_at + self.shape.delete_retry_s
        while True:
            rec.attempts += 1
            started = time.monotonic()
            try:
                resp = await self.client.delete(
                    rec.space, ids, request_id=request_id, timeout=self.shape.delete_timeout_s
                )
            except EngramError as err:
                now = time.monotonic()
                rec.detail = f"{pb.ErrorCode.Name(err.code)}: {err}"[:300]
                ledger.op("delete", False, t=now)
                ledger.count(f"delete_error:{pb.ErrorCode.Name(err.code)}")
                ledger.example("delete", rec.detail)
                if not err.retryable or now >= give_up:  # an earlier attempt may have done it
                    rec.state, rec.done_at = "failed", now
                    return
                await asyncio.sleep(0.5)
                continue
            now = time.monotonic()
            rec.state, rec.done_at = "acked", now
            rec.deleted, rec.already_deleted = resp.deleted, resp.already_deleted
            rec.not_found = resp.not_found
            ledger.op("delete", True, (now - started) * 1000, now)
            if rec.attempts > 1:
                ledger.count("delete_retried")
            # a retry may find its rows deleted by an attempt that was not answered
            first = rec.attempts == 1
            if resp.not_found or resp.deleted + resp.already_deleted != len(rec.rows):
                ledger.count("delete_not_found", resp.not_found or 1)
                ledger.example(
                    "delete_answer",
                    f"delete {rec.k} of {len(rec.rows)} ids: deleted {resp.deleted}, already "
                    f"{resp.already_deleted}, not found {resp.not_found}",
                )
            elif first and resp.already_deleted:
                ledger.count("delete_already_on_first_try", resp.already_deleted)
            return

    async def _probe(self, rec: DeleteRecord, vector: np.ndarray) -> None:
        """A STRONG recall with a deleted row's own vector, sent after the delete's answer."""
        req = pb.StreamingRecallRequest(
            memory_space_id=rec.space,
            cue=vector.tolist(),
            max_results=10,
            consistency=pb.STRONG,
            deadline_ms=int(self.shape.recall_timeout_s * 1000),
        )
        sent = time.monotonic()
        ids: list[str] = []
        try:
            async for chunk in self.client.stub.RecallStream(
                req, timeout=self.shape.recall_timeout_s
            ):
                ids.extend(m.id for m in chunk.results)
        except grpc.aio.AioRpcError as exc:
            self.ledger.op("delete_probe", False, t=time.monotonic())
            log.debug("probe recall of delete %d failed: %s", rec.k, exc.code().name)
            return
        self.ledger.op("delete_probe", True, (time.monotonic() - sent) * 1000)
        note_resurrected(self.ledger, f"probe of delete {rec.k} ({rec.space})", ids, sent)
