"""Sampling profiles of service processes during the timed phase (py-spy), and their hot spots.

``py-spy record --format raw --threads --nonblocking`` writes collapsed stacks
(``thread (tid): name;frame;frame count``); :func:`hot_spots` turns them into the functions
with the most samples on top of the stack ("self") and anywhere in it ("total"), in percent
of the samples the profile took. Idle threads are not sampled, so 100 % means "busy all the
time in one thread"; two busy threads can add up to more than the wall time.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str | None:
    """Path of the py-spy binary (next to this Python, or on PATH)."""
    local = Path(sys.executable).parent / "py-spy"
    if local.exists():
        return str(local)
    return shutil.which("py-spy")


def start(pid: int, seconds: float, out: Path, rate: int) -> subprocess.Popen[bytes]:
    binary = py_spy()
    if binary is None:
        raise FileNotFoundError("py-spy is not installed (pip install py-spy; make bench does)")
    argv = [
        binary,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(max(1, round(seconds))),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "--output",
        str(out),
        "--nonblocking",
        "--threads",
    ]
    log = out.with_suffix(".log").open("wb")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)


def _short(path: str) -> str:
    for marker in ("site-packages/", "services/", "clients/python/", "lib/python3."):
        i = path.find(marker)
        if i >= 0:
            rest = path[i + len(marker) :]
            return rest.split("/", 1)[1] if marker == "lib/python3." and "/" in rest else rest
    return path


def _name(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    return f"{m.group('func')} ({_short(m.group('file'))})"


def hot_spots(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and total sample shares per function, and per thread, from a raw py-spy file."""
    self_c: Counter[str] = Counter()
    total_c: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        thread = frames[0]
        if thread.startswith("thread ("):
            frames = frames[1:]
            threads[thread.split(": ", 1)[-1] if ": " in thread else thread] += count
        if not frames:
            continue
        samples += count
        names = [_name(f) for f in frames]
        self_c[names[-1]] += count
        for name in set(names):
            total_c[name] += count

    def share(c: Counter[str], n: int) -> list[dict[str, Any]]:
        return [
            {"function": k, "samples": v, "pct": round(100.0 * v / samples, 1)}
            for k, v in c.most_common(n)
        ]

    engram_total = Counter(
        {k: v for k, v in total_c.items() if "engram" in k and not k.startswith("<module>")}
    )
    return {
        "samples": samples,
        "threads": share(threads, 10),
        "self": share(self_c, top),
        "total_engram": share(engram_total, top),
    }
