"""The demo page at ``/demo``: static files from ``gateway/static/``, answered before any handshake.

``/demo`` and ``/demo/`` serve ``index.html``; ``/demo/<name>`` serves that file of the folder
(no subfolders, no dot files). ``engram-client.js`` is the TypeScript client bundled for the
browser by ``make ts-client``; when it has not been built, a small module that throws an
explanatory error is served instead, so the page can say what to do.
"""

from __future__ import annotations

import re
from pathlib import Path

STATIC_DIR = Path(__file__).resolve().parent / "static"
PREFIX = "/demo"
CLIENT_BUNDLE = "engram-client.js"

_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".map": "application/json",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
_MISSING_BUNDLE = (
    b"throw new Error('the browser build of the TypeScript client is missing: run "
    b"`make ts-client` (needs node and npm), then reload');\n"
)


def route(path: str) -> tuple[bytes, str] | None:
    """(body, content type) for a path under /demo, or None when it is not one of ours."""
    if path in (PREFIX, PREFIX + "/"):
        name = "index.html"
    elif path.startswith(PREFIX + "/"):
        name = path[len(PREFIX) + 1 :]
    else:
        return None
    if not _NAME.fullmatch(name) or ".." in name:
        return None
    content_type = _TYPES.get(Path(name).suffix)
    if content_type is None:
        return None
    file = STATIC_DIR / name
    try:
        return file.read_bytes(), content_type
    except OSError:
        if name == CLIENT_BUNDLE:
            return _MISSING_BUNDLE, content_type
        return None
