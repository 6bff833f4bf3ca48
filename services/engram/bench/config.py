"""Options of ``engram bench``: one frozen dataclass, parsed from the command line only here."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import engram

# Recalls per second of each scenario (the SLO is stated at 10/s, and again at 100/s).
SCENARIO_RECALL_RATES = {"default": 10.0, "recall-heavy": 100.0}

# The repository's bench/ folder (peer scripts, venvs, results), when running from a checkout.
REPO_ROOT = Path(engram.__file__).resolve().parents[2]
BENCH_DIR = REPO_ROOT / "bench"


@dataclass(frozen=True)
class BenchConfig:
    seconds: float = 60.0  # timed ingest phase
    rate: float = 100_000.0  # offered observations per second, all writers together
    dim: int = 384
    batch: int = 1000
    spaces: int = 4
    writers: int = 2
    recall_rate: float = 10.0  # recalls per second, during ingest and the drain wait
    vis_rate: float = 4.0  # visibility samples per second, all writers together
    client_target_latency_ms: float | None = None  # the client's ack-latency target (None: its
    #                                                 default)
    target: str = ""  # gateway address of a running cluster; empty: start one
    cluster_dir: str = "./.engram"  # with --target: where its cluster.json is
    shards: int = 2
    gateways: int = 2  # gateway processes of the own cluster, sharing its gRPC port
    data_dir: str = ""  # own cluster's data; empty: a temporary directory
    keep_data: bool = False
    cluster_env: tuple[str, ...] = ()  # NAME=VALUE for the own cluster's services
    json_path: str = ""
    out: str = ""
    find_max: bool = False  # search the highest offered rate that holds the SLO (search.py)
    start_rate: float = 20_000.0  # --find-max: the first step
    step_factor: float = 1.5  # --find-max: rate factor per step until a step fails
    step_seconds: float = 300.0  # --find-max: how long each rate must hold the SLO
    max_steps: int = 8  # --find-max: steps in all (up, then bisection)
    scenario: str = "default"  # "recall-heavy": 100 recalls/s unless --recall-rate is given
    slo_recall_p99_ms: float = 20.0  # the SLO: recall P99 at most this
    slo_visibility_p99_ms: float = 100.0  # ... visibility P99 at most this
    slo_acked_tolerance: float = 0.02  # ... acked at least (1 - this) x offered
    peers: tuple[str, ...] = ("chroma", "milvus")
    compare_count: int = 50_000  # rows of the side-by-side, the raw hnswlib limit and the
    #                              idle indexing probe
    compare_samples: int = 30
    drain_timeout: float = 300.0
    drain_recall_seconds: float = 10.0  # recalls go on this long after ingest, then stop
    recall_queries: int = 100
    recall_spaces: int = 2
    pool: int = 65_536
    limit_seconds: float = 3.0
    profile_seconds: float = 0.0
    profile_start: float = 15.0
    profile_rate: int = 100
    corpus: str = "synthetic"
    minilm_count: int = 15_000
    plots: bool = True
    trace_ratio: float | None = None  # tracing on in the own cluster at this ratio (None: off)
    trace_endpoint: str = ""  # where its spans go; empty: an OTLP sink the bench runs
    auth: bool = False  # the own cluster asks for an API key; the clients send one (access.py)
    tls: bool = False  # the own cluster's gateway serves TLS; the clients trust its CA only
    api_key: str = ""  # with --target: the key its clients send (never written to the report)
    ca_file: str = ""  # with --target: the CA of its gateway's certificate (TLS on)

    @property
    def results_root(self) -> Path:
        if self.out:
            return Path(self.out)
        return BENCH_DIR / "results" if BENCH_DIR.is_dir() else Path("bench-results")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="engram bench",
        description="Ingest/recall benchmark of Engram Stream against its limits and peers.",
    )
    a = p.add_argument
    a("--seconds", type=float, default=60.0, help="timed ingest phase (default 60)")
    a("--rate", type=float, default=100_000, help="offered obs/s, all writers (default 100000)")
    a("--dim", type=int, default=384, help="vector dimension (default 384)")
    a("--batch", type=int, default=1000, help="observations per batch (default 1000)")
    a("--spaces", type=int, default=4, help="memory spaces, spread over the shards (default 4)")
    a("--writers", type=int, default=2, help="writer processes (default 2)")
    a(
        "--recall-rate",
        type=float,
        default=None,
        help="recalls per second (default 10; 100 with --scenario recall-heavy)",
    )
    a(
        "--scenario",
        choices=tuple(SCENARIO_RECALL_RATES),
        default="default",
        help="default: 10 recalls/s; recall-heavy: 100 recalls/s (the SLO's second scenario)",
    )
    a("--vis-rate", type=float, default=4.0, help="visibility samples per second (default 4)")
    a(
        "--client-target-latency-ms",
        type=float,
        default=None,
        help="the client's ack-latency target for its in-flight window (0: always every credit; "
        "default: the client's own default)",
    )
    a("--target", default="", help="gateway of a running cluster (default: start one)")
    a("--cluster-dir", default="./.engram", help="with --target: directory of its cluster.json")
    a("--shards", type=int, default=2, help="shards of the cluster it starts (default 2)")
    a(
        "--gateways",
        type=int,
        default=2,
        help="gateway processes of the cluster it starts, sharing its gRPC port (default 2)",
    )
    a("--data-dir", default="", help="data directory of the cluster it starts (default: temp)")
    a("--keep-data", action="store_true", help="keep that data directory afterwards")
    a(
        "--cluster-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="ENGRAM_* setting for the services of the cluster it starts (repeatable)",
    )
    a("--json", dest="json_path", default="", metavar="PATH", help="also write the JSON here")
    a("--out", default="", help="results root (default bench/results)")
    a(
        "--find-max",
        action="store_true",
        help="search the highest offered rate that holds the SLO for --step-seconds: acked "
        "within --slo-acked-tolerance of offered, recall and visibility P99 within their bounds "
        "at --recall-rate (steps up by --step-factor until one fails, then bisects)",
    )
    a("--start-rate", type=float, default=20_000, help="--find-max: first step (default 20000)")
    a("--step-factor", type=float, default=1.5, help="--find-max: rate factor per step up")
    a(
        "--step-seconds",
        type=float,
        default=300.0,
        help="--find-max: seconds each rate must hold the SLO (default 300)",
    )
    a("--max-steps", type=int, default=8, help="--find-max: steps in all (default 8)")
    a("--slo-recall-p99-ms", type=float, default=20.0, help="SLO: recall P99 bound (default 20)")
    a(
        "--slo-visibility-p99-ms",
        type=float,
        default=100.0,
        help="SLO: visibility P99 bound (default 100)",
    )
    a(
        "--slo-acked-tolerance",
        type=float,
        default=0.02,
        help="SLO: acked may fall short of offered by this fraction (default 0.02)",
    )
    a("--no-peers", action="store_true", help="skip Chroma and Milvus Lite")
    a("--peers", default="chroma,milvus", help="peers to run (default chroma,milvus)")
    a(
        "--compare-count",
        type=int,
        default=50_000,
        help="rows of the side-by-side, the raw hnswlib limit and the idle indexing probe",
    )
    a("--compare-samples", type=int, default=30, help="freshness samples per system")
    a(
        "--drain-timeout",
        type=float,
        default=300.0,
        help="seconds to wait for the index backlog to drain after ingest (default 300)",
    )
    a(
        "--drain-recall-seconds",
        type=float,
        default=10.0,
        help="recalls continue this long after ingest (backlog at its peak), then stop so the "
        "drain measures indexing alone (default 10)",
    )
    a("--recall-queries", type=int, default=100, help="recall@10 queries per checked space")
    a("--recall-spaces", type=int, default=2, help="spaces checked for recall@10")
    a("--pool", type=int, default=65_536, help="pre-generated vectors per space (default 65536)")
    a("--limit-seconds", type=float, default=3.0, help="seconds per WAL / gRPC limit probe")
    a(
        "--profile",
        dest="profile_seconds",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="py-spy the gateway and shard-0 for this long during the timed phase (0: off)",
    )
    a("--profile-start", type=float, default=15.0, help="profile from this second of the run")
    a("--profile-rate", type=int, default=100, help="py-spy samples per second")
    a(
        "--corpus",
        choices=("synthetic", "minilm"),
        default="synthetic",
        help="synthetic clustered vectors, or real text embedded with all-MiniLM-L6-v2 (dim 384)",
    )
    a("--minilm-count", type=int, default=15_000, help="sentences to embed for --corpus minilm")
    a("--no-plots", action="store_true", help="skip the PNG plots")
    a(
        "--trace-ratio",
        type=float,
        default=None,
        metavar="RATIO",
        help="run the cluster it starts with tracing on, sampling this share of batches "
        "(parent-based ratio), exporting to an OTLP collector the benchmark runs (default: "
        "tracing off)",
    )
    a(
        "--trace-endpoint",
        default="",
        metavar="URL",
        help="with --trace-ratio: export there instead (a closed port such as "
        "http://127.0.0.1:9 measures the worst case: every export fails)",
    )
    a(
        "--auth",
        action="store_true",
        help="the cluster it starts asks for API keys (a keys file with one key for the "
        "benchmark's spaces, which every client sends)",
    )
    a(
        "--tls",
        action="store_true",
        help="the cluster it starts serves TLS (a certificate from a CA made for the run, which "
        "every client trusts)",
    )
    a(
        "--api-key",
        default=None,
        help="with --target: the API key its clients send (default: $ENGRAM_API_KEY)",
    )
    a("--ca", default="", metavar="FILE", help="with --target: TLS, trusting this PEM CA")
    return p


def parse(argv: list[str] | None) -> BenchConfig:
    p = parser()
    ns = p.parse_args(argv)
    if ns.spaces < 1 or ns.writers < 1 or ns.batch < 1 or ns.dim < 1:
        p.error("--spaces, --writers, --batch and --dim must be at least 1")
    if ns.gateways < 1:
        p.error("--gateways must be at least 1")
    if ns.writers > ns.spaces:
        p.error("--writers must not exceed --spaces (each writer owns at least one space)")
    for kv in ns.cluster_env:
        if "=" not in kv or not kv.split("=", 1)[0].isidentifier():
            p.error(f"--cluster-env expects NAME=VALUE, got {kv!r}")
    if ns.trace_ratio is not None and not 0.0 <= ns.trace_ratio <= 1.0:
        p.error("--trace-ratio must be in 0..1")
    if (ns.trace_ratio is not None or ns.trace_endpoint) and ns.target:
        p.error("--trace-ratio configures the cluster the benchmark starts: not with --target")
    if ns.trace_endpoint and ns.trace_ratio is None:
        p.error("--trace-endpoint needs --trace-ratio")
    if (ns.auth or ns.tls) and ns.target:
        p.error(
            "--auth and --tls configure the cluster the benchmark starts: with --target, "
            "pass --api-key and --ca"
        )
    if ns.api_key is None:
        ns.api_key = os.environ.get("ENGRAM_API_KEY", "") if ns.target else ""
    if (ns.api_key or ns.ca) and not ns.target:
        p.error("--api-key and --ca are for --target; the cluster it starts uses --auth / --tls")
    if ns.corpus == "minilm" and ns.dim != 384:
        p.error("--corpus minilm gives dimension 384; drop --dim or pass --dim 384")
    if ns.find_max and (ns.step_seconds <= 0 or ns.max_steps < 1 or ns.step_factor <= 1):
        p.error("--find-max needs --step-seconds > 0, --max-steps >= 1 and --step-factor > 1")
    if not 0 <= ns.slo_acked_tolerance < 1:
        p.error("--slo-acked-tolerance must be in 0..1")
    if ns.recall_rate is None:
        ns.recall_rate = SCENARIO_RECALL_RATES[ns.scenario]
    pool = max(ns.batch, ns.pool // ns.batch * ns.batch)
    return BenchConfig(
        seconds=ns.seconds,
        rate=ns.rate,
        dim=ns.dim,
        batch=ns.batch,
        spaces=ns.spaces,
        writers=ns.writers,
        recall_rate=ns.recall_rate,
        vis_rate=ns.vis_rate,
        client_target_latency_ms=ns.client_target_latency_ms,
        target=ns.target,
        cluster_dir=ns.cluster_dir,
        shards=ns.shards,
        gateways=ns.gateways,
        data_dir=ns.data_dir,
        keep_data=ns.keep_data,
        cluster_env=tuple(ns.cluster_env),
        json_path=ns.json_path,
        out=ns.out,
        find_max=ns.find_max,
        start_rate=ns.start_rate,
        step_factor=ns.step_factor,
        step_seconds=ns.step_seconds,
        max_steps=ns.max_steps,
        scenario=ns.scenario,
        slo_recall_p99_ms=ns.slo_recall_p99_ms,
        slo_visibility_p99_ms=ns.slo_visibility_p99_ms,
        slo_acked_tolerance=ns.slo_acked_tolerance,
        peers=() if ns.no_peers else tuple(p for p in ns.peers.split(",") if p),
        compare_count=max(ns.batch, ns.compare_count // ns.batch * ns.batch),
        compare_samples=ns.compare_samples,
        drain_timeout=ns.drain_timeout,
        drain_recall_seconds=ns.drain_recall_seconds,
        recall_queries=ns.recall_queries,
        recall_spaces=ns.recall_spaces,
        pool=pool,
        limit_seconds=ns.limit_seconds,
        profile_seconds=ns.profile_seconds,
        profile_start=ns.profile_start,
        profile_rate=ns.profile_rate,
        corpus=ns.corpus,
        minilm_count=ns.minilm_count,
        plots=not ns.no_plots,
        trace_ratio=ns.trace_ratio,
        trace_endpoint=ns.trace_endpoint,
        auth=ns.auth,
        tls=ns.tls,
        api_key=ns.api_key,
        ca_file=ns.ca,
    )
