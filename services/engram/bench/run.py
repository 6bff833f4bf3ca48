"""``engram bench``: the whole run, phase by phase.

1. limits (raw hnswlib, WAL append, loopback gRPC) on an otherwise idle benchmark;
2. the cluster: started here on free ports (stopped by PID at the end, whatever happens) or
   the one named by ``--target``;
3. the side-by-side: Engram Stream, then each peer, on the same vectors, plus the idle
   indexing probe;
4. the timed load (writers, recalls, visibility sampler; ``--find-max`` searches the rate that
   holds the SLO), recall@10 asked with the backlog at its peak, then the drain of the backlog;
5. recall@10 against exact search (during the backlog and after the drain, on the same
   queries); final process sizes; the gateway's and shards' metrics before and after the load;
6. the report: JSON, markdown summary, plots, and a table on stdout.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engram.bench import compare, limits, machine, quality, report, targets, tradeoff
from engram.bench.config import BenchConfig, parse
from engram.bench.load import run_load
from engram.bench.monitor import Monitor
from engram.bench.otlp_sink import OtlpSink
from engram.bench.peers import Unavailable, minilm_corpus
from engram.bench.target import Target, attach, start_own
from engram.bench.workers import SourceSpec
from engram.bench.workload import VectorSource, plan_spaces

_ROW_ALIGN = 4096


class _Phases:
    """Prints a header per phase and how long the previous one took."""

    def __init__(self) -> None:
        self.t: float | None = None
        self.took: dict[str, float] = {}
        self.name = ""

    def next(self, name: str) -> None:
        self.end()
        print(f"== {name} ==", flush=True)
        self.name, self.t = name, time.monotonic()

    def end(self) -> None:
        if self.t is not None:
            self.took[self.name] = round(time.monotonic() - self.t, 1)
            print(f"   ({self.took[self.name]:.1f} s)", flush=True)
            self.t = None


def _align(n: int) -> int:
    return (n + _ROW_ALIGN - 1) // _ROW_ALIGN * _ROW_ALIGN


def _results_dir(cfg: BenchConfig) -> Path:
    root = cfg.results_root
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = root / stamp
    n = 1
    while out.exists():
        n += 1
        out = root / f"{stamp}-{n}"
    out.mkdir(parents=True)
    return out


def _source(cfg: BenchConfig) -> tuple[VectorSource, SourceSpec, dict[str, Any]]:
    if cfg.corpus == "minilm":
        try:
            path = minilm_corpus(cfg.minilm_count)
            spec = SourceSpec("array", 384, str(path), "minilm")
            src = spec.build()
            rows = getattr(src, "rows", None)
            return src, spec, {"corpus": "minilm", "path": str(path), "sentences": rows}
        except (Unavailable, OSError, ValueError) as exc:
            print(
                f"  --corpus minilm is not available here ({exc}); using the synthetic corpus",
                flush=True,
            )
            spec = SourceSpec("synthetic", cfg.dim)
            return spec.build(), spec, {"corpus": "synthetic", "minilm_skipped": str(exc)}
    spec = SourceSpec("synthetic", cfg.dim)
    return spec.build(), spec, {"corpus": "synthetic", "generator": "engram.corpus.Corpus"}


def _sample_batch_messages(
    source: VectorSource, plan_name: str, cfg: BenchConfig
) -> tuple[bytes, int]:
    """A serialized client request of one batch, and the size of its WAL record."""
    import numpy as np

    from engram.internal.v1 import shard_pb2 as ipb
    from engram.v1 import streaming_pb2 as pb

    vecs = source.vectors(0, cfg.batch)
    batch = pb.ObservationBatch(dim=cfg.dim, vectors=vecs.astype("<f4").tobytes())
    batch.ids.extend(f"{plan_name}/{g}" for g in range(cfg.batch))
    batch.contents.extend(f"memory {g} of {plan_name}" for g in range(cfg.batch))
    req = pb.ObservationRequest(
        memory_space_id=plan_name, session_id="s-" + "0" * 32, sequence_number=1, batch=batch
    )
    wal_batch = pb.ObservationBatch()
    wal_batch.CopyFrom(batch)
    wal_batch.confidences = np.full(cfg.batch, 0.7, "<f4").tobytes()
    wal_batch.timestamps_us = np.full(cfg.batch, time.time_ns() // 1000, "<i8").tobytes()
    record = ipb.WalRecord(
        batch=ipb.WalBatch(
            session_id="s-" + "0" * 32, sequence_number=1, first_lsn=1, batch=wal_batch
        )
    )
    return req.SerializeToString(), len(record.SerializeToString())


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    # SIGTERM unwinds like Ctrl-C, so the cluster and the load processes are always stopped
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return run(cfg)
    except KeyboardInterrupt:
        print("interrupted: the cluster and the load processes were stopped", file=sys.stderr)
        return 130


def run(cfg: BenchConfig) -> int:
    out_dir = _results_dir(cfg)
    started = time.time()
    print(
        f"engram bench: dim {cfg.dim}, batches of {cfg.batch:,}, {cfg.spaces} spaces, "
        f"{cfg.writers} writers; results in {out_dir}",
        flush=True,
    )
    own_work = not cfg.data_dir
    work = Path(cfg.data_dir) if cfg.data_dir else Path(tempfile.mkdtemp(prefix="engram-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {"started_unix": started, "machine": machine.info(work)}
    source, spec, data["corpus"] = _source(cfg)
    tag = f"{int(started) % 1_000_000:06d}"
    pools_end = _align(cfg.spaces * cfg.pool)
    compare_start = pools_end
    compare_rows = cfg.compare_count + cfg.compare_samples * cfg.batch
    query_start = _align(compare_start + compare_rows)
    target: Target | None = None
    monitor: Monitor | None = None
    sink: OtlpSink | None = None
    phases = _Phases()
    try:
        phases.next("limits (measured here, before any load)")
        lim: dict[str, Any] = {}
        target_index = attach(cfg).index_settings if cfg.target else None
        env = dict(kv.split("=", 1) for kv in cfg.cluster_env)
        from engram.common.settings import load as load_settings

        idx = target_index or load_settings(env).shard.index
        lim["hnswlib"] = limits.hnswlib_rate(
            source, compare_start, cfg.compare_count, idx.m, idx.ef_construction, idx.build_threads
        )
        print(
            f"  hnswlib add_items: {lim['hnswlib']['vectors_per_s']:,.0f} vectors/s "
            f"({cfg.compare_count:,} x {cfg.dim}, M={idx.m}, efC={idx.ef_construction}, "
            f"{idx.build_threads} threads)",
            flush=True,
        )
        request, wal_record = _sample_batch_messages(source, "bench-limit", cfg)
        lim["wal"] = limits.wal_rate(work / "wal-limit", wal_record, cfg.batch, cfg.limit_seconds)
        print(
            f"  WAL append (fdatasync, group commit): {lim['wal']['records_per_s']:,.0f} "
            f"records/s of {wal_record / 1e6:.2f} MB = {lim['wal']['obs_per_s']:,.0f} obs/s",
            flush=True,
        )
        lim["grpc"] = limits.grpc_rate(request, cfg.batch, cfg.limit_seconds)
        print(
            f"  loopback gRPC: {lim['grpc']['messages_per_s']:,.0f} batches/s = "
            f"{lim['grpc']['obs_per_s']:,.0f} obs/s",
            flush=True,
        )
        data["limits"] = lim

        phases.next("cluster")
        if cfg.target:
            target = attach(cfg)
            print(f"  using {target.address}; {target.note}", flush=True)
        else:
            trace_env: dict[str, str] = {}
            if cfg.trace_ratio is not None:
                if not cfg.trace_endpoint:
                    sink = OtlpSink(keep=False).start()
                trace_env = _trace_env(cfg.trace_ratio, cfg.trace_endpoint or sink.endpoint)
                print(f"  tracing on: {trace_env}", flush=True)
            target = start_own(cfg, work / "cluster", trace_env)
            print(
                f"  started: gateway {target.address}, {target.shard_count} shards, "
                f"data in {target.data_dir}{_security(target)}",
                flush=True,
            )
        monitor = Monitor(
            dict(target.pids), dict(target.shard_addresses), security=target.shard_security
        )
        monitor.add("bench", os.getpid())
        monitor.start()

        phases.next("side-by-side: ingest until searchable, freshness")
        vectors = compare.write_vectors(source, compare_start, compare_rows, work / "compare.npy")
        with target.access.exported():  # peer_engram's key and CA
            ours = compare.ours(cfg, target, vectors, tag)
        if "skipped" in ours:
            print(f"  engram-stream skipped: {ours['skipped']}", flush=True)
        else:
            print(
                f"  {compare.describe(ours)}; indexing probe "
                f"{ours['index_probe'].get('rows_per_s')} rows/s",
                flush=True,
            )
        data["ours"] = ours
        if ours.get("index_probe", {}).get("rows_per_s"):
            # again right after the probe: the machine may be shared and its load changes
            lim["hnswlib_after_probe"] = limits.hnswlib_rate(
                source, compare_start, cfg.compare_count, idx.m, idx.ef_construction,
                idx.build_threads,
            )  # fmt: skip
            print(
                f"  hnswlib add_items again: {lim['hnswlib_after_probe']['vectors_per_s']:,.0f} "
                "vectors/s",
                flush=True,
            )
        data["peers"] = compare.run_peers(cfg, vectors, work / "peers") if cfg.peers else []

        phases.next("load")
        plans = plan_spaces(tag, cfg.spaces, target.shard_count, cfg.pool)
        for p in plans:
            print(f"  space {p.name} -> shard {p.shard}", flush=True)
        data["before_load"] = monitor.sample_now()
        http = tradeoff.http_addresses(target.data_dir)
        data["metrics_before"] = tradeoff.scrape(http, target.access.ca_file)
        chosen = _one_per_shard(plans, cfg.recall_spaces)
        recall_queries = query_start + 4096 * (cfg.spaces + 1)

        def at_peak(tel: Any) -> dict[str, Any]:
            """recall@10 asked with the backlog at its peak (scored after the load)."""
            print("  recall@10 with the backlog at its peak: asking ...", flush=True)
            t = time.monotonic()
            asked = quality.ask(
                target.address, plans, chosen, tel.acks, source, cfg.batch, recall_queries,
                cfg.recall_queries, target.access,
            )  # fmt: skip
            return {"asked": asked, "t_start": t, "t_end": time.monotonic()}

        profile_pids = {}
        if cfg.profile_seconds > 0:
            profile_pids = {n: pid for n, pid in target.pids.items() if n in ("gateway", "shard-0")}
        load = run_load(
            cfg,
            target.address,
            plans,
            spec,
            query_start,
            monitor,
            profile_pids,
            out_dir,
            target.access,
            at_peak,
        )
        data["metrics_after"] = tradeoff.scrape(http, target.access.ca_file)
        data["load"] = load
        data["plans"] = plans

        phases.next("recall@10 against exact search")
        exact: dict[int, Any] = {}
        peak = load.at_peak
        asked = quality.ask(
            target.address, plans, chosen, load.telemetry.acks, source, cfg.batch,
            recall_queries, cfg.recall_queries, target.access,
        )  # fmt: skip
        data["quality"] = quality.score(asked, plans, source, cfg.batch, exact)
        if "asked" in peak:
            during = quality.score(
                peak.pop("asked"), plans, source, cfg.batch, exact, " during the backlog"
            )
            during.pop("latency_s")
            data["quality_during_backlog"] = {**during, **peak}
        data["final"] = monitor.sample_now()
        data["target"] = target.describe()
    finally:
        if monitor is not None:
            monitor.stop()
        if target is not None and target.cluster is not None:
            phases.next("stopping the cluster")
            target.stop()
        if cfg.trace_ratio is not None:
            data["tracing"] = {
                "ratio": cfg.trace_ratio,
                "endpoint": cfg.trace_endpoint or "an OTLP sink in the benchmark process",
                "spans_received": sink.count if sink is not None else None,
            }
        if sink is not None:
            sink.stop()
            logs = target.cluster.logs_dir
            if logs.is_dir():
                shutil.copytree(logs, out_dir / "logs", dirs_exist_ok=True)
        if own_work and not cfg.keep_data:
            shutil.rmtree(work, ignore_errors=True)
    phases.end()
    data["monitor"] = monitor.samples if monitor is not None else []
    data["finished_unix"] = time.time()
    result = report.build(cfg, data)
    result["phase_seconds"] = phases.took
    report.write(cfg, out_dir, result)
    print(targets.table(result), flush=True)
    print(f"\nresults: {out_dir}", flush=True)
    return 0


def _security(target: Target) -> str:
    on = [name for name, used in target.access.describe().items() if used]
    return f"; {' and '.join(on)} on" if on else ""


def _trace_env(ratio: float, endpoint: str) -> dict[str, str]:
    """The services' tracing variables: parent-based ratio sampling, OTLP to ``endpoint``."""
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": f"{ratio:g}",
    }


def _one_per_shard(plans: list[Any], n: int) -> list[int]:
    chosen: list[int] = []
    seen: set[int] = set()
    for i, p in enumerate(plans):
        if p.shard not in seen:
            chosen.append(i)
            seen.add(p.shard)
    for i in range(len(plans)):
        if len(chosen) >= n:
            break
        if i not in chosen:
            chosen.append(i)
    return chosen[:n]
