"""Milvus Lite (pymilvus MilvusClient on a local .db file) measured like every peer: see
_common.py.

Runs in bench/.venv-milvus. The collection is created with MilvusClient's quick setup
(COSINE, its default index and consistency level), as a user would out of the box.
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
from _common import emit, measure, parse_args
from pymilvus import MilvusClient

# pymilvus reports the level as a number.
_CONSISTENCY = {0: "Strong", 1: "Session", 2: "Bounded", 3: "Eventually", 4: "Customized"}


def main() -> int:
    args = parse_args("milvus")
    client = MilvusClient(str(Path(args.dir) / "milvus.db"))
    dim = int(np.load(args.vectors, mmap_mode="r").shape[1])
    client.create_collection("bench", dimension=dim, metric_type="COSINE")
    described = client.describe_collection("bench")

    def insert(first: int, vectors: np.ndarray) -> None:
        client.insert("bench", [{"id": first + i, "vector": v} for i, v in enumerate(vectors)])

    def search(vector: np.ndarray) -> list[int]:
        res = client.search("bench", data=[vector], limit=10)
        return [hit["id"] for hit in res[0]]

    indexes = client.list_indexes("bench")
    index = client.describe_index("bench", indexes[0]) if indexes else {}
    peer = {
        "peer": "milvus-lite",
        "version": f"milvus-lite {version('milvus-lite')}, pymilvus {version('pymilvus')}",
        "settings": {
            "client": "MilvusClient(local .db)",
            "metric": "COSINE",
            "consistency_level": _CONSISTENCY.get(
                described.get("consistency_level"), str(described.get("consistency_level"))
            ),
            "index": {k: str(v) for k, v in index.items()},
        },
    }
    result = measure(args, peer, insert, search, key=lambda i: i)
    client.close()
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
