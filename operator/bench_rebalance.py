"""The operator against a Zipf-skewed workload: does it even out the shards, without flapping?

    .venv/bin/python operator/bench_rebalance.py            # 4 shards, 40 spaces, 240 s
    make -f operator/operator.mk ... / make operator-bench   # the same

Starts a local cluster of 4 real shards and a gateway, kmock as the Kubernetes API (pods made
from the real processes, the script plays the StatefulSet controller, as the operator's tests
do) and the operator (``kopf run -m engram_operator``). Then writes to 40 spaces at rates
following a Zipf law (s = ``--zipf``), and every ``--every`` seconds prints the busiest
shard's ingest rate over the mean (measured from the shards' Stats, not from the operator)
with the moves made so far. Halfway through it kills -9 the busiest shard and prints how long
until the EngramCluster's status says so, and until it is Ready again. At the end: moves per
hour, and whether every acknowledged observation is stored exactly once (Stats counts against
acknowledged counts: lost and duplicated).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "services"), str(ROOT / "clients" / "python")]
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import numpy as np  # noqa: E402
from tests.operator import conftest as k8s  # noqa: E402

from engram.control.moves import shard_stats  # noqa: E402
from engram.launcher.cluster import LocalCluster  # noqa: E402
from engram_client import EngramClient  # noqa: E402


def say(*args: object) -> None:
    """Prints to the real stdout: kopf's runner redirects sys.stdout while it runs."""
    print(*args, file=sys.__stdout__, flush=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=240.0)
    p.add_argument("--spaces", type=int, default=40)
    p.add_argument("--rate", type=float, default=4000.0, help="observations/s in all")
    p.add_argument("--zipf", type=float, default=1.1)
    p.add_argument("--every", type=float, default=10.0)
    p.add_argument("--dim", type=int, default=32)
    p.add_argument("--cooldown", type=int, default=20, help="spec.rebalance.cooldownSeconds")
    p.add_argument("--space-cooldown", type=int, default=120)
    return p.parse_args()


async def writer(client: EngramClient, space: str, rate: float, dim: int, acked: dict[str, int],
                 stop: asyncio.Event) -> None:  # fmt: skip
    """Writes ``rate`` observations/s to ``space`` in batches of 10 per tenth of a second
    (fewer for cold spaces); counts what is acknowledged."""
    rng = np.random.default_rng(abs(hash(space)) % 2**32)
    stream = await client.open_stream(space)
    per_tick = max(1, round(rate / 10))
    sent = 0
    pending: list[asyncio.Future[Any]] = []
    next_at = time.monotonic()
    while not stop.is_set():
        vectors = rng.standard_normal((per_tick, dim)).astype(np.float32)
        ids = [f"{space}:{sent + i}" for i in range(per_tick)]
        fut = await stream.send(vectors, ids=ids, contents=ids)
        sent += per_tick

        def done(f: asyncio.Future[Any], n: int = per_tick) -> None:
            if not f.cancelled() and f.exception() is None:
                acked[space] += n

        fut.add_done_callback(done)
        pending.append(fut)
        next_at += 0.1
        await asyncio.sleep(max(0.0, next_at - time.monotonic()))
    await asyncio.gather(*pending, return_exceptions=True)
    await stream.close()


def shard_rates(before: dict[int, Any], after: dict[int, Any], dt: float) -> dict[int, float]:
    old = {s.memory_space_id: s.count for r in before.values() for s in r.spaces}
    rates = {i: 0.0 for i in after}
    for shard, reply in after.items():
        for s in reply.spaces:
            if s.state == "owned":
                rates[shard] += max(0, s.count - old.get(s.memory_space_id, s.count)) / dt
    return rates


