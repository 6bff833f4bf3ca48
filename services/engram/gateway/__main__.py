"""Entry point of a gateway process: ``python -m engram.gateway`` (ENGRAM_* variables)."""

from __future__ import annotations

import sys

from engram.common import logs, settings
from engram.common.settings import SettingsError
from engram.gateway.server import run

if __name__ == "__main__":
    try:
        cfg = settings.load()
    except SettingsError as exc:
        sys.exit(f"engram gateway: invalid setting: {exc}")
    logs.setup("gateway", cfg.log_level)
    run(cfg)
