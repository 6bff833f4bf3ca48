"""Entry point of a shard process: ``python -m engram.shard`` (configured by ENGRAM_* variables)."""

from __future__ import annotations

import sys

from engram.common import logs, settings
from engram.common.errors import SettingsError
from engram.shard.server import run

if __name__ == "__main__":
    try:
        cfg = settings.load()
    except SettingsError as exc:
        sys.exit(f"engram shard: invalid setting: {exc}")
    logs.setup(f"shard-{cfg.shard.shard_id}", cfg.log_level)
    run(cfg)
