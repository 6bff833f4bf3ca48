"""The operator's loop for one EngramCluster: observe, decide, act, report.

:class:`ClusterLoop` runs in the kopf daemon of its resource (only in the operator replica
that holds the peering). Every :data:`TICK_S` it observes the cluster (:mod:`.observe`),
decides (:mod:`.decide`), deletes stuck pods, sets the StatefulSet's replicas, starts moves
(:mod:`.moves`, one at a time, in a task of their own) and writes the whole status. Every
``spec.rebalance.intervalSeconds`` it also samples the shards' Stats and asks
:func:`engram.control.rebalance.plan` for a round. Everything it must remember lives in
the status (moves in progress and recent, when shards went down and were restarted, which
shards are new), so a restarted operator carries on where the last one stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

from engram.control import rebalance as rb
from engram.control.loads import Sample, cluster_of, space_loads
from engram.control.store import ControlStore
from engram_operator import decide
from engram_operator.decide import Report, ShardMemory
from engram_operator.kube import Kube
from engram_operator.moves import Mover, PostEvent, iso
from engram_operator.observe import Observation, observe, timestamp
from engram_operator.spec import GROUP, PLURAL, VERSION, ClusterSpec, SpecError, parse

log = logging.getLogger("engram_operator")

# Seconds between observations: a shard that dies is in the status within about two of these.
TICK_S = 2.0


class ClusterLoop:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
        event: PostEvent,
        redis_url: str | None = None,
    ) -> None:
        self.kube = kube
        self.namespace = namespace
        self.name = name
        self.event = event
        self.redis_url = redis_url
        self.status: dict[str, Any] = dict(status)
        moves = self.status.get("moves") or {}
        self.mover = Mover(moves.get("recent") or (), self._save_moves, event)
        self.pending = moves.get("current")  # a move an earlier operator started
        self.memory = {
            int(s["id"]): ShardMemory(
                timestamp(s.get("downSince")) or None,
                tuple(timestamp(t) for t in s.get("recentRestarts") or ()),
                int(s.get("restarts") or 0),
                int(s.get("containerRestarts") or 0),
            )
            for s in self.status.get("shards") or ()
        }
        self.new = {int(s["id"]) for s in self.status.get("shards") or () if s.get("role") == "new"}
        reb = self.status.get("rebalance") or {}
        self.last_round = timestamp(reb.get("lastRound")) or None
        self.unfinished = bool(reb.get("unfinished", False))
        self.hottest = float(reb.get("hottestRatio") or 0.0)
        self.balance_note = ""
        self.skips: list[str] = []
        self.samples: tuple[Sample | None, Sample | None] = (None, None)
        self.store: ControlStore | None = None
        # The last plan's cluster and policy: each shard's load figure for the status.
        self.loads: tuple[rb.Cluster, rb.Policy] | None = None

    # ------------------------------------------------------------------ the loop

    async def tick(self, spec_body: Mapping[str, Any], generation: int) -> None:
        now = time.time()
        try:
            spec = parse(spec_body, self.redis_url)
        except SpecError as exc:
            report = Report(int(spec_body.get("shards") or 0), None, {}, spec_error=str(exc))
            await self._write(report, generation, now, None)
            return
        store = self._store(spec)
        obs = await observe(self.kube, self.namespace, spec, store)
        ids = set(range(max(spec.shards, obs.replicas or 0))) | set(obs.pods)
        health = {
            s: decide.shard_health(
                s,
                obs.pods.get(s),
                obs.heartbeat_age.get(s),
                spec.heartbeat_timeout_s,
                now,
                self.memory[s].pod_restarts if s in self.memory else None,
            )
            for s in sorted(ids)
        }
        self.memory = {
            s: decide.remember(self.memory.get(s, ShardMemory()), h, obs.pods.get(s), now)
            for s, h in health.items()
        }
        deletions = decide.pod_deletions(health, self.memory, now, spec.restart_policy)
        if not spec.paused:
            await self._delete_pods(deletions.due, health, spec, now)
        if self.pending is not None and not self.mover.busy() and obs.addresses:
            self.mover.follow(obs.addresses, self.pending)
            self.pending = None
        step = await self._scale(spec, obs)
        unreachable = self._rebalance(spec, obs, health, step, now)
        report = Report(
            desired=spec.shards,
            replicas=obs.replicas,
            health=health,
            paused=spec.paused,
            observe_errors=obs.errors,
            redis_error=obs.redis_error,
            given_up=deletions.given_up,
            unreachable=unreachable,
            step=step,
            moving=self.mover.moving(now),
            rebalance_enabled=spec.rebalance_enabled,
            hottest=self.hottest,
            deferred=self.balance_note,
            unfinished=self.unfinished,
            skips=self.skips,
        )
        await self._write(report, generation, now, obs)

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()

    # ------------------------------------------------------------------ acting

    def _store(self, spec: ClusterSpec) -> ControlStore:
        if self.store is None:
            self.store = ControlStore(spec.redis_url, spec.key_prefix)
        return self.store

    async def _delete_pods(
        self, due: tuple[int, ...], health: Mapping[int, decide.ShardHealth], spec: ClusterSpec,
        now: float,
    ) -> None:  # fmt: skip
        for shard in due:
            pod = f"{spec.shard_statefulset}-{shard}"
            await self.kube.delete_pod(self.namespace, pod)
            self.memory[shard] = decide.record_deletion(
                self.memory[shard], now, spec.restart_policy
            )
            why = health[shard].message
            self.event("Warning", "RestartedShard", f"deleted pod {pod} of shard-{shard}: {why}")
            log.warning("deleted pod %s: %s", pod, why)

    async def _scale(self, spec: ClusterSpec, obs: Observation) -> decide.ScaleStep:
        held = {
            s: sum(1 for x in reply.spaces if x.state in ("owned", "fenced", "incoming"))
            for s, reply in obs.stats.items()
        }
        total = sum(x.bytes for r in obs.stats.values() for x in r.spaces if x.state == "owned")
        step = decide.scale_step(
            spec.shards, obs.replicas, self.new, held, total, spec.storage_bytes
        )
        self.new = set(step.new)
        if step.replicas is not None and not spec.paused:
            path = (
                f"/apis/apps/v1/namespaces/{self.namespace}/statefulsets/{spec.shard_statefulset}"
            )
            await self.kube.patch(path, {"spec": {"replicas": step.replicas}})
            self.event(
                "Normal", "Scaled", f"shard StatefulSet replicas {obs.replicas} -> {step.replicas}"
            )
        return step

    def _rebalance(
        self,
        spec: ClusterSpec,
        obs: Observation,
        health: Mapping[int, decide.ShardHealth],
        step: decide.ScaleStep,
        now: float,
    ) -> list[int]:
        """Samples the load every interval and starts a plan's moves; returns the shards down
        past the threshold whose spaces cannot be moved (they do not answer)."""
        answered = set(obs.stats)
        unreachable = [
            s
            for s, h in health.items()
            if h.phase == decide.DOWN
            and s not in answered
            and spec.move_spaces_after_s > 0
            and (since := self.memory[s].down_since) is not None
            and now - since >= spec.move_spaces_after_s
        ]
        previous, last = self.samples
        if last is not None and time.monotonic() - last.at < spec.interval_s:
            return unreachable
        sample = Sample(time.monotonic(), obs.stats)
        self.samples = (last, sample)
        if last is None or spec.paused or self.mover.busy() or self.pending is not None:
            return unreachable
        shards = set(range(max(spec.shards, obs.replicas or 0)))
        statuses = decide.plan_statuses(
            shards, step, health, self.memory, answered, now, spec.move_spaces_after_s
        )
        silent = sorted(s for s in shards if s not in statuses and s not in unreachable)
        if silent:
            names = ", ".join(f"shard-{s}" for s in silent)
            self.balance_note = f"waiting: {names} do not answer"
            return unreachable
        cluster = cluster_of(
            last,
            sample,
            statuses,
            last_moved=self.mover.last_moved(),
            last_round=self.last_round,
            unfinished=self.unfinished,
        )
        plan = rb.plan(cluster, now, spec.policy)
        self.hottest = plan.hottest_before
        self.balance_note = plan.deferred
        self.skips = [f"{s.space} stays on shard-{s.shard}: {s.reason}" for s in plan.skips]
        self.unfinished = plan.unfinished
        if plan.moves:
            self.last_round = now
            self.mover.start(obs.addresses, plan.moves)
        elif not plan.unfinished:
            self.new.clear()  # filled (or nothing can go there): ordinary shards now
        self.loads = (cluster, spec.policy)
        return unreachable

    # ------------------------------------------------------------------ status

    async def _save_moves(self, moves: dict[str, Any]) -> None:
        self.status.setdefault("moves", {}).update(moves)
        await self._patch({"moves": moves})

    async def _patch(self, status: Mapping[str, Any]) -> None:
        path = f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}/{self.name}/status"
        await self.kube.patch(path, {"status": dict(status)})

    def _shard_entries(
        self, report: Report, obs: Observation | None, now: float
    ) -> list[dict[str, Any]]:
        loads: dict[int, list[rb.Load]] = {}
        before, after = self.samples
        if before is not None and after is not None:
            for owner, load in space_loads(before, after).values():
                loads.setdefault(owner, []).append(load)
        figures: dict[int, float] = {}
        if self.loads is not None:
            figures = rb.shard_loads(*self.loads)
        mean = sum(figures.values()) / len(figures) if figures else 0.0
        out = []
        for shard, h in sorted(report.health.items()):
            mem = self.memory.get(shard, ShardMemory())
            role = (
                "draining" if shard in report.step.draining else "new" if shard in self.new
                else "active"
            )  # fmt: skip
            entry: dict[str, Any] = {
                "id": shard,
                "phase": h.phase if role != "draining" or h.phase != decide.SERVING else "Draining",
                "role": role,
                "message": h.message,
                "restarts": mem.restarts,
                "containerRestarts": mem.pod_restarts,
                "recentRestarts": [iso(t) for t in mem.restart_times],
                "downSince": iso(mem.down_since) if mem.down_since else None,
            }
            if obs is not None:
                pod = obs.pods.get(shard)
                entry["pod"] = pod.name if pod else None
                age = obs.heartbeat_age.get(shard)
                entry["heartbeatAgeSeconds"] = round(age, 1) if age is not None else None
                reply = obs.stats.get(shard)
                if reply is not None:
                    owned = [x for x in reply.spaces if x.state == "owned"]
                    entry["spaces"] = len(owned)
                    entry["bytes"] = sum(x.bytes for x in owned)
            mine = loads.get(shard, [])
            entry["ingestPerSecond"] = round(sum(x.ingest for x in mine), 1)
            entry["recallsPerSecond"] = round(sum(x.recall for x in mine), 1)
            if mean > 0 and shard in figures:
                entry["load"] = round(figures[shard] / mean, 3)
            out.append({k: v for k, v in entry.items() if v is not None})
        return out

    async def _write(
        self, report: Report, generation: int, now: float, obs: Observation | None
    ) -> None:
        conds = decide.conditions(report)
        serving = sum(
            1 for s in range(report.desired)
            if report.health.get(s, decide.ShardHealth(s, decide.MISSING)).phase == decide.SERVING
        )  # fmt: skip
        status: dict[str, Any] = {
            "observedGeneration": generation,
            "phase": decide.phase(report, conds),
            "readyShards": f"{serving}/{report.desired}",
            "conditions": decide.condition_entries(
                conds, self.status.get("conditions") or (), generation, iso(now)
            ),
            "shards": self._shard_entries(report, obs, now),
            "moves": {
                "current": self.mover.current_entry(),
                "recent": self.mover.recent,
                "perHour": self.mover.per_hour(now),
            },
            "rebalance": {
                "hottestRatio": round(self.hottest, 3),
                "unfinished": self.unfinished,
                "message": "; ".join([x for x in [self.balance_note, *self.skips[:3]] if x]),
                "lastRound": iso(self.last_round) if self.last_round else None,
            },
        }
        if report.replicas is not None:
            status["shardCount"] = report.replicas
        self._announce(self.status.get("conditions") or (), status["conditions"])
        self.status = status
        await self._patch(status)

    def _announce(self, before: Any, after: list[dict[str, Any]]) -> None:
        """An Event for every condition that changed status."""
        old = {c.get("type"): c.get("status") for c in before}
        for c in after:
            if old.get(c["type"]) != c["status"]:
                kind = "Warning" if (c["type"], c["status"]) in _BAD else "Normal"
                self.event(kind, c["reason"], f"{c['type']}={c['status']}: {c['message']}")


_BAD = {("Ready", "False"), ("Degraded", "True")}
