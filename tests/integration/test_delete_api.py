"""Forgetting through the public API of a real cluster: the Python client's delete (unary and on
a stream), drop_space and set_retention, and the ``engram delete`` / ``drop-space`` /
``retention`` commands run as a user runs them."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import numpy as np
import pytest

from engram.forget_cli import duration_s, time_us
from engram.launcher.cluster import LocalCluster
from engram_client import EngramClient, Retention

CLUSTER_SHARDS = 1
DIM = 16


def _vectors(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def engram(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "engram.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        input=stdin,
        env={k: v for k, v in os.environ.items() if k != "ENGRAM_API_KEY"},
        check=False,
    )


async def test_a_stream_deletes_its_own_rows_and_no_recall_returns_them(
    shared_cluster: LocalCluster, space_id: str
):
    v = _vectors(100, 1)
    ids = [f"row-{i}" for i in range(100)]
    async with EngramClient(shared_cluster.gateway_address) as client:
        stream = await client.open_stream(space_id)
        acks = [await stream.send(v[i : i + 10], ids=ids[i : i + 10]) for i in range(0, 100, 10)]
        gone = ids[5:95:10]  # one row of each batch, some of them not yet acknowledged
        result = await stream.delete(ids=[*gone, "never-written"])
        assert (result.deleted, result.already_deleted, result.not_found) == (len(gone), 0, 1)
        assert all(a.done() for a in acks), "the delete was answered before earlier batches"
        assert result.lsn >= 100

        for row in (5, 55, 85):  # a deleted row's own vector: it would be the nearest
            hits = await stream.recall(v[row], k=5, consistency="STRONG")
            assert ids[row] not in [h.id for h in hits.hits]
            assert len(hits.hits) == 5  # k results still come back
        again = await client.delete(space_id, gone[:3])
        assert (again.deleted, again.already_deleted) == (0, 3)
        await stream.close()
        listed = await client.list_ids(space_id)
    assert sorted(listed) == sorted(set(ids) - set(gone))


async def test_delete_by_time_range_then_drop_and_start_empty(
    shared_cluster: LocalCluster, space_id: str
):
    t0 = 1_767_225_600_000_000  # 2026-01-01
    async with EngramClient(shared_cluster.gateway_address) as client:
        stream = await client.open_stream(space_id)
        times = [t0 + i * 1_000_000 for i in range(10)]
        await (
            await stream.send(
                _vectors(10, 2), ids=[f"t{i}" for i in range(10)], timestamps_us=times
            )
        )
        await stream.close()
        result = await client.delete(space_id, since_us=t0 + 2_000_000, until_us=t0 + 5_000_000)
        assert result.deleted == 3
        assert await client.list_ids(space_id) == ["t0", "t1", "t5", "t6", "t7", "t8", "t9"]

        assert await client.set_retention(space_id, max_rows=1_000) == Retention(0, 1_000)
        assert await client.set_retention(space_id) == Retention(0, 0)
        assert await client.drop_space(space_id) == 7
        assert await client.drop_space(space_id) == 0
        stream = await client.open_stream(space_id)  # a new session on the name: empty
        assert stream.dim == 0
        await (await stream.send(_vectors(1, 3), ids=["fresh"]))
        await stream.close()
        assert await client.list_ids(space_id) == ["fresh"]


async def test_the_commands(shared_cluster: LocalCluster, space_id: str):
    target = ["--target", shared_cluster.gateway_address]
    async with EngramClient(shared_cluster.gateway_address) as client:
        stream = await client.open_stream(space_id)
        await (await stream.send(_vectors(4, 4), ids=["a", "b", "c", "d"]))
        await stream.close()

    done = engram("delete", *target, "--space", space_id, "--id", "a", "b", "--id", "zz")
    assert done.returncode == 0, done.stderr
    assert f"deleted 2 observations from {space_id}" in done.stdout
    assert "not found 1" in done.stdout

    done = engram("retention", *target, "--space", space_id, "--max-age", "30d")
    assert done.returncode == 0, done.stderr
    assert f"at most {30 * 86_400} s old" in done.stdout

    refused = engram("drop-space", *target, space_id, stdin="")  # no terminal, no --yes
    assert refused.returncode == 1 and "add --yes" in refused.stderr
    done = engram("drop-space", *target, space_id, "--yes")
    assert done.returncode == 0, done.stderr
    assert f"dropped {space_id} and its 2 observations" in done.stdout

    bad = engram("delete", *target, "--space", space_id)
    assert bad.returncode == 2 and "name what to delete" in bad.stderr


def test_durations_and_times_of_the_commands():
    assert [duration_s(t) for t in ("30d", "12h", "90m", "45s", "2w", "3600")] == [
        2_592_000,
        43_200,
        5_400,
        45,
        1_209_600,
        3_600,
    ]
    for bad in ("0d", "30x", "-1h", ""):
        with pytest.raises(argparse.ArgumentTypeError):
            duration_s(bad)
    assert time_us("2026-01-01T00:00:00Z") == 1_767_225_600_000_000
    assert time_us("2026-01-01T01:00:00+01:00") == 1_767_225_600_000_000
    assert time_us("1767225600000000") == 1_767_225_600_000_000
    with pytest.raises(argparse.ArgumentTypeError):
        time_us("yesterday")
