"""The operator's decisions, as pure functions: health, restarts, scaling, plan statuses,
conditions; and the spec's checks."""

from __future__ import annotations

import pytest

from engram.control import rebalance as rb
from engram.control import restarts
from engram_operator import decide
from engram_operator.decide import DOWN, SERVING, STARTING, Report, ShardHealth, ShardMemory
from engram_operator.observe import PodView, pod_view, shard_pods
from engram_operator.spec import SpecError, parse, quantity

NOW = 1_000_000.0
POLICY = restarts.Policy(initial_delay_s=10, max_delay_s=100, max_restarts=3, window_s=600)


def pod(ready: bool = True, restarts: int = 0, waiting: str = "", age: float = 1000.0,
        phase: str = "Running", terminating: bool = False) -> PodView:  # fmt: skip
    return PodView("sts-0", ready, phase, restarts, waiting, terminating, NOW - age)


# ---------------------------------------------------------------------------- health


@pytest.mark.parametrize(
    ("view", "age", "phase", "reason", "stuck"),
    [
        (pod(), 1.0, SERVING, "", False),
        (None, None, "Missing", "PodMissing", False),
        (pod(ready=False, age=5), None, STARTING, "Starting", False),
        (pod(ready=False, restarts=1), 30.0, DOWN, "NotReady", False),
        (pod(ready=False, restarts=4, waiting="CrashLoopBackOff"), None, DOWN, "CrashLoop", True),
        (pod(), 60.0, DOWN, "HeartbeatMissing", True),
        (pod(), None, DOWN, "HeartbeatMissing", True),
        (pod(phase="Unknown"), 1.0, DOWN, "PodUnknown", True),
        (pod(terminating=True), 1.0, DOWN, "Terminating", False),
    ],
)
def test_shard_health(
    view: PodView | None, age: float | None, phase: str, reason: str, stuck: bool
) -> None:
    h = decide.shard_health(0, view, age, 10.0, NOW)
    assert (h.phase, h.reason, h.stuck) == (phase, reason, stuck)


def test_a_restart_repaired_between_two_looks_is_reported_once() -> None:
    h = decide.shard_health(0, pod(restarts=2), 1.0, 10.0, NOW, restarts_seen=1)
    assert (h.phase, h.reason) == (DOWN, "Restarted")
    memory = decide.remember(ShardMemory(), h, pod(restarts=2), NOW)
    assert memory.pod_restarts == 2 and memory.down_since == NOW
    again = decide.shard_health(0, pod(restarts=2), 1.0, 10.0, NOW + 2, restarts_seen=2)
    assert again.phase == SERVING
    assert decide.remember(memory, again, pod(restarts=2), NOW + 2).down_since is None


def test_pod_view_reads_the_kubelets_status() -> None:
    raw = {
        "metadata": {"name": "x-shard-3", "creationTimestamp": "2026-12-05T10:00:00Z"},
        "status": {
            "phase": "Running",
            "conditions": [{"type": "Ready", "status": "False"}],
            "containerStatuses": [
                {"restartCount": 5, "state": {"waiting": {"reason": "CrashLoopBackOff"}}}
            ],
        },
    }
    view = pod_view(raw)
    assert (view.ready, view.restarts, view.waiting) == (False, 5, "CrashLoopBackOff")
    other = {"metadata": {"name": "x-shard-config"}}
    assert list(shard_pods("x-shard", [raw, other])) == [3]


# ---------------------------------------------------------------------------- restarts


def test_a_stuck_pod_is_deleted_after_a_backoff_and_given_up_on_a_crash_loop() -> None:
    stuck = {0: ShardHealth(0, DOWN, "CrashLoop", "loop", stuck=True)}
    mem = {0: ShardMemory(down_since=NOW)}
    assert decide.pod_deletions(stuck, mem, NOW + 5, POLICY).due == ()
    assert decide.pod_deletions(stuck, mem, NOW + 10, POLICY).due == (0,)
    m = decide.record_deletion(mem[0], NOW + 10, POLICY)
    # The second deletion waits longer (backoff doubles).
    assert decide.pod_deletions(stuck, {0: m}, NOW + 25, POLICY).due == ()
    assert decide.pod_deletions(stuck, {0: m}, NOW + 30, POLICY).due == (0,)
    for t in (30, 80):
        m = decide.record_deletion(m, NOW + t, POLICY)
    result = decide.pod_deletions(stuck, {0: m}, NOW + 500, POLICY)
    assert result.due == () and "shard-0 restarted 3 times" in result.given_up[0]


def test_a_down_shard_that_is_not_stuck_is_left_to_the_kubelet() -> None:
    down = {0: ShardHealth(0, DOWN, "NotReady", "restarting")}
    assert decide.pod_deletions(down, {0: ShardMemory(NOW)}, NOW + 1000, POLICY).due == ()


# ---------------------------------------------------------------------------- scaling


def test_scale_up_sets_replicas_and_marks_the_new_shards() -> None:
    step = decide.scale_step(4, 2, (), {0: 3, 1: 3}, 0, None)
    assert step.replicas == 4 and step.new == {2, 3}


