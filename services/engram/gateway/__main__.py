"""Entry point of a gateway process: ``python -m engram.gateway`` (ENGRAM_* variables)."""

from __future__ import annotations

import sys

from engram.common import logs, settings, tracing
from engram.common.settings import SettingsError
from engram.gateway.server import run

if __name__ == "__main__":
    try:
        cfg = settings.load()
        logs.setup("gateway", cfg.log_level)
        tracing.configure("engram-gateway", cfg.tracing, instance=cfg.gateway.listen)
    except SettingsError as exc:
        sys.exit(f"engram gateway: invalid setting: {exc}")
    try:
        run(cfg)
    finally:
        tracing.shutdown()