async def run(args: argparse.Namespace) -> int:
    import kmock

    work = Path(tempfile.mkdtemp(prefix="engram-operator-bench-"))
    cluster = LocalCluster(work, shards=4, env={"ENGRAM_CANARY_INTERVAL_S": "0"})
    await asyncio.to_thread(cluster.start)
    weights = 1.0 / np.arange(1, args.spaces + 1) ** args.zipf
    rates = args.rate * weights / weights.sum()
    spaces = [f"z{i:02d}" for i in range(args.spaces)]
    acked = dict.fromkeys(spaces, 0)
    stop = asyncio.Event()
    addresses = {i: cluster.shard_address(i) for i in range(4)}
    kubeconfig = work / "kubeconfig"
    try:
        async with k8s.Emulator() as emulator, kmock.Server(emulator):
            api = await k8s.start_api(emulator, kubeconfig)
            os.environ["KUBECONFIG"] = str(kubeconfig)
            await k8s.install_workloads(api, replicas=4)
            spec = {
                "rebalance": {"intervalSeconds": 5, "cooldownSeconds": args.cooldown,
                              "spaceCooldownSeconds": args.space_cooldown},
                "restart": {"heartbeatTimeoutSeconds": 5},
            }  # fmt: skip
            await api.create(k8s.EC, k8s.cluster_resource(cluster.redis_url, 4, **spec))
            from tests.operator.test_end_to_end import shard_pods

            async with (
                k8s.Kubelet(api, shard_pods(cluster), interval=0.5),
                k8s.operator(),
                EngramClient(cluster.gateway_address) as client,
            ):
                await api.wait(lambda o: k8s.is_true(o, "Ready"), "Ready", seconds=60)
                tasks = [
                    asyncio.create_task(writer(client, s, r, args.dim, acked, stop))
                    for s, r in zip(spaces, rates, strict=True)
                ]
                say(f"{args.spaces} spaces, Zipf s={args.zipf}, {args.rate:.0f} obs/s in all; "
                      f"hottest space {rates[0]:.0f} obs/s = {rates[0] / (args.rate / 4):.2f}x "
                      "a shard's fair share")  # fmt: skip
                say("   t(s)  busiest/mean  per-shard obs/s             moves")
                start = time.monotonic()
                before, t0 = await shard_stats(addresses), time.monotonic()
                ratios: list[tuple[float, float]] = []
                killed = False
                kill_report = ""
                while time.monotonic() - start < args.seconds:
                    await asyncio.sleep(args.every)
                    after, t1 = await shard_stats(addresses), time.monotonic()
                    r = shard_rates(before, after, t1 - t0)
                    before, t0 = after, t1
                    mean = sum(r.values()) / max(1, len(r))
                    ratio = max(r.values()) / mean if mean else 0.0
                    obj = await api.cluster()
                    moves = [m for m in obj["status"].get("moves", {}).get("recent", ())
                             if m.get("result") == "Done"]  # fmt: skip
                    t = time.monotonic() - start
                    ratios.append((t, ratio))
                    shares = " ".join(f"{r.get(i, 0):6.0f}" for i in range(4))
                    say(f"{t:7.0f}  {ratio:12.2f}  {shares}   {len(moves):5d}")
                    if not killed and t >= args.seconds / 2:
                        killed = True
                        kill_report = await kill_busiest(cluster, api, r)
                stop.set()
                await asyncio.gather(*tasks, return_exceptions=True)
                obj = await api.cluster()
                recent = obj["status"].get("moves", {}).get("recent", ())
                done = [m for m in recent if m.get("result") == "Done"]
                elapsed_h = (time.monotonic() - start) / 3600
                final = await shard_stats(addresses)
                stored = {s.memory_space_id: s.count for r in final.values() for s in r.spaces
                          if s.state == "owned"}  # fmt: skip
                lost = sum(max(0, acked[s] - stored.get(s, 0)) for s in spaces)
                dup = sum(max(0, stored.get(s, 0) - acked[s]) for s in spaces)
                late = [x for t, x in ratios if t >= args.seconds / 3]
                say(kill_report)
                failed = sum(1 for m in recent if m.get("result") == "Failed")
                say(f"moves: {len(done)} in {elapsed_h * 60:.1f} min = "
                      f"{len(done) / elapsed_h:.0f} per hour ({failed} failed)")  # fmt: skip
                say(f"busiest/mean over the last two thirds: median "
                      f"{float(np.median(late)):.2f}, max {max(late):.2f}")  # fmt: skip
                say(f"acknowledged {sum(acked.values())}, stored {sum(stored.values())}: "
                      f"lost {lost}, duplicated {dup}")  # fmt: skip
                for m in reversed(done):
                    say(f"  moved {m['space']} {m['source']}->{m['target']} "
                          f"({m['reason']}; {m.get('message', '')})")  # fmt: skip
                await api.session.close()
                return 0 if lost == 0 and dup == 0 else 1
    finally:
        stop.set()
        await asyncio.to_thread(cluster.stop)


async def kill_busiest(cluster: LocalCluster, api: k8s.Api, rates: dict[int, float]) -> str:
    """kill -9 of the busiest shard; how long until the status says so, and until Ready."""
    shard = max(rates, key=lambda i: rates[i])
    t = time.monotonic()
    await asyncio.to_thread(cluster.kill, f"shard-{shard}", signal.SIGKILL)
    await api.wait(lambda o: k8s.is_true(o, "Degraded"), "Degraded", seconds=30)
    seen = time.monotonic() - t
    await api.wait(lambda o: k8s.is_true(o, "Ready"), "Ready", seconds=120)
    back = time.monotonic() - t
    return (f"kill -9 of shard-{shard}: Degraded in the status after {seen:.1f} s, "
            f"Ready again after {back:.1f} s")  # fmt: skip


def main() -> int:
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(run(parse_args()))
    return 130


if __name__ == "__main__":
    sys.exit(main())
