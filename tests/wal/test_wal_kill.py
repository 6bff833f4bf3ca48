"""Crash test of engram.shard.wal: SIGKILL a process that appends, then replay.

Every record whose append was acknowledged before the kill must come back, and what comes
back must be a gap-free prefix of what was appended.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import engram
from engram.shard.wal import Wal

pytestmark = pytest.mark.cluster  # a child process writes the WAL and is killed

# Payload of record ``lsn`` (sizes from empty to 400 KB); the child uses the same formula.
SIZE_EXPR = "(lsn * 7919) % 5 and ((lsn * 104729) % 400_000)"


def payload(lsn: int) -> bytes:
    size = (lsn * 7919) % 5 and ((lsn * 104729) % 400_000)
    return (lsn.to_bytes(8, "little") * (size // 8 + 1))[:size]


CHILD = f"""
import asyncio, sys
from engram.shard.wal import Wal

def payload(lsn):
    size = {SIZE_EXPR}
    return (lsn.to_bytes(8, "little") * (size // 8 + 1))[:size]

async def main():
    wal = Wal(sys.argv[1], segment_bytes=1 << 20)
    last = 0
    for last, _ in wal.replay():
        pass
    wal.start()
    slots = asyncio.Semaphore(8)

    async def one(lsn):
        try:
            await wal.append(payload(lsn), lsn)
        finally:
            slots.release()
        sys.stdout.write(f"{{lsn}}\\n")
        sys.stdout.flush()

    tasks = set()
    lsn = last
    print("ready", flush=True)
    while True:
        await slots.acquire()
        lsn += 1
        task = asyncio.ensure_future(one(lsn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

asyncio.run(main())
"""


def run_and_kill(directory: Path, delay: float) -> list[int]:
    """Runs the appending child, SIGKILLs it ``delay`` s after it is ready; returns the acks."""
    env = dict(os.environ)
    services = str(Path(engram.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [services, env.get("PYTHONPATH")]))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert child.stdout is not None
        if child.stdout.readline() != b"ready\n":
            child.kill()
            pytest.fail(f"the child did not start: {child.communicate(timeout=10)[1]!r}")
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        out, err = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
        child.wait()
        for stream in (child.stdout, child.stderr):
            if stream is not None:
                stream.close()
    assert child.returncode == -signal.SIGKILL, err
    lines = out.decode().split("\n")
    return [int(line) for line in lines[:-1]]  # the last line may be cut short


@pytest.mark.parametrize("delay", [0.3, 0.5, 0.7])
async def test_acked_records_survive_sigkill(tmp_path: Path, delay: float) -> None:
    acked = await asyncio.to_thread(run_and_kill, tmp_path, delay)
    assert len(acked) > 10, "the child acknowledged too few records to test anything"

    wal = Wal(tmp_path, segment_bytes=1 << 20)
    replayed = [(lsn, bytes(data)) for lsn, data in wal.replay()]
    lsns = [lsn for lsn, _ in replayed]
    assert lsns == list(range(1, len(lsns) + 1)), "replay is not a gap-free prefix"
    assert max(acked) <= len(lsns), "an acknowledged record was lost"
    assert all(data == payload(lsn) for lsn, data in replayed)

    # The repaired WAL takes appends, and a second crash run continues after it.
    wal.start()
    await wal.append(payload(len(lsns) + 1), len(lsns) + 1)
    await wal.close()
    acked = await asyncio.to_thread(run_and_kill, tmp_path, 0.2)
    lsns = [lsn for lsn, _ in Wal(tmp_path).replay()]
    assert lsns == list(range(1, len(lsns) + 1))
    assert max(acked, default=0) <= len(lsns)
