"""Helper of the TypeScript client's tests: reads a running cluster over gRPC, makes keys
and certificates.

    python engram_helper.py list --cluster-file DIR/cluster.json --space SPACE [--api-key K]

prints {"ids": [...], "lsns": [...]} (every observation of the space, via ListObservations).

    python engram_helper.py key --keys-file F --scope write:ts-a-* [--scope ...]

adds a key to the keys file F (made if missing) and prints {"key": "ek_...", "id": "..."}.

    python engram_helper.py certs --dir D

writes D/ca.pem and D/server.crt, D/server.key (for 127.0.0.1 and localhost) from a CA made
now (trustme), and prints their paths as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from engram_client.client import EngramClient


async def _list(gateway: str, space: str, api_key: str | None) -> dict[str, list[object]]:
    ids: list[str] = []
    lsns: list[int] = []
    async with EngramClient(gateway, api_key=api_key) as client:
        async for chunk_ids, chunk_lsns in client.list_observations(space):
            ids.extend(chunk_ids)
            lsns.extend(chunk_lsns)
    return {"ids": ids, "lsns": lsns}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    ls = sub.add_parser("list")
    ls.add_argument("--cluster-file", required=True)
    ls.add_argument("--space", required=True)
    ls.add_argument("--api-key", default=None)
    key = sub.add_parser("key")
    key.add_argument("--keys-file", required=True)
    key.add_argument("--scope", action="append", required=True)
    certs = sub.add_parser("certs")
    certs.add_argument("--dir", required=True)
    args = parser.parse_args(argv)
    if args.command == "key":
        print(json.dumps(_key(Path(args.keys_file), args.scope)))
    elif args.command == "certs":
        print(json.dumps(_certs(Path(args.dir))))
    else:
        gateway = json.loads(Path(args.cluster_file).read_text())["gateway"]
        print(json.dumps(asyncio.run(_list(gateway, args.space, args.api_key))))
    return 0


def _key(keys_file: Path, scopes: list[str]) -> dict[str, str]:
    from engram.common import keys

    ring = keys.load_keys(keys_file, missing_ok=True)
    plaintext, entry = keys.create_key(
        [keys.parse_scope(s) for s in scopes], name="typescript tests", taken=ring
    )
    keys.save_keys(keys_file, {**ring, entry.id: entry})
    return {"key": plaintext, "id": entry.id}


def _certs(root: Path) -> dict[str, str]:
    import trustme

    root.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    paths = {"ca": root / "ca.pem", "cert": root / "server.crt", "key": root / "server.key"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    paths["cert"].write_bytes(b"".join(p.bytes() for p in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    return {name: str(path) for name, path in paths.items()}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
