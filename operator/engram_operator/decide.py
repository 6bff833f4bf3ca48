"""The operator's decisions: pure functions of what it observed and what it remembers.

* :func:`shard_health` - is a shard serving, starting, or down (and why);
* :func:`pod_deletions` - which stuck pods to delete now, through the restart decisions the
  local launcher uses (:mod:`engram.control.restarts`: backoff, give up on a crash loop);
* :func:`scale_step` - the StatefulSet's replicas: up at once (the new shards are then
  filled), down only once the shards beyond the desired count hold nothing;
* :func:`plan_statuses` - which shards a rebalancing plan may use, and which it must empty
  (draining shards, and shards down past the threshold whose data is still reachable);
* :func:`conditions` - Ready, Progressing, Degraded and Rebalancing, each with a reason.

Nothing here does I/O or reads a clock: the loop in :mod:`.act` passes ``now`` in.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from engram.control import rebalance as rb
from engram.control import restarts
from engram_operator.observe import PodView

# A pod not ready for this long after it was created is down, not starting (WAL replay of
# a large shard takes a while: the chart's startup probe allows about as long).
STARTUP_GRACE_S = 300.0
# A move running longer than this is stuck: Ready turns False until it ends.
MOVE_STUCK_S = 900.0
# A shrink waits while the data would fill the remaining volumes past this fraction.
FULL = 0.8

SERVING, STARTING, DOWN, MISSING = "Serving", "Starting", "Down", "Missing"


@dataclass(frozen=True)
class ShardHealth:
    shard: int
    phase: str
    # A CamelCase reason when not serving (CrashLoop, HeartbeatMissing, NotReady...).
    reason: str = ""
    message: str = ""
    # A pod the operator should delete (subject to the restart backoff).
    stuck: bool = False


@dataclass(frozen=True)
class ShardMemory:
    """What the status remembers of a shard between loops and operator restarts."""

    # When the shard was first seen not serving (wall clock); None: serving.
    down_since: float | None = None
    # When the operator deleted its pod, the last few times.
    restart_times: tuple[float, ...] = ()
    restarts: int = 0
    # The pod's container restarts when last seen (the kubelet's own restarts).
    pod_restarts: int = 0


def shard_health(
    shard: int,
    pod: PodView | None,
    heartbeat_age: float | None,
    heartbeat_timeout_s: float,
    now: float,
    restarts_seen: int | None = None,
) -> ShardHealth:
    """A shard serves when its pod is Ready and its Redis heartbeat is fresh. A container
    restarted since the last look (``restarts_seen``) counts as down once, even if it serves
    again: a crash the kubelet repaired in a second is still reported."""
    if pod is None:
        return ShardHealth(shard, MISSING, "PodMissing", f"shard-{shard} has no pod yet")
    fresh = heartbeat_age is not None and heartbeat_age <= heartbeat_timeout_s
    beat = "no heartbeat" if heartbeat_age is None else f"last heartbeat {heartbeat_age:.0f} s ago"
    if pod.terminating:
        return ShardHealth(shard, DOWN, "Terminating", f"pod {pod.name} is being deleted")
    if pod.waiting == "CrashLoopBackOff":
        why = f"pod {pod.name} is crash-looping ({pod.restarts} restarts, {beat})"
        return ShardHealth(shard, DOWN, "CrashLoop", why, stuck=True)
    if pod.phase in ("Failed", "Unknown"):
        why = f"pod {pod.name} is {pod.phase} ({beat})"
        return ShardHealth(shard, DOWN, f"Pod{pod.phase}", why, stuck=True)
    if not pod.ready:
        if pod.restarts == 0 and now - pod.created < STARTUP_GRACE_S:
            return ShardHealth(shard, STARTING, "Starting", f"pod {pod.name} is starting")
        why = f"pod {pod.name} is not ready ({pod.restarts} container restarts, {beat})"
        return ShardHealth(shard, DOWN, "NotReady", why)
    if not fresh:
        why = f"pod {pod.name} is ready but the shard is silent in Redis ({beat})"
        return ShardHealth(shard, DOWN, "HeartbeatMissing", why, stuck=True)
    if restarts_seen is not None and pod.restarts > restarts_seen:
        why = f"pod {pod.name} restarted (container restarts {restarts_seen} -> {pod.restarts})"
        return ShardHealth(shard, DOWN, "Restarted", why)
    return ShardHealth(shard, SERVING)


def remember(
    memory: ShardMemory, health: ShardHealth, pod: PodView | None, now: float
) -> ShardMemory:
    """The memory after this observation: when a shard went down (cleared once it serves),
    and the pod's restart count."""
    seen = pod.restarts if pod is not None else memory.pod_restarts
    if health.phase == SERVING:
        return replace(memory, down_since=None, pod_restarts=seen)
    since = memory.down_since if memory.down_since is not None else now
    return replace(memory, down_since=since, pod_restarts=seen)


