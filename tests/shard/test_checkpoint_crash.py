"""Crashes in the middle of a checkpoint of engram.shard.space.Space.

A checkpoint writes metadata chunks, the index and last the manifest (each to a temporary name,
fsynced and renamed), then drops the old index and the WAL segments it covers. A crash between
any two of these steps must leave a directory from which every acknowledged observation comes
back exactly once; files no manifest names are removed at the next start.

Crashes are simulated in process by making a step of engram.shard.checkpoint raise (and then
dropping the space), and for real by SIGKILLing a child process that appends and checkpoints.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

import engram
from engram.common.settings import IndexSettings, LimitSettings, WalSettings
from engram.shard import checkpoint as ckpt
from engram.shard.space import Space

SMALL_SEGMENTS = WalSettings(segment_bytes=8 * 1024)
FAST_INDEX = IndexSettings(m=8, ef_construction=40, build_threads=1)


class Crash(Exception):
    """Stands for the process dying at this point."""


async def _fill(space: Any, ledger: Any, rounds: int, n: int = 7) -> None:
    for _ in range(rounds):
        pending = [ledger.batch(sid, ledger.next_seq(sid), n) for sid in ("a", "b")]
        futs = [space.begin_append(p.sid, p.seq, p.batch) for p in pending]
        for p, result in zip(pending, await asyncio.gather(*futs), strict=True):
            ledger.record(p, result)


async def _setup(harness: Any, ledger: Any) -> Space:
    space = harness.space(wal=SMALL_SEGMENTS, index=FAST_INDEX)
    for sid in ("a", "b"):
        await space.open_session(sid, create=True)
        ledger.open(sid)
    await _fill(space, ledger, 12)
    return space


def _referenced(space: Space) -> set[str]:
    manifest = ckpt.read_manifest(space.directory / "ckpt")
    if manifest is None:
        return set()
    return {ckpt.MANIFEST, manifest.index_file, *manifest.meta_files}


def _crashing_write_atomic(prefix: str, stage: str) -> Callable[..., None]:
    """A write_atomic that dies at ``stage`` for files named ``prefix*``."""
    real = ckpt.write_atomic

    def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
        if not path.name.startswith(prefix):
            return real(path, write)
        if stage == "before":
            raise Crash(f"before {path.name}")
        if stage == "tmp-written":
            write(path.with_name(path.name + ".tmp"))
            raise Crash(f"{path.name}.tmp written, not renamed")
        real(path, write)
        raise Crash(f"{path.name} renamed, later steps not done")

    return write_atomic


STAGES = ["before", "tmp-written", "renamed"]
FILES = ["meta-", "hnsw-", "manifest.json"]


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("file", FILES)
@pytest.mark.parametrize("earlier_checkpoint", [False, True], ids=["first", "second"])
async def test_crash_at_each_checkpoint_step(
    harness: Any,
    ledger: Any,
    kit: ModuleType,
    monkeypatch: pytest.MonkeyPatch,
    file: str,
    stage: str,
    earlier_checkpoint: bool,
) -> None:
    space = await _setup(harness, ledger)
    if earlier_checkpoint:
        space.index_step(40)  # ends inside a batch
        await asyncio.to_thread(space.checkpoint)
        await _fill(space, ledger, 6)
    before = space.checkpoint_rows
    space.index_step(61)  # ends inside a batch too
    indexed = space.hnsw.covered
    await _fill(space, ledger, 2)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "write_atomic", _crashing_write_atomic(file, stage))
        with pytest.raises(Crash):
            await asyncio.to_thread(space.checkpoint)
    leftovers = set(kit.ckpt_files(space)) - _referenced(space)
    if stage != "before" and not (file == "manifest.json" and stage == "renamed"):
        assert leftovers, "the simulated crash left no file behind: it tests nothing"

    space = await harness.restart(space)  # the crashed process is gone; a new one recovers
    ledger.check(space)
    assert set(kit.ckpt_files(space)) == _referenced(space), "unreferenced files were kept"
    assert not any(name.endswith(".tmp") for name in kit.ckpt_files(space))
    manifest_written = file == "manifest.json" and stage == "renamed"
    assert space.checkpoint_rows == (indexed if manifest_written else before)

    # The space carries on: more batches, a whole checkpoint, another restart.
    await _fill(space, ledger, 3)
    space.index_step(100_000)
    assert await asyncio.to_thread(space.checkpoint) == space.visible
    await _fill(space, ledger, 1)
    space = await harness.restart(space)
    ledger.check(space)
    assert set(kit.ckpt_files(space)) == _referenced(space)


@pytest.mark.parametrize("step", ["write_meta", "write_manifest"])
async def test_crash_in_checkpoint_functions(
    harness: Any, ledger: Any, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    space = await _setup(harness, ledger)
    space.index_step(30)
    await asyncio.to_thread(space.checkpoint)
    await _fill(space, ledger, 3)
    space.index_step(1000)

    def crash(*args: object, **kwargs: object) -> None:
        raise Crash(step)

    with monkeypatch.context() as patch:
        patch.setattr(ckpt, step, crash)
        with pytest.raises(Crash):
            await asyncio.to_thread(space.checkpoint)
    space = await harness.restart(space)
    assert space.checkpoint_rows == 30
    ledger.check(space)


async def test_crash_before_wal_trim(harness: Any, ledger: Any, kit: ModuleType) -> None:
    """Manifest written, old index and WAL not yet deleted: rows must not come back twice."""
    space = await _setup(harness, ledger)
    space.index_step(50)
    await asyncio.to_thread(space.checkpoint)
    await _fill(space, ledger, 4)
    space.index_step(1000)
    segments = kit.wal_files(space)

    def crash(*args: object) -> int:
        raise Crash("before WAL trim")

    space.wal.delete_through = crash  # type: ignore[method-assign]
    with pytest.raises(Crash):
        await asyncio.to_thread(space.checkpoint)
    assert set(segments) <= set(kit.wal_files(space))
    space = await harness.restart(space)
    assert space.checkpoint_rows == space.visible
    ledger.check(space)


async def test_failed_checkpoint_leaves_the_space_serving(
    harness: Any, ledger: Any, kit: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like the builder: a checkpoint that fails (disk full) is logged and retried later."""
    space = await _setup(harness, ledger)
    space.index_step(1000)
    with monkeypatch.context() as patch:
        patch.setattr(ckpt, "write_atomic", _crashing_write_atomic("hnsw-", "tmp-written"))
        with pytest.raises(Crash):
            await asyncio.to_thread(space.checkpoint)
    await _fill(space, ledger, 3)
    ledger.check(space)
    space.index_step(1000)
    assert await asyncio.to_thread(space.checkpoint) == space.visible
    space = await harness.restart(space)
    ledger.check(space)
    assert set(kit.ckpt_files(space)) == _referenced(space)


