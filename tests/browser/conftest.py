"""Fixtures of the browser tests: headless Chromium (Debian's) driven by Playwright.

The tests skip, saying why, when Chromium or the ``playwright`` package is missing
(``make browser-deps`` installs both). Chromium is never downloaded by Playwright: it is
launched from ``ENGRAM_CHROMIUM`` (default ``/usr/bin/chromium``). Screenshots are written to
``tests/browser/artifacts/`` (not committed).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from engram.gateway import ws_static

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def _chromium() -> str | None:
    explicit = os.environ.get("ENGRAM_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for candidate in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("chromium")


@pytest.fixture
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """A headless Chromium, closed after the test."""
    executable = _chromium()
    if executable is None:
        pytest.skip(
            "Chromium is not installed (looked for /usr/bin/chromium and $ENGRAM_CHROMIUM): "
            "`make browser-deps` installs it with apt-get when run as root"
        )
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("the playwright package is not installed: run `make browser-deps`")
    if not (ws_static.STATIC_DIR / ws_static.CLIENT_BUNDLE).exists():
        pytest.fail(
            f"{ws_static.STATIC_DIR / ws_static.CLIENT_BUNDLE} is missing: run `make ts-client` "
            "(builds the TypeScript client for the browser; needs node and npm)"
        )
    async with async_playwright() as pw:
        chromium = await pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            await chromium.close()
