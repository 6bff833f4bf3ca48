"""Checkers: what the cluster stores against what the workload was told.

:func:`read_space` reads a whole memory space with ``list_observations`` (ids and LSNs);
:func:`analyse` compares such listings with the :class:`~engram.chaos.ledger.Ledger`:

* completeness — every observation of an acknowledged batch is stored (else ``lost``);
  nothing of a batch refused for good, or never sent, is stored (``rejected_stored``); a batch
  whose fate is unknown (its stream died, or no answer at the end) is stored whole or not at
  all; no stored id of this run is unknown (``phantom``);
* atomicity — no batch is stored in part (``partial``);
* no duplicates — every id is stored once (``duplicated`` counts the extra copies);
* per-session order — a batch's observations have consecutive LSNs in item order, and the
  batches of one session are stored in the order they were sent (``reordered``);
* deletes — no row whose delete was acknowledged is stored (``resurrected``); a row named by a
  delete whose answer never came may be either; every other row of an acknowledged batch must
  be there (deleted rows keep their LSNs, so the order checks hold across the holes).

:class:`ContinuousChecker` runs the same analysis on one space at a time during the run: every
batch acknowledged before a listing started must be in it (a missing one ``blinked``: acked,
then not readable) unless a delete sent before the listing ended names it, no row whose delete
was acknowledged before the listing started may be in it (``resurrected``), and nothing may be
duplicated or out of order at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from array import array
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from engram.chaos.ledger import MUST_NOT_STORE, Ledger
from engram_client import EngramClient

log = logging.getLogger("engram.chaos.checkers")

_EXAMPLES = 12
_ITEMS = 1024  # a row's key is g * _ITEMS + i (a batch holds at most 500 observations)


@dataclass
class Listing:
    space: str
    g: np.ndarray  # batch number of each stored id of this run
    i: np.ndarray  # item index within the batch
    lsn: np.ndarray
    foreign: int = 0  # ids that are not of this run's format


@dataclass
class Findings:
    acked_batches: int = 0
    acked: int = 0  # observations acknowledged
    lost: int = 0  # acknowledged observations not stored
    lost_batches: int = 0
    duplicated: int = 0  # extra copies of stored ids
    reordered: int = 0  # batches out of session order or not contiguous in LSN order
    partial: int = 0  # batches stored in part
    rejected_stored: int = 0  # observations stored although refused for good or never sent
    phantom: int = 0  # stored ids of this run that no batch (of that space) holds
    invalid_acked: int = 0  # deliberately invalid batches that were acknowledged
    uncertain_batches: int = 0  # fate unknown to the client (stream died / no answer)
    uncertain_stored: int = 0  # ... of which stored (whole)
    stored: int = 0  # observations of this run found
    foreign: int = 0
    resurrected: int = 0  # stored rows whose delete was acknowledged
    deleted: int = 0  # rows of acknowledged deletes (gone, as they must be, unless resurrected)
    delete_uncertain: int = 0  # rows named by deletes never answered: may be either
    examples: list[str] = field(default_factory=list)

    @property
    def violations(self) -> int:
        return (
            self.resurrected
            + self.lost
            + self.duplicated
            + self.reordered
            + self.partial
            + self.rejected_stored
            + self.phantom
            + self.invalid_acked
        )

    def example(self, text: str) -> None:
        if len(self.examples) < _EXAMPLES:
            self.examples.append(text)


def parse(run: str, space: str, ids: Iterable[str], lsns: Iterable[int]) -> Listing:
    prefix = f"{run}."
    cut = len(prefix)
    gs, items, ls = array("q"), array("q"), array("q")
    foreign = 0
    for oid, lsn in zip(ids, lsns, strict=True):
        if oid.startswith(prefix):
            g, _, i = oid[cut:].partition(".")
            try:
                gs.append(int(g))
                items.append(int(i))
            except ValueError:
                foreign += 1
                continue
            ls.append(lsn)
        else:
            foreign += 1
    return Listing(
        space,
        np.frombuffer(gs, dtype=np.int64).copy(),
        np.frombuffer(items, dtype=np.int64).copy(),
        np.frombuffer(ls, dtype=np.int64).copy(),
        foreign,
    )


async def read_space(client: EngramClient, run: str, space: str) -> Listing:
    ids: list[str] = []
    lsns: list[int] = []
    async for chunk_ids, chunk_lsns in client.list_observations(space):
        ids.extend(chunk_ids)
        lsns.extend(chunk_lsns)
    return await asyncio.to_thread(parse, run, space, ids, lsns)


@dataclass
class DeletedRows:
    """Rows named by deletes, as keys ``g * _ITEMS + i``: ``named`` may be absent from a
    listing, ``gone`` must be (their delete was acknowledged before it started)."""

    named: np.ndarray
    gone: np.ndarray
    uncertain: int = 0  # rows of ``named`` whose delete was never answered


def deleted_rows(
    ledger: Ledger, *, sent_before: float | None = None, acked_before: float | None = None
) -> DeletedRows:
    """The rows of the deletes sent before ``sent_before`` and of those acknowledged before
    ``acked_before`` (None: every delete). Call it on the event loop (the ledger changes)."""
    named: list[int] = []
    gone: list[int] = []
    uncertain = 0
    for d in list(ledger.deletes):
        if sent_before is not None and d.sent_at >= sent_before:
            continue
        keys = [g * _ITEMS + i for g, i in d.rows]
        named += keys
        if d.state == "acked":
            if acked_before is None or d.done_at < acked_before:
                gone += keys
        elif d.state == "failed" or acked_before is None:
            uncertain += len(keys)
    return DeletedRows(np.array(named, dtype=np.int64), np.array(gone, dtype=np.int64), uncertain)


def analyse(
    ledger: Ledger,
    listings: Sequence[Listing],
    *,
    required: set[int] | None = None,
    deletes: DeletedRows | None = None,
) -> Findings:
    """Compares ``listings`` with the ledger.

    With ``required`` (continuous checks), only those batches must be complete and only the
    listed spaces count; batches whose outcome may still change are not judged. ``deletes``:
    the rows the listings may (``named``) and must not (``gone``) hold; None: none."""
    out = Findings()
    empty = np.zeros(0, dtype=np.int64)
    deletes = deletes or DeletedRows(empty, empty)
    out.deleted = len(deletes.gone)
    out.delete_uncertain = deletes.uncertain
    spaces = [lst.space for lst in listings]
    if not listings:
        return out
    out.foreign = sum(lst.foreign for lst in listings)
    g = np.concatenate([lst.g for lst in listings])
    item = np.concatenate([lst.i for lst in listings])
    lsn = np.concatenate([lst.lsn for lst in listings])
    sp = np.concatenate([np.full(len(lst.g), k, dtype=np.int64) for k, lst in enumerate(listings)])
    out.stored = len(g)
    order = np.lexsort((lsn, item, g))
    g, item, lsn, sp = g[order], item[order], lsn[order], sp[order]
    # duplicates: the same (batch, item) more than once; keep the first (lowest LSN)
    dup = np.zeros(len(g), dtype=bool)
    if len(g) > 1:
        dup[1:] = (g[1:] == g[:-1]) & (item[1:] == item[:-1])
    out.duplicated = int(dup.sum())
    for k in np.flatnonzero(dup)[:3]:
        out.example(f"duplicate: id {ledger.run}.{g[k]}.{item[k]} (again at LSN {lsn[k]})")
    keep = ~dup
    g, item, lsn, sp = g[keep], item[keep], lsn[keep], sp[keep]
    # deletes: rows that must be gone, and per batch the stored rows a delete names
    keys = g * _ITEMS + item
    back = np.isin(keys, deletes.gone)
    out.resurrected = int(back.sum())
    for k in np.flatnonzero(back)[:3]:
        out.example(f"resurrected: id {ledger.run}.{g[k]}.{item[k]} (LSN {lsn[k]}) is deleted")
    named_stored = np.bincount(g[np.isin(keys, deletes.named)], minlength=len(ledger.batches))
    named_per_batch = np.bincount(deletes.named // _ITEMS, minlength=len(ledger.batches))
    # within a batch, sorted by item: LSNs must step exactly as the items do
    bad_step: set[int] = set()
    if len(g) > 1:
        same = g[1:] == g[:-1]
        wrong = same & ((lsn[1:] - lsn[:-1]) != (item[1:] - item[:-1]))
        bad_step = {int(x) for x in g[1:][wrong]}
    stored: dict[int, tuple[int, int, int]] = {}  # g -> (count, min lsn, max lsn)
    if len(g):
        groups, starts, counts = np.unique(g, return_index=True, return_counts=True)
        lo = np.minimum.reduceat(lsn, starts)
        hi = np.maximum.reduceat(lsn, starts)
        top = np.maximum.reduceat(item, starts)
        sp_lo = np.minimum.reduceat(sp, starts)
        sp_hi = np.maximum.reduceat(sp, starts)
        n_batches = len(ledger.batches)
        for k, bg in enumerate(groups.tolist()):
            count = int(counts[k])
            rec = ledger.batches[bg] if 0 <= bg < n_batches else None
            if (
                rec is None
                or sp_lo[k] != sp_hi[k]
                or spaces[int(sp_lo[k])] != rec.space
                or int(top[k]) >= rec.n
            ):
                out.phantom += count
                out.example(f"phantom: {count} stored ids of batch {bg} that no batch sent there")
                continue
            stored[bg] = (count, int(lo[k]), int(hi[k]))
    judged = set(spaces)
    sessions: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for rec in ledger.batches:
        if rec.space not in judged:
            continue
        count, lo_lsn, hi_lsn = stored.get(rec.g, (0, 0, 0))
        if count:
            sessions[rec.session].append((rec.index, lo_lsn, hi_lsn))
        if rec.g in bad_step:
            out.reordered += 1
            out.example(f"not contiguous in item order: batch {rec.g} ({rec.session}#{rec.index})")
        # rows of the batch no delete names: every one of an acked batch must be stored
        named = int(named_per_batch[rec.g]) if rec.g < len(named_per_batch) else 0
        kept = count - (int(named_stored[rec.g]) if rec.g < len(named_stored) else 0)
        missing = rec.n - named - kept
        if required is not None:
            if rec.g in required:
                out.acked_batches += 1
                out.acked += rec.n
                if missing > 0:
                    out.lost += missing
                    out.lost_batches += 1
                    out.example(
                        f"missing: {missing} of {rec.n} of acked batch {rec.g} "
                        f"({rec.session}#{rec.index}, {rec.space}; {named} of it deleted)"
                    )
            continue
        if rec.state == "acked":
            out.acked_batches += 1
            out.acked += rec.n
            if rec.invalid:
                out.invalid_acked += 1
                out.example(f"invalid batch acknowledged: {rec.g} ({rec.session}#{rec.index})")
            if missing > 0:
                out.lost += missing
                out.lost_batches += 1
                out.example(
                    f"lost: {missing} of {rec.n} of acked batch {rec.g} ({rec.session}#"
                    f"{rec.index}, {rec.space}, {named} of it deleted, {rec.detail or 'no detail'})"
                )
                if kept > 0:
                    out.partial += 1
        elif rec.state in MUST_NOT_STORE:
            if count:
                out.rejected_stored += count
                out.example(
                    f"stored although {rec.state}: {count} of batch {rec.g} "
                    f"({rec.session}#{rec.index}: {rec.detail})"
                )
        else:
            out.uncertain_batches += 1
            if count == rec.n:
                out.uncertain_stored += 1
            elif count:
                out.partial += 1
                out.example(f"partial: {count} of {rec.n} of batch {rec.g} ({rec.state})")
    for session, batches in sessions.items():
        batches.sort()
        for (ia, _la, ha), (ib, lb, _hb) in zip(batches, batches[1:], strict=False):
            if lb <= ha:
                out.reordered += 1
                out.example(
                    f"out of order: {session}#{ib} stored at LSN {lb}, before the end "
                    f"({ha}) of {session}#{ia} sent earlier"
                )
    return out


@dataclass
class ContinuousResult:
    checks: int = 0
    failed_reads: int = 0
    blinked: int = 0  # acknowledged observations missing from a later listing
    duplicated: int = 0
    reordered: int = 0
    phantom: int = 0
    resurrected: int = 0  # rows listed after their delete was acknowledged
    examples: list[str] = field(default_factory=list)

    @property
    def violations(self) -> int:
        return self.blinked + self.duplicated + self.reordered + self.phantom + self.resurrected


class ContinuousChecker:
    """Reads one space after another during the run and checks what is there."""

    def __init__(
        self, client: EngramClient, ledger: Ledger, spaces: Sequence[str], every_s: float
    ) -> None:
        self.client = client
        self.ledger = ledger
        self.spaces = list(spaces)
        self.every_s = every_s
        self.result = ContinuousResult()
        self.t0 = time.monotonic()  # the run's start, for the examples' timestamps

    async def run(self, stop: asyncio.Event) -> None:
        turn = 0
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every_s)
            if stop.is_set():
                return
            await self.check(self.spaces[turn % len(self.spaces)])
            turn += 1

    async def check(self, space: str) -> None:
        t0 = time.monotonic()
        required = {
            b.g
            for b in self.ledger.batches
            if b.space == space and b.state == "acked" and b.done_at < t0
        }
        try:
            listing = await asyncio.wait_for(read_space(self.client, self.ledger.run, space), 60)
        except Exception as exc:  # a fault may be on: try again later
            self.result.failed_reads += 1
            self.ledger.op("list", False)
            log.debug("continuous check of %s failed: %s", space, exc)
            return
        ended = time.monotonic()
        self.ledger.op("list", True, (ended - t0) * 1000)
        deletes = deleted_rows(self.ledger, sent_before=ended, acked_before=t0)
        found = await asyncio.to_thread(
            analyse, self.ledger, [listing], required=required, deletes=deletes
        )
        r = self.result
        r.checks += 1
        r.blinked += found.lost
        r.duplicated += found.duplicated
        r.reordered += found.reordered
        r.phantom += found.phantom
        r.resurrected += found.resurrected
        for text in found.examples:
            if len(r.examples) < _EXAMPLES:
                r.examples.append(f"[{space}, listing at +{t0 - self.t0:.0f}s] {text}")
