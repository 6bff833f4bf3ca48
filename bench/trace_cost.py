"""What tracing costs at full ingest: alternating ``engram bench`` runs with tracing off and on.

    .venv/bin/python bench/trace_cost.py                          # 3 pairs, 1 % sampling
    .venv/bin/python bench/trace_cost.py --pairs 5 --ratio 0.01 -- --seconds 30 --no-peers \\
        --no-plots --drain-timeout 5

Each pair runs ``engram bench ARGS`` (tracing off: no OTLP endpoint, so the services' hot
paths stop at one flag) and ``engram bench ARGS --trace-ratio R`` (spans exported to the OTLP
sink the benchmark runs; add ``--trace-endpoint http://127.0.0.1:9`` to ARGS for the worst
case, a closed port that fails every export), alternating which goes first, so that a drift in
the shared machine's load falls on both. Reports each run's acknowledged observations/s and the
other processes' CPU during its timed phase, the medians, and on / off of the medians; writes
bench/results/trace-cost-<timestamp>.json. The machine is shared and noisy: the ratio of
medians measured in one run is the figure, never one absolute throughput.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
ENGRAM = Path(sys.executable).parent / "engram"
DEFAULT_ARGS = ["--seconds", "30", "--no-peers", "--no-plots", "--drain-timeout", "5"]


def _run(args: list[str], out: Path) -> dict[str, Any]:
    cmd = [str(ENGRAM), "bench", *args, "--json", str(out)]
    print(f"$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    r = json.loads(out.read_text())
    run = {
        "args": args,
        "acked_obs_per_s": r["acked_obs_per_s"],
        "other_cpu_pct": r["machine"]["other_processes_cpu_pct_during_timed_phase"],
        **cpu_per_observation(r),
        "tracing": r.get("tracing"),
    }
    print(
        f"  {run['acked_obs_per_s']:,.0f} obs/s, services' event loops "
        f"{run['loop_cpu_us_per_obs']} us of CPU per observation (other processes "
        f"{run['other_cpu_pct']} % CPU)"
    )
    return run


def cpu_per_observation(result: dict[str, Any]) -> dict[str, float | None]:
    """CPU the gateway and shards spent per acknowledged observation in the timed phase: all
    their threads, and their event-loop threads alone (where tracing's spans are made and
    the data path runs; the indexing threads' duty cycle does not follow the load). Less
    sensitive than throughput to what other processes take from a shared machine."""
    obs = result["acked_obs_per_s"]
    services = [
        p
        for name, p in result["processes"].items()
        if name == "gateway" or name.startswith("shard")
    ]
    if not obs or not services:
        return {"service_cpu_us_per_obs": None, "loop_cpu_us_per_obs": None}
    total = sum(p["cpu_pct_mean_timed"] for p in services)
    loops = sum(p["threads_cpu_pct_timed"].get("python", 0.0) for p in services)
    return {
        "service_cpu_us_per_obs": round(total * 1e4 / obs, 2),
        "loop_cpu_us_per_obs": round(loops * 1e4 / obs, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=3, help="off/on pairs (default 3)")
    p.add_argument("--ratio", type=float, default=0.01, help="sampling ratio when on (0.01)")
    p.add_argument("bench_args", nargs="*", help=f"engram bench's (default {DEFAULT_ARGS})")
    ns = p.parse_args(argv)
    args = ns.bench_args or DEFAULT_ARGS
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(ns.pairs):
            order = ["off", "on"] if i % 2 == 0 else ["on", "off"]
            for mode in order:
                extra = ["--trace-ratio", f"{ns.ratio:g}"] if mode == "on" else []
                runs[mode].append(_run([*args, *extra], Path(tmp) / f"{mode}-{i}.json"))
    result: dict[str, Any] = {
        "command": f"bench/trace_cost.py --pairs {ns.pairs} --ratio {ns.ratio:g} -- "
        + " ".join(args),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "runs": runs,
    }
    for figure in ("acked_obs_per_s", "service_cpu_us_per_obs", "loop_cpu_us_per_obs"):
        off_on = [
            statistics.median(r[figure] for r in runs[mode] if r[figure] is not None)
            for mode in ("off", "on")
        ]
        result[figure] = {"median_off": off_on[0], "median_on": off_on[1]}
        result[figure]["on_over_off"] = round(off_on[1] / off_on[0], 4)
    off, on = (result["acked_obs_per_s"][f"median_{m}"] for m in ("off", "on"))
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"trace-cost-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2))
    loops = result["loop_cpu_us_per_obs"]
    print(
        f"tracing off: median {off:,.0f} obs/s; on at {ns.ratio:g}: median {on:,.0f} obs/s; "
        f"on / off = {result['acked_obs_per_s']['on_over_off']}; event-loop CPU per "
        f"observation {loops['median_off']} -> {loops['median_on']} us "
        f"({loops['on_over_off']})  ({path})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
