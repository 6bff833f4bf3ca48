"""Logging set-up shared by the services: one line per record, with the process role."""

from __future__ import annotations

import logging
import sys


def setup(role: str, level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s {role} %(name)s: %(message)s",
    )
