"""The backup suites reuse the move suites' helpers (``mv``: a writer of unique ids, DIM,
BATCH), loaded from ``tests/moves/conftest.py`` rather than copied; ``s3`` is a local S3
server (moto) for backups to a bucket."""

from __future__ import annotations

import importlib.util
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from engram.launcher import procs

_NAME = "engram_tests_move_helpers"


def _helpers() -> ModuleType:
    if _NAME not in sys.modules:
        path = Path(__file__).parent.parent / "moves" / "conftest.py"
        spec = importlib.util.spec_from_file_location(_NAME, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[_NAME] = module
        spec.loader.exec_module(module)
    return sys.modules[_NAME]


@pytest.fixture
def mv() -> ModuleType:
    return _helpers()


class LocalS3:
    """A moto S3 server on a free local port: ``endpoint``, ``env`` (credentials and region a
    child process needs), ``client`` (boto3, for the test's own looks and changes)."""

    def __init__(self, endpoint: str, env: dict[str, str]) -> None:
        import boto3

        self.endpoint = endpoint
        self.env = env
        self.client = boto3.client("s3", endpoint_url=endpoint)


@pytest.fixture
def s3(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalS3]:
    """moto's S3 server as a process of its own (started and stopped by PID), with a bucket
    ``backups``; multipart parts may be as small as 1 KiB there, so small backups use them."""
    pytest.importorskip("boto3", reason="boto3 missing: pip install '.[dev]'")
    pytest.importorskip("moto", reason="moto missing: pip install '.[dev]'")
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    port = procs.free_port()
    server = Path(sys.executable).parent / "moto_server"
    proc = procs.spawn(
        [str(server), "-H", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "S3_UPLOAD_PART_MIN_SIZE": "1024"},
        log_path=tmp_path / "moto.log",
    )
    try:
        deadline = time.monotonic() + 30
        while not procs.port_in_use(port):
            assert proc.poll() is None, procs.log_tail(tmp_path / "moto.log")
            assert time.monotonic() < deadline, "moto_server did not listen within 30 s"
            time.sleep(0.1)
        local = LocalS3(f"http://127.0.0.1:{port}", env)
        local.client.create_bucket(Bucket="backups")
        yield local
    finally:
        procs.stop(proc)
