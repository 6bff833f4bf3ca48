"""``engram keys``: create, list and revoke the API keys of a keys file.

::

    engram keys create --keys-file FILE --scope read:team-a-* --scope write:team-a-*
                       [--name N] [--expires-in 30d | --expires 2027-01-01T00:00:00Z]
                       [--max-observations-per-s N] [--max-recalls-per-s N]
    engram keys list --keys-file FILE [--json]
    engram keys revoke --keys-file FILE ID

``create`` prints the new key once, on stdout (only its SHA-256 is stored), and where to use
it on stderr. A gateway started with ``ENGRAM_KEYS_FILE=FILE`` (``engram up --keys-file``)
picks up changes within ``ENGRAM_KEYS_RELOAD_S``, without a restart. Every change is an audit
line (``engram.audit``). Exit status: 0 done, 2 a bad request or keys file.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import re
import sys

from engram.common import keys

audit = logging.getLogger("engram.audit")

_DURATION = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}


class UsageError(Exception):
    pass


def parse_duration(text: str) -> dt.timedelta:
    """``90s``, ``15m``, ``12h``, ``30d``, ``2w`` -> a timedelta."""
    m = _DURATION.fullmatch(text.strip())
    if m is None or int(m.group(1)) == 0:
        raise UsageError(f"--expires-in {text!r}: expected a positive number and a unit, e.g. 30d")
    return dt.timedelta(seconds=int(m.group(1)) * _UNITS[m.group(2)])


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="engram keys", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    create = sub.add_parser("create", help="make a new key; prints it once")
    create.add_argument("--keys-file", required=True, help="the keys file (created if absent)")
    create.add_argument(
        "--scope",
        action="append",
        required=True,
        help="ACTION:PATTERN, ACTION read|write|admin, PATTERN a space, a prefix* or * "
        "(repeat for several)",
    )
    create.add_argument("--name", default="", help="what the key is for (shown by list)")
    when = create.add_mutually_exclusive_group()
    when.add_argument("--expires-in", help="lifetime: 90s, 15m, 12h, 30d, 2w")
    when.add_argument("--expires", help="expiry time, RFC 3339 (2027-01-01T00:00:00Z)")
    create.add_argument(
        "--max-observations-per-s",
        type=int,
        default=0,
        help="per-gateway limit (0: the gateway's ENGRAM_KEY_MAX_OBSERVATIONS_PER_S)",
    )
    create.add_argument(
        "--max-recalls-per-s",
        type=int,
        default=0,
        help="per-gateway limit (0: the gateway's ENGRAM_KEY_MAX_RECALLS_PER_S)",
    )

    ls = sub.add_parser("list", help="show the keys (never their hashes)")
    ls.add_argument("--keys-file", required=True)
    ls.add_argument("--json", action="store_true", help="print JSON")

    revoke = sub.add_parser("revoke", help="revoke a key (gateways refuse it from the reload)")
    revoke.add_argument("--keys-file", required=True)
    revoke.add_argument("id", help="the key's id (the 12 hex characters after ek_)")
    return p


def _create(args: argparse.Namespace) -> int:
    try:
        scopes = [keys.parse_scope(s) for s in args.scope]
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for flag in ("max_observations_per_s", "max_recalls_per_s"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag.replace('_', '-')} must be >= 0 (0: the default)")
    expires = None
    if args.expires_in:
        expires = dt.datetime.now(dt.UTC).replace(microsecond=0) + parse_duration(args.expires_in)
    elif args.expires:
        try:
            expires = keys.parse_time(args.expires)
        except ValueError as exc:
            raise UsageError(f"--expires: {exc}") from None
        if expires <= dt.datetime.now(dt.UTC):
            raise UsageError(f"--expires {args.expires} is in the past")
    current = keys.load_keys(args.keys_file, missing_ok=True)
    plaintext, entry = keys.create_key(
        scopes,
        name=args.name,
        expires=expires,
        max_observations_per_s=args.max_observations_per_s,
        max_recalls_per_s=args.max_recalls_per_s,
        taken=current,
    )
    keys.save_keys(args.keys_file, {**current, entry.id: entry})
    audit.info(
        "audit event=key_created key_id=%s name=%r scopes=%s expires=%s path=%s",
        entry.id,
        entry.name,
        ",".join(str(s) for s in entry.scopes),
        keys.format_time(entry.expires) if entry.expires else "-",
        args.keys_file,
    )
    print(plaintext)
    print(
        f"created API key {entry.id} in {args.keys_file}; this is the only time it is shown.\n"
        "Send it as 'authorization: Bearer <key>' (gRPC metadata, WebSocket header) or as the "
        "init message's api_key.",
        file=sys.stderr,
    )
    return 0


def _row(entry: keys.KeyEntry) -> dict[str, object]:
    return {
        "id": entry.id,
        "name": entry.name,
        "scopes": [str(s) for s in entry.scopes],
        "created": keys.format_time(entry.created),
        "expires": keys.format_time(entry.expires) if entry.expires else None,
        "revoked": keys.format_time(entry.revoked) if entry.revoked else None,
        "state": entry.state(),
        "max_observations_per_s": entry.max_observations_per_s,
        "max_recalls_per_s": entry.max_recalls_per_s,
    }


def _list(args: argparse.Namespace) -> int:
    rows = [_row(e) for e in keys.load_keys(args.keys_file).values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no keys in {args.keys_file}")
        return 0
    print(f"{'ID':<12}  {'STATE':<7}  {'CREATED':<20}  {'EXPIRES':<20}  NAME / SCOPES")
    for r in rows:
        print(
            f"{r['id']:<12}  {r['state']:<7}  {r['created']:<20}  {r['expires'] or '-':<20}  "
            f"{r['name'] or '-'}  {' '.join(r['scopes'])}"  # type: ignore[arg-type]
        )
    return 0


def _revoke(args: argparse.Namespace) -> int:
    current = keys.load_keys(args.keys_file)
    if args.id not in current:
        known = ", ".join(sorted(current)) or "none"
        raise UsageError(f"no key {args.id!r} in {args.keys_file} (its keys: {known})")
    if current[args.id].revoked is not None:
        print(f"API key {args.id} was already revoked", file=sys.stderr)
        return 0
    keys.save_keys(args.keys_file, keys.revoke(current, args.id))
    audit.info("audit event=key_revoked key_id=%s path=%s", args.id, args.keys_file)
    print(f"revoked API key {args.id}; gateways refuse it from their next reload", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if not logging.getLogger().handlers:  # the audit lines of a change go to stderr
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        if args.action == "create":
            return _create(args)
        if args.action == "list":
            return _list(args)
        return _revoke(args)
    except (UsageError, keys.KeysFileError) as exc:
        print(f"engram keys: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"engram keys: error: {exc}", file=sys.stderr)
        return 2
