"""The timed phase: starts the load processes, paces them, collects telemetry, prints a line
per second, searches the rate for ``--find-max`` (:mod:`.search`), takes the measurements that
need the backlog at its peak (``at_peak``, once every ack is in), then waits for the index
backlog to drain.

Called by :mod:`engram.bench.run`; returns the raw telemetry (every batch, recall and
visibility sample with its times) for :mod:`engram.bench.report` to summarise.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engram.bench import profiling, search
from engram.bench.access import NO_ACCESS, Access
from engram.bench.config import BenchConfig
from engram.bench.monitor import Monitor
from engram.bench.workers import (
    Channels,
    SourceSpec,
    WorkerSpec,
    recaller_main,
    sampler_main,
    writer_main,
)
from engram.bench.workload import SpacePlan

READY_TIMEOUT_S = 180.0
TELEMETRY_LAG_S = 0.7  # workers flush every 0.5 s


@dataclass
class Telemetry:
    acks: list[tuple[Any, ...]] = field(default_factory=list)
    recalls: list[tuple[Any, ...]] = field(default_factory=list)
    vis: list[tuple[Any, ...]] = field(default_factory=list)
    pushes: list[tuple[Any, ...]] = field(default_factory=list)  # StreamStatus and REJECTED
    events: list[tuple[Any, ...]] = field(default_factory=list)
    done: dict[str, dict[str, Any]] = field(default_factory=dict)
    ready: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)

    def consume(self, msg: tuple[Any, ...]) -> None:
        kind = msg[0]
        if kind == "acks":
            self.acks.extend(msg[2])
        elif kind == "recalls":
            self.recalls.extend(msg[2])
        elif kind == "vis":
            self.vis.extend(msg[2])
        elif kind == "pushes":
            self.pushes.extend(msg[2])
        elif kind == "event":
            self.events.append(msg[1:])
            print(f"  [{msg[1]} {msg[2]}] {msg[3]}: {msg[4]}", flush=True)
        elif kind == "ready":
            self.ready.add(msg[1])
        elif kind == "done":
            self.done[msg[1]] = msg[2]
        elif kind == "failed":
            self.failures.append(msg[2])
            print(f"  !! {msg[2].splitlines()[0]}", flush=True)


@dataclass
class LoadRun:
    telemetry: Telemetry
    t0: float
    t_stop: float  # writes stopped
    t_writers_done: float
    t_reads_stopped: float
    t_drained: float | None
    drain_deadline_hit: bool
    steps: list[dict[str, Any]]
    step_windows: list[tuple[float, float, float]]  # (offered, from, to): what each step judged
    rate_changes: list[tuple[float, float]]  # (t, offered obs/s)
    profiles: dict[str, Any]
    worker_pids: dict[str, int]
    at_peak: dict[str, Any] = field(default_factory=dict)  # what ``at_peak`` returned


def _window(tel: Telemetry, lo: float, hi: float) -> tuple[int, list[float]]:
    n = 0
    lat: list[float] = []
    for _si, _k, _ts, t_w, t_ack, size, ok, *_ in tel.acks:
        if ok and lo <= t_ack < hi:
            n += size
            lat.append(t_ack - t_w)
    return n, lat


def _p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000 if values else float("nan")


def _progress(tel: Telemetry, t0: float, i: int, rate: float, mon: Monitor) -> str:
    n, lat = _window(tel, t0 + i, t0 + i + 1)
    rec = [r[1] for r in tel.recalls if r[6] and t0 + i <= r[0] < t0 + i + 1]
    s = mon.latest()
    backlog = s.backlog() if s else None
    cpu = ""
    if s:
        cpu = " ".join(
            f"{k.replace('shard-', 's').replace('gateway', 'gw')} {v['cpu_pct']:.0f}%"
            for k, v in s.procs.items()
            if k.startswith(("shard", "gateway"))
        )

    def ms(values: list[float], q: float) -> str:
        return f"{_p(values, q):>6,.0f}" if values else "     -"

    shown = "?" if backlog is None else f"{backlog:,}"
    return (
        f"  [{i + 1:>4} s] offered {rate / 1000:>6.1f}K/s  acked {n / 1000:>6.1f}K/s  "
        f"ack p50/p99 {ms(lat, 50)}/{ms(lat, 99)} ms  recall p99 {ms(rec, 99)} ms  "
        f"backlog {shown:>11}  cpu {cpu}"
    )


def run_load(
    cfg: BenchConfig,
    target: str,
    plans: list[SpacePlan],
    source: SourceSpec,
    query_start: int,
    monitor: Monitor,
    profile_pids: dict[str, int],
    out_dir: Path,
    access: Access = NO_ACCESS,
    at_peak: Callable[[Telemetry], dict[str, Any]] | None = None,
) -> LoadRun:
    """``at_peak`` runs once every writer's acks are in, before the drain: the backlog is then
    at its peak and the acknowledged rows are final."""
    ctx = mp.get_context("spawn")
    ch = Channels(
        telemetry=ctx.Queue(),
        samples=ctx.Queue(),
        rate=ctx.RawValue("d", 0.0),
        t0=ctx.RawValue("d", 0.0),
        go=ctx.Event(),
        stop_writes=ctx.Event(),
        stop_reads=ctx.Event(),
    )
    tel = Telemetry()
    collecting = threading.Event()
    collecting.set()

    def collect() -> None:
        while collecting.is_set() or not ch.telemetry.empty():
            try:
                tel.consume(ch.telemetry.get(timeout=0.2))
            except queue.Empty:
                continue

    collector = threading.Thread(target=collect, name="bench-telemetry", daemon=True)
    collector.start()

    shard_count = max(p.shard for p in plans) + 1
    groups: list[list[int]] = [[] for _ in range(cfg.writers)]
    for i in range(len(plans)):  # each writer gets spaces of every shard where it can
        groups[
            (i // shard_count) % cfg.writers
            if len(plans) >= cfg.writers * shard_count
            else i % cfg.writers
        ].append(i)
    vis_interval = cfg.writers / cfg.vis_rate if cfg.vis_rate > 0 else 0.0
    base = dict(
        client_target_latency_ms=cfg.client_target_latency_ms,
        target=target,
        access=access,
        source=source,
        plans=plans,
        batch=cfg.batch,
        streams_total=len(plans),
        query_start=query_start,
    )
    specs: list[tuple[Any, WorkerSpec]] = [
        (
            writer_main,
            WorkerSpec(who=f"writer-{w}", mine=g, vis_interval_s=vis_interval * len(g), **base),
        )  # type: ignore[arg-type]
        for w, g in enumerate(groups)
    ]
    specs.append((recaller_main, WorkerSpec(who="recaller", recall_rate=cfg.recall_rate, **base)))  # type: ignore[arg-type]
    specs.append((sampler_main, WorkerSpec(who="sampler", **base)))  # type: ignore[arg-type]
    procs = {spec.who: ctx.Process(target=fn, args=(spec, ch), name=spec.who) for fn, spec in specs}
    for name, p in procs.items():
        p.start()
        assert p.pid is not None
        monitor.add(name, p.pid)
    worker_pids = {name: p.pid or 0 for name, p in procs.items()}
    profiles: dict[str, Any] = {}
    spies: dict[str, tuple[Any, Path]] = {}
    try:
        print(
            f"  waiting for {len(procs)} load processes (pools of {cfg.pool:,} vectors per "
            "space are generated before the timed phase) ...",
            flush=True,
        )
        deadline = time.monotonic() + READY_TIMEOUT_S
        while len(tel.ready) < len(procs):
            if tel.failures or any(not p.is_alive() for p in procs.values()):
                raise RuntimeError(
                    "a load process failed before the start: "
                    + (tel.failures[0] if tel.failures else "exited")
                )
            if time.monotonic() > deadline:
                raise RuntimeError("load processes not ready in time")
            time.sleep(0.05)

        finder = search.RateSearch(cfg.start_rate, cfg.step_factor, cfg.max_steps)
        rate = finder.rate if cfg.find_max else cfg.rate
        ch.rate.value = rate
        t0 = time.monotonic() + 0.5
        ch.t0.value = t0
        ch.go.set()
        rate_changes = [(t0, rate)]
        steps: list[dict[str, Any]] = []
        step_windows: list[tuple[float, float, float]] = []
        duration = math.inf if cfg.find_max else cfg.seconds  # --find-max: the search ends it
        step_end = t0 + cfg.step_seconds
        prof_at = t0 + cfg.profile_start if cfg.profile_seconds > 0 else float("inf")
        i = 0
        what = (
            f"find-max ({search.criteria(cfg)}) from {rate:,.0f}"
            if cfg.find_max
            else f"{rate:,.0f}"
        )
        longest = f"{cfg.max_steps} steps of {cfg.step_seconds:g} s" if cfg.find_max else ""
        print(
            f"  timed phase: {what} obs/s offered for up to {longest or f'{duration:g} s'}",
            flush=True,
        )
        t_stop = 0.0
        while True:
            now = time.monotonic()
            if tel.failures:
                raise RuntimeError("a load process failed: " + tel.failures[0])
            if now >= prof_at:
                prof_at = float("inf")
                for name, pid in profile_pids.items():
                    out = out_dir / f"profile-{name}.txt"
                    try:
                        proc = profiling.start(pid, cfg.profile_seconds, out, cfg.profile_rate)
                        spies[name] = (proc, out)
                        print(
                            f"  profiling {name} (pid {pid}) for {cfg.profile_seconds:g} s",
                            flush=True,
                        )
                    except FileNotFoundError as exc:
                        profiles[name] = {"skipped": str(exc)}
            if not t_stop and now >= t0 + duration:
                ch.stop_writes.set()
                t_stop = t0 + duration
            if cfg.find_max and not t_stop and now >= step_end + TELEMETRY_LAG_S:
                lo, hi = search.window(cfg, step_end)
                step = search.judge(tel, cfg, rate, lo, hi)
                s = monitor.latest()
                step["backlog_end"] = s.backlog() if s else None
                steps.append(step)
                step_windows.append((rate, lo, hi))
                print(_step_line(len(steps), step), flush=True)
                nxt = finder.next(step["keeps_up"])
                if nxt is None:
                    ch.stop_writes.set()
                    t_stop = time.monotonic()
                else:
                    rate = nxt
                    ch.rate.value = rate
                    rate_changes.append((time.monotonic(), rate))
                    step_end = time.monotonic() + cfg.step_seconds
            if now >= t0 + i + 1 + TELEMETRY_LAG_S:
                print(_progress(tel, t0, i, rate_changes[-1][1], monitor), flush=True)
                i += 1
            if t_stop and now >= t_stop + TELEMETRY_LAG_S:
                break
            time.sleep(0.05)
        print("  writes stopped; waiting for outstanding acks ...", flush=True)
        writers = [n for n in procs if n.startswith("writer")]
        deadline = time.monotonic() + 180
        while not all(w in tel.done for w in writers) and time.monotonic() < deadline:
            if tel.failures:
                raise RuntimeError("a load process failed: " + tel.failures[0])
            time.sleep(0.1)
        t_writers_done = time.monotonic()
        peak: dict[str, Any] = {}
        if at_peak is not None:
            s = monitor.latest()
            peak = {"backlog_before": s.backlog() if s else None, **at_peak(tel)}
            s = monitor.latest()
            peak["backlog_after"] = s.backlog() if s else None
        for name, (proc, out) in spies.items():
            try:
                proc.wait(cfg.profile_seconds + 30)
                profiles[name] = (
                    profiling.hot_spots(out)
                    if out.exists()
                    else {"skipped": f"py-spy wrote nothing (see {out.with_suffix('.log')})"}
                )
            except Exception as exc:  # a profile is a bonus; the run goes on
                profiles[name] = {"skipped": f"py-spy failed: {exc!r}"}
        t_drained, hit, t_reads = _drain(cfg, monitor, t_stop, ch, procs, tel)
        return LoadRun(
            tel,
            t0,
            t_stop,
            t_writers_done,
            t_reads,
            t_drained,
            hit,
            steps,
            step_windows,
            rate_changes,
            profiles,
            worker_pids,
            peak,
        )
    finally:
        ch.stop_writes.set()
        ch.stop_reads.set()
        for proc, _ in spies.values():
            if proc.poll() is None:
                proc.terminate()
        for p in procs.values():
            p.join(timeout=15)
            if p.is_alive():
                p.terminate()
                p.join(5)
        time.sleep(TELEMETRY_LAG_S)
        collecting.clear()
        collector.join(5)


def _step_line(n: int, step: dict[str, Any]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x:,.0f}"

    failed = [k for k, ok in step["held"].items() if not ok]
    verdict = "holds the SLO" if step["keeps_up"] else f"does NOT hold it ({', '.join(failed)})"
    return (
        f"  step {n}: offered {step['offered']:,.0f}/s acked {step['acked']:,.0f}/s "
        f"({step['acked_ratio']:.1%}), recall P99 {ms(step['recall_p99_ms'])} ms over "
        f"{step['recalls']} ({step['recalls_failed']} failed), visibility P99 "
        f"{ms(step['visibility_p99_ms'])} ms over {step['visibility_samples']} "
        f"({step['visibility_missed']} missed), ack p99 {ms(step['ack_p99_ms'])} ms -> {verdict}"
    )


def _stop_reads(ch: Channels, procs: dict[str, Any], tel: Telemetry) -> float:
    ch.stop_reads.set()
    t = time.monotonic()
    for name in ("recaller", "sampler"):
        deadline = time.monotonic() + 45
        while name not in tel.done and procs[name].is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
    return t


def _drain(
    cfg: BenchConfig,
    monitor: Monitor,
    t_stop: float,
    ch: Channels,
    procs: dict[str, Any],
    tel: Telemetry,
) -> tuple[float | None, bool, float]:
    """Waits until the index backlog is 0; recalls go on for ``drain_recall_seconds`` first.

    Returns (time drained or None, timed out, time recalls were stopped)."""
    deadline = time.monotonic() + cfg.drain_timeout
    reads_until = t_stop + cfg.drain_recall_seconds
    t_reads: float | None = None
    last_print = 0.0
    print(
        f"  waiting up to {cfg.drain_timeout:g} s for the index backlog to drain (recalls go on "
        f"for {cfg.drain_recall_seconds:g} s, then stop) ...",
        flush=True,
    )
    while True:
        now = time.monotonic()
        if t_reads is None and now >= reads_until:
            t_reads = _stop_reads(ch, procs, tel)
            print("  recalls stopped", flush=True)
        s = monitor.latest()
        backlog = s.backlog() if s else None
        if backlog == 0 and s is not None and s.t > t_stop:
            print(f"  backlog drained {now - t_stop:.1f} s after writes stopped", flush=True)
            break
        if now >= deadline:
            print(
                f"  backlog NOT drained after {cfg.drain_timeout:g} s: {backlog} rows left",
                flush=True,
            )
            break
        if now - last_print >= 10:
            last_print = now
            rate = _index_rate(monitor, 10.0)
            shown = "?" if backlog is None else f"{backlog:,}"
            print(f"  drain: backlog {shown:>11}  indexing {rate:,.0f} rows/s", flush=True)
        time.sleep(0.5)
    drained = None if backlog != 0 or s is None else s.t
    if t_reads is None:
        t_reads = _stop_reads(ch, procs, tel)
    return drained, drained is None, t_reads


def _index_rate(monitor: Monitor, window: float) -> float:
    samples = [s for s in monitor.samples if s.rows() is not None]
    if len(samples) < 2:
        return 0.0
    last = samples[-1]
    first = next((s for s in samples if s.t >= last.t - window), samples[0])
    if last.t <= first.t:
        return 0.0
    idx = lambda s: (s.rows() or 0) - (s.backlog() or 0)  # noqa: E731
    return (idx(last) - idx(first)) / (last.t - first.t)