@pytest.mark.parametrize("with_manifest", [False, True])
async def test_leftover_files_are_removed(
    harness: Any, ledger: Any, kit: ModuleType, with_manifest: bool
) -> None:
    space = await _setup(harness, ledger)
    if with_manifest:
        space.index_step(33)
        await asyncio.to_thread(space.checkpoint)
        await _fill(space, ledger, 2)
    ckpt_dir = space.directory / "ckpt"
    junk = {
        "hnsw-000000099999.bin": os.urandom(4096),
        "hnsw-000000000033.bin.tmp": os.urandom(100),
        "meta-000000000000-000000099999.pb": os.urandom(300),
        "meta-000000000033-000000000050.pb.tmp": b"",
        "manifest.json.tmp": b'{"rows": 99999, "dim": 16, "index_fi',
    }
    kept = set(kit.ckpt_files(space))
    for name, data in junk.items():
        (ckpt_dir / name).write_bytes(data)

    space = await harness.restart(space)
    assert set(kit.ckpt_files(space)) == kept
    assert kept == _referenced(space) or not with_manifest
    ledger.check(space)


# ------------------------------------------------------------------------------ kill -9

DIM = 12
SESSIONS = ("a", "b")

CHILD = f"""
import asyncio, random, sys, threading, time
from collections import deque
from pathlib import Path
import numpy as np
from engram.common.settings import IndexSettings, LimitSettings, WalSettings
from engram.shard.space import Space
from engram.v1 import streaming_pb2 as pb

DIM = {DIM}

def rows(sid, seq):
    return 1 + (seq * 7 + ord(sid) * 3) % 23

def vectors(sid, seq):
    rng = np.random.default_rng([ord(sid), seq])
    return rng.standard_normal((rows(sid, seq), DIM)).astype("<f4")

async def main():
    directory, seed = Path(sys.argv[1]), int(sys.argv[2])
    space = Space(
        "kill", directory,
        wal=WalSettings(segment_bytes=32 << 10),
        index=IndexSettings(m=8, ef_construction=40, build_threads=1),
        limits=LimitSettings(),
    )
    space.recover()
    space.start(asyncio.get_running_loop())
    marks = {{sid: await space.open_session(sid, True) for sid in {SESSIONS!r}}}
    stop = threading.Event()

    def builder():
        r = random.Random(seed)
        while not stop.is_set():
            space.index_step(r.randint(1, 200))
            if space.hnsw is not None and r.random() < 0.3:
                space.checkpoint()
            time.sleep(0.001)

    threading.Thread(target=builder, daemon=True).start()
    print("ready", flush=True)

    async def writer(sid):
        seq = marks[sid]
        inflight = deque()
        while True:
            seq += 1
            batch = pb.ObservationBatch(dim=DIM, vectors=vectors(sid, seq).tobytes())
            inflight.append((seq, space.begin_append(sid, seq, batch)))
            if len(inflight) >= 3:
                s, fut = inflight.popleft()
                r = await fut
                assert not r.duplicate and r.sequence_number == s
                sys.stdout.write(f"{{sid}} {{s}} {{r.count}}\\n")
                sys.stdout.flush()

    await asyncio.gather(*(writer(sid) for sid in {SESSIONS!r}))

asyncio.run(main())
"""