@dataclass(frozen=True)
class Deletions:
    # Shards whose pod is to be deleted now.
    due: tuple[int, ...] = ()
    # Shards the operator no longer restarts, with why.
    given_up: Mapping[int, str] = field(default_factory=dict)


def pod_deletions(
    health: Mapping[int, ShardHealth],
    memory: Mapping[int, ShardMemory],
    now: float,
    policy: restarts.Policy,
) -> Deletions:
    """Stuck shards whose pod is due for deletion: the first after one backoff delay from
    when the shard went down, later ones backing off further; none after ``max_restarts``
    within the window (the kubelet's own restarts go on)."""
    states = []
    for shard, h in sorted(health.items()):
        mem = memory.get(shard, ShardMemory())
        if not h.stuck or mem.down_since is None:
            continue
        times = mem.restart_times
        states.append(
            restarts.ProcessState(
                name=str(shard),
                role="shard",
                alive=False,
                last_start=times[-1] if times else mem.down_since,
                last_exit=max(mem.down_since, times[-1] if times else mem.down_since),
                streak=len(times),
                restart_times=times,
                restarts=mem.restarts,
            )
        )
    due: list[int] = []
    given_up: dict[int, str] = {}
    for action in restarts.decide(states, now, policy):
        if isinstance(action, restarts.GiveUp):
            given_up[int(action.name)] = action.reason.replace(
                action.name, f"shard-{action.name}", 1
            )
        elif action.delay_s <= 0:
            due.append(int(action.name))
    return Deletions(tuple(due), given_up)


def record_deletion(memory: ShardMemory, now: float, policy: restarts.Policy) -> ShardMemory:
    recent = tuple(t for t in memory.restart_times if now - t < policy.window_s)
    return replace(memory, restart_times=(*recent, now), restarts=memory.restarts + 1)


@dataclass(frozen=True)
class ScaleStep:
    # Set the StatefulSet's replicas to this now; None: leave them.
    replicas: int | None
    # Shards being emptied before the StatefulSet shrinks.
    draining: frozenset[int] = frozenset()
    # Shards added by a scale-up, filled first until they carry their share.
    new: frozenset[int] = frozenset()
    # Why the shards beyond the desired count stay (capacity, a shard down); "" otherwise.
    waiting: str = ""
    refused: bool = False


def scale_step(
    desired: int,
    replicas: int | None,
    new: Iterable[int],
    held: Mapping[int, int],
    total_bytes: int,
    storage_bytes: int | None,
) -> ScaleStep:
    """``held``: spaces each answering shard holds (owned, fenced or incoming); a shard
    missing from it did not answer."""
    new_set = frozenset(new)
    if replicas is None:
        return ScaleStep(None, new=new_set)
    if desired >= replicas:
        added = frozenset(range(replicas, desired))
        return ScaleStep(desired if desired > replicas else None, new=(new_set | added))
    keep = frozenset(s for s in new_set if s < desired)
    if storage_bytes and total_bytes > desired * storage_bytes * FULL:
        why = (
            f"shrinking to {desired} shards refused: the data ({total_bytes / 2**30:.1f} GiB) "
            f"would fill {desired} volumes of {storage_bytes / 2**30:.1f} GiB past "
            f"{FULL:.0%}; grow storage or keep {replicas} shards"
        )
        return ScaleStep(None, new=keep, waiting=why, refused=True)
    leaving = frozenset(range(desired, replicas))
    silent = sorted(s for s in leaving if s not in held)
    if silent:
        names = ", ".join(f"shard-{s}" for s in silent)
        why = f"{names} do not answer: their spaces cannot be drained until they serve"
        return ScaleStep(None, leaving, keep, waiting=why)
    full = sorted(s for s in leaving if held[s] > 0)
    if full:
        spaces = sum(held[s] for s in full)
        why = f"draining {spaces} spaces off shard(s) {', '.join(map(str, full))}"
        return ScaleStep(None, leaving, keep, waiting=why)
    return ScaleStep(desired, leaving, keep)


