"""What the chaos workload did and saw: every batch it sent, every operation's outcome.

The :class:`Ledger` is the harness's memory. Each batch gets a global number ``g`` when it is
created; its observations carry the ids ``<run>.<g>.<i>`` (i = 0..n-1), so any id read back
names its batch, and through it the session and the batch's place in that session's send
order. A batch ends in one of these states:

=============  =========================================================================
``acked``      the server acknowledged it: it must be stored exactly once, atomically
``rejected``   refused for good (a deliberately invalid batch): it must not be stored
``error``      a valid batch refused for good (unexpected): it must not be stored
``unsent``     ``send`` raised before the batch left the client: it must not be stored
``failed``     its stream died (fatal error) before an answer: stored at most once
``pending``    no answer when the run ended: stored at most once
=============  =========================================================================

Deletes (:class:`DeleteRecord`) name acknowledged observations by id. A delete is ``acked``
once the server answered it (its rows must never be read again after ``done_at``), ``failed``
when no attempt was answered before the run ended (its rows may or may not be gone), or
``pending`` meanwhile. Every observation is named by at most one delete; :attr:`Ledger.deleted`
maps ``(g, i)`` to the delete's number.

Operations (``write``, ``delete``, ``recall_<level>``, ``stream``, ``list``) are logged with
their time and outcome; the report derives success rates around each fault and recovery times
from them.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

# States whose batches must be found exactly once / never / at most once.
MUST_STORE = frozenset({"acked"})
MUST_NOT_STORE = frozenset({"rejected", "error", "unsent"})
MAY_STORE = frozenset({"failed", "pending", "sending"})


@dataclass(slots=True)
class BatchRecord:
    g: int  # global batch number (in the ids)
    session: str  # writer session key, e.g. "w3.0" (writer 3, generation 0)
    index: int  # send order within the session
    space: str
    n: int
    invalid: bool  # deliberately invalid (zero or NaN vector): must be rejected
    sent_at: float
    state: str = "sending"
    done_at: float = 0.0
    detail: str = ""


@dataclass(slots=True)
class DeleteRecord:
    k: int  # delete number (in the request id)
    space: str
    rows: list[tuple[int, int]]  # (batch g, item i) of each id named
    sent_at: float
    state: str = "pending"  # pending, acked, failed
    done_at: float = 0.0
    attempts: int = 0
    deleted: int = 0  # the answer's figures (acked only)
    already_deleted: int = 0
    not_found: int = 0
    detail: str = ""


@dataclass(slots=True)
class OpEvent:
    t: float  # monotonic time the outcome was known
    op: str
    ok: bool
    latency_ms: float = 0.0


@dataclass
class Ledger:
    run: str
    batches: list[BatchRecord] = field(default_factory=list)
    events: list[OpEvent] = field(default_factory=list)
    # (monotonic time, ack -> visible ms, send -> visible ms)
    visibility: list[tuple[float, float, float]] = field(default_factory=list)
    visibility_timeouts: int = 0
    counters: Counter[str] = field(default_factory=Counter)
    # (monotonic time, error code) of every error answer the writers' streams got
    errors: list[tuple[float, str]] = field(default_factory=list)
    # a few distinct messages per kind of error, with when they were first seen
    error_examples: dict[str, list[str]] = field(default_factory=dict)
    deletes: list[DeleteRecord] = field(default_factory=list)
    # (batch g, item i) -> number of the delete that names it
    deleted: dict[tuple[int, int], int] = field(default_factory=dict)

    def new_batch(self, session: str, index: int, space: str, n: int, invalid: bool) -> BatchRecord:
        rec = BatchRecord(len(self.batches), session, index, space, n, invalid, time.monotonic())
        self.batches.append(rec)
        return rec

    def new_delete(self, space: str, rows: list[tuple[int, int]]) -> DeleteRecord:
        rec = DeleteRecord(len(self.deletes), space, rows, time.monotonic())
        self.deletes.append(rec)
        for row in rows:
            self.deleted[row] = rec.k
        return rec

    def row_id(self, g: int, i: int) -> str:
        return f"{self.run}.{g}.{i}"

    def ids(self, rec: BatchRecord) -> list[str]:
        prefix = f"{self.run}.{rec.g}."
        return [f"{prefix}{i}" for i in range(rec.n)]

    def op(self, op: str, ok: bool, latency_ms: float = 0.0, t: float | None = None) -> None:
        self.events.append(OpEvent(time.monotonic() if t is None else t, op, ok, latency_ms))

    def count(self, what: str, n: int = 1) -> None:
        self.counters[what] += n

    def example(self, kind: str, text: str, limit: int = 4) -> None:
        seen = self.error_examples.setdefault(kind, [])
        if len(seen) < limit and not any(text in s for s in seen):
            seen.append(f"{time.monotonic():.1f}: {text}")

    def states(self) -> Counter[str]:
        return Counter(b.state for b in self.batches)

    def acked_observations(self) -> int:
        return sum(b.n for b in self.batches if b.state == "acked")

    def gone_since(self, before: float) -> dict[tuple[int, int], float]:
        """Rows whose delete was acknowledged before ``before`` -> when it was."""
        out: dict[tuple[int, int], float] = {}
        for d in self.deletes:
            if d.state == "acked" and d.done_at < before:
                for row in d.rows:
                    out[row] = d.done_at
        return out
