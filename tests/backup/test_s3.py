"""Backups to an S3-compatible bucket (a local moto server), restored into a fresh cluster.

* a backup taken while a stream writes, uploaded in multipart parts (1 KiB parts here), holds
  exactly the observations up to its LSN and restores them, ids and LSNs equal;
* ``engram backup --all --to s3://... --stamp`` / ``engram restore --from s3://...`` with
  ``--s3-endpoint``: a location a run, every space restored;
* a corrupt, truncated or missing object is refused with an error naming it and restores
  nothing; a prefix without ``backup.json`` holds no backup;
* without boto3 the error names the extra to install.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from types import ModuleType

import pytest

from engram.control import backup_format as fmt
from engram.control import backup_store
from engram.control.backup_store import open_store
from engram.control.backups import backup_space, restore_space
from engram_client import EngramClient

ENV = {"ENGRAM_CHECKPOINT_EVERY": "500", "ENGRAM_CHECKPOINT_INTERVAL_S": "0.5"}
PART = 1024  # the multipart uploads' part size: every checkpoint file takes several

pytestmark = pytest.mark.cluster


def addresses(cluster) -> dict[int, str]:
    return {i: cluster.shard_address(i) for i in range(cluster.shards)}


async def listing(client: EngramClient, space: str) -> list[tuple[str, int]]:
    chunks = [zip(ids, lsns, strict=True) async for ids, lsns in client.list_observations(space)]
    return [pair for chunk in chunks for pair in chunk]


async def test_backup_to_s3_under_ingest_restores_into_a_new_cluster(
    make_cluster, mv: ModuleType, s3
) -> None:
    source = make_cluster(shards=2, env=ENV)
    space = "to-bucket"
    dest = open_store("s3://backups/nightly", s3_endpoint=s3.endpoint, part_bytes=PART)
    async with EngramClient(source.gateway_address) as client:
        writer = await mv.Writer(client, space, "w").start()
        await asyncio.sleep(2.0)  # a checkpoint or two, and WAL after them
        result = await backup_space(addresses(source), space, dest)
        await asyncio.sleep(0.5)  # writes go on after the backup's LSN
        await writer.stop()
        assert not writer.failed
        before = [(i, lsn) for i, lsn in await listing(client, space) if lsn <= result.lsn]
    assert len(before) == result.lsn > 0
    assert result.location == f"s3://backups/nightly/{space}/"

    objects = s3.client.list_objects_v2(Bucket="backups", Prefix=f"nightly/{space}/")["Contents"]
    sizes = {o["Key"].rsplit("/", 1)[1]: o["Size"] for o in objects}
    manifest = fmt.parse(
        s3.client.get_object(Bucket="backups", Key=f"nightly/{space}/backup.json")["Body"].read(),
        "",
    )
    assert {f.name: f.size for f in manifest.files} == {
        k: v for k, v in sizes.items() if k != "backup.json"
    }
    big = max(manifest.files, key=lambda f: f.size)
    assert big.size > PART  # so it went up in parts
    head = s3.client.head_object(Bucket="backups", Key=f"nightly/{space}/{big.name}")
    assert head["ETag"].strip('"').endswith(f"-{-(-big.size // PART)}")  # a multipart ETag

    target = make_cluster(shards=2)
    restored = await restore_space(addresses(target), dest.space(space))
    assert restored.lsn == result.lsn
    async with EngramClient(target.gateway_address) as client:
        assert await listing(client, space) == before


async def test_cli_backup_and_restore_through_s3(make_cluster, mv: ModuleType, s3) -> None:
    source = make_cluster(shards=1, env=ENV)
    async with EngramClient(source.gateway_address) as client:
        for space in ("s3-a", "s3-b"):
            writer = await mv.Writer(client, space, space, pause_s=0.0).start()
            await asyncio.sleep(0.5)
            await writer.stop()
        ids = {s: await client.list_ids(s) for s in ("s3-a", "s3-b")}

    def engram(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "engram.cli", *args],
            capture_output=True, text=True, timeout=120,
            env={**_environ(), **s3.env},
        )  # fmt: skip

    run = await asyncio.to_thread(
        engram, "backup", "--all", "--to", "s3://backups/runs", "--stamp",
        "--s3-endpoint", s3.endpoint, "--data-dir", str(source.data_dir),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("MB/s)") == 2 and "-> s3://backups/runs/" in run.stdout
    (stamp,) = {
        p["Prefix"]
        for p in s3.client.list_objects_v2(Bucket="backups", Prefix="runs/", Delimiter="/")[
            "CommonPrefixes"
        ]
    }
    target = make_cluster(shards=2)
    run = await asyncio.to_thread(
        engram, "restore", "--from", f"s3://backups/{stamp}", "--data-dir", str(target.data_dir),
        "--s3-endpoint", s3.endpoint,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "restored s3-a" in run.stdout and "restored s3-b" in run.stdout
    async with EngramClient(target.gateway_address) as client:
        for space in ("s3-a", "s3-b"):
            assert await client.list_ids(space) == ids[space]
    # the endpoint from AWS_ENDPOINT_URL, as boto3 reads it; a prefix with no backup
    run = await asyncio.to_thread(
        lambda: subprocess.run(
            [sys.executable, "-m", "engram.cli", "restore", "--from", "s3://backups/none",
             "--data-dir", str(target.data_dir)],
            capture_output=True, text=True, timeout=120,
            env={**_environ(), **s3.env, "AWS_ENDPOINT_URL": s3.endpoint},
        )
    )  # fmt: skip
    assert run.returncode == 2 and "has no backup.json" in run.stderr, run.stderr


async def test_a_corrupt_object_is_refused(make_cluster, mv: ModuleType, s3) -> None:
    source = make_cluster(shards=1, env=ENV)
    async with EngramClient(source.gateway_address) as client:
        writer = await mv.Writer(client, "src", "s").start()
        await asyncio.sleep(1.0)
        await writer.stop()
    dest = open_store("s3://backups/b", s3_endpoint=s3.endpoint, part_bytes=PART)
    await backup_space(addresses(source), "src", dest)
    target = make_cluster(shards=1)

    def key(name: str) -> str:
        return f"b/src/{name}"

    def body(name: str) -> bytes:
        return s3.client.get_object(Bucket="backups", Key=key(name))["Body"].read()

    original = {name: body(name) for name in ("manifest.json", "wal.log")}

    def put(name: str, data: bytes) -> None:
        s3.client.put_object(Bucket="backups", Key=key(name), Body=data)

    def flipped(data: bytes) -> bytes:
        out = bytearray(data)
        out[len(out) // 2] ^= 0xFF
        return bytes(out)

    cases = [
        ("manifest.json", flipped(original["manifest.json"]), "is corrupt"),
        ("wal.log", flipped(original["wal.log"]), "is corrupt"),
        ("wal.log", original["wal.log"][:-3], "truncated or altered"),
        ("wal.log", None, "is missing"),
    ]
    for name, data, why in cases:
        if data is None:
            s3.client.delete_object(Bucket="backups", Key=key(name))
        else:
            put(name, data)
        with pytest.raises(fmt.BackupError, match=why) as refused:
            await restore_space(addresses(target), dest.space("src"), space="t-src")
        assert name in str(refused.value)
        put(name, original[name])
    async with EngramClient(target.gateway_address) as client:
        assert await client.list_ids("t-src") == []
    restored = await restore_space(addresses(target), dest.space("src"), space="t-src")
    assert restored.lsn > 0  # put back, it restores


def test_without_boto3_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)  # `import boto3` raises ImportError
    with pytest.raises(fmt.BackupError, match=r"pip install '\.\[s3\]'"):
        open_store("s3://backups/x")
    assert isinstance(open_store("/tmp/x"), backup_store.DirStore)


def _environ() -> dict[str, str]:
    """This process's environment without AWS_* variables (the test gives its own)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
