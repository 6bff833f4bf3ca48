"""Plumbing every process shares: OS thread names, event-loop lag, settings, shard channels."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import grpc
import pytest

from engram.common import metrics
from engram.common.looplag import watch
from engram.common.settings import SettingsError, load
from engram.common.threads import name_os_thread
from engram.control.store import ControlStore
from engram.gateway.router import Router
from engram.internal.v1 import shard_pb2 as ipb
from engram.internal.v1 import shard_pb2_grpc


def _os_name(native_id: int) -> str:
    return Path(f"/proc/self/task/{native_id}/comm").read_text().strip()


def test_a_thread_is_named_at_the_os_level_by_its_python_name() -> None:
    seen: list[str] = []

    def body() -> None:
        name_os_thread()
        seen.append(_os_name(threading.get_native_id()))

    t = threading.Thread(target=body, name="fresh-partitioner")
    t.start()
    t.join()
    assert seen == ["fresh-partition"]  # Linux keeps 15 bytes of "fresh-partitioner"


def test_os_thread_names_are_cut_to_fifteen_bytes() -> None:
    seen: list[str] = []

    def body() -> None:
        name_os_thread("wal-committer:a-very-long-space-name")
        seen.append(_os_name(threading.get_native_id()))

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == ["wal-committer:a"]


def _lag_count() -> float:
    for family in metrics.event_loop_lag.collect():
        for sample in family.samples:
            if sample.name.endswith("_count"):
                return sample.value
    raise AssertionError("engram_event_loop_lag_seconds has no count")


def test_event_loop_lag_is_measured_and_a_blocked_loop_shows_up() -> None:
    before = _lag_count()

    async def main() -> None:
        task = asyncio.create_task(watch())
        await asyncio.sleep(0.1)
        threading.Event().wait(0.2)  # block the loop, as a long synchronous step would
        await asyncio.sleep(0.1)
        task.cancel()

    asyncio.run(main())
    assert _lag_count() - before >= 3
    slow = [
        s.value
        for f in metrics.event_loop_lag.collect()
        for s in f.samples
        if s.name.endswith("_bucket") and s.labels["le"] == "0.1"
    ]
    total = _lag_count()
    assert slow and slow[0] < total  # at least one lag fell above 100 ms


def _slow_synchronous_step() -> None:
    time.sleep(0.3)  # holds the loop, as a long synchronous step would


def test_a_stalled_loop_is_caught_while_stalled_and_the_blocking_step_named(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        task = asyncio.create_task(watch(stall_ms=50))
        await asyncio.sleep(0.1)
        _slow_synchronous_step()
        await asyncio.sleep(0.05)
        task.cancel()

    with caplog.at_level(logging.WARNING, logger="engram.looplag"):
        asyncio.run(main())
    stalls = [r.getMessage() for r in caplog.records if "late" in r.getMessage()]
    assert len(stalls) == 1, stalls
    assert "--- event loop" in stalls[0]
    assert "_slow_synchronous_step" in stalls[0]


def test_a_loop_that_keeps_up_logs_no_stall(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        task = asyncio.create_task(watch(stall_ms=1000))
        await asyncio.sleep(0.3)
        task.cancel()

    with caplog.at_level(logging.WARNING, logger="engram.looplag"):
        asyncio.run(main())
    assert not [r for r in caplog.records if "late" in r.getMessage()]


def test_the_watchdog_thread_is_named_at_the_os_level() -> None:
    names: list[str] = []

    async def main() -> None:
        task = asyncio.create_task(watch(stall_ms=1000))
        await asyncio.sleep(0.1)
        names.extend(_os_name(t.native_id) for t in threading.enumerate() if t.native_id)
        task.cancel()

    asyncio.run(main())
    assert "loop-watchdog" in names


def test_stall_traces_are_on_by_default_and_can_be_turned_off() -> None:
    assert load({}).loop_stall_trace_ms == 250.0
    assert load({"ENGRAM_LOOP_STALL_TRACE_MS": "0"}).loop_stall_trace_ms == 0.0
    with pytest.raises(SettingsError, match="ENGRAM_LOOP_STALL_TRACE_MS"):
        load({"ENGRAM_LOOP_STALL_TRACE_MS": "-1"})


def test_huge_pages_are_off_unless_asked_for() -> None:
    assert load({}).shard.huge_pages is False
    assert load({"ENGRAM_HUGE_PAGES": "1"}).shard.huge_pages is True
    with pytest.raises(SettingsError, match="ENGRAM_HUGE_PAGES"):
        load({"ENGRAM_HUGE_PAGES": "yes"})


class _PeerRecorder(shard_pb2_grpc.ShardServicer):
    """A shard that only answers Stats, noting the client address of each call."""

    def __init__(self) -> None:
        self.peers: list[str] = []

    async def Stats(self, request, context):  # type: ignore[no-untyped-def]  # noqa: N802
        self.peers.append(context.peer())
        return ipb.StatsResponse()


def test_reads_and_writes_reach_a_shard_on_separate_connections(redis_url: str) -> None:
    async def main() -> None:
        recorder = _PeerRecorder()
        server = grpc.aio.server()
        shard_pb2_grpc.add_ShardServicer_to_server(recorder, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        store = ControlStore(redis_url, "plumbing", shard_count=1)
        await store.heartbeat(0, f"127.0.0.1:{port}", ttl_s=30)
        router = Router(load({"ENGRAM_SHARD_COUNT": "1"}), store)
        await router.refresh()
        try:
            for space, reads in [("a", False), ("b", False), ("a", True), ("b", True)]:
                _, stub = await router.stub(space, reads=reads)
                await stub.Stats(ipb.StatsRequest(), timeout=5)
        finally:
            await router.close()
            await store.close()
            await server.stop(None)
        writes, reads = recorder.peers[:2], recorder.peers[2:]
        assert len(set(writes)) == 1 and len(set(reads)) == 1  # one connection each...
        assert set(writes) != set(reads)  # ...and not the same one

    asyncio.run(main())
