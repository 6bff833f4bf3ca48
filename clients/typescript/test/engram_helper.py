"""Helper of the TypeScript client's tests: reads a running cluster over gRPC.

    python engram_helper.py list --cluster-file DIR/cluster.json --space SPACE

prints {"ids": [...], "lsns": [...]} (every observation of the space, via ListObservations).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from engram_client.client import EngramClient


async def _list(gateway: str, space: str) -> dict[str, list[object]]:
    ids: list[str] = []
    lsns: list[int] = []
    async with EngramClient(gateway) as client:
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
    args = parser.parse_args(argv)
    gateway = json.loads(Path(args.cluster_file).read_text())["gateway"]
    print(json.dumps(asyncio.run(_list(gateway, args.space))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
