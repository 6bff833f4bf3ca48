"""The report of a chaos run: the JSON document, its files and the summary printed at the end.

Figures derived from the ledger's operation log:

* success rate of an operation group in a window: outcomes with ok / all outcomes (``write``:
  a batch acknowledged vs. a failure a client saw — an error answer, a refused valid batch or
  a dropped stream; ``recall``: recalls of all levels);
* windows around a fault: ``before`` the 5 s before it started, ``during`` from its start to
  the moment every process served again, ``after`` the 5 s after that;
* recovery time of a fault: from the first write-path failure after it started to the first
  acknowledged write after the last such failure (before the next fault); 0 when no write
  failed;
* visibility: ack -> first EVENTUAL recall that returns the observation (sampled);
* deletes: requests and rows acknowledged, those never answered (their rows may or may not be
  gone), and ``resurrected``: rows read after their delete was acknowledged, by the final
  listing, a continuous check's listing or a recall (one row may count in several).
"""

from __future__ import annotations

import json
import shutil
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from engram.chaos.checkers import ContinuousResult, Findings
from engram.chaos.faults import KINDS, FaultEvent
from engram.chaos.ledger import Ledger, OpEvent

WINDOW_S = 5.0
GROUPS = {
    # the write path: acks vs. errors and disconnects the clients saw
    "write": ("write", "stream_down"),
    "recall": tuple(f"recall_{x}" for x in ("eventual", "bounded", "session", "strong", "stream")),
}


