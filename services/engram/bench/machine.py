"""What the benchmark ran on: CPU, memory, disk, software versions, and how busy the machine
was (the dev machines are shared, so the load average is part of every result)."""

from __future__ import annotations

import os
import platform
import shutil
import socket
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import psutil


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(pkg: str) -> str | None:
    try:
        return version(pkg)
    except PackageNotFoundError:
        return None


def _filesystem(path: Path) -> str:
    best = ""
    fstype = "unknown"
    for part in psutil.disk_partitions(all=True):
        if str(path).startswith(part.mountpoint) and len(part.mountpoint) > len(best):
            best, fstype = part.mountpoint, f"{part.fstype} on {part.device}"
    return fstype


def info(data_path: Path) -> dict[str, Any]:
    vm = psutil.virtual_memory()
    usage = shutil.disk_usage(data_path)
    return {
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gb": round(vm.total / 1e9, 1),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": sys.version.split()[0],
        "data_filesystem": _filesystem(data_path.resolve()),
        "data_free_gb": round(usage.free / 1e9, 1),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "packages": {p: _version(p) for p in ("numpy", "hnswlib", "grpcio", "protobuf", "psutil")},
        "env": {
            k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OMP_NUM_THREADS") if k in os.environ
        },
    }
