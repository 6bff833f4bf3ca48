"""Backups on real clusters: taken while a stream writes, restored into a fresh cluster.

* the restored space holds exactly the observations up to the backup's LSN (ids and LSNs
  equal to the source's), nothing after it, and recalls find them;
* ``engram backup`` / ``engram restore`` print progress and MB/s and exit 0;
* refusals change nothing: another dimension, a corrupt or truncated file, a missing
  ``backup.json``, a newer format, a target space that holds observations;
* a backup whose client dies holding the checkpoint is released: checkpoints resume.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from engram.control import backup_format as fmt
from engram.control.backups import backup_space, restore_space
from engram_client import EngramClient

ENV = {"ENGRAM_CHECKPOINT_EVERY": "500", "ENGRAM_CHECKPOINT_INTERVAL_S": "0.5"}


def addresses(cluster) -> dict[int, str]:
    return {i: cluster.shard_address(i) for i in range(cluster.shards)}


async def listing(client: EngramClient, space: str) -> list[tuple[str, int]]:
    chunks = [zip(ids, lsns, strict=True) async for ids, lsns in client.list_observations(space)]
    return [pair for chunk in chunks for pair in chunk]


async def test_backup_under_ingest_restores_exactly_up_to_its_lsn(
    make_cluster, mv: ModuleType, tmp_path: Path
) -> None:
    source = make_cluster(shards=2, env=ENV)
    space = "backed-up"
    async with EngramClient(source.gateway_address) as client:
        writer = await mv.Writer(client, space, "w").start()
        await asyncio.sleep(2.0)  # a checkpoint or two, and WAL after them
        result = await backup_space(addresses(source), space, tmp_path / "b")
        await asyncio.sleep(0.5)  # writes go on after the backup's LSN
        await writer.stop()
        assert not writer.failed
        before = [(i, lsn) for i, lsn in await listing(client, space) if lsn <= result.lsn]
        after = [i for i, lsn in await listing(client, space) if lsn > result.lsn]
    assert len(before) == result.lsn > 0 and after, (result.lsn, len(before), len(after))
    names = {f.name for f in fmt.parse((result.directory / "backup.json").read_bytes(), "").files}
    assert "manifest.json" in names and "wal.log" in names

    target = make_cluster(shards=2)
    restored = await restore_space(addresses(target), result.directory)
    assert restored.lsn == result.lsn
    async with EngramClient(target.gateway_address) as client:
        assert await listing(client, space) == before
        rng = np.random.default_rng(abs(hash("w")) % (1 << 32))  # the writer's first batch
        first = rng.standard_normal((mv.BATCH, mv.DIM))
        hits = await client.recall(space, first[3], k=5)
        assert hits.hits[0].id == "w-0-3"
        # the restored space takes writes: its LSNs go on from the backup's
        stream = await client.open_stream(space)
        ack = await (await stream.send(np.ones((2, mv.DIM)), ids=["new-1", "new-2"]))
        await stream.close()
        assert ack.first_lsn == result.lsn + 1


async def test_cli_backup_and_restore(make_cluster, mv: ModuleType, tmp_path: Path) -> None:
    source = make_cluster(shards=1, env=ENV)
    async with EngramClient(source.gateway_address) as client:
        for space in ("cli-a", "cli-b"):
            writer = await mv.Writer(client, space, space, pause_s=0.0).start()
            await asyncio.sleep(0.5)
            await writer.stop()
        ids = {s: await client.list_ids(s) for s in ("cli-a", "cli-b")}

    def engram(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "engram.cli", *args],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    out = tmp_path / "backups"
    run = await asyncio.to_thread(
        engram, "backup", "--all", "--to", str(out), "--data-dir", str(source.data_dir),
        "--disk-rate",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("MB/s)") == 2 and "disk copy of the same" in run.stdout
    target = make_cluster(shards=2)
    run = await asyncio.to_thread(
        engram, "restore", "--from", str(out), "--data-dir", str(target.data_dir)
    )
    assert run.returncode == 0, run.stderr
    assert "restored cli-a" in run.stdout and "restored cli-b" in run.stdout
    run = await asyncio.to_thread(
        engram, "restore", "--from", str(out / "cli-a"), "--space", "cli-a-copy",
        "--data-dir", str(target.data_dir),
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    async with EngramClient(target.gateway_address) as client:
        for space in ("cli-a", "cli-b"):
            assert await client.list_ids(space) == ids[space]
        assert await client.list_ids("cli-a-copy") == ids["cli-a"]
    run = await asyncio.to_thread(
        engram, "restore", "--from", str(out / "cli-a"), "--data-dir", str(target.data_dir)
    )
    assert run.returncode == 2 and "already holds" in run.stderr


async def test_refusals_change_nothing(make_cluster, mv: ModuleType, tmp_path: Path) -> None:
    source = make_cluster(shards=1, env=ENV)
    async with EngramClient(source.gateway_address) as client:
        writer = await mv.Writer(client, "src", "s").start()
        await asyncio.sleep(1.0)
        await writer.stop()
    good = (await backup_space(addresses(source), "src", tmp_path / "b")).directory
    target = make_cluster(shards=1)
    shards = addresses(target)

    def broken(name: str, change) -> Path:
        copy = tmp_path / name / "src"
        copy.parent.mkdir()
        shutil.copytree(good, copy)
        change(copy)
        return copy

    def flip(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    def newer(d: Path) -> None:
        doc = json.loads((d / "backup.json").read_text())
        doc["format"] = fmt.FORMAT_VERSION + 1
        (d / "backup.json").write_text(json.dumps(doc))

    def lie_about_size(d: Path) -> None:  # the size check passes, the checksum cannot
        doc = json.loads((d / "backup.json").read_text())
        entry = next(f for f in doc["files"] if f["name"] == "wal.log")
        (d / "wal.log").write_bytes((d / "wal.log").read_bytes()[:-7])
        entry["size"] -= 7
        (d / "backup.json").write_text(json.dumps(doc))

    cases = {
        "corrupt": (lambda d: flip(d / "manifest.json"), "is corrupt"),
        "corrupt-wal": (lambda d: flip(d / "wal.log"), "is corrupt"),
        "truncated": (lambda d: (d / "wal.log").write_bytes(b"\n"), "truncated"),
        "cut-record": (lie_about_size, "is corrupt"),
        "no-manifest": (lambda d: (d / "backup.json").unlink(), "has no backup.json"),
        "newer": (newer, "backup format 2"),
    }
    for name, (change, why) in cases.items():
        with pytest.raises(fmt.BackupError, match=why):
            await restore_space(shards, broken(name, change), space=f"t-{name}")
    async with EngramClient(target.gateway_address) as client:
        for name in cases:
            assert await client.list_ids(f"t-{name}") == []
        # a space of another dimension
        stream = await client.open_stream("other-dim")
        await (await stream.send(np.ones((1, mv.DIM + 1)), ids=["x"]))
        await stream.close()
    with pytest.raises(fmt.BackupError, match=f"dimension {mv.DIM + 1}"):
        await restore_space(shards, good, space="other-dim")
    restored = await restore_space(shards, good, space="fine")  # the good one still restores
    assert restored.lsn > 0


async def test_hold_released_after_the_backup_client_dies(
    make_cluster, mv: ModuleType, tmp_path: Path
) -> None:
    source = make_cluster(shards=1, env=ENV)
    space = "held"
    manifest = source.data_dir / "shard-0" / "spaces" / space / "ckpt" / "manifest.json"
    script = (
        "import asyncio, sys\n"
        "from engram.common import internal\n"
        "from engram.internal.v1 import shard_pb2 as ipb, shard_pb2_grpc\n"
        "async def main():\n"
        "    async with internal.aio_channel(sys.argv[1]) as ch:\n"
        "        r = await shard_pb2_grpc.ShardStub(ch).OpenBackup(\n"
        "            ipb.OpenBackupRequest(memory_space_id=sys.argv[2], backup_id='dies'))\n"
        "        assert not r.HasField('error'), r.error\n"
        "        print(r.lsn, flush=True)\n"
        "        await asyncio.sleep(3600)\n"
        "asyncio.run(main())\n"
    )
    async with EngramClient(source.gateway_address) as client:
        writer = await mv.Writer(client, space, "h").start()
        for _ in range(100):
            if manifest.exists():
                break
            await asyncio.sleep(0.1)
        proc = subprocess.Popen(  # noqa: ASYNC220 (started once; it prints and waits)
            [sys.executable, "-c", script, source.shard_address(0), space],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            assert proc.stdout is not None
            await asyncio.to_thread(proc.stdout.readline)  # opened: checkpoints held
        finally:
            proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()
        held_rows = json.loads(manifest.read_text())["rows"]
        await asyncio.sleep(3.0)
        assert json.loads(manifest.read_text())["rows"] == held_rows  # still held
        deadline = time.monotonic() + 90
        while json.loads(manifest.read_text())["rows"] == held_rows:
            assert time.monotonic() < deadline, "the hold of the dead backup was never released"
            await asyncio.sleep(0.5)
        await writer.stop()


async def test_deletes_before_the_backup_stay_deleted_after_the_restore(
    make_cluster, mv: ModuleType, tmp_path: Path
) -> None:
    """Deletes whose rows a checkpoint holds and deletes only the WAL holds are both in the
    backup; a delete after the backup's LSN is not (its rows come back with the backup)."""
    source = make_cluster(shards=1, env=ENV)
    space = "forgets"
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((1200, mv.DIM))
    ids = [f"r{i}" for i in range(len(vectors))]

    async def write(client: EngramClient, lo: int, hi: int) -> None:
        stream = await client.open_stream(space)
        acks = [
            await stream.send(vectors[a : a + mv.BATCH], ids=ids[a : a + mv.BATCH])
            for a in range(lo, hi, mv.BATCH)
        ]
        await asyncio.gather(*acks)
        await stream.close()

    manifest = source.data_dir / "shard-0" / "spaces" / space / "ckpt" / "manifest.json"
    async with EngramClient(source.gateway_address) as client:
        await write(client, 0, 1000)
        for _ in range(100):  # a checkpoint holds the first rows and then their deletes
            if manifest.exists():
                break
            await asyncio.sleep(0.1)
        early = set(ids[0:1000:3])
        assert (await client.delete(space, sorted(early))).deleted == len(early)
        await write(client, 1000, 1200)
        late = set(ids[1000:1200:4])  # rows and their deletes in the WAL only
        assert (await client.delete(space, sorted(late))).deleted == len(late)
        result = await backup_space(addresses(source), space, tmp_path / "b")
        after = {ids[1], ids[1001]}  # deleted after the backup's LSN
        assert (await client.delete(space, sorted(after))).deleted == 2
    assert result.lsn == len(ids)

    target = make_cluster(shards=1)
    await restore_space(addresses(target), result.directory)
    gone = early | late
    async with EngramClient(target.gateway_address) as client:
        listed = await listing(client, space)
        assert [i for i, _ in listed] == [i for i in ids if i not in gone]
        assert after <= {i for i, _ in listed}
        for row in [0, 3, 999, 1000, 1196, 1, 1001]:
            hits = await client.recall(space, vectors[row], k=5)
            found = [h.id for h in hits.hits]
            assert len(found) == 5 and not gone & set(found), (row, found)
            assert (found[0] == ids[row]) == (ids[row] not in gone), (row, found)


