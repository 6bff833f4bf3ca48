"""One chaos run: a local cluster behind fault proxies, the workload, the faults, the verdict.

:func:`run` starts Redis, the shards and the gateway with :class:`LocalCluster` (each shard
advertises a :class:`~engram.chaos.proxy.FaultProxy` in front of it, so gateway->shard traffic
can be delayed, reset or cut; each shard polls its own WAL fault file), drives the workload
for ``seconds`` (writes, deletes by id of a share of what was acknowledged, recalls),
injects one fault after another on a schedule drawn from the seed (every kind
once per round, in shuffled order, with random targets and durations), then stops the writers,
waits for their last acks, reads every space back and builds the report. The cluster, the
proxies and every fault are undone in all cases, also when the run is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from engram.chaos import report as reporting
from engram.chaos.checkers import ContinuousChecker, Findings, analyse, deleted_rows, read_space
from engram.chaos.config import CLUSTER_ENV, SUPERVISOR_POLICY, ChaosConfig
from engram.chaos.deletes import Deleter
from engram.chaos.faults import KINDS, FaultEvent, Injector
from engram.chaos.ledger import Ledger
from engram.chaos.proxy import RECALL, ProxyHost
from engram.chaos.workload import RECALL_LEVELS, Recaller, Visibility, Writer
from engram.control.assignment import default_shard
from engram.launcher.cluster import LocalCluster
from engram_client import EngramClient

log = logging.getLogger("engram.chaos")


def choose_spaces(count: int, shards: int) -> list[str]:
    """``count`` space names spread evenly over the shards by the default assignment."""
    names: list[str] = []
    candidate = 0
    for k in range(count):
        want = k % shards
        while default_shard(f"chaos-{candidate}", shards) != want:
            candidate += 1
        names.append(f"chaos-{candidate}")
        candidate += 1
    return names


def _say(t0: float, text: str) -> None:
    print(f"[{time.monotonic() - t0:7.1f}s] {text}", flush=True)


class ChaosRun:
    def __init__(self, cfg: ChaosConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        # ids of this run start with it: unique, so a reused --data-dir cannot mix runs up
        self.ledger = Ledger(f"c{cfg.seed}t{int(time.time())}")
        self.spaces = choose_spaces(cfg.spaces, cfg.shards)
        self.faults: list[FaultEvent] = []
        self.t0 = time.monotonic()
        self.chaos_end = 0.0
        self.temp_dir = cfg.data_dir is None
        self.data_dir = Path(cfg.data_dir or tempfile.mkdtemp(prefix="engram-chaos-")).resolve()
        self.proxies = ProxyHost()
        self.cluster: LocalCluster | None = None
        self.injector: Injector | None = None
        self.client: EngramClient | None = None
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    # ------------------------------------------------------------------ setup and teardown

    async def setup(self) -> None:
        cfg = self.cfg
        self.proxies.start()
        proxies = [self.proxies.add(f"shard-{i}", "") for i in range(cfg.shards)]
        # recalls reach a shard's recall port through a proxy of their own, cut with the other
        recall_proxies = [self.proxies.add(f"shard-{i}{RECALL}", "") for i in range(cfg.shards)]
        fault_dir = self.data_dir / "faults"
        fault_dir.mkdir(parents=True, exist_ok=True)
        fault_files = {i: fault_dir / f"shard-{i}.json" for i in range(cfg.shards)}
        for path in fault_files.values():
            path.write_text("{}")
        self.cluster = LocalCluster(
            self.data_dir / "cluster",
            shards=cfg.shards,
            env=CLUSTER_ENV,
            policy=SUPERVISOR_POLICY,
            shard_env={
                i: {
                    "ENGRAM_FAULT_FILE": str(p),
                    "ENGRAM_SHARD_RECALL_ADVERTISE": recall_proxies[i].address,
                }
                for i, p in fault_files.items()
            },
            shard_advertise={i: p.address for i, p in enumerate(proxies)},
        )
        for i, proxy in enumerate(proxies):
            proxy.upstream = self.cluster.shard_address(i)
            recall_proxies[i].upstream = self.cluster.shard_recall_address(i)
        await asyncio.to_thread(self.cluster.start)
        self.injector = Injector(
            self.cluster,
            self.proxies,
            fault_files,
            random.Random(self.rng.getrandbits(64)),
            long_faults=cfg.long_faults,
            short=cfg.short,
            recovery_timeout_s=cfg.recovery_timeout_s,
            spaces=self.spaces,
        )
        if not await self.injector.wait_serving(60.0):
            raise RuntimeError("the cluster did not come up")
        self.client = EngramClient(self.cluster.gateway_address)

    async def teardown(self) -> None:
        if self.injector is not None:
            with contextlib.suppress(Exception):
                await self.injector.undo_all()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()
        if self.cluster is not None:
            await asyncio.to_thread(self.cluster.stop)
        self.proxies.stop()

    # ------------------------------------------------------------------ the run

    async def execute(self) -> dict[str, Any]:
        cfg = self.cfg
        assert self.client is not None and self.injector is not None
        seed = self.rng.getrandbits(32)
        visibility = Visibility(self.client, self.ledger)
        deleter = Deleter(self.client, self.ledger, self.spaces, cfg.shape, seed + 2000)
        writers = [
            Writer(
                w,
                self.spaces[w % len(self.spaces)],
                self.client,
                self.ledger,
                cfg.shape,
                seed + w,
                visibility,
                deleter,
            )
            for w in range(len(self.spaces) * cfg.writers_per_space)
        ]
        recallers = [
            Recaller(level, self.client, writers, self.ledger, cfg.shape, seed + 1000 + k)
            for k, level in enumerate((*RECALL_LEVELS, "stream"))
        ]
        checker = ContinuousChecker(self.client, self.ledger, self.spaces, cfg.check_every_s)
        stop_writes, stop_reads = asyncio.Event(), asyncio.Event()
        self.t0 = time.monotonic()
        checker.t0 = self.t0
        _say(
            self.t0,
            f"workload: {len(writers)} writers on {len(self.spaces)} spaces "
            f"({', '.join(self.spaces)}), deletes of {cfg.shape.delete_share:.0%} of the acked "
            f"rows, recalls at {', '.join((*RECALL_LEVELS, 'stream'))}; "
            f"faults from +{cfg.warmup_s:.0f}s, seed {cfg.seed}",
        )
        write_tasks = [asyncio.create_task(w.run(stop_writes)) for w in writers]
        write_tasks.append(asyncio.create_task(deleter.run(stop_writes)))
        read_tasks = [asyncio.create_task(r.run(stop_reads)) for r in recallers]
        read_tasks.append(asyncio.create_task(checker.run(stop_reads)))
        progress = asyncio.create_task(self._progress(stop_reads))
        try:
            self.chaos_end = self.t0 + cfg.seconds - cfg.tail_s
            await self._fault_loop()
            remaining = self.t0 + cfg.seconds - time.monotonic()
            if remaining > 0:
                _say(self.t0, f"faults done; workload continues {remaining:.0f} s")
                await asyncio.sleep(remaining)
            _say(self.t0, "stopping the writers; waiting for the last acks")
            stop_writes.set()
            # a delete being retried may take up to delete_retry_s to settle
            _, late = await asyncio.wait(write_tasks, timeout=cfg.shape.delete_retry_s + 5)
            for task in late:
                task.cancel()
            await asyncio.gather(*[w.drain(cfg.drain_s) for w in writers])
        finally:
            stop_writes.set()
            stop_reads.set()
            for task in write_tasks:
                task.cancel()
            await asyncio.gather(*write_tasks, return_exceptions=True)
            await asyncio.wait(read_tasks, timeout=15)
            for task in (*read_tasks, progress):
                task.cancel()
            await asyncio.gather(*read_tasks, progress, return_exceptions=True)
            await visibility.close()
        for rec in self.ledger.batches:
            if rec.state == "pending":
                self.ledger.count("unanswered_at_end")
        for d in self.ledger.deletes:
            if d.state == "pending":
                self.ledger.count("deletes_unanswered_at_end")
        findings, unreadable = await self._verify()
        return self._report(findings, unreadable, checker)

    async def _fault_loop(self) -> None:
        assert self.injector is not None
        await asyncio.sleep(max(0.0, self.t0 + self.cfg.warmup_s - time.monotonic()))
        order: list[str] = []
        rounds = 0
        while True:
            if not order:
                if rounds and time.monotonic() >= self.chaos_end:
                    break
                order = list(KINDS)
                self.rng.shuffle(order)
                rounds += 1
            if rounds > 1 and time.monotonic() >= self.chaos_end:
                break
            kind = order.pop(0)
            event = await self.injector.inject(kind)
            self.faults.append(event)
            if not event.recovered:
                _say(
                    self.t0,
                    f"{kind} on {event.target}: the cluster did not serve again within "
                    f"{self.cfg.recovery_timeout_s:.0f} s; no more faults",
                )
                return
            lifted = event.end - event.start
            back = f"{event.recovered - event.start:.1f}s" if event.recovered else "NOT RECOVERED"
            _say(
                self.t0,
                f"{kind:<22} {event.target:<16} lifted after {lifted:4.1f}s, "
                f"all serving after {back}  {_params(event)}",
            )
            await asyncio.sleep(self.rng.uniform(*self.cfg.gap_s))

    async def _progress(self, stop: asyncio.Event) -> None:
        last_acked, last_t = 0, time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 30.0)
            now = time.monotonic()
            acked = self.ledger.acked_observations()
            rate = (acked - last_acked) / max(now - last_t, 1e-3)
            deleted = sum(len(d.rows) for d in self.ledger.deletes if d.state == "acked")
            _say(
                self.t0,
                f"progress: {acked:,} observations acked ({rate:,.0f}/s), {deleted:,} deleted, "
                f"{len(self.faults)} faults, {self.ledger.counters['resumes']} resumes",
            )
            last_acked, last_t = acked, now

    async def _verify(self) -> tuple[Findings, list[str]]:
        """Reads every space back (bounded in time); returns the findings over the spaces that
        could be read, and the names of those that could not."""
        assert self.client is not None and self.injector is not None
        _say(self.t0, f"verifying: reading {len(self.spaces)} spaces back")
        deadline = time.monotonic() + self.cfg.verify_s
        await self.injector.wait_serving(self.cfg.verify_s / 2)
        listings = []
        unreadable = []
        for space in self.spaces:
            attempt = 0
            while True:
                attempt += 1
                left = deadline - time.monotonic()
                try:
                    read = read_space(self.client, self.ledger.run, space)
                    listings.append(await asyncio.wait_for(read, max(left, 1.0)))
                    break
                except Exception as exc:
                    log.warning("reading %s failed (attempt %d): %s", space, attempt, exc)
                    if time.monotonic() + 2.0 > deadline:
                        _say(self.t0, f"could not read space {space}: it is not verified")
                        unreadable.append(space)
                        break
                    await asyncio.sleep(2.0)
        deletes = deleted_rows(self.ledger)
        findings = await asyncio.to_thread(analyse, self.ledger, listings, deletes=deletes)
        return findings, unreadable

    def _report(
        self, findings: Findings, unreadable: list[str], checker: ContinuousChecker
    ) -> dict[str, Any]:
        assert self.cluster is not None and self.injector is not None
        extra: dict[str, Any] = {
            "started": self.started,
            "duration_s": round(time.monotonic() - self.t0, 1),
            "spaces": self.spaces,
            "restarts": {name: self.cluster.restarts(name) for name in self.cluster.names},
            "proxy": {name: vars(stats).copy() for name, stats in self.proxies.stats().items()},
            "observed": {
                "shard_processes_saying_serving_while_recovering": len(
                    self.injector.serving_while_recovering
                ),
                **self.injector.counters,
            },
            "data_dir": str(self.data_dir),
            "unreadable_spaces": unreadable,
            # acknowledged observations in spaces that could not be read: not verified
            "unverified_acked": sum(
                b.n for b in self.ledger.batches if b.space in unreadable and b.state == "acked"
            ),
        }
        return reporting.build(
            config=self.cfg.as_dict(),
            ledger=self.ledger,
            findings=findings,
            verified=not unreadable,
            continuous=checker.result,
            faults=self.faults,
            t0=self.t0,
            chaos_end=self.chaos_end,
            extra=extra,
        )


def _params(event: FaultEvent) -> str:
    text = " ".join(f"{k}={v}" for k, v in event.params.items() if k != "pid")
    return f"{text} {event.note}".strip()


async def run(cfg: ChaosConfig) -> dict[str, Any] | None:
    """Runs the whole chaos experiment; returns the report (also written to results_dir)."""
    chaos = ChaosRun(cfg)
    report: dict[str, Any] | None = None
    try:
        await chaos.setup()
        report = await chaos.execute()
    finally:
        await chaos.teardown()
        if report is not None:
            path = reporting.write(report, cfg.results_dir)
            print(reporting.summary(report), flush=True)
            print(f"report: {cfg.results_dir / 'latest.json'} (and {path.name})", flush=True)
        keep = cfg.keep_data or report is None or not report["ok"]
        if keep:
            print(f"cluster data and logs kept in {chaos.data_dir}", flush=True)
        elif chaos.temp_dir:
            shutil.rmtree(chaos.data_dir, ignore_errors=True)
    return report