def _pct(values: Sequence[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if len(values) else None


class Timeline:
    """The outcomes of a group of operations in time order, for fast window counts."""

    def __init__(self, events: Sequence[OpEvent], ops: Sequence[str]) -> None:
        chosen = sorted((e.t, e.ok) for e in events if e.op in ops)
        self.ops = tuple(ops)
        self.t = np.array([c[0] for c in chosen], dtype=np.float64)
        self.ok = np.array([c[1] for c in chosen], dtype=bool)
        self._cum = np.concatenate([[0], np.cumsum(self.ok)])

    def rate(self, lo: float, hi: float) -> list[int]:
        """[ok, total] of the outcomes in [lo, hi)."""
        a, b = np.searchsorted(self.t, [lo, hi])
        return [int(self._cum[b] - self._cum[a]), int(b - a)]

    def recovery(self, start: float, until: float) -> float:
        """First failure at/after ``start`` -> first success after the last failure before
        ``until``; 0 when nothing failed."""
        a, b = np.searchsorted(self.t, [start, until])
        t, ok = self.t[a:b], self.ok[a:b]
        failed = np.flatnonzero(~ok)
        if not len(failed):
            return 0.0
        first, last = t[failed[0]], failed[-1]
        later = np.flatnonzero(ok[last + 1 :])
        end = t[last + 1 + later[0]] if len(later) else t[last]
        return round(float(end - first), 3)


def _fraction(pair: Sequence[int]) -> float | None:
    return round(pair[0] / pair[1], 4) if pair[1] else None


def build(
    *,
    config: dict[str, Any],
    ledger: Ledger,
    findings: Findings,
    verified: bool,
    continuous: ContinuousResult,
    faults: Sequence[FaultEvent],
    t0: float,
    chaos_end: float,
    extra: dict[str, Any],
) -> dict[str, Any]:
    events = ledger.events
    timelines = {group: Timeline(events, ops) for group, ops in GROUPS.items()}
    counts = Counter(f.kind for f in faults)
    fault_log: list[dict[str, Any]] = []
    per_kind: dict[str, dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    kind_codes: dict[str, Counter[str]] = defaultdict(Counter)
    for k, f in enumerate(faults):
        until = faults[k + 1].start if k + 1 < len(faults) else chaos_end + WINDOW_S
        back = f.recovered or f.end
        rto = timelines["write"].recovery(f.start, until)
        row: dict[str, Any] = {
            "kind": f.kind,
            "target": f.target,
            "at_s": round(f.start - t0, 2),
            "lifted_after_s": round(f.end - f.start, 2),
            "serving_after_s": round(f.recovered - f.start, 2) if f.recovered else None,
            "recovery_s": rto,
            "params": f.params,
        }
        codes = Counter(code for t, code in ledger.errors if f.start <= t < max(back, f.end))
        if codes:
            row["error_answers"] = dict(codes)  # e.g. STORAGE_FAILURE: writes refused
        kind_codes[f.kind].update(codes)
        if f.note:
            row["note"] = f.note
        for group in GROUPS:
            line = timelines[group]
            before = line.rate(f.start - WINDOW_S, f.start)
            during = line.rate(f.start, back)
            after = line.rate(back, back + WINDOW_S)
            row[f"{group}_success"] = {
                "before": _fraction(before),
                "during": _fraction(during),
                "after": _fraction(after),
            }
            for name, pair in (("before", before), ("during", during), ("after", after)):
                per_kind[f.kind][f"{group}_{name}"].append(pair)
        per_kind[f.kind]["recovery"].append(rto)
        fault_log.append(row)
    by_kind: dict[str, Any] = {}
    for kind in KINDS:
        d = per_kind.get(kind)
        if not d:
            by_kind[kind] = {"count": 0}
            continue
        entry: dict[str, Any] = {
            "count": counts[kind],
            "recovery_s_mean": round(float(np.mean(d["recovery"])), 3),
            "recovery_s_max": round(float(np.max(d["recovery"])), 3),
            "error_answers": dict(kind_codes[kind]),
        }
        for group in GROUPS:
            for name in ("before", "during", "after"):
                pairs = d[f"{group}_{name}"]
                entry[f"{group}_success_{name}"] = _fraction(
                    [sum(p[0] for p in pairs), sum(p[1] for p in pairs)]
                )
        by_kind[kind] = entry
    ops: dict[str, Any] = {}
    by_op: dict[str, list[OpEvent]] = defaultdict(list)
    for e in events:
        if e.op != "stream_down":  # a copy of the stream failures, for the write group
            by_op[e.op].append(e)
    for op in sorted(by_op):
        ok = sum(1 for e in by_op[op] if e.ok)
        total = len(by_op[op])
        lat = [e.latency_ms for e in by_op[op] if e.ok and e.latency_ms]
        ops[op] = {
            "ok": ok,
            "failed": total - ok,
            "success_rate": round(ok / total, 4) if total else None,
            "latency_p50_ms": _pct(lat, 50),
            "latency_p99_ms": _pct(lat, 99),
        }
    timeline = []
    horizon = max((e.t for e in events), default=t0)
    for second in range(int(horizon - t0) + 1):
        lo = t0 + second
        row = [second]
        for group in GROUPS:
            ok, total = timelines[group].rate(lo, lo + 1.0)
            row += [ok, total - ok]
        timeline.append(row)
    ack_vis = [v[1] for v in ledger.visibility]
    send_vis = [v[2] for v in ledger.visibility]
    f = findings
    in_recall = ledger.counters.get("resurrected_in_recall", 0)
    resurrected = f.resurrected + continuous.resurrected + in_recall
    acked_deletes = [d for d in ledger.deletes if d.state == "acked"]
    deletes = {
        "requests": len(ledger.deletes),
        "acked": len(acked_deletes),
        "rows_acked": sum(len(d.rows) for d in acked_deletes),
        "rows_deleted_by_answer": sum(d.deleted for d in acked_deletes),
        "already_deleted": sum(d.already_deleted for d in acked_deletes),
        "not_found": sum(d.not_found for d in acked_deletes),
        "unanswered": len(ledger.deletes) - len(acked_deletes),
        "rows_unanswered": f.delete_uncertain,
        "resurrected_in_listing": f.resurrected,
        "resurrected_in_continuous": continuous.resurrected,
        "resurrected_in_recall": in_recall,
    }
    unrecovered = [k for k, e in enumerate(faults) if not e.recovered]
    observed = extra.get("observed", {})
    not_rebuilt = observed.get("redis_not_rebuilt", 0) + observed.get("redis_assignment_lost", 0)
    unsettled = observed.get("move_owners_unsettled", 0)
    ok = (
        verified
        and f.violations == 0
        and resurrected == 0
        and deletes["not_found"] == 0  # acked rows a delete did not find
        and continuous.violations == 0
        and not unrecovered
        and not not_rebuilt
        and not unsettled
    )
    return {
        "ok": ok,
        "verified": verified,
        "seed": config.get("seed"),
        "seconds": config.get("seconds"),
        "started": extra.pop("started", None),
        "faults": {kind: counts[kind] for kind in KINDS},
        "faults_total": len(faults),
        "all_fault_kinds": all(counts[k] > 0 for k in KINDS),
        "unrecovered_faults": len(unrecovered),
        "redis_not_rebuilt": not_rebuilt,
        "move_owners_unsettled": unsettled,
        "acked": f.acked,
        "acked_batches": f.acked_batches,
        "lost": f.lost,
        "duplicated": f.duplicated,
        "reordered": f.reordered,
        "partial": f.partial,
        "rejected_stored": f.rejected_stored,
        "phantom": f.phantom,
        "invalid_acked": f.invalid_acked,
        "blinked": continuous.blinked,
        "resurrected": resurrected,
        "deletes_acked": len(acked_deletes),
        "deleted_acked": deletes["rows_acked"],
        "deletes": deletes,
        "stored": f.stored,
        "uncertain_batches": f.uncertain_batches,
        "uncertain_stored": f.uncertain_stored,
        "visibility_p50_ms": _pct(ack_vis, 50),
        "visibility_p99_ms": _pct(ack_vis, 99),
        "visibility_max_ms": round(max(ack_vis), 1) if ack_vis else None,
        "write_to_visible_p50_ms": _pct(send_vis, 50),
        "write_to_visible_p99_ms": _pct(send_vis, 99),
        "visibility_samples": len(ack_vis),
        "visibility_timeouts": ledger.visibility_timeouts,
        "examples": f.examples + continuous.examples,
        "continuous": asdict(continuous),
        "operations": ops,
        "by_fault_kind": by_kind,
        "batch_states": dict(ledger.states()),
        "counters": dict(sorted(ledger.counters.items())),
        "error_examples": ledger.error_examples,
        "config": config,
        **extra,
        "fault_log": fault_log,
        "timeline_columns": ["second", "write_ok", "write_failed", "recall_ok", "recall_failed"],
        "timeline": timeline,
    }


def write(report: dict[str, Any], results_dir: Path) -> Path:
    """Writes ``latest.json`` and a timestamped copy; returns the copy's path."""
    results_dir.mkdir(parents=True, exist_ok=True)
    latest = results_dir / "latest.json"
    tmp = latest.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    tmp.replace(latest)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime())
    copy = results_dir / f"chaos-{stamp}.json"
    shutil.copyfile(latest, copy)
    return copy


def _fmt(value: float | None, pct: bool = True) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.0f}%" if pct else f"{value:.2f}"


def summary(report: dict[str, Any]) -> str:
    lines = []
    lines.append(
        f"chaos run: seed {report['seed']}, {report['seconds']} s, {report['faults_total']} faults"
    )
    head = (
        f"{'fault kind':<22}{'count':>6}{'recovery s':>12}{'max s':>8}"
        f"{'writes ok before/during/after':>32}{'recalls ok during':>19}"
    )
    lines += ["", head, "-" * len(head)]
    for kind, e in report["by_fault_kind"].items():
        if not e["count"]:
            lines.append(f"{kind:<22}{0:>6}")
            continue
        writes = "/".join(_fmt(e[f"write_success_{w}"]) for w in ("before", "during", "after"))
        lines.append(
            f"{kind:<22}{e['count']:>6}{e['recovery_s_mean']:>12.2f}{e['recovery_s_max']:>8.2f}"
            f"{writes:>32}{_fmt(e['recall_success_during']):>19}"
        )
    lines.append("")
    ops = report["operations"]
    lines.append(
        "operations: "
        + ", ".join(
            f"{op} {v['ok']}/{v['ok'] + v['failed']} ({_fmt(v['success_rate'])})"
            for op, v in ops.items()
        )
    )
    lines.append(
        f"visibility (ack -> recall returns it): P50 {report['visibility_p50_ms']} ms, "
        f"P99 {report['visibility_p99_ms']} ms, max {report['visibility_max_ms']} ms over "
        f"{report['visibility_samples']} samples ({report['visibility_timeouts']} not seen in 30 s)"
    )
    d = report["deletes"]
    lines.append(
        f"deletes: {d['acked']:,} of {d['requests']:,} acknowledged ({d['rows_acked']:,} rows; "
        f"{d['unanswered']} never answered, {d['rows_unanswered']:,} rows), not found "
        f"{d['not_found']}; resurrected: {d['resurrected_in_listing']} in the final listing, "
        f"{d['resurrected_in_continuous']} in continuous checks, "
        f"{d['resurrected_in_recall']} in recalls"
    )
    c = report["continuous"]
    lines.append(
        f"continuous checks: {c['checks']} listings ({c['failed_reads']} failed reads), "
        f"blinked {c['blinked']}, duplicated {c['duplicated']}, reordered {c['reordered']}"
    )
    lines.append(
        f"acked {report['acked']:,} observations in {report['acked_batches']:,} batches; "
        f"stored {report['stored']:,}; fate unknown to the client: "
        f"{report['uncertain_batches']} batches ({report['uncertain_stored']} of them stored)"
    )
    verdict = "PASS" if report["ok"] else "FAIL"
    lines.append(
        f"{verdict}: lost {report['lost']}, duplicated {report['duplicated']}, "
        f"reordered {report['reordered']}, partial {report['partial']}, "
        f"rejected-but-stored {report['rejected_stored']}, phantom {report['phantom']}, "
        f"invalid-acked {report['invalid_acked']}, blinked {report['blinked']}, "
        f"resurrected {report['resurrected']}"
        + (
            ""
            if report["verified"]
            else f" (NOT VERIFIED: could not read {', '.join(report['unreadable_spaces'])}, "
            f"which hold {report['unverified_acked']:,} acknowledged observations)"
        )
        + (
            f"; {report['unrecovered_faults']} fault(s) the cluster did not recover from"
            if report["unrecovered_faults"]
            else ""
        )
        + (
            f"; Redis state not rebuilt after {report['redis_not_rebuilt']} restart(s)"
            if report["redis_not_rebuilt"]
            else ""
        )
    )
    for text in report["examples"][:12]:
        lines.append(f"  {text}")
    return "\n".join(lines)