def plan_statuses(
    shards: Iterable[int],
    step: ScaleStep,
    health: Mapping[int, ShardHealth],
    memory: Mapping[int, ShardMemory],
    answered: Iterable[int],
    now: float,
    move_after_s: float,
) -> dict[int, rb.ShardStatus]:
    """The shards a plan may use: those that answer Stats, draining the ones leaving and
    the ones down past ``move_after_s`` (their data is reachable: they answered)."""
    out: dict[int, rb.ShardStatus] = {}
    answering = set(answered)
    for shard in sorted(shards):
        if shard not in answering:
            continue
        since = memory.get(shard, ShardMemory()).down_since
        down_long = (
            move_after_s > 0
            and health.get(shard, ShardHealth(shard, SERVING)).phase != SERVING
            and since is not None
            and now - since >= move_after_s
        )
        if shard in step.draining or down_long:
            out[shard] = rb.ShardStatus.DRAINING
        elif shard in step.new:
            out[shard] = rb.ShardStatus.NEW
        else:
            out[shard] = rb.ShardStatus.ACTIVE
    return out


@dataclass(frozen=True)
class Report:
    """Everything the conditions are made of, gathered by one loop."""

    desired: int
    replicas: int | None
    health: Mapping[int, ShardHealth]
    spec_error: str = ""
    paused: bool = False
    observe_errors: Sequence[str] = ()
    redis_error: str = ""
    given_up: Mapping[int, str] = field(default_factory=dict)
    # Shards down past the threshold whose spaces cannot be moved (they do not answer).
    unreachable: Sequence[int] = ()
    step: ScaleStep = ScaleStep(None)
    # The move running now: (space, source, target, reason, seconds running).
    moving: tuple[str, int, int, str, float] | None = None
    rebalance_enabled: bool = True
    hottest: float = 0.0
    deferred: str = ""
    unfinished: bool = False
    skips: Sequence[str] = ()


