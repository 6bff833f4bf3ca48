#!/usr/bin/env python3
"""Local chaos run (``make chaos``): a workload against a local cluster under faults.

Runs :mod:`engram.chaos` from this checkout (its ``services/`` and ``clients/python/`` come
first on the import path), writing reports to ``chaos/results/``. Options: ``--help``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
for sub in ("clients/python", "services"):
    sys.path.insert(0, str(ROOT / sub))

# gRPC notes every fork of the launcher's supervisor on stderr: keep the output readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from engram.chaos.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    if not any(a == "--results" or a.startswith("--results=") for a in args):
        args += ["--results", str(ROOT / "chaos" / "results")]
    sys.exit(main(args))
