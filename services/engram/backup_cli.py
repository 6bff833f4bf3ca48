"""``engram backup`` and ``engram restore``: a space's consistent copy in a directory or an
S3-compatible bucket, and back.

::

    engram backup --space S [--space S2 ... | --all] --to DEST [--stamp]   DEST/<space>/
    engram restore --from DEST [--space NEW_NAME]            DEST/<space>/ or DEST of many

DEST is a directory or ``s3://bucket/prefix`` (boto3, the ``s3`` extra; the endpoint of an
S3-compatible service from ``--s3-endpoint`` or ``AWS_ENDPOINT_URL``, credentials the
standard boto3 way). ``--stamp`` backs up into ``DEST/<UTC time>/`` instead, one location a
run, as the chart's scheduled backups do. A backup is consistent as of one LSN and taken while
ingest goes on; ``backup.json`` is written last, so a location without it holds no backup. A
restore goes into a running cluster whose space of that name is new or empty, and refuses a
backup that is incomplete, corrupt, of a newer format or of another dimension than the space.
``--disk-rate`` (directories) also times a plain copy of the same bytes on the same disk, so
the MB/s can be read next to what the disk does.

Shards are found as ``engram move`` finds them (:mod:`engram.move_cli`): the cluster's
``cluster.json`` (``--data-dir``) or the control plane's registry (``--redis URL``).
Exit status: 0 done, 1 failed (the cluster's error), 2 a bad request or a refused backup.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from engram.common.settings import SecuritySettings
from engram.contract.errors import EngramError
from engram.control import backup_format as fmt
from engram.control.assignment import Assignment
from engram.control.backup_store import BackupStore, DirStore, open_store
from engram.control.backups import Progress, backup_space, restore_space
from engram.control.moves import shard_stats, spaces_of
from engram.control.store import ControlStore
from engram.launcher import secure
from engram.launcher.status import NoClusterError, load_cluster_file
from engram.move_cli import registered_addresses, shard_addresses

MB = 1 << 20


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="engram", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("backup", help="back spaces up into a directory")
    what = b.add_mutually_exclusive_group(required=True)
    what.add_argument("--space", action="append", help="a memory space (repeat for more)")
    what.add_argument("--all", action="store_true", help="every space of the cluster")
    b.add_argument(
        "--to", required=True, help="directory or s3://bucket/prefix: each space to DEST/<space>/"
    )
    b.add_argument("--stamp", action="store_true", help="into DEST/<UTC time>/: one location a run")
    r = sub.add_parser("restore", help="restore a backup into a running cluster")
    r.add_argument("--from", dest="source", required=True, help="DEST/<space>, or DEST of many")
    r.add_argument("--space", default="", help="restore under this name (one backup only)")
    for cmd in (b, r):
        cmd.add_argument(
            "--s3-endpoint",
            default="",
            help="an S3-compatible service's URL (default: AWS_ENDPOINT_URL, else AWS S3)",
        )
        cmd.add_argument("--data-dir", default="./.engram", help="the cluster's data directory")
        cmd.add_argument("--redis", default="", help="find the shards in this Redis instead")
        cmd.add_argument("--key-prefix", default="engram", help="with --redis: the prefix")
        cmd.add_argument("--quiet", action="store_true", help="print only the results")
        cmd.add_argument(
            "--disk-rate", action="store_true", help="also time a plain copy of the same bytes"
        )
    return p.parse_args(argv)


class Shown:
    """Progress lines, at most a few a second."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.last = 0.0

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if self.quiet or now - self.last < 0.5:
            return
        self.last = now
        print(
            f"  {p.space}: {p.file:<28} {p.done_bytes / MB:9.1f} MB "
            f"(checkpoint {p.total_bytes / MB:.1f} MB)",
            flush=True,
        )


async def _cluster(args: argparse.Namespace) -> tuple[dict[int, str], SecuritySettings | None, str]:
    """(shard addresses, security, Redis URL) of the cluster the arguments name."""
    if args.redis:
        return await registered_addresses(args.redis, args.key_prefix), None, args.redis
    info = load_cluster_file(args.data_dir)
    security = secure.from_cluster_file(info).internal
    return shard_addresses(args.data_dir), security, str(info.get("redis_url", ""))


