"""Chroma (PersistentClient, local HNSW) measured like every peer: see _common.py.

Runs in bench/.venv-chroma. The collection uses cosine space with the HNSW parameters Engram
Stream uses (M / max_neighbors 16, ef_construction 100); everything else is Chroma's default.
"""

from __future__ import annotations

import sys

import chromadb
import numpy as np
from _common import emit, measure, parse_args


def main() -> int:
    args = parse_args("chroma")
    client = chromadb.PersistentClient(path=args.dir)
    hnsw = {"space": "cosine", "ef_construction": 100, "max_neighbors": 16}
    col = client.create_collection("bench", configuration={"hnsw": hnsw}, embedding_function=None)

    def insert(first: int, vectors: np.ndarray) -> None:
        col.add(ids=[f"p{first + i}" for i in range(len(vectors))], embeddings=vectors)

    def search(vector: np.ndarray) -> list[str]:
        res = col.query(query_embeddings=vector[None, :], n_results=10, include=[])
        return list(res["ids"][0])

    peer = {
        "peer": "chroma",
        "version": chromadb.__version__,
        "settings": {"client": "PersistentClient", **hnsw},
    }
    emit(measure(args, peer, insert, search, key=lambda i: f"p{i}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
