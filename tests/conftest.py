"""The fixture kit every suite shares: real processes on free ports, markers and leak guards.

Clusters are :class:`LocalCluster` objects run by this test process: it spawns (and the
supervisor restarts) the services through ``engram.launcher.procs.spawn``, which stays on
``subprocess``'s vfork/exec path (no ``preexec_fn``, no fork handlers), so spawning while gRPC
or numpy threads are busy here is safe (``tests/integration/test_restart_spawn.py`` guards it).
Every process a fixture starts lives under a temporary directory and is stopped by PID at
teardown, whether the test passed or not. When a test fails, the last lines of the logs of
every cluster it used are added to its report.

Processes:

* ``redis_server`` / ``redis_url``: a private redis-server (no persistence).
* ``make_cluster(shards=2, start=True, **kwargs)``: starts a per-test cluster (keyword
  arguments go to :class:`LocalCluster`; ``data_dir=`` reuses a stopped cluster's directory,
  ``start=False`` returns it unstarted), for tests that kill, stop or reconfigure processes.
* ``shared_cluster``: one started cluster per test module, for tests that leave it as they
  found it (each writes to memory spaces of its own, see ``space_id``). A module configures it
  with ``CLUSTER_SHARDS`` (default 2) and ``CLUSTER_ENV`` (extra ``ENGRAM_*`` variables)::

      CLUSTER_SHARDS = 1
      CLUSTER_ENV = {"ENGRAM_WS_HEARTBEAT_S": "0.2"}

* ``space_id``: a memory space id no other test uses.

Markers: every test that uses a fixture above starting processes is marked ``cluster``
(``pytest_collection_modifyitems``); a module or test that starts processes by itself carries
``pytest.mark.cluster`` explicitly, and an unmarked test that starts a process fails, so
``make test-fast`` (``-m "not cluster and not slow"``) never runs one.

Guards (every test): no WAL committer thread outlives the test (``no_leaked_committers``),
and, as above, an unmarked test starts no process.
"""

from __future__ import annotations

import contextlib
import io
import sys
import threading
import uuid
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from engram.launcher.cluster import LocalCluster
from engram.launcher.redis_server import RedisServer

# Fixtures that start processes; a test whose fixture closure holds one is marked ``cluster``
# (the others that start processes, such as ``redis_url``, depend on one of these).
PROCESS_FIXTURES = frozenset({"redis_server", "make_cluster", "shared_cluster"})

# Audit events of a new process (subprocess, asyncio subprocesses, multiprocessing, os).
_SPAWN_EVENTS = frozenset(
    {"subprocess.Popen", "os.posix_spawn", "os.fork", "os.forkpty", "os.exec", "os.system"}
)
_SPAWNED = pytest.StashKey[list[str]]()
_LOGGED = pytest.StashKey[bool]()


class ClusterFactory:
    """``make_cluster``: starts clusters under ``root``; stops every one of them at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.clusters: list[LocalCluster] = []

    def __call__(self, *, shards: int = 2, start: bool = True, **kwargs: Any) -> LocalCluster:
        data_dir = kwargs.pop("data_dir", None) or self.root / f"cluster-{len(self.clusters)}"
        cluster = LocalCluster(data_dir, shards=shards, **kwargs)
        self.clusters.append(cluster)
        if start:
            cluster.start()
        return cluster

    def stop_all(self) -> None:
        errors: list[BaseException] = []
        for cluster in reversed(self.clusters):
            try:
                cluster.stop()
            except BaseException as exc:  # stop the others regardless
                errors.append(exc)
        if errors:
            raise errors[0]


# ------------------------------------------------------------------------------ markers


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.cluster)


# The test being run, when it is not marked ``cluster``: an audit hook notes the processes it
# starts (audit hooks stay for the life of the process, so this one is added once, here).
_current: pytest.Item | None = None


def _on_audit(event: str, args: tuple[Any, ...]) -> None:
    if event in _SPAWN_EVENTS and _current is not None and not _library_lookup():
        _current.stash.setdefault(_SPAWNED, []).append(f"{event} {args[:2]!r}")


def _library_lookup() -> bool:
    """Whether ctypes.util.find_library is the caller (it runs ldconfig: not a test's process)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_globals.get("__name__") == "ctypes.util":
            return True
        frame = frame.f_back
    return False


sys.addaudithook(_on_audit)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Generator[None, object, object]:
    """Notes the processes an unmarked test starts (setup, call and teardown)."""
    global _current
    _current = None if item.get_closest_marker("cluster") else item
    try:
        return (yield)
    finally:
        _current = None


# ------------------------------------------------------------------------------ reports


def _cluster_logs(item: pytest.Item) -> str:
    """The log tails of every cluster the test used (shared or made by the factory)."""
    clusters: list[LocalCluster] = []
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, LocalCluster):
            clusters.append(value)
        elif isinstance(value, ClusterFactory):
            clusters.extend(value.clusters)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for cluster in clusters:
            cluster.print_logs()
    return out.getvalue()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    spawned = item.stash.get(_SPAWNED, [])
    if report.when == "teardown" and spawned and not report.failed:
        report.outcome = "failed"
        report.longrepr = (
            f"{item.nodeid} started processes but is not marked `cluster` (mark it with "
            "pytest.mark.cluster, or use a fixture of tests/conftest.py), so "
            f"`make test-fast` would run it: {spawned[:3]}"
        )
    if report.failed and not item.stash.get(_LOGGED, False):
        item.stash[_LOGGED] = True
        logs = _cluster_logs(item)
        if logs:
            report.sections.append(("cluster logs", logs))
    return report


# ------------------------------------------------------------------------------ guards


@pytest.fixture(autouse=True)
def no_leaked_committers() -> Iterator[None]:
    """Every WAL committer thread a test started is gone when it ends."""
    before = {t for t in threading.enumerate() if t.name.startswith("wal-committer")}
    yield
    leaked = {t for t in threading.enumerate() if t.name.startswith("wal-committer")} - before
    assert not leaked, f"WAL committer threads left running: {sorted(t.name for t in leaked)}"


# ------------------------------------------------------------------------------ processes


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of our own on a free port (no persistence)."""
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of a private redis-server, e.g. ``redis://127.0.0.1:40123/0``."""
    return redis_server.url


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[ClusterFactory]:
    """Factory of per-test clusters; all of them are stopped at teardown."""
    factory = ClusterFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture(scope="module")
def shared_cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalCluster]:
    """A started cluster for the whole module, configured by CLUSTER_SHARDS / CLUSTER_ENV."""
    factory = ClusterFactory(tmp_path_factory.mktemp("shared-cluster"))
    try:
        yield factory(
            shards=getattr(request.module, "CLUSTER_SHARDS", 2),
            env=dict(getattr(request.module, "CLUSTER_ENV", None) or {}),
        )
    finally:
        factory.stop_all()


@pytest.fixture
def space_id() -> str:
    """A memory space id no other test uses (so counts and LSNs start at 0)."""
    return f"t-{uuid.uuid4().hex[:20]}"