async def _routing(args: argparse.Namespace, redis_url: str, shards: int) -> Assignment | None:
    """The routing table (a space's owner), None if the control plane cannot be read."""
    if not redis_url:
        return None
    count = shards
    if not args.redis:
        count = int(load_cluster_file(args.data_dir).get("shard_count", shards))
    store = ControlStore(redis_url, args.key_prefix, count)
    try:
        return await store.assignment()
    except Exception:  # routed by the hash over the shards found
        return None
    finally:
        await store.close()


def _disk_rate(paths: list[Path], scratch: Path) -> float:
    """MB/s of a plain copy (copy + fsync) of ``paths`` into ``scratch``, on the same disk."""
    total = sum(p.stat().st_size for p in paths)
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".disk-rate-") as tmp:
        started = time.monotonic()
        for p in paths:
            dest = Path(tmp) / p.name
            shutil.copyfile(p, dest)
            with open(dest, "rb") as f:
                os.fsync(f.fileno())
        return total / MB / max(time.monotonic() - started, 1e-9)


def stamp(now: datetime.datetime | None = None) -> str:
    """A run's location name: its UTC time, sorting as the runs came."""
    return (now or datetime.datetime.now(datetime.UTC)).strftime("%Y%m%dT%H%M%SZ")


async def _disk_rate_of(store: BackupStore, mb: float) -> None:
    if not isinstance(store, DirStore):
        print("  (--disk-rate times directories only)", flush=True)
        return
    files = sorted(f for f in store.path.iterdir() if f.is_file())
    rate = await asyncio.to_thread(_disk_rate, files, store.path.parent)
    print(f"  disk copy of the same {mb:.1f} MB: {rate:.1f} MB/s", flush=True)


async def _backup(args: argparse.Namespace) -> int:
    dest = open_store(args.to, s3_endpoint=args.s3_endpoint)
    if args.stamp:
        dest = dest.space(stamp())
    addresses, security, _ = await _cluster(args)
    spaces = args.space or sorted(spaces_of(await shard_stats(addresses, security)))
    if not spaces:
        print("no spaces to back up", file=sys.stderr)
        return 2
    show = Shown(args.quiet)
    for space in spaces:
        result = await backup_space(addresses, space, dest, security=security, on_progress=show)
        mb = result.bytes / MB
        print(
            f"backed up {space} from shard-{result.shard} at LSN {result.lsn:,} (dim "
            f"{result.dim}): {mb:.1f} MB in {result.seconds:.2f} s "
            f"({mb / result.seconds:.1f} MB/s) -> {result.location}",
            flush=True,
        )
        if args.disk_rate:
            await _disk_rate_of(result.store, mb)
    return 0


async def _backups_in(source: BackupStore) -> list[BackupStore]:
    """The backup at ``source``, or those one level under it (a run of ``--all``)."""
    if await source.size(fmt.MANIFEST) is not None:
        return [source]
    return await source.backups() or [source]  # none: the error names the location


async def _restore(args: argparse.Namespace) -> int:
    dirs = await _backups_in(open_store(args.source, s3_endpoint=args.s3_endpoint))
    if args.space and len(dirs) > 1:
        print(
            f"error: {args.source} holds {len(dirs)} backups; --space renames one",
            file=sys.stderr,
        )
        return 2
    addresses, security, redis_url = await _cluster(args)
    table = await _routing(args, redis_url, len(addresses))
    route: Callable[[str], int] | None = table.owner if table is not None else None
    show = Shown(args.quiet)
    for directory in dirs:
        result = await restore_space(
            addresses,
            directory,
            space=args.space,
            route=route,
            security=security,
            on_progress=show,
        )
        mb = result.bytes / MB
        print(
            f"restored {result.space} on shard-{result.shard} at LSN {result.lsn:,}: "
            f"{mb:.1f} MB in {result.seconds:.2f} s ({mb / result.seconds:.1f} MB/s)",
            flush=True,
        )
        if args.disk_rate:
            await _disk_rate_of(directory, mb)
    return 0


async def run(args: argparse.Namespace) -> int:
    try:
        return await (_backup(args) if args.command == "backup" else _restore(args))
    except NoClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except fmt.BackupError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 2
    except EngramError as exc:
        print(f"{args.command} failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"{args.command} failed: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(parse_args(list(sys.argv[1:] if argv is None else argv))))
