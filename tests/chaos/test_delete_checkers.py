"""The chaos checkers with deletes, on hand-made ledgers and listings (no cluster).

Each case is one way a store can answer after deletes: the checkers must call a deleted row that
is still listed or recalled ``resurrected``, a missing row no delete names ``lost``, and must
excuse the absence of a row named by a delete (answered or not), at its time.
"""

from __future__ import annotations

from engram.chaos.checkers import Listing, analyse, deleted_rows, parse
from engram.chaos.deletes import resurrected
from engram.chaos.ledger import Ledger

RUN = "t1"
SPACE = "s"


def _ledger(batches: int = 2, n: int = 5) -> Ledger:
    ledger = Ledger(RUN)
    for k in range(batches):
        rec = ledger.new_batch("w0.0", k, SPACE, n, False)
        rec.state, rec.done_at = "acked", rec.sent_at
    return ledger


def _listing(ledger: Ledger, rows: list[tuple[int, int]]) -> Listing:
    ids = [ledger.row_id(g, i) for g, i in rows]
    lsns = [1 + g * 5 + i for g, i in rows]  # deleted rows keep their LSNs: holes, not shifts
    return parse(RUN, SPACE, ids, lsns)


def _all_but(ledger: Ledger, gone: set[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(b.g, i) for b in ledger.batches for i in range(b.n) if (b.g, i) not in gone]


def test_acknowledged_delete_absent_is_clean() -> None:
    ledger = _ledger()
    d = ledger.new_delete(SPACE, [(0, 1), (1, 4)])
    d.state, d.done_at = "acked", d.sent_at
    found = analyse(
        ledger, [_listing(ledger, _all_but(ledger, {(0, 1), (1, 4)}))], deletes=deleted_rows(ledger)
    )
    assert (found.violations, found.lost, found.resurrected, found.deleted) == (0, 0, 0, 2)


def test_acknowledged_delete_still_listed_is_resurrected() -> None:
    ledger = _ledger()
    d = ledger.new_delete(SPACE, [(0, 1), (1, 4)])
    d.state, d.done_at = "acked", d.sent_at
    found = analyse(
        ledger, [_listing(ledger, _all_but(ledger, {(1, 4)}))], deletes=deleted_rows(ledger)
    )
    assert found.resurrected == 1 and found.lost == 0
    assert any("resurrected" in e and f"{RUN}.0.1" in e for e in found.examples)


def test_missing_row_no_delete_names_is_lost() -> None:
    ledger = _ledger()
    d = ledger.new_delete(SPACE, [(0, 1)])
    d.state, d.done_at = "acked", d.sent_at
    found = analyse(
        ledger, [_listing(ledger, _all_but(ledger, {(0, 1), (0, 2)}))], deletes=deleted_rows(ledger)
    )
    assert (found.lost, found.lost_batches, found.partial, found.resurrected) == (1, 1, 1, 0)


def test_unanswered_delete_may_or_may_not_have_happened() -> None:
    ledger = _ledger()
    d = ledger.new_delete(SPACE, [(0, 1), (0, 2)])
    d.state = "failed"
    deletes = deleted_rows(ledger)
    assert deletes.uncertain == 2
    half = _listing(ledger, _all_but(ledger, {(0, 1)}))
    assert analyse(ledger, [half], deletes=deletes).violations == 0


def test_continuous_window_judges_each_delete_at_its_time() -> None:
    ledger = _ledger()
    early = ledger.new_delete(SPACE, [(0, 0)])
    early.state, early.done_at = "acked", early.sent_at
    late = ledger.new_delete(SPACE, [(1, 0)])
    late.state, late.done_at = "acked", late.sent_at + 10.0
    listed_at = late.sent_at + 5.0  # after the late one was sent, before its answer
    deletes = deleted_rows(ledger, sent_before=listed_at + 1.0, acked_before=listed_at)
    required = {0, 1}
    # the late delete's row may be either; the early one's must be gone
    for rows in (_all_but(ledger, {(0, 0)}), _all_but(ledger, {(0, 0), (1, 0)})):
        found = analyse(ledger, [_listing(ledger, rows)], required=required, deletes=deletes)
        assert found.violations == 0, found.examples
    found = analyse(
        ledger, [_listing(ledger, _all_but(ledger, set()))], required=required, deletes=deletes
    )
    assert found.resurrected == 1


def test_recall_hits_are_judged_by_when_the_recall_was_sent() -> None:
    ledger = _ledger()
    d = ledger.new_delete(SPACE, [(0, 3)])
    d.state, d.done_at = "acked", d.sent_at + 1.0
    hit = ledger.row_id(0, 3)
    assert resurrected(ledger, [hit, ledger.row_id(0, 2), "other"], d.done_at + 0.1) == [hit]
    assert resurrected(ledger, [hit], d.done_at - 0.1) == []  # sent before the answer: may
