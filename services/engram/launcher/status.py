"""State of a local cluster: which processes run, and what each shard holds.

Reads ``<data_dir>/cluster.json`` (written by ``engram up``), checks every PID, pings Redis,
probes the gateway's health and asks every shard for its Stats. Nothing here raises for a
process that is down: it shows as down.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc

from engram.common import internal
from engram.common.settings import SecuritySettings, SettingsError
from engram.control.moves import incoming_of, spaces_of
from engram.internal.v1 import shard_pb2, shard_pb2_grpc
from engram.launcher import procs, redis_server, secure
from engram.launcher.cluster import CLUSTER_FILE, http_healthy

RPC_TIMEOUT_S = 2.0


class NoClusterError(RuntimeError):
    """There is no cluster.json in the data directory."""


def load_cluster_file(data_dir: Path | str) -> dict[str, Any]:
    path = Path(data_dir) / CLUSTER_FILE
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError:
        raise NoClusterError(
            f"no cluster is running from {Path(data_dir).resolve()} (no {CLUSTER_FILE}); "
            "start one with `engram up`"
        ) from None
    return data


def shard_stats(
    address: str, timeout: float = RPC_TIMEOUT_S, security: SecuritySettings | None = None
) -> dict[str, Any]:
    """Calls Shard.Stats; returns {"up": True, "spaces": [...]} or {"up": False, "error": ...}
    (with the reply itself under "reply", for :func:`space_table`). ``security``: the
    cluster's (:func:`engram.launcher.secure.from_cluster_file`; None: this process's)."""
    try:
        channel = internal.sync_channel(address, security=security)
    except SettingsError as exc:  # the token or a certificate file went missing
        return {"up": False, "error": str(exc)}
    with channel:
        try:
            reply = shard_pb2_grpc.ShardStub(channel).Stats(
                shard_pb2.StatsRequest(), timeout=timeout
            )
        except grpc.RpcError as e:
            code = e.code() if isinstance(e, grpc.Call) else None
            name = code.name if code is not None else "ERROR"
            details = e.details() if isinstance(e, grpc.Call) else str(e)
            return {"up": False, "error": f"{name}: {details}"}
    spaces = [
        {
            "memory_space_id": s.memory_space_id,
            "dim": s.dim,
            "count": s.count,
            "indexed": s.indexed,
            "checkpoint_lsn": s.checkpoint_lsn,
            "sessions": s.sessions,
            "epoch": s.epoch,
            "state": s.state,
            "move_id": s.move_id,
            "peer": s.peer,
            "move_phase": s.move_phase,
        }
        for s in reply.spaces
    ]
    moved = [
        {"memory_space_id": m.memory_space_id, "owner": m.owner, "epoch": m.epoch}
        for m in reply.moved
    ]
    return {
        "up": True,
        "shard_id": reply.shard_id,
        "spaces": spaces,
        "moved": moved,
        "reply": reply,
    }


def space_table(stats: dict[int, shard_pb2.StatsResponse]) -> dict[str, dict[str, Any]]:
    """Every space a shard claims, with its owner and epoch (the higher epoch where two claim
    it), and any move in progress."""
    table: dict[str, dict[str, Any]] = {}
    for name, s in spaces_of(stats).items():
        table[name] = {
            "owner": f"shard-{s.owner}",
            "epoch": s.epoch,
            "state": s.state,
            "count": s.rows,
            "indexed": s.indexed,
        }
        if s.state == "fenced":
            table[name]["move"] = {
                "id": s.move_id,
                "from": f"shard-{s.owner}",
                "to": f"shard-{s.peer}",
                "phase": "fenced",
            }
    for name, (target, m) in incoming_of(stats).items():
        table.setdefault(name, {})["move"] = {
            "id": m.move_id,
            "from": f"shard-{m.peer}",
            "to": f"shard-{target}",
            "phase": m.move_phase,
            "epoch": m.epoch,
        }
    return dict(sorted(table.items()))


def collect(data_dir: Path | str) -> dict[str, Any]:
    """The cluster's state as a dict (see :func:`format_text` for the fields)."""
    info = load_cluster_file(data_dir)
    security = secure.from_cluster_file(info)
    launcher_pid = int(info.get("launcher_pid") or 0)
    processes: list[dict[str, Any]] = []
    replies: dict[int, shard_pb2.StatsResponse] = {}
    for p in info.get("processes", []):
        pid = p.get("pid")
        entry: dict[str, Any] = {
            "name": p["name"],
            "role": p["role"],
            "pid": pid,
            "alive": bool(pid) and procs.pid_alive(int(pid)),
            "grpc": p.get("grpc"),
            "http": p.get("http"),
            "restarts": p.get("restarts", 0),
        }
        if p["role"] == "redis":
            entry["up"] = entry["alive"] and redis_server.ping(info["redis_url"], timeout=1.0)
        elif p["role"] == "shard":
            stats = (
                shard_stats(p["grpc"], security=security.internal)
                if entry["alive"]
                else {"up": False, "error": "no process"}
            )
            reply = stats.pop("reply", None)
            if reply is not None:
                replies[int(p["name"].split("-")[1])] = reply
            entry.update(stats)
        else:  # its own /healthz: the gateways share their gRPC port
            entry["up"] = entry["alive"] and http_healthy(
                p["http"], RPC_TIMEOUT_S, security.gateway_ssl_context()
            )
        processes.append(entry)
    return {
        "data_dir": info.get("data_dir", str(Path(data_dir).resolve())),
        "logs_dir": info.get("logs_dir"),
        "launcher": {"pid": launcher_pid, "alive": procs.pid_alive(launcher_pid)},
        "gateway": info.get("gateway"),
        "http": info.get("http"),
        "redis_url": info.get("redis_url"),
        "shard_count": info.get("shard_count"),
        "auth": bool(security.keys_file),
        "tls": security.tls,
        "healthy": all(p["up"] for p in processes) and bool(processes),
        "processes": processes,
        "spaces": space_table(replies),
    }


