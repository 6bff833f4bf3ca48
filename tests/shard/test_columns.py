"""Compact string columns behave as a list of the strings appended to them."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engram.shard.columns import StringColumn

texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(texts, max_size=8), max_size=6), st.data())
def test_a_column_reads_back_what_was_appended(
    batches: list[list[str]], data: st.DataObject
) -> None:
    column, model = StringColumn(), []
    for batch in batches:
        column.extend(batch)
        model.extend(batch)
    assert len(column) == len(model)
    assert [column[i] for i in range(len(model))] == model
    lo = data.draw(st.integers(0, len(model)))
    hi = data.draw(st.integers(0, len(model)))
    assert column[lo:hi] == model[lo:hi]
    assert column[:] == model
    if model:
        assert column[-1] == model[-1]


def test_rows_past_the_end_are_an_index_error() -> None:
    column = StringColumn()
    column.extend(["a", "b"])
    with pytest.raises(IndexError):
        column[2]
    with pytest.raises(ValueError, match="step"):
        column[::2]


def _traced(build) -> int:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    try:
        kept = build()
        size, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del kept
    return size


def test_a_column_is_much_smaller_than_a_list_of_str() -> None:
    def as_list() -> list[str]:
        out: list[str] = []
        for lo in range(0, 10_000, 1_000):
            out.extend(f"obs-{i:08d}" for i in range(lo, lo + 1_000))
        return out

    def as_column() -> StringColumn:
        out = StringColumn()
        for lo in range(0, 10_000, 1_000):
            out.extend([f"obs-{i:08d}" for i in range(lo, lo + 1_000)])
        return out

    assert _traced(as_column) * 3 < _traced(as_list)  # 12 + 4 bytes a row against 61 + 8


def test_rows_appended_one_at_a_time_stay_compact_and_readable() -> None:
    def one_by_one() -> StringColumn:
        out = StringColumn()
        for i in range(5_000):
            out.extend([f"obs-{i:08d}"])
        return out

    def as_list() -> list[str]:
        return [f"obs-{i:08d}" for i in range(5_000)]

    column = one_by_one()
    assert column[:] == as_list() and column[4_321] == "obs-00004321"
    assert _traced(one_by_one) * 2 < _traced(as_list)
