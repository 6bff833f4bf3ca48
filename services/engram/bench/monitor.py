"""Once-a-second samples of the cluster while the benchmark runs.

* RSS and CPU of every process by PID (psutil): the cluster's (from :class:`LocalCluster` or a
  ``cluster.json``) and the benchmark's own, as a rate (``cpu_pct``) and as the process's
  cumulative user + system seconds (``cpu_s``, which :mod:`.cost` divides by work done);
* CPU seconds of every thread of those processes, summed by thread name (the shard and gateway
  name their threads), so a report can say where the CPU went;
* every shard's ``engram.internal.v1.Shard/Stats``: per space, visible and indexed rows, from
  which the un-indexed backlog follows.

Samples are appended to lists the orchestrator reads; nothing here raises for a process that
is gone or a shard that does not answer (the sample records it).
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import grpc
import psutil

from engram.common import internal
from engram.common.settings import SecuritySettings
from engram.internal.v1 import shard_pb2, shard_pb2_grpc


@dataclass
class Sample:
    t: float
    procs: dict[str, dict[str, float]]  # name -> {"rss_mb", "cpu_pct", "cpu_s"}
    shards: dict[int, dict[str, Any]]  # shard id -> {"spaces": {name: {count, indexed}}}
    system_cpu_pct: float = 0.0  # whole machine, 100 = one core busy
    threads: dict[str, dict[str, float]] = field(default_factory=dict)  # name -> CPU s by thread

    def other_cpu_pct(self) -> float:
        """CPU used by processes that are not part of the benchmark or the cluster."""
        return max(0.0, self.system_cpu_pct - sum(p["cpu_pct"] for p in self.procs.values()))

    def backlog(self) -> int | None:
        if not self.shards or any("spaces" not in s for s in self.shards.values()):
            return None
        return sum(
            sp["count"] - sp["indexed"] for s in self.shards.values() for sp in s["spaces"].values()
        )

    def rows(self) -> int | None:
        if not self.shards or any("spaces" not in s for s in self.shards.values()):
            return None
        return sum(sp["count"] for s in self.shards.values() for sp in s["spaces"].values())


_NUMBERED = re.compile(r"[_-]?\d+$")


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of each thread of ``pid`` so far, summed by thread name, with
    a trailing number folded (``recall_0`` and ``recall_1`` count as ``recall``). Threads that
    ended are not counted; empty if the process is gone."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:
            continue  # the thread ended
        name = _NUMBERED.sub("", stat[stat.index("(") + 1 : stat.rindex(")")]) or "?"
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def shard_stats(channel: grpc.Channel, timeout: float = 2.0) -> dict[str, Any]:
    try:
        reply = shard_pb2_grpc.ShardStub(channel).Stats(shard_pb2.StatsRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        return {"error": str(exc.code()) if isinstance(exc, grpc.Call) else str(exc)}
    return {
        "spaces": {
            s.memory_space_id: {"count": int(s.count), "indexed": int(s.indexed)}
            for s in reply.spaces
        }
    }


@dataclass
class Monitor:
    """Samples ``pids`` (name -> pid) and ``shards`` (shard id -> gRPC address)."""

    pids: dict[str, int]
    shards: dict[int, str]
    interval_s: float = 1.0
    samples: list[Sample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _procs: dict[str, psutil.Process] = field(default_factory=dict)
    _cpu: dict[str, tuple[float, float]] = field(default_factory=dict)
    _channels: dict[int, grpc.Channel] = field(default_factory=dict)
    # How to reach the shards (the cluster's token and mTLS; None: this process's settings).
    security: SecuritySettings | None = None

    def add(self, name: str, pid: int) -> None:
        self.pids[name] = pid

    def start(self) -> Monitor:
        self._channels = {
            i: internal.sync_channel(a, security=self.security) for i, a in self.shards.items()
        }
        self._thread = threading.Thread(target=self._run, name="bench-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for ch in self._channels.values():
            ch.close()

    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def sample_now(self) -> Sample:
        """One sample, taken synchronously (also used outside the thread)."""
        t = time.monotonic()
        pids = dict(self.pids)  # one copy: add() may run on another thread meanwhile
        procs: dict[str, dict[str, float]] = {}
        for name, pid in pids.items():
            try:
                proc = self._procs.get(name)
                if proc is None or proc.pid != pid:
                    proc = self._procs[name] = psutil.Process(pid)
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    cpu = proc.cpu_times()
                total = cpu.user + cpu.system
                prev = self._cpu.get(name)
                self._cpu[name] = (t, total)
                pct = 100.0 * (total - prev[1]) / (t - prev[0]) if prev and t > prev[0] else 0.0
                procs[name] = {
                    "rss_mb": round(rss / 1e6, 1),
                    "cpu_pct": round(pct, 1),
                    "cpu_s": round(total, 3),
                }
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                procs[name] = {"rss_mb": 0.0, "cpu_pct": 0.0, "gone": 1.0}
        threads = {name: thread_cpu_seconds(pid) for name, pid in pids.items()}
        shards = {i: shard_stats(ch) for i, ch in self._channels.items()}
        system = psutil.cpu_percent(interval=None) * (psutil.cpu_count() or 1)
        return Sample(t, procs, shards, round(system, 1), threads)

    def _run(self) -> None:
        next_t = time.monotonic()
        while not self._stop.is_set():
            self.samples.append(self.sample_now())
            next_t += self.interval_s
            self._stop.wait(max(0.0, next_t - time.monotonic()))