def conditions(report: Report) -> list[tuple[str, bool, str, str]]:
    """(type, true?, reason, message) of the four conditions, in a fixed order."""
    r = report
    # Starting and not-yet-created pods are progress, not damage.
    down = {s: h for s, h in sorted(r.health.items()) if h.phase == DOWN}
    serving_desired = sum(
        1 for s in range(r.desired) if r.health.get(s, ShardHealth(s, MISSING)).phase == SERVING
    )
    stuck_move = r.moving is not None and r.moving[4] > MOVE_STUCK_S
    scaling = r.replicas is not None and (r.replicas != r.desired or bool(r.step.draining))

    if r.spec_error:
        degraded = (True, "InvalidSpec", r.spec_error)
    elif r.redis_error:
        degraded = (True, "RedisUnreachable", r.redis_error)
    elif r.observe_errors:
        degraded = (True, "WorkloadMissing", "; ".join(r.observe_errors))
    elif r.given_up:
        degraded = (True, "RestartsExhausted", "; ".join(r.given_up.values()))
    elif r.unreachable:
        names = ", ".join(f"shard-{s}" for s in r.unreachable)
        why = (
            f"{names} down past the threshold and unreachable: their spaces stay there until "
            "the shard (and its volume) is back; nothing is re-created elsewhere"
        )
        degraded = (True, "ShardDataUnreachable", why)
    elif down:
        first = next(iter(down.values()))
        reason = first.reason if len({h.reason for h in down.values()}) == 1 else "ShardsDown"
        degraded = (True, reason, "; ".join(h.message for h in down.values()))
    else:
        degraded = (False, "AllShardsServing", "every shard serves and heartbeats")

    if r.spec_error:
        progressing = (False, "InvalidSpec", r.spec_error)
    elif r.paused:
        progressing = (False, "Paused", "spec.paused: observing only")
    elif r.step.refused:
        progressing = (False, "ShrinkRefused", r.step.waiting)
    elif r.moving is not None:
        space, source, target, reason, _ = r.moving
        why = f"moving {space} from shard-{source} to shard-{target} ({reason})"
        progressing = (True, "MovingSpace", why)
    elif scaling:
        why = r.step.waiting or f"scaling from {r.replicas} to {r.desired} shards"
        progressing = (True, "Draining" if r.step.draining else "Scaling", why)
    elif r.step.new and r.unfinished:
        progressing = (True, "Filling", "new shards are receiving spaces")
    else:
        progressing = (False, "Reconciled", f"{r.desired} shards, nothing to do")

    balancing = r.moving is not None and r.moving[3].startswith("balance")
    if r.paused:
        rebalancing = (False, "Paused", "spec.paused: no moves")
    elif not r.rebalance_enabled:
        rebalancing = (False, "Disabled", "spec.rebalance.enabled is false")
    elif balancing:
        assert r.moving is not None
        rebalancing = (True, "MovingHotSpace", f"moving {r.moving[0]}: {r.moving[3]}")
    elif r.unfinished:
        rebalancing = (True, "Unfinished", f"hottest shard at {r.hottest:.2f}x the mean")
    else:
        why = f"hottest shard at {r.hottest:.2f}x the mean"
        extra = [r.deferred] if r.deferred else []
        rebalancing = (False, "Balanced", "; ".join([why, *extra, *r.skips[:3]]))

    if r.spec_error:
        ready = (False, "InvalidSpec", r.spec_error)
    elif stuck_move:
        assert r.moving is not None
        why = f"the move of {r.moving[0]} has run for {r.moving[4]:.0f} s"
        ready = (False, "MoveStuck", why)
    elif serving_desired < r.desired or r.redis_error or r.observe_errors:
        why = f"{serving_desired}/{r.desired} shards serving"
        ready = (False, "ShardsNotServing", why if not degraded[0] else f"{why}: {degraded[2]}")
    else:
        ready = (True, "AllShardsServing", f"{serving_desired}/{r.desired} shards serving")
    return [
        ("Ready", *ready),
        ("Progressing", *progressing),
        ("Degraded", *degraded),
        ("Rebalancing", *rebalancing),
    ]


def phase(report: Report, conds: Sequence[tuple[str, bool, str, str]]) -> str:
    by = {c[0]: c for c in conds}
    if report.spec_error:
        return "Invalid"
    if report.paused:
        return "Paused"
    if by["Degraded"][1]:
        return "Degraded"
    if by["Progressing"][1] and by["Progressing"][2] in ("Scaling", "Draining", "Filling"):
        return "Scaling"
    if by["Rebalancing"][1]:
        return "Rebalancing"
    return "Running" if by["Ready"][1] else "Pending"


def condition_entries(
    conds: Sequence[tuple[str, bool, str, str]],
    previous: Sequence[Mapping[str, Any]],
    generation: int,
    now_iso: str,
) -> list[dict[str, Any]]:
    """The status.conditions list; a condition keeps its lastTransitionTime until its status
    changes."""
    before = {c.get("type"): c for c in previous}
    out = []
    for kind, true, reason, message in conds:
        status = "True" if true else "False"
        old = before.get(kind) or {}
        since = old.get("lastTransitionTime") if old.get("status") == status else None
        out.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message[:1024],
                "lastTransitionTime": since or now_iso,
                "observedGeneration": generation,
            }
        )
    return out
