"""The ``engram`` command: run a local cluster, show its state, stream a demo workload.

::

    engram up [--shards 2] [--gateways 2] [--data-dir ./.engram] [--grpc-port 50051]
              [--http-port 7432]
              [--keys-file FILE] [--tls-cert FILE --tls-key FILE [--tls-ca FILE]]
    engram status [--json] [--data-dir ./.engram]
    engram demo --spaces 3 --count 100000 --dim 384 --verify
    engram bench [--seconds 60] [--rate 100000] [--dim 384] [--json PATH] [--target ADDR]
    engram move SPACE --to shard-N [--data-dir ./.engram]
    engram keys create|list|revoke --keys-file FILE ...
    engram delete --space S --id ID... | drop-space S | retention --space S --max-age 30d
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from engram.launcher import procs
from engram.launcher.cluster import ClusterError, LocalCluster
from engram.launcher.redis_server import RedisNotFoundError

DEFAULT_DATA_DIR = "./.engram"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="engram", description="Engram Stream: a streaming memory service for AI agents."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run a local cluster (Redis, shards, gateways) until Ctrl-C")
    up.add_argument("--shards", type=int, default=2, help="number of shards (default 2)")
    up.add_argument(
        "--gateways",
        type=int,
        default=2,
        help="gateway processes sharing the gRPC port (each its own HTTP port; default 2)",
    )
    up.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="WALs, checkpoints and logs")
    up.add_argument("--grpc-port", type=int, default=50051, help="gateway gRPC port (0: free)")
    up.add_argument("--http-port", type=int, default=7432, help="gateway /metrics port (0: free)")
    up.add_argument("--redis-port", type=int, default=0, help="Redis port (default 0: free)")
    up.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR")
    up.add_argument(
        "--canary-interval",
        type=float,
        default=1.0,
        help="seconds between visibility canary probes per shard (0: off; default 1)",
    )
    up.add_argument(
        "--memory-budget",
        default=None,
        help="per-shard budget for un-indexed data, e.g. 64MB or 2GB "
        "(default: 40%% of memory / shards; env ENGRAM_MEMORY_BUDGET)",
    )
    up.add_argument(
        "--keys-file",
        default=None,
        help="API keys file (engram keys): every client must present a key, and the shards a "
        "secret the launcher makes (env ENGRAM_KEYS_FILE; default: no auth)",
    )
    up.add_argument("--tls-cert", default=None, help="gateway TLS certificate chain (PEM)")
    up.add_argument("--tls-key", default=None, help="the key of --tls-cert (PEM, unencrypted)")
    up.add_argument(
        "--tls-ca",
        default=None,
        help="CA that signed --tls-cert, for the launcher's own checks of the gateway "
        "(default: the system's CAs)",
    )

    up.add_argument(
        "--rebalance",
        action="store_true",
        help="move hot spaces between shards while the cluster runs (engram.control.rebalance)",
    )
    up.add_argument(
        "--rebalance-interval",
        type=float,
        default=10.0,
        help="seconds between rebalancing rounds (default 10)",
    )

    status = sub.add_parser("status", help="show the processes and spaces of a local cluster")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.add_argument("--data-dir", default=DEFAULT_DATA_DIR)

    sub.add_parser("demo", help="stream observations into a running cluster (engram demo -h)")
    sub.add_parser("bench", help="benchmark against the limits and peers (engram bench -h)")
    sub.add_parser("recall", help="one recall at a chosen consistency level (engram recall -h)")
    sub.add_parser("move", help="move a memory space to another shard (engram move -h)")
    sub.add_parser("keys", help="create, list or revoke API keys (engram keys -h)")
    sub.add_parser("backup", help="back memory spaces up to a directory (engram backup -h)")
    sub.add_parser("restore", help="restore a backup into a cluster (engram restore -h)")
    sub.add_parser("delete", help="delete observations by id or time (engram delete -h)")
    sub.add_parser("drop-space", help="drop a memory space and all of it (engram drop-space -h)")
    sub.add_parser("retention", help="a space's maximum age or rows (engram retention -h)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and args_list[0] == "demo":
        return _demo(args_list[1:])
    if args_list and args_list[0] == "bench":
        from engram.bench import main as bench_main

        return bench_main(args_list[1:])
    if args_list and args_list[0] == "move":
        from engram.move_cli import main as move_main

        return move_main(args_list[1:])
    if args_list and args_list[0] in ("backup", "restore"):
        from engram.backup_cli import main as backup_main

        return backup_main(args_list)
    if args_list and args_list[0] == "keys":
        from engram.keys_cli import main as keys_main

        return keys_main(args_list[1:])
    if args_list and args_list[0] in ("delete", "drop-space", "retention"):
        from engram.forget_cli import main as forget_main

        return forget_main(args_list)
    if args_list and args_list[0] == "recall":
        from engram.recall_cli import main as recall_main

        return recall_main(args_list[1:])
    args = _parser().parse_args(args_list)
    if args.command == "up":
        return _up(args)
    if args.command == "status":
        return _status(args)
    return 2


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _up(args: argparse.Namespace) -> int:
    from engram.launcher.status import NoClusterError, load_cluster_file

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    if args.shards < 1:
        print("error: --shards must be at least 1", file=sys.stderr)
        return 2
    if args.gateways < 1:
        print("error: --gateways must be at least 1", file=sys.stderr)
        return 2
    data_dir = Path(args.data_dir).resolve()
    try:
        running = load_cluster_file(data_dir)
    except NoClusterError:
        running = {}
    other = int(running.get("launcher_pid") or 0)
    if other and procs.pid_alive(other):
        print(
            f"error: a cluster is already running from {data_dir} (launcher pid {other}); "
            "stop it first, or use another --data-dir",
            file=sys.stderr,
        )
        return 1

    env: dict[str, str] = {"ENGRAM_CANARY_INTERVAL_S": str(args.canary_interval)}
    if args.memory_budget:
        from engram.common.settings import parse_size

        if parse_size(args.memory_budget) is None:
            print(
                f"error: --memory-budget {args.memory_budget!r} is not a size (e.g. 64MB)",
                file=sys.stderr,
            )
            return 2
        env["ENGRAM_MEMORY_BUDGET"] = args.memory_budget
    if bool(args.tls_cert) != bool(args.tls_key):
        print("error: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    shards, new, draining = _shard_layout(data_dir, args.shards)
    if draining:
        print(
            f"shards {', '.join(f'shard-{i}' for i in sorted(draining))} still hold spaces: "
            f"running {shards} shards and moving their spaces off first; once they are empty, "
            f"`engram up --shards {args.shards}` leaves them out"
        )
    cluster = LocalCluster(
        data_dir,
        shards=shards,
        home_shards=args.shards,  # the draining ones run as extra shards: no new space there
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        redis_port=args.redis_port,
        log_level=args.log_level,
        env=env or None,
        keys_file=args.keys_file,
        tls=(args.tls_cert, args.tls_key) if args.tls_cert else None,
        tls_ca=args.tls_ca,
        gateways=args.gateways,
    )
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)
    print(
        f"starting Redis, {shards} shard(s) and {args.gateways} gateway(s) "
        f"(logs in {cluster.logs_dir})"
    )
    stop_rebalancing = threading.Event()
    try:
        cluster.start()
        _print_endpoints(cluster)
        if args.rebalance or new or draining:
            from engram.launcher.rebalancer import Rebalancer, start_thread

            rebalancer = Rebalancer(
                addresses=lambda: {i: cluster.shard_address(i) for i in range(cluster.shards)},
                new=set(new),
                draining=set(range(args.shards, shards)),  # none receives a space
                interval_s=args.rebalance_interval,
                until_balanced=not args.rebalance and not draining,
                security=cluster.security.internal,
            )
            start_thread(rebalancer, stop_rebalancing)
        forever = threading.Event()
        while not forever.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    except (ClusterError, RedisNotFoundError) as e:
        stop_rebalancing.set()
        print(f"error: {e}", file=sys.stderr)
        _ignore_signals()
        cluster.stop()
        return 1
    stop_rebalancing.set()
    _ignore_signals()
    print("\nstopping: gateways, shards, Redis")
    cluster.stop()
    print("stopped")
    return 0


def _shard_layout(data_dir: Path, wanted: int) -> tuple[int, set[int], set[int]]:
    """(shards to run, new shards, draining shards) for ``--shards wanted`` on ``data_dir``:
    shards added to a directory whose spaces live on the others are new (they are filled);
    shards beyond ``wanted`` that still hold spaces keep running, draining."""

    def holds_spaces(i: int) -> bool:
        spaces = data_dir / f"shard-{i}" / "spaces"
        return spaces.is_dir() and any(e.is_dir() for e in spaces.iterdir())

    existing = {
        int(p.name.split("-")[1])
        for p in data_dir.glob("shard-*")
        if p.name.split("-")[1].isdigit() and holds_spaces(int(p.name.split("-")[1]))
    }
    draining = {i for i in existing if i >= wanted}
    shards = max([wanted, *(i + 1 for i in draining)])
    new = {i for i in range(wanted) if i not in existing} if existing else set()
    return shards, new, draining


def _ignore_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _print_endpoints(cluster: LocalCluster) -> None:
    print()
    print(f"Engram Stream is up ({cluster.shards} shard{'s' if cluster.shards != 1 else ''})")
    sec = cluster.security
    http = "https" if sec.tls else "http"
    print(f"  gateway gRPC  {cluster.gateway_address}{'  (TLS)' if sec.tls else ''}")
    print(
        f"  HTTP          {http}://127.0.0.1:{cluster.http_port}/metrics  "
        "(and /healthz and WebSocket, at the first gateway)"
    )
    if sec.keys_file:
        print(f"  API keys      {sec.keys_file}  (every client needs a key: engram keys)")
    print(f"  redis         {cluster.redis_url}  (pid {cluster.pid('redis')})")
    for i in range(cluster.shards):
        name = f"shard-{i}"
        print(
            f"  {name:<13} {cluster.shard_address(i)}  (pid {cluster.pid(name)}, "
            f"metrics http://127.0.0.1:{cluster.shard_http_port(i)}/metrics)"
        )
    for name in cluster.gateway_names:
        print(
            f"  {name:<13} {cluster.gateway_address}  (pid {cluster.pid(name)}, "
            f"metrics {http}://127.0.0.1:{cluster.gateway_http_port(name)}/metrics)"
        )
    print(f"  data dir      {cluster.data_dir}")
    print(f"  logs          {cluster.logs_dir}")
    print()
    print("Ctrl-C to stop", flush=True)


def _status(args: argparse.Namespace) -> int:
    from engram.launcher.status import NoClusterError, collect, format_text

    try:
        status = collect(args.data_dir)
    except NoClusterError as e:
        if args.json:
            print(json.dumps({"running": False, "error": str(e)}, indent=2))
        else:
            print(str(e), file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"running": True, **status}, indent=2))
    else:
        print(format_text(status))
    return 0 if status["healthy"] else 1


def _demo(argv: list[str]) -> int:
    try:
        from engram.demo import main as demo_main
    except ModuleNotFoundError as e:
        if e.name not in ("engram.demo", "engram"):
            raise
        print("error: `engram demo` is not available in this installation", file=sys.stderr)
        return 2
    return int(demo_main(argv) or 0)


if __name__ == "__main__":
    sys.exit(main())
