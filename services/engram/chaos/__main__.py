"""``python -m engram.chaos``: see :mod:`engram.chaos.cli`."""

from __future__ import annotations

import os
import sys

# gRPC notes every fork of the launcher's supervisor on stderr: keep the output readable.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from engram.chaos.cli import main

if __name__ == "__main__":
    sys.exit(main())
