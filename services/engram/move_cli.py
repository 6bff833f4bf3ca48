"""``engram move``: move a memory space to another shard of a running local cluster.

::

    engram move SPACE --to shard-2        waits until the move is done; prints the write pause
    engram move SPACE --cancel            cancels the move of SPACE in progress

Shards are found in the cluster's ``cluster.json`` (``--data-dir``, as ``engram up`` wrote it,
with the shards' token and certificates if it has them), or, with ``--redis URL`` (a cluster
elsewhere, e.g. on Kubernetes), in the control plane's shard registry (the token and
certificates then come from this process's ``ENGRAM_INTERNAL_TOKEN_FILE`` and
``ENGRAM_INTERNAL_TLS_CA``/``_CERT``/``_KEY``).
Exit status: 0 moved (or cancelled), 1 the move aborted (nothing changed), 2 a bad request.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys

from engram.common.settings import SecuritySettings
from engram.contract.errors import EngramError
from engram.control.moves import PHASES, MoveRefused, cancel_move, move_space
from engram.control.store import ControlStore
from engram.internal.v1 import shard_pb2 as ipb
from engram.launcher import secure
from engram.launcher.status import NoClusterError, load_cluster_file

_SHARD = re.compile(r"(?:shard-)?(\d+)")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="engram move", description=__doc__.splitlines()[0])
    p.add_argument("space", help="memory space id")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--to", help="target shard: shard-N (or N)")
    what.add_argument("--cancel", action="store_true", help="cancel the move in progress")
    p.add_argument("--data-dir", default="./.engram", help="the cluster's data directory")
    p.add_argument("--redis", default="", help="find the shards in this Redis instead")
    p.add_argument("--key-prefix", default="engram", help="with --redis: the cluster's prefix")
    p.add_argument("--quiet", action="store_true", help="print only the result")
    return p.parse_args(argv)


def shard_addresses(data_dir: str) -> dict[int, str]:
    """Each shard's advertised gRPC address, from the cluster's cluster.json."""
    info = load_cluster_file(data_dir)
    out: dict[int, str] = {}
    for p in info.get("processes", []):
        if p["role"] == "shard":
            out[int(p["name"].split("-")[1])] = p.get("advertise") or p["grpc"]
    return out


def _show(progress: ipb.MoveProgress) -> None:
    mb = 1 << 20
    print(
        f"  {PHASES[progress.phase]:<12} copied {progress.bytes_copied / mb:8.1f} of "
        f"{progress.files_bytes / mb:.1f} MB, WAL {progress.wal_bytes / mb:8.1f} MB, "
        f"LSN {progress.lsn:,} of {progress.source_lsn:,}",
        flush=True,
    )


async def registered_addresses(redis_url: str, prefix: str) -> dict[int, str]:
    store = ControlStore(redis_url, prefix)
    try:
        return {i: info.address for i, info in (await store.registered()).items()}
    finally:
        await store.close()


async def run(args: argparse.Namespace) -> int:
    security: SecuritySettings | None = None  # this process's own settings
    try:
        if args.redis:
            addresses = await registered_addresses(args.redis, args.key_prefix)
        else:
            addresses = shard_addresses(args.data_dir)
            security = secure.from_cluster_file(load_cluster_file(args.data_dir)).internal
    except NoClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # Redis unreachable
        print(f"error: cannot read the shard registry at {args.redis}: {exc}", file=sys.stderr)
        return 2
    try:
        if args.cancel:
            target = await cancel_move(addresses, args.space, security)
            print(f"cancelled the move of {args.space} to shard-{target}")
            return 0
        match = _SHARD.fullmatch(args.to.strip())
        if match is None:
            print(f"error: --to {args.to!r} is not a shard (shard-N)", file=sys.stderr)
            return 2
        result = await move_space(
            addresses,
            args.space,
            int(match.group(1)),
            on_progress=None if args.quiet else _show,
            security=security,
        )
    except MoveRefused as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except EngramError as exc:
        print(f"move failed, nothing changed: {exc}", file=sys.stderr)
        return 1
    mb = (result.copied_bytes + result.wal_bytes) / (1 << 20)
    print(
        f"moved {result.space} from shard-{result.source} to shard-{result.target} "
        f"(epoch {result.epoch}, {result.rows:,} observations) in {result.seconds:.2f} s; "
        f"copied {mb:.1f} MB ({mb / max(result.seconds, 1e-9):.1f} MB/s); "
        f"write pause {result.pause_ms:.0f} ms"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(argv)))
