"""PNG plots of one run (matplotlib, Agg): throughput, latencies, backlog and resources over
time, and Engram Stream next to its peers."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def draw(r: dict[str, Any], out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = r["series"]
    t = s["t"]
    timed = r["throughput"]["timed_seconds"]
    names: list[str] = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=110)
        plt.close(fig)
        names.append(name)

    def mark_timed(ax: Any) -> None:
        ax.axvspan(0, timed, color="0.93", zorder=0, label="timed phase")

    # throughput
    fig, ax = plt.subplots(figsize=(10, 4.5))
    mark_timed(ax)
    ax.plot(t, [x / 1000 for x in s["acked_obs_per_s"]], label="acked durable", lw=1.8)
    ax.plot(t, [x / 1000 for x in s["sent_obs_per_s"]], label="sent", lw=1, alpha=0.7)
    ax.step(
        t,
        [x / 1000 for x in s["offered_obs_per_s"]],
        where="post",
        ls="--",
        label="offered (token bucket)",
    )
    ax.axhline(100, color="green", ls=":", label="target 100 K/s")
    for key, style in (("wal", "-."), ("grpc", ":")):
        ax.axhline(
            r["limits"][key]["obs_per_s"] / 1000, color="grey", ls=style, label=f"{key} limit"
        )
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("K observations / s")
    ax.set_title(f"Ingest (dim {r['config']['dim']}, batches of {r['config']['batch']})")
    ax.legend(loc="upper right", fontsize=8)
    save(fig, "throughput.png")

    # latencies
    fig, ax = plt.subplots(figsize=(10, 4.5))
    mark_timed(ax)
    for key, lab in (
        ("ack_p50_ms", "ack p50"),
        ("ack_p99_ms", "ack p99"),
        ("recall_p50_ms", "recall p50"),
        ("recall_p99_ms", "recall p99"),
    ):
        ys = s[key]
        ax.plot(
            [x for x, y in zip(t, ys, strict=True) if y is not None],
            [y for y in ys if y is not None],
            label=lab,
            lw=1.3,
        )
    if s["visibility"]:
        ax.scatter(
            [v[0] for v in s["visibility"]],
            [max(v[1], 0.01) for v in s["visibility"]],
            s=8,
            color="black",
            label="visibility samples",
            zorder=3,
        )
    ax.axhline(100, color="red", ls=":", lw=1, label="visibility target 100 ms")
    ax.axhline(20, color="orange", ls=":", lw=1, label="recall target 20 ms")
    ax.set_yscale("log")
    ax.set_xlabel("seconds since start")
    ax.set_ylabel("ms (log)")
    ax.set_title("Latency percentiles per second")
    ax.legend(loc="upper left", fontsize=8, ncol=2)
    save(fig, "latency.png")

    # backlog and shard memory
    mon = s["monitor"]
    if mon:
        fig, ax = plt.subplots(figsize=(10, 4.5))
        mark_timed(ax)
        mt = [m["t"] for m in mon]
        shards = sorted({k for m in mon for k in m["shards"]})
        for k in shards:
            ax.plot(
                mt,
                [m["shards"].get(k, {}).get("backlog", float("nan")) / 1e6 for m in mon],
                label=f"shard {k} backlog",
            )
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("un-indexed rows (M)")
        ax2 = ax.twinx()
        for k in shards:
            name = f"shard-{k}"
            ax2.plot(
                mt,
                [m["procs"].get(name, {}).get("rss_mb", float("nan")) / 1000 for m in mon],
                ls="--",
                lw=1,
                label=f"{name} RSS",
            )
        ax2.set_ylabel("RSS (GB), dashed")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8)
        ax.set_title("Index backlog (fresh tier) and shard memory")
        save(fig, "backlog.png")

        fig, ax = plt.subplots(figsize=(10, 4.5))
        mark_timed(ax)
        procs = sorted({n for m in mon for n in m["procs"]})
        for n in procs:
            ax.plot(
                mt, [m["procs"].get(n, {}).get("cpu_pct", float("nan")) for m in mon], label=n, lw=1
            )
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("CPU % (100 = one core)")
        ax.set_title("CPU per process")
        ax.legend(loc="upper right", fontsize=7, ncol=2)
        save(fig, "cpu.png")

    # peers
    peers = {k: v for k, v in r["peers"]["results"].items() if "skipped" not in v}
    if peers:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
        labels = list(peers)
        a1.bar(
            labels,
            [peers[k]["ingest_until_searchable_obs_per_s"] / 1000 for k in labels],
            color=["C0" if k == "engram-stream" else "C7" for k in labels],
        )
        a1.set_ylabel("K obs/s")
        a1.set_title("Ingest until searchable")
        x = range(len(labels))
        p50 = [max(peers[k]["freshness_ms"]["p50"] or 0.01, 0.01) for k in labels]
        p99 = [max(peers[k]["freshness_ms"]["p99"] or 0.01, 0.01) for k in labels]
        a2.bar([i - 0.2 for i in x], p50, width=0.4, label="p50")
        a2.bar([i + 0.2 for i in x], p99, width=0.4, label="p99")
        a2.set_xticks(list(x), labels)
        a2.set_yscale("log")
        a2.set_ylabel("ms (log)")
        a2.set_title("Freshness: insert returns -> query finds it")
        a2.legend(fontsize=8)
        save(fig, "peers.png")
    return names
