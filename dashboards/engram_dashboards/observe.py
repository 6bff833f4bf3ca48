"""``make observe``: Prometheus next to a running local cluster, with the alert rules loaded.

Reads the cluster's process list from ``<data-dir>/cluster.json`` (what ``engram status
--json`` shows), scrapes every gateway and shard under the jobs the alerts and dashboards
select, prints Prometheus' address and how to point Grafana at it, then waits. When the
process list changes (the cluster was restarted on other ports) it reloads the targets.
Ctrl-C (or SIGTERM) stops Prometheus by PID and exits.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from engram.launcher.procs import port_in_use
from engram.launcher.status import NoClusterError, load_cluster_file
from engram_dashboards.build import ALERTS, DASHBOARDS, DASHBOARDS_DIR
from engram_dashboards.prometheus import HOST, Prometheus, PrometheusError, cluster_targets

POLL_S = 2.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=".engram", help="the cluster's data directory")
    parser.add_argument(
        "--port", type=int, default=9090, help="Prometheus' port (taken: a free one)"
    )
    parser.add_argument("--scrape-interval", default="5s")
    args = parser.parse_args(argv)
    data_dir = Path(args.data_dir).resolve()
    try:
        targets = cluster_targets(load_cluster_file(data_dir))
    except NoClusterError as exc:
        print(f"error: {exc} (make run starts one)", file=sys.stderr)
        return 1
    port = 0 if port_in_use(args.port, HOST) else args.port
    prom = Prometheus(
        data_dir / "prometheus",
        targets,
        rule_files=[ALERTS],
        scrape_interval=args.scrape_interval,
        evaluation_interval=args.scrape_interval,
        port=port,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        prom.start()
    except PrometheusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        _announce(prom, targets)
        while not stop.wait(POLL_S):
            if not prom.running():
                print("error: prometheus exited; see " + str(prom.log_path), file=sys.stderr)
                return 1
            _follow(prom, data_dir)
    finally:
        prom.stop()
    print("prometheus stopped")
    return 0


def _follow(prom: Prometheus, data_dir: Path) -> None:
    """Reloads Prometheus when the cluster's process list names other endpoints."""
    try:
        targets = cluster_targets(load_cluster_file(data_dir))
    except (NoClusterError, ValueError):  # stopped, or cluster.json being rewritten
        return
    if targets != prom.targets:
        prom.reload(targets)
        print(f"targets changed; reloaded: {_describe(targets)}")


def _describe(targets: dict[str, list[str]]) -> str:
    return "; ".join(f"{job} {', '.join(t)}" for job, t in targets.items())


def _announce(prom: Prometheus, targets: dict[str, list[str]]) -> None:
    boards = ", ".join(str(DASHBOARDS_DIR / name) for name in DASHBOARDS)
    print(
        f"Prometheus: {prom.url}  (pid {prom.pid}, data {prom.directory})\n"
        f"  scraping  {_describe(targets)}\n"
        f"  rules     {ALERTS} (alerts: {prom.url}/alerts)\n"
        f"  Grafana   add a Prometheus data source with URL {prom.url}, then import\n"
        f"            {boards}\n"
        "Ctrl-C stops it."
    )


if __name__ == "__main__":
    sys.exit(main())
