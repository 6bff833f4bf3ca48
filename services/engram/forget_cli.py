"""``engram delete``, ``engram drop-space`` and ``engram retention``: forgetting, from a shell.

::

    engram delete --space S --id ID [ID ...] [--since T] [--until T]
    engram drop-space S [--yes]
    engram retention --space S [--max-age 30d] [--max-rows N] | --clear

A delete names observations by id and/or by time (``T``: RFC 3339, e.g. 2026-01-31T12:00:00Z,
or unix microseconds; ``[since, until)``, either bound alone an open range) and returns once
it is durable. ``drop-space`` removes a space and everything in it; it asks first unless
``--yes``. ``retention`` sets a space's maximum age (``30d``, ``12h``, ``90m``, ``45s``, or
seconds) and/or row count, or clears both. Deleting needs a key with ``write`` on the space,
dropping and retention ``admin``: ``--api-key`` (default ``$ENGRAM_API_KEY``), ``--ca FILE``
and ``--target`` as for every client command (:mod:`engram.client_options`). Exit status: 0
done, 1 refused or failed, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import re
import sys
from collections.abc import Awaitable, Callable, Sequence

from engram import client_options
from engram.contract.errors import EngramError
from engram_client import EngramClient

COMMANDS = ("delete", "drop-space", "retention")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_DURATION = re.compile(r"(\d+)([smhdw]?)")


def duration_s(text: str) -> int:
    """``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or plain seconds -> seconds (at least 1)."""
    m = _DURATION.fullmatch(text.strip().lower())
    if m is None or int(m.group(1)) == 0:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: a positive number with s, m, h, d or w (e.g. 30d)"
        )
    return int(m.group(1)) * _UNITS[m.group(2) or "s"]


def time_us(text: str) -> int:
    """RFC 3339 (naive means UTC) or unix microseconds -> unix microseconds."""
    value = text.strip()
    if value.lstrip("-").isdigit():
        return int(value)
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a time: RFC 3339 (2026-01-31T12:00:00Z) or unix microseconds"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    delta = when - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"engram {command}", description=__doc__.splitlines()[0])
    client_options.add_arguments(p)
    if command == "delete":
        p.add_argument("--space", required=True, help="memory space id")
        p.add_argument(
            "--id", dest="ids", action="extend", nargs="+", default=[], metavar="ID",
            help="observation ids to delete (repeatable)",
        )  # fmt: skip
        p.add_argument("--since", type=time_us, help="and every observation from this time on")
        p.add_argument("--until", type=time_us, help="... and before this time")
    elif command == "drop-space":
        p.add_argument("space", help="memory space id")
        p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    else:
        p.add_argument("--space", required=True, help="memory space id")
        p.add_argument("--max-age", type=duration_s, default=0, help="e.g. 30d, 12h, 3600")
        p.add_argument("--max-rows", type=int, default=0, help="keep at most this many")
        p.add_argument("--clear", action="store_true", help="keep everything (no retention)")
    return p


def _check(command: str, args: argparse.Namespace, p: argparse.ArgumentParser) -> None:
    if command == "delete" and not args.ids and args.since is None and args.until is None:
        p.error("name what to delete: --id ID..., or a time range (--since and/or --until)")
    if command == "retention":
        if args.clear == bool(args.max_age or args.max_rows):
            p.error("give --max-age and/or --max-rows, or --clear (not both)")
        if args.max_rows < 0:
            p.error("--max-rows must be a positive number")


def _confirmed(space: str) -> bool:
    if not sys.stdin.isatty():
        print(f"error: dropping {space!r} needs confirmation: add --yes", file=sys.stderr)
        return False
    try:
        answer = input(
            f"Drop memory space {space!r} and everything in it? It cannot be undone [y/N] "
        )
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


async def _delete(client: EngramClient, args: argparse.Namespace) -> str:
    r = await client.delete(args.space, args.ids, since_us=args.since, until_us=args.until)
    return (
        f"deleted {r.deleted} observations from {args.space} (already deleted {r.already_deleted}, "
        f"not found {r.not_found}); durable at LSN {r.lsn}"
    )


async def _drop(client: EngramClient, args: argparse.Namespace) -> str:
    held = await client.drop_space(args.space)
    if held == 0:
        return f"dropped {args.space}: it held no observations"
    return f"dropped {args.space} and its {held} observations"


async def _retention(client: EngramClient, args: argparse.Namespace) -> str:
    r = await client.set_retention(args.space, max_age_s=args.max_age, max_rows=args.max_rows)
    if not (r.max_age_s or r.max_rows):
        return f"{args.space} keeps everything (no retention)"
    bounds = [f"at most {r.max_age_s} s old"] if r.max_age_s else []
    bounds += [f"at most {r.max_rows} rows"] if r.max_rows else []
    return f"{args.space} keeps observations {' and '.join(bounds)}"


_RUN: dict[str, Callable[[EngramClient, argparse.Namespace], Awaitable[str]]] = {
    "delete": _delete,
    "drop-space": _drop,
    "retention": _retention,
}


async def run(command: str, args: argparse.Namespace) -> int:
    try:
        client = client_options.connect(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    async with client:
        try:
            print(await _RUN[command](client, args))
        except EngramError as exc:
            print(f"{command} failed: {exc}", file=sys.stderr)
            return 1
    return 0


def main(argv: Sequence[str]) -> int:
    """``argv``: the command's name (one of :data:`COMMANDS`), then its arguments."""
    command, rest = argv[0], list(argv[1:])
    p = _parser(command)
    args = p.parse_args(rest)
    _check(command, args, p)
    if command == "drop-space" and not args.yes and not _confirmed(args.space):
        print("not dropped", file=sys.stderr)
        return 1
    return asyncio.run(run(command, args))
