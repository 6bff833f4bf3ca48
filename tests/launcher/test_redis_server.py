"""The private redis-server: found, started on a free port, answering PING, stopped by PID."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest
import redis

from engram.launcher import procs
from engram.launcher.redis_server import (
    RedisNotFoundError,
    RedisServer,
    RedisStartError,
    find_redis_server,
    ping,
    redis_argv,
)


@pytest.mark.cluster
def test_finds_a_redis_server_binary() -> None:
    path = find_redis_server()
    assert os.access(path, os.X_OK)
    out = subprocess.run([path, "--version"], capture_output=True, text=True, check=True)
    assert "Redis server" in out.stdout


def test_env_variable_wins_and_must_point_at_an_executable(tmp_path: Path) -> None:
    real = find_redis_server()
    assert find_redis_server({"ENGRAM_REDIS_SERVER": real}) == real
    with pytest.raises(RedisNotFoundError, match="ENGRAM_REDIS_SERVER"):
        find_redis_server({"ENGRAM_REDIS_SERVER": str(tmp_path / "missing")})


def test_runs_without_persistence_in_the_foreground(tmp_path: Path) -> None:
    argv = redis_argv("redis-server", 7000, tmp_path)
    assert argv[argv.index("--save") + 1] == ""
    assert argv[argv.index("--appendonly") + 1] == "no"
    assert argv[argv.index("--daemonize") + 1] == "no"
    assert argv[argv.index("--bind") + 1] == "127.0.0.1"
    assert argv[argv.index("--dir") + 1] == str(tmp_path)


@pytest.mark.cluster
def test_start_ping_stop(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        assert server.pid is not None and procs.pid_alive(server.pid)
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
            client.set("k", "v")
            assert client.get("k") == b"v"
    finally:
        code = server.stop()
    assert code == 0
    assert not ping(server.url, timeout=0.2)
    assert not procs.pid_alive(server.pid)


@pytest.mark.cluster
def test_stop_escalates_to_sigkill_by_pid(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    assert server.pid is not None
    os.kill(server.pid, signal.SIGSTOP)  # a stopped process cannot act on SIGTERM
    code = server.stop(timeout=0.5)
    assert code == -signal.SIGKILL
    assert not procs.pid_alive(server.pid)


@pytest.mark.cluster
def test_refuses_a_port_in_use(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "a") as first:
        second = RedisServer(tmp_path / "b", port=first.port)
        with pytest.raises(RedisStartError, match="already in use"):
            second.start()
        assert second.proc is None


@pytest.mark.cluster
def test_start_failure_reports_the_log(tmp_path: Path) -> None:
    fake = tmp_path / "fake-redis"
    fake.write_text("#!/bin/sh\necho 'bad config line' >&2\nexit 1\n")
    fake.chmod(0o755)
    server = RedisServer(tmp_path / "redis", binary=str(fake))
    with pytest.raises(RedisStartError, match="exited with code 1(.|\n)*bad config line"):
        server.start(timeout=5)


def test_redis_url_fixture(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        assert client.ping()
