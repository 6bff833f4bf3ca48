"""The dashboards' panels as Prometheus query plots (Grafana cannot be installed here).

``python -m engram_dashboards.plot`` starts a local cluster and a Prometheus scraping it
(every second), drives a short workload through the real client (a few spaces streaming
batches, recalls, a move now and then), then runs every panel's queries over the run with
``query_range`` and draws one PNG per dashboard, a grid of its panels, into ``docs/images/``.
These are the queries' results from a real Prometheus, not Grafana screenshots.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from engram.control.moves import move_space, shard_stats, spaces_of
from engram.launcher.cluster import LocalCluster
from engram_client import EngramClient
from engram_dashboards.build import DASHBOARDS, DASHBOARDS_DIR, REPO
from engram_dashboards.prometheus import Prometheus, cluster_targets

IMAGES = REPO / "docs" / "images"
DIM = 64
BATCH = 250
# Grafana's variables as this run resolves them: every instance; the rate window of a 1 s
# scrape interval (four scrapes at least).
VARIABLES = {"$__rate_interval": "10s", "$instance": ".*"}


def resolve(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def legend(fmt: str, labels: dict[str, str]) -> str:
    """Grafana's ``legendFormat``: ``{{label}}`` replaced by the series' label value."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt) or "value"


def plot_dashboard(prom: Prometheus, name: str, start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    board = json.loads((DASHBOARDS_DIR / name).read_text())
    panels = [p for p in board["panels"] if p["type"] != "row"]
    cols = 2
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(13, 3.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels, strict=False):
        for target in panel["targets"]:
            for series in prom.query_range(resolve(target["expr"]), start, end, 1.0):
                points = np.array(series["values"], dtype=float)
                ax.plot(
                    points[:, 0] - start,
                    points[:, 1],
                    label=legend(target["legendFormat"], series["metric"]),
                    linewidth=1,
                )
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        ax.set_title(panel["title"], fontsize=10)
        ax.set_ylabel(unit, fontsize=8)
        ax.set_xlabel("seconds into the run", fontsize=8)
        ax.tick_params(labelsize=7)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
        else:
            ax.text(0.5, 0.5, "no data in this run", ha="center", transform=ax.transAxes)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(f"{board['title']}: Prometheus query results of a {end - start:.0f} s local run")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


async def workload(cluster: LocalCluster, seconds: float, spaces: int) -> None:
    """``spaces`` streams writing paced batches, recalls on them, and a move every 20 s."""
    stop = time.monotonic() + seconds
    addresses = {i: cluster.shard_address(i) for i in range(cluster.shards)}
    async with EngramClient(cluster.gateway_address) as client:

        async def write(space: str, rate: float) -> None:
            rng = np.random.default_rng(abs(hash(space)) % (1 << 32))
            stream = await client.open_stream(space)
            n = 0
            while time.monotonic() < stop:
                ids = [f"{space}-{n}-{i}" for i in range(BATCH)]
                vectors = rng.standard_normal((BATCH, DIM))
                await (await stream.send(vectors, ids=ids))
                if n % 10 == 0:
                    await stream.recall(vectors[0], k=5)
                n += 1
                await asyncio.sleep(BATCH / rate)
            await stream.close()

        async def mover() -> None:
            while time.monotonic() + 20 < stop:
                await asyncio.sleep(20)
                owners = spaces_of(await shard_stats(addresses))
                space = "plot-0"
                if space in owners:
                    target = (owners[space].owner + 1) % cluster.shards
                    await move_space(addresses, space, target)

        rates = [4000.0 / (i + 1) for i in range(spaces)]
        await asyncio.gather(
            *(write(f"plot-{i}", r) for i, r in enumerate(rates)),
            mover(),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=90.0, help="length of the workload")
    parser.add_argument("--spaces", type=int, default=3)
    parser.add_argument("--out", type=Path, default=IMAGES)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="engram-plots-") as tmp:
        root = Path(tmp)
        env = {"ENGRAM_CANARY_INTERVAL_S": "0.5", "ENGRAM_CHECKPOINT_INTERVAL_S": "10"}
        with LocalCluster(root / "cluster", shards=2, env=env) as cluster:
            targets = cluster_targets(cluster.endpoints())
            with Prometheus(root / "prometheus", targets) as prom:
                time.sleep(5)  # a few scrapes of the idle cluster first
                start = time.time()
                asyncio.run(workload(cluster, args.seconds, args.spaces))
                time.sleep(5)
                end = time.time()
                for name in DASHBOARDS:
                    out = args.out / f"dashboard-{Path(name).stem}.png"
                    plot_dashboard(prom, name, start - 5, end, out)
                    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
