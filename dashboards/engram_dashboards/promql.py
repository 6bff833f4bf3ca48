"""The metric names a PromQL expression reads, and the names a ``/metrics`` page exports.

Not a PromQL parser: a tokenizer that knows enough of the grammar to tell a metric name
from a function, an aggregation's label list, a label matcher, a range or a keyword. The
tests use it to check every dashboard query and alert expression against the metrics the
services really export (Prometheus itself checks the syntax: it runs every query).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

_TOKEN = re.compile(
    r"""
      "(?:[^"\\]|\\.)*" | '(?:[^'\\]|\\.)*'   # strings
    | \[[^\]]*\]                              # ranges, subqueries
    | \{[^}]*\}                               # label matchers
    | \d[\w.]*                                # numbers, durations
    | [A-Za-z_:][A-Za-z0-9_:]*                # identifiers
    | \S                                      # operators, parentheses, commas
    """,
    re.VERBOSE,
)
# Keywords followed by a parenthesised list of label names.
_LABEL_LISTS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right"})
_KEYWORDS = _LABEL_LISTS | {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan"}
_JOB = re.compile(r'\bjob\s*(=~|=)\s*"([^"]*)"')
# Series Prometheus makes itself for every target; no exporter serves them.
SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})


@dataclass(frozen=True)
class Selector:
    metric: str
    jobs: tuple[str, ...]  # the jobs its matcher names (none: any job)


def selectors(expr: str) -> list[Selector]:
    """Every metric a PromQL expression selects, with the jobs it restricts it to."""
    tokens = _TOKEN.findall(expr)
    found: list[Selector] = []
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
        if tok.lower() in _LABEL_LISTS and nxt == "(":
            i = tokens.index(")", i)  # skip the label names
        elif re.fullmatch(r"[A-Za-z_:][A-Za-z0-9_:]*", tok) and tok.lower() not in _KEYWORDS:
            # a function is followed by its arguments, an aggregation by them or its labels
            if nxt != "(" and nxt.lower() not in ("by", "without"):
                found.append(Selector(tok, _jobs(nxt) if nxt.startswith("{") else ()))
        i += 1
    return found


def _jobs(matchers: str) -> tuple[str, ...]:
    match = _JOB.search(matchers)
    if match is None:
        return ()
    op, value = match.groups()
    return tuple(value.split("|")) if op == "=~" else (value,)


def exported_names(text: str) -> set[str]:
    """Every series name a /metrics page can serve, including those of families that have no
    sample yet (a labelled metric nothing has touched): a counter ``x`` serves ``x_total``, a
    histogram ``x_bucket``, ``x_sum`` and ``x_count``."""
    suffixes = {
        "counter": ("_total",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
    }
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names