def format_text(status: dict[str, Any]) -> str:
    """A human-readable report of :func:`collect`'s result."""
    launcher = status["launcher"]
    lines = [
        f"cluster   {'healthy' if status['healthy'] else 'DEGRADED'}"
        f"  (launcher pid {launcher['pid']}{'' if launcher['alive'] else ', not running'})",
        f"gateway   {status['gateway']}  (HTTP {status['http']})"
        + ("  TLS" if status.get("tls") else "")
        + ("  auth" if status.get("auth") else ""),
        f"redis     {status['redis_url']}",
        f"data      {status['data_dir']}",
        "",
        f"{'NAME':<10} {'ROLE':<8} {'PID':>8}  {'STATE':<6} {'RESTARTS':>8}  ADDRESS",
    ]
    for p in status["processes"]:
        state = "up" if p["up"] else "DOWN"
        address = p["grpc"] or status["redis_url"]
        lines.append(
            f"{p['name']:<10} {p['role']:<8} {p['pid'] or '-':>8}  {state:<6} "
            f"{p['restarts']:>8}  {address}"
        )
    shards = [p for p in status["processes"] if p["role"] == "shard"]
    if shards:
        lines += [
            "",
            f"{'SHARD':<10} {'SPACE':<28} {'DIM':>5} {'COUNT':>10} {'INDEXED':>10} {'EPOCH':>6}"
            "  STATE",
        ]
    for p in shards:
        if not p["up"]:
            lines.append(f"{p['name']:<10} down: {p.get('error', '')}")
        elif not p["spaces"]:
            lines.append(f"{p['name']:<10} (no spaces)")
        for s in p.get("spaces", []):
            state = s["state"]
            if s["move_id"]:
                state += f" ({'from' if state == 'incoming' else 'to'} shard-{s['peer']})"
            lines.append(
                f"{p['name']:<10} {s['memory_space_id']:<28} {s['dim']:>5} "
                f"{s['count']:>10} {s['indexed']:>10} {s['epoch']:>6}  {state}"
            )
    return "\n".join(lines)
