"""Restarts by a launcher that lives in a busy process (as in these tests, or a benchmark).

:class:`LocalCluster` forks replacement processes from its supervisor thread inside the
process that embeds it. A ``preexec_fn`` (to set PR_SET_PDEATHSIG) would make ``subprocess``
use a plain ``fork()`` and run the process's atfork handlers, instead of vfork/exec, with two
consequences (so ``engram.launcher.procs.spawn`` sets it from a small shim in the child):

* while gRPC calls are active in the process, a share of the forked children die with SIGSEGV
  or SIGABRT before they exec (gRPC: "Other threads are currently calling into gRPC, skipping
  fork() handlers"); the supervisor then crash-loops the restart with growing backoff;
* while another thread is inside a multi-threaded OpenBLAS call (numpy matmul), the fork
  deadlocks that thread for good (OpenBLAS stops its thread pool in its atfork handler).

Each test runs its spawning in a subprocess, so a regression's crashes or deadlock stay out of
this process. They are what lets the test process launch its clusters itself (``conftest.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engram.launcher.cluster import LocalCluster

pytestmark = pytest.mark.cluster  # spawns children of its own

SPAWNS = 100


GRPC_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys, threading
    from collections import Counter
    from pathlib import Path
    import numpy as np
    from engram.launcher import procs
    from engram_client import EngramClient

    target, log, spawns = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    codes = Counter()
    done = threading.Event()

    def spawner():
        try:
            for _ in range(spawns):
                child = procs.spawn(["/bin/true"], env={}, log_path=log)
                codes[child.wait(timeout=30)] += 1
        finally:
            done.set()

    async def main():
        vecs = np.random.default_rng(1).standard_normal((2000, 32)).astype("<f4")
        async with EngramClient(target) as client:
            stream = await client.open_stream("spawn-busy")
            thread = threading.Thread(target=spawner, daemon=True)
            thread.start()
            row = 0
            while not done.is_set():  # keep gRPC busy while the other thread spawns
                await stream.send(vecs[row % 2000 : row % 2000 + 100])
                await stream.recall(vecs[row % 2000], k=3)
                row += 100
            await stream.close()
            await asyncio.to_thread(thread.join, 30)
        print(json.dumps({str(code): n for code, n in codes.items()}))

    asyncio.run(main())
    """
)


def test_children_spawned_while_grpc_is_busy_all_start(
    shared_cluster: LocalCluster, tmp_path: Path
) -> None:
    # In a process of its own: the children that crash dump their tracebacks to its stderr.
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            GRPC_SCRIPT,
            shared_cluster.gateway_address,
            str(tmp_path / "log"),
            str(SPAWNS),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:  # not the failure this test is about
        raise RuntimeError(f"the spawning script failed:\n{result.stderr[-3000:]}")
    codes = json.loads(result.stdout.strip().splitlines()[-1])
    assert sum(codes.values()) == SPAWNS
    assert codes == {"0": SPAWNS}, f"exit codes of /bin/true children: {codes}"


BLAS_SCRIPT = textwrap.dedent(
    """
    import sys, threading, time
    from pathlib import Path
    import numpy as np
    from engram.launcher import procs

    stop = threading.Event()

    def spawner():
        while not stop.is_set():
            procs.spawn(["/bin/true"], env={}, log_path=Path(sys.argv[1])).wait()

    thread = threading.Thread(target=spawner, daemon=True)
    thread.start()
    a, b = np.ones((1024, 48), np.float32), np.ones((48, 64), np.float32)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        a @ b  # multi-threaded OpenBLAS sgemm
    stop.set()
    thread.join()
    print("finished")
    """
)


def test_spawning_while_numpy_computes_does_not_deadlock(tmp_path: Path) -> None:
    try:
        result = subprocess.run(
            [sys.executable, "-c", BLAS_SCRIPT, str(tmp_path / "log")],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise AssertionError(
            "deadlock: a numpy matmul never returned while the launcher spawned"
        ) from None
    if result.returncode != 0 or "finished" not in result.stdout:  # not this test's failure
        raise RuntimeError(f"the spawning script failed:\n{result.stderr[-3000:]}")