def test_scale_down_drains_before_it_shrinks() -> None:
    step = decide.scale_step(2, 3, (), {0: 1, 1: 1, 2: 2}, 0, None)
    assert step.replicas is None and step.draining == {2} and "draining 2 spaces" in step.waiting
    assert decide.scale_step(2, 3, (), {0: 2, 1: 2, 2: 0}, 0, None).replicas == 2
    silent = decide.scale_step(2, 3, (), {0: 2, 1: 2}, 0, None)
    assert silent.replicas is None and "do not answer" in silent.waiting


def test_a_shrink_the_data_does_not_fit_is_refused() -> None:
    gib = 1 << 30
    step = decide.scale_step(1, 3, (), {0: 1, 1: 1, 2: 1}, 9 * gib, 10 * gib)
    assert step.refused and step.replicas is None and not step.draining
    assert "refused" in step.waiting


def test_plan_statuses_drain_leaving_and_long_dead_reachable_shards() -> None:
    step = decide.ScaleStep(None, draining=frozenset({3}), new=frozenset({2}))
    health = {1: ShardHealth(1, DOWN, "HeartbeatMissing")}
    memory = {1: ShardMemory(down_since=NOW - 400)}
    statuses = decide.plan_statuses(range(5), step, health, memory, {0, 1, 2, 3}, NOW, 300)
    assert statuses == {
        0: rb.ShardStatus.ACTIVE,
        1: rb.ShardStatus.DRAINING,
        2: rb.ShardStatus.NEW,
        3: rb.ShardStatus.DRAINING,
    }
    assert 1 not in decide.plan_statuses(range(2), step, health, memory, {0}, NOW, 300)


# ---------------------------------------------------------------------------- conditions


def by_type(report: Report) -> dict[str, tuple[bool, str]]:
    return {kind: (ok, reason) for kind, ok, reason, _ in decide.conditions(report)}


def test_ready_only_when_every_desired_shard_serves() -> None:
    serving = {i: ShardHealth(i, SERVING) for i in range(2)}
    assert by_type(Report(2, 2, serving))["Ready"] == (True, "AllShardsServing")
    starting = {**serving, 1: ShardHealth(1, STARTING, "Starting")}
    conds = by_type(Report(2, 2, starting))
    assert conds["Ready"][0] is False and conds["Degraded"][0] is False
    down = {**serving, 1: ShardHealth(1, DOWN, "CrashLoop", "loops")}
    conds = by_type(Report(2, 2, down))
    assert conds["Ready"][0] is False and conds["Degraded"] == (True, "CrashLoop")


def test_a_stuck_move_turns_ready_false() -> None:
    serving = {i: ShardHealth(i, SERVING) for i in range(2)}
    moving = ("s", 0, 1, "balance: hot", decide.MOVE_STUCK_S + 1)
    conds = by_type(Report(2, 2, serving, moving=moving))
    assert conds["Ready"] == (False, "MoveStuck") and conds["Rebalancing"][0] is True
    fresh = by_type(Report(2, 2, serving, moving=("s", 0, 1, "balance: hot", 3.0)))
    assert fresh["Ready"][0] is True and fresh["Progressing"] == (True, "MovingSpace")


def test_invalid_spec_and_unreachable_data_are_reported() -> None:
    conds = by_type(Report(2, None, {}, spec_error="bad"))
    assert conds["Degraded"] == (True, "InvalidSpec") and conds["Ready"][0] is False
    serving = {i: ShardHealth(i, SERVING) for i in range(2)}
    conds = by_type(Report(2, 2, serving, unreachable=[1]))
    assert conds["Degraded"] == (True, "ShardDataUnreachable")


def test_conditions_keep_their_transition_time() -> None:
    conds = [("Ready", True, "AllShardsServing", "ok")]
    first = decide.condition_entries(conds, [], 1, "t1")
    again = decide.condition_entries(conds, first, 2, "t2")
    assert again[0]["lastTransitionTime"] == "t1" and again[0]["observedGeneration"] == 2
    flipped = decide.condition_entries([("Ready", False, "X", "no")], again, 2, "t3")
    assert flipped[0]["lastTransitionTime"] == "t3"


# ---------------------------------------------------------------------------- spec


BASE = {
    "shards": 2,
    "workloads": {"shardStatefulSet": "s", "shardService": "s", "gatewayDeployment": "g"},
    "redis": {"url": "redis://r:6379/0"},
}


def test_spec_defaults_and_env_redis_url() -> None:
    spec = parse(BASE, "redis://env:6379/0")
    assert spec.redis_url == "redis://env:6379/0" and spec.policy.trigger == 1.25
    assert spec.interval_s == 30 and spec.move_spaces_after_s == 300
    off = parse({**BASE, "rebalance": {"enabled": False}})
    assert off.policy.trigger > 1e9  # balancing never starts; drains and fills still do


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"shards": 0}, "shards"),
        ({"workloads": {}}, "workloads"),
        ({"redis": {}}, "Redis"),
        ({"rebalance": {"trigger": 1.1, "target": 1.3}}, "target"),
        ({"storage": {"size": "lots"}}, "quantity"),
    ],
)
def test_bad_specs_are_refused_with_the_reason(change: dict[str, object], word: str) -> None:
    with pytest.raises(SpecError, match=word):
        parse({**BASE, **change})


def test_quantity() -> None:
    assert quantity("20Gi") == 20 << 30 and quantity("1G") == 10**9 and quantity("512") == 512
