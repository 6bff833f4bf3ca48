"""Fixtures shared by every suite: private Redis servers and local clusters.

Each fixture starts its processes on free ports under the test's ``tmp_path`` and always stops
them at teardown, whether the test passed or not; when a test fails, the tails of the cluster's
logs are printed with its report.

* ``redis_server`` / ``redis_url``: a private redis-server.
* ``make_cluster(shards=2, **kwargs)``: starts a :class:`LocalCluster` (keyword arguments go to
  its constructor; ``data_dir=`` reuses a stopped cluster's directory, ``start=False`` returns
  it unstarted). Every cluster it made is stopped at teardown.
* ``cluster``: one started cluster; parametrize it indirectly to pass arguments::

      @pytest.mark.parametrize("cluster", [{"shards": 3}], indirect=True)
      def test_three(cluster): ...
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from engram.launcher.cluster import LocalCluster
from engram.launcher.redis_server import RedisServer

ClusterFactory = Callable[..., LocalCluster]

_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    item.stash.setdefault(_REPORTS, {})[report.when] = report
    return report


def _failed(node: pytest.Item) -> bool:
    return any(r.failed for r in node.stash.get(_REPORTS, {}).values())


@pytest.fixture
def no_leaked_committers() -> Iterator[None]:
    """Every WAL committer thread a test started is gone when it ends (the suites that run
    spaces in-process use it on every test)."""
    before = {t for t in threading.enumerate() if t.name.startswith("wal-committer")}
    yield
    leaked = {t for t in threading.enumerate() if t.name.startswith("wal-committer")} - before
    assert not leaked, f"WAL committer threads left running: {sorted(t.name for t in leaked)}"


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
def make_cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ClusterFactory]:
    """Factory of local clusters; all of them are stopped at teardown."""
    clusters: list[LocalCluster] = []

    def make(*, shards: int = 2, start: bool = True, **kwargs: Any) -> LocalCluster:
        data_dir = kwargs.pop("data_dir", None) or tmp_path / f"cluster-{len(clusters)}"
        cluster = LocalCluster(data_dir, shards=shards, **kwargs)
        clusters.append(cluster)
        if start:
            cluster.start()
        return cluster

    try:
        yield make
    finally:
        failed = _failed(request.node)
        errors: list[BaseException] = []
        for cluster in reversed(clusters):
            if failed:
                cluster.print_logs()
            try:
                cluster.stop()
            except BaseException as e:  # stop the others regardless
                errors.append(e)
        if errors:
            raise errors[0]


@pytest.fixture
def cluster(request: pytest.FixtureRequest, make_cluster: ClusterFactory) -> LocalCluster:
    """A started two-shard cluster (or as parametrized, indirectly, with a dict of arguments)."""
    params: dict[str, Any] = dict(getattr(request, "param", None) or {})
    return make_cluster(**params)