def _rows(sid: str, seq: int) -> int:
    return 1 + (seq * 7 + ord(sid) * 3) % 23


def _vectors(sid: str, seq: int) -> np.ndarray:
    rng = np.random.default_rng([ord(sid), seq])
    return rng.standard_normal((_rows(sid, seq), DIM)).astype("<f4")


def _run_and_kill(
    directory: Path, out: Path, seed: int, delay: float
) -> list[tuple[str, int, int]]:
    """Runs the child until ``delay`` s after it is ready, SIGKILLs it; returns its acks."""
    env = dict(os.environ)
    services = str(Path(engram.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [services, env.get("PYTHONPATH")]))
    with open(out, "wb") as stdout, open(out.with_suffix(".err"), "wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(directory), str(seed)],
            stdout=stdout,
            stderr=stderr,
            env=env,
        )
    try:
        deadline = time.monotonic() + 30
        while not out.read_bytes().startswith(b"ready\n"):
            if child.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the child did not start: {out.with_suffix('.err').read_text()}")
            time.sleep(0.01)
        time.sleep(delay)
        assert child.poll() is None, out.with_suffix(".err").read_text()
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL, out.with_suffix(".err").read_text()
    acks = []
    for line in out.read_text().split("\n")[1:-1]:  # the last line may be cut short
        sid, seq, count = line.split()
        acks.append((sid, int(seq), int(count)))
    return acks


def _verify(directory: Path, acks: list[tuple[str, int, int]], kit: ModuleType) -> int:
    """Recovers the space and checks every acked batch is there exactly once; returns rows."""
    space = Space(
        "kill",
        directory,
        wal=WalSettings(segment_bytes=32 << 10),
        index=IndexSettings(m=8, ef_construction=40, build_threads=1),
        limits=LimitSettings(),
    )
    space.recover()  # not started: no committer thread
    ids = kit.all_ids(space)
    assert len(ids) == len(set(ids)), "an observation is stored twice"
    assert space.visible == len(ids)
    marks = {sid: space.session_mark(sid) for sid in SESSIONS}
    for sid, seq, count in acks:
        assert marks[sid] is not None and seq <= marks[sid], f"acked batch {sid}/{seq} was lost"
        assert count == _rows(sid, seq)
    expected_vectors = np.empty((space.visible, DIM), np.float32)
    for sid in SESSIONS:
        mark = marks[sid] or 0
        expected = [
            f"{sid}/{seq}/{i}" for seq in range(1, mark + 1) for i in range(_rows(sid, seq))
        ]
        rows = [row for row, i in enumerate(ids) if i.startswith(f"{sid}/")]
        assert [ids[row] for row in rows] == expected, f"session {sid}: lost, torn or reordered"
        if expected:
            vectors = np.concatenate([_vectors(sid, seq) for seq in range(1, mark + 1)])
            expected_vectors[rows] = kit.normalise(vectors)
    np.testing.assert_allclose(kit.stored_vectors(space), expected_vectors, atol=1e-6)
    ckpt_dir = directory / "ckpt"
    manifest = ckpt.read_manifest(ckpt_dir)
    names = {p.name for p in ckpt_dir.iterdir()}
    if manifest is not None:
        assert names == {ckpt.MANIFEST, manifest.index_file, *manifest.meta_files}
        assert space.checkpoint_rows == manifest.rows
    else:
        assert names == set()
    return space.visible


@pytest.mark.cluster  # a child process runs the space and is killed
async def test_sigkill_while_appending_and_checkpointing(tmp_path: Path, kit: ModuleType) -> None:
    directory = tmp_path / "space"
    rnd = random.Random(20240611)
    total_acks = 0
    checkpointed = 0
    for round_ in range(5):
        delay = rnd.uniform(0.3, 1.0)
        out = tmp_path / f"child-{round_}.out"
        acks = await asyncio.to_thread(_run_and_kill, directory, out, rnd.randrange(1 << 30), delay)
        total_acks += len(acks)
        rows = await asyncio.to_thread(_verify, directory, acks, kit)
        manifest = ckpt.read_manifest(directory / "ckpt")
        checkpointed = max(checkpointed, manifest.rows if manifest else 0)
        assert rows >= sum(count for _, _, count in acks)
    assert total_acks > 50, "the children acknowledged too little to test anything"
    assert checkpointed > 0, "no checkpoint was ever written: the kill test tests nothing"