async def test_a_backup_whose_wal_the_checkpoint_covers_restores(
    make_cluster, mv: ModuleType, tmp_path: Path
) -> None:
    """Every row in the checkpoint, no WAL record after it: ``wal.log`` is empty, and the
    restore still takes it (an empty file is sent as one empty chunk)."""
    source = make_cluster(shards=1, env=ENV)
    space = "all-checkpointed"
    vectors = np.random.default_rng(3).standard_normal((600, mv.DIM))
    async with EngramClient(source.gateway_address) as client:
        stream = await client.open_stream(space)
        await asyncio.gather(*[await stream.send(vectors[a : a + 100]) for a in range(0, 600, 100)])
        await stream.close()
        before = await listing(client, space)
        for attempt in range(200):  # until a checkpoint covers every row and the WAL is trimmed
            result = await backup_space(addresses(source), space, tmp_path / "b" / str(attempt))
            if (result.directory / fmt.WAL_FILE).stat().st_size == 0:
                break
            await asyncio.sleep(0.2)
        assert (result.directory / fmt.WAL_FILE).stat().st_size == 0
    target = make_cluster(shards=1)
    restored = await restore_space(addresses(target), result.directory)
    assert restored.lsn == 600
    async with EngramClient(target.gateway_address) as client:
        assert await listing(client, space) == before
