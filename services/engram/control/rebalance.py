"""Rebalancing decisions: which memory spaces move to which shard. Pure functions, no I/O.

The local launcher (``engram up --rebalance``, and ``--shards N`` on existing data) and the
Kubernetes operator build a :class:`Cluster` from their own state, call :func:`plan`, carry
out the :class:`Move` records it returns and record them (:func:`record_round` when they are
done, ``Cluster.in_flight`` while they run). A plan has no move when the cluster is balanced.

Load model: a space's ingest rate, recall rate and bytes held add up, weighted by the
:class:`Policy`, to one figure; a shard's figure is its spaces' (a move in flight counts at
its target) plus its own overhead. The mean is over the shards that are not draining.

A round:
1. Drain: the spaces of draining shards move, the largest first, each to the least loaded
   shard that is not draining, whatever the trigger and the cooldowns.
2. Balance (unless the last round was less than ``cluster_cooldown_s`` ago). It starts when
   a shard is over ``trigger`` x the mean, or a new shard is under ``fill`` x the mean, and a
   move can relieve it. Then, greedily: the shard furthest over ``target`` x the mean gives
   the coolest shard the space closest in figure to what brings one of the two to the mean;
   a new shard takes from the hottest shards. Until nothing is over the target (or nothing
   can move).
A move must leave its receiver under the target and cooler than the source was, and lower
the pair's peak by ``min_gain`` of what it moves, so it never just shifts the peak and is
never worth undoing. A space alone over the target moves only where it lowers its shard's
peak that much (else a :class:`Skip` says why it stays); its neighbours are moved off.
Hysteresis: nothing starts between target and trigger, nothing is moved back, a space rests
``space_cooldown_s`` after a move, and the cluster ``cluster_cooldown_s`` after a round.
Limits on moves in flight, moves and bytes per round cut a round short: ``Plan.unfinished``
then lets the next one carry on to the target. Ties go to the lower id: the same input
always gives the same plan.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, replace
from enum import StrEnum

GIB = 1 << 30


class ShardStatus(StrEnum):
    ACTIVE = "active"
    # Just added: receives spaces until it carries about the mean.
    NEW = "new"
    # Being removed: every space moves off it, it receives none.
    DRAINING = "draining"


@dataclass(frozen=True)
class Load:
    # Observations ingested per second.
    ingest: float = 0.0
    # Recalls served per second.
    recall: float = 0.0
    # Bytes held (WAL, index, snapshots): what a move copies.
    bytes: int = 0
    # Rows written but not indexed yet.
    backlog: int = 0


@dataclass(frozen=True)
class Policy:
    # Load figure: the cost of one observation ingested per second (the figure's unit)...
    ingest_weight: float = 1.0
    # ...of one recall per second (a search costs about a hundred ingested observations)...
    recall_weight: float = 100.0
    # ...and of one GiB held (memory, disk, snapshot and move time).
    gib_weight: float = 1000.0
    # A round starts when a shard's figure is over this multiple of the mean.
    trigger: float = 1.25
    # A round moves spaces until no shard is over this multiple of the mean (<= trigger).
    target: float = 1.2
    # A move must lower the peak of its two shards by this fraction of the moved space's
    # figure: a move that mostly shifts the peak from one shard to the other is not made.
    min_gain: float = 0.5
    # On a shard held over the target by a space alone, a move must also lower the peak by
    # this fraction of that space's own excess over the target: the further the target is
    # out of reach, the less a small neighbour moved off helps.
    min_hotspot_gain: float = 0.02
    # A new shard receives spaces until it carries this fraction of the mean, or of the
    # median shard if lower (when a few hot spaces lift the mean over what most carry).
    fill: float = 0.9
    # A space rests this long after a move before it moves again (drains excepted).
    space_cooldown_s: float = 1800.0
    # Balancing waits this long after a round that moved something, for the figures to
    # settle (drains do not wait).
    cluster_cooldown_s: float = 300.0
    # Moves in flight at once, counting those of earlier rounds.
    max_concurrent_moves: int = 8
    # Moves one round proposes.
    max_moves_per_round: int = 8
    # Bytes one round moves; a space larger than this still moves, alone in its round.
    max_bytes_per_round: int = 16 * GIB
    # A shard whose un-indexed rows, with the moved space's own, would pass this receives
    # nothing: it is behind already.
    max_target_backlog: int = 500_000

    def __post_init__(self) -> None:
        checks = (
            ("ingest_weight", self.ingest_weight >= 0, ">= 0"),
            ("recall_weight", self.recall_weight >= 0, ">= 0"),
            ("gib_weight", self.gib_weight >= 0, ">= 0"),
            ("target", 1.0 <= self.target, ">= 1"),
            ("trigger", self.target <= self.trigger, ">= target"),
            ("min_gain", 0.0 <= self.min_gain <= 1.0, "in [0, 1]"),
            ("min_hotspot_gain", 0.0 <= self.min_hotspot_gain, ">= 0"),
            ("fill", 0.0 <= self.fill <= self.target, "in [0, target]"),
            ("space_cooldown_s", self.space_cooldown_s >= 0, ">= 0"),
            ("cluster_cooldown_s", self.cluster_cooldown_s >= 0, ">= 0"),
            ("max_concurrent_moves", self.max_concurrent_moves >= 1, ">= 1"),
            ("max_moves_per_round", self.max_moves_per_round >= 1, ">= 1"),
            ("max_bytes_per_round", self.max_bytes_per_round >= 0, ">= 0"),
            ("max_target_backlog", self.max_target_backlog >= 0, ">= 0"),
        )
        for name, ok, allowed in checks:
            value = getattr(self, name)
            if not ok or not math.isfinite(value):
                raise ValueError(f"Policy.{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class ShardState:
    shard: int
    status: ShardStatus = ShardStatus.ACTIVE
    # Load no space accounts for (the shard's measured totals less its spaces' sum): it
    # counts toward the shard and never moves.
    overhead: Load = Load()


@dataclass(frozen=True)
class SpaceState:
    space: str
    owner: int
    load: Load = Load()
    # When the space last finished moving, on the caller's clock; None: never.
    last_moved: float | None = None


@dataclass(frozen=True)
class InFlight:
    """A move proposed by an earlier round and not finished yet."""

    space: str
    source: int
    target: int


@dataclass(frozen=True)
class Cluster:
    shards: tuple[ShardState, ...]
    spaces: tuple[SpaceState, ...]
    in_flight: tuple[InFlight, ...] = ()
    # When the last round that moved something ran; None: never.
    last_round: float | None = None
    # The last round's balancing stopped at a limit with work left (its Plan.unfinished).
    unfinished: bool = False


@dataclass(frozen=True)
class Move:
    space: str
    source: int
    target: int
    # Starts with what asked for it: "drain", "balance" or "fill".
    reason: str


@dataclass(frozen=True)
class Skip:
    """A space left where it is although its shard is over the target, and why."""

    space: str
    shard: int
    reason: str


@dataclass(frozen=True)
class Plan:
    moves: tuple[Move, ...] = ()
    skips: tuple[Skip, ...] = ()
    # The hottest shard's figure over the mean, before and after the moves (as planned).
    hottest_before: float = 0.0
    hottest_after: float = 0.0
    # Balancing stopped at a limit with work left: pass it back as Cluster.unfinished.
    unfinished: bool = False
    # Why balancing did not run this round (cooldown, moves in flight); empty if it did.
    deferred: str = ""


def figure(load: Load, policy: Policy) -> float:
    """One load figure, in observations ingested per second."""
    return (
        policy.ingest_weight * load.ingest
        + policy.recall_weight * load.recall
        + policy.gib_weight * load.bytes / GIB
    )


def plan(cluster: Cluster, now: float, policy: Policy | None = None) -> Plan:
    """The moves of one round; no move when the cluster is balanced. Raises ValueError on a
    malformed cluster (unknown owner, duplicate id, negative load), naming the item."""
    policy = policy or Policy()
    _check(cluster)
    r = _Round(cluster, now, policy)
    before = r.hottest()
    skips = r.drain()
    deferred = ""
    since = now - cluster.last_round if cluster.last_round is not None else math.inf
    if since < policy.cluster_cooldown_s:
        wait = policy.cluster_cooldown_s - since
        deferred = f"balancing waits {wait:.0f} s for the cluster cooldown"
    elif r.full():
        deferred = f"the move limit is reached ({len(cluster.in_flight)} moves in flight)"
    else:
        r.balance(resume=cluster.unfinished)
    skips += r.skips(balanced=not deferred)
    unfinished = (r.cut or r.full()) and r.work_left() if not deferred else cluster.unfinished
    moves = tuple(r.moves.values())
    return Plan(moves, tuple(skips), before, r.hottest(), unfinished, deferred)


def shard_loads(cluster: Cluster, policy: Policy | None = None) -> dict[int, float]:
    """Each shard's load figure, moves in flight counted at their targets."""
    _check(cluster)
    return dict(_Round(cluster, 0.0, policy or Policy()).load)


def record_round(cluster: Cluster, plan: Plan, now: float) -> Cluster:
    """The cluster after the plan's moves finished at ``now``: new owners and rest times,
    the round's time and whether it left work undone."""
    moved = {m.space: m.target for m in plan.moves}
    spaces = tuple(
        replace(s, owner=moved[s.space], last_moved=now) if s.space in moved else s
        for s in cluster.spaces
    )
    return replace(
        cluster,
        spaces=spaces,
        in_flight=tuple(m for m in cluster.in_flight if m.space not in moved),
        last_round=now if plan.moves else cluster.last_round,
        unfinished=plan.unfinished,
    )


def _check_load(load: Load, what: str) -> None:
    for name in ("ingest", "recall", "bytes", "backlog"):
        value = getattr(load, name)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{what} has {name} = {value!r}: loads must be finite and >= 0")


def _check(cluster: Cluster) -> None:
    shards: set[int] = set()
    for shard in cluster.shards:
        if shard.shard in shards:
            raise ValueError(f"shard {shard.shard} is listed twice")
        shards.add(shard.shard)
        _check_load(shard.overhead, f"shard {shard.shard}")
    owners: dict[str, int] = {}
    for space in cluster.spaces:
        if space.space in owners:
            raise ValueError(f"space {space.space!r} is listed twice")
        if space.owner not in shards:
            raise ValueError(f"space {space.space!r} is owned by unknown shard {space.owner}")
        _check_load(space.load, f"space {space.space!r}")
        owners[space.space] = space.owner
    flying: set[str] = set()
    for move in cluster.in_flight:
        what = f"the move in flight of space {move.space!r}"
        if move.space in flying:
            raise ValueError(f"{what} is listed twice")
        if move.space not in owners:
            raise ValueError(f"{what} names an unknown space")
        if move.source not in shards or move.target not in shards or move.source == move.target:
            raise ValueError(f"{what} goes from shard {move.source} to shard {move.target}")
        if owners[move.space] not in (move.source, move.target):
            raise ValueError(f"{what}: the space's owner is shard {owners[move.space]}")
        flying.add(move.space)
    if cluster.spaces and all(s.status is ShardStatus.DRAINING for s in cluster.shards):
        raise ValueError("every shard is draining: no shard is left to hold the spaces")


@dataclass(eq=False)
class _Space:
    id: str
    figure: float
    bytes: int
    backlog: int
    # A move of it is in flight: it stays put.
    flying: bool
    # Moved less than space_cooldown_s ago: only a drain moves it.
    resting: bool


class _Round:
    """The working state of one plan() call: projected loads, updated as moves are chosen."""

    def __init__(self, cluster: Cluster, now: float, policy: Policy) -> None:
        self.policy = policy
        self.status = {s.shard: s.status for s in sorted(cluster.shards, key=lambda s: s.shard)}
        self.load = {s.shard: figure(s.overhead, policy) for s in cluster.shards}
        self.backlog = {s.shard: s.overhead.backlog for s in cluster.shards}
        self.on: dict[int, list[_Space]] = {shard: [] for shard in self.status}
        flying = {m.space: m.target for m in cluster.in_flight}
        for s in sorted(cluster.spaces, key=lambda s: s.space):
            at = flying.get(s.space, s.owner)
            resting = s.last_moved is not None and now - s.last_moved < policy.space_cooldown_s
            space = _Space(
                s.space, figure(s.load, policy), s.load.bytes, s.load.backlog,
                s.space in flying, resting,
            )  # fmt: skip
            self.on[at].append(space)
            self.load[at] += space.figure
            self.backlog[at] += space.backlog
        self.receivers = [s for s, st in self.status.items() if st is not ShardStatus.DRAINING]
        # A draining shard's overhead leaves with it; its spaces stay in the cluster.
        gone = [s.overhead for s in cluster.shards if s.status is ShardStatus.DRAINING]
        total = sum(self.load.values()) - sum(figure(o, policy) for o in gone)
        self.mean = total / max(1, len(self.receivers))
        self.cap = policy.target * self.mean
        self.top = {s: max((x.figure for x in self.on[s]), default=0.0) for s in self.status}
        self.slots = policy.max_concurrent_moves - len(cluster.in_flight)
        self.slots = min(policy.max_moves_per_round, self.slots)
        # One move per space: a space moved again within the round keeps its first source.
        self.moves: dict[str, Move] = {}
        self.bytes_moved = 0
        # A candidate was passed over for the byte limit, or for the target's backlog.
        self.cut = False
        self.backlogged = False

    def hottest(self) -> float:
        return max(self.load.values(), default=0.0) / self.mean if self.mean > 0 else 0.0

    def ratio(self, shard: int) -> str:
        return f"{self.load[shard] / self.mean:.2f}x the mean"

    def full(self) -> bool:
        return len(self.moves) >= self.slots

    def fits(self, space: _Space) -> bool:
        if space.id in self.moves:
            return True  # already paid for
        room = self.bytes_moved + space.bytes <= self.policy.max_bytes_per_round
        return not self.full() and (room or not self.moves)

    def share(self) -> float:
        """What a new shard aims at: the mean, or the median shard when that is lower."""
        donors = [self.load[s] for s in self.receivers if self.status[s] is ShardStatus.ACTIVE]
        return min(self.mean, statistics.median(donors or [self.mean]))

    def excess(self, shard: int) -> float:
        """Load over the target, or over the shard's own space when that alone is hotter."""
        return self.load[shard] - max(self.cap, self.top[shard])

    def least_gain(self, shard: int) -> float:
        """The least a move off ``shard`` must lower its peak by, beyond ``min_gain``: on a
        shard held over the target by a space alone, a share of that space's own excess."""
        return self.policy.min_hotspot_gain * max(0.0, self.top[shard] - self.cap)

    def pressure(self, shard: int) -> float:
        """What starts a round: the excess; on a shard held over the target by a space alone,
        what its neighbours carry over the least gain (continuous at the target both ways,
        so a figure wavering about it, or about the least gain, starts nothing)."""
        if self.top[shard] <= self.cap:
            return self.excess(shard)
        least = self.least_gain(shard)
        sizes = sorted((x.figure for x in self.on[shard]), reverse=True)[1:]
        return sum(max(0.0, x - least) for x in sizes)

    def coolest(self, exclude: int, backlog: int = 0) -> int | None:
        limit = self.policy.max_target_backlog
        fit = [s for s in self.receivers if s != exclude and self.backlog[s] + backlog <= limit]
        return min(fit, key=lambda s: (self.load[s], s), default=None)

    def move(self, space: _Space, source: int, target: int, reason: str) -> None:
        earlier = self.moves.get(space.id)
        if earlier is None:
            self.moves[space.id] = Move(space.id, source, target, reason)
            self.bytes_moved += space.bytes
        elif earlier.source != target:
            self.moves[space.id] = replace(earlier, target=target)
        else:  # back where it started: no move
            del self.moves[space.id]
            self.bytes_moved -= space.bytes
        self.on[source].remove(space)
        self.on[target].append(space)
        for shard, sign in ((source, -1), (target, 1)):
            self.load[shard] += sign * space.figure
            self.backlog[shard] += sign * space.backlog
        self.top[source] = max((x.figure for x in self.on[source]), default=0.0)
        self.top[target] = max(self.top[target], space.figure)

    def drain(self) -> list[Skip]:
        """Moves the spaces of the draining shards, the largest of them all first, each to
        the least loaded shard that is not draining."""
        draining = [s for s, status in self.status.items() if status is ShardStatus.DRAINING]
        home = {x.id: s for s in draining for x in self.on[s] if not x.flying}
        leaving = [x for s in draining for x in self.on[s] if not x.flying]
        skips: list[Skip] = []
        for space in sorted(leaving, key=lambda x: (-x.figure, x.id)):
            shard = home[space.id]
            target = self.coolest(shard, space.backlog)
            if target is None:
                why = "drain: every other shard is too far behind on indexing to take it"
                skips.append(Skip(space.id, shard, why))
            elif self.fits(space):  # else it waits for a round with bytes left
                self.move(space, shard, target, f"drain: shard {shard} is being removed")
        return skips

    def best(self, source: int, target: int, ideal: float) -> _Space | None:
        """The space of ``source`` whose move to ``target`` is allowed and closest to
        ``ideal``; ties go to fewer bytes, then to the lower id."""
        p = self.policy
        src, dst = self.load[source], self.load[target]
        floor = self.least_gain(source)
        chosen: tuple[float, int, str] | None = None
        found = None
        for space in self.on[source]:
            x = space.figure
            if space.flying or space.resting:
                continue
            if self.cap < dst + x and x <= self.cap:
                continue  # over the target it goes only when it is over it alone anyway
            gain = min(x, src - dst - x)  # how much lower the pair's peak gets
            if gain <= 0 or gain < max(floor, p.min_gain * x):
                continue
            if self.backlog[target] + space.backlog > p.max_target_backlog:
                self.backlogged = True
                continue
            if not self.fits(space):
                self.cut = True
                continue
            key = (abs(x - ideal), space.bytes, space.id)
            if chosen is None or key < chosen:
                chosen, found = key, space
        return found

    def balance(self, resume: bool) -> None:
        p = self.policy
        band = (p.trigger - p.target) * self.mean
        started = resume
        stuck: set[int] = set()
        unfillable: set[int] = set()
        while not self.full():
            level, floor = (self.excess, 0.0) if started else (self.pressure, band)
            over = [s for s in self.receivers if s not in stuck and level(s) > floor]
            if over:
                source = max(over, key=lambda s: (level(s), -s))
                if not self.shed(source):
                    stuck.add(source)
                    continue
            else:
                goal = p.fill * self.share()
                hungry = [
                    s
                    for s in self.receivers
                    if self.status[s] is ShardStatus.NEW
                    and s not in unfillable
                    and self.load[s] < goal
                ]
                if not hungry:
                    return
                target = min(hungry, key=lambda s: (self.load[s], s))
                if not self.fill(target):
                    unfillable.add(target)
                    continue
            started = True
            stuck.clear()
            unfillable.clear()

    def shed(self, source: int) -> bool:
        """Moves a space of ``source`` to the coolest shard that takes one (a cooler shard
        is always as good, unless it is behind on indexing)."""
        others = sorted((s for s in self.receivers if s != source), key=lambda s: (self.load[s], s))
        for target in others:
            ideal = min(self.load[source] - self.mean, self.mean - self.load[target])
            self.backlogged = False
            space = self.best(source, target, ideal)
            if space is not None:
                why = (
                    f"balance: shard {source} at {self.ratio(source)}, over {self.policy.target:g}x"
                )
                self.move(space, source, target, why)
                return True
            if not self.backlogged:
                return False
        return False

    def fill(self, target: int) -> bool:
        donors = [s for s in self.receivers if s != target and self.status[s] is ShardStatus.ACTIVE]
        dst = self.load[target]
        for source in sorted(donors, key=lambda s: (-self.load[s], s)):
            ideal = min(self.share() - dst, (self.load[source] - dst) / 2)
            space = self.best(source, target, ideal)
            if space is not None:
                why = f"fill: new shard {target} at {self.ratio(target)}"
                self.move(space, source, target, why)
                return True
        return False

    def work_left(self) -> bool:
        """Whether a shard is still over the target or a new one short of its share."""
        fill = self.policy.fill * self.share()
        return any(
            self.excess(s) > 0 or (self.status[s] is ShardStatus.NEW and self.load[s] < fill)
            for s in self.receivers
        )

    def skips(self, balanced: bool) -> list[Skip]:
        """Why shards stay over the target: a space alone hotter than it, or (when balancing
        ran to the end) a shard over the trigger that no allowed move relieves."""
        p = self.policy
        found = []
        for shard in self.receivers:
            hot = [x for x in self.on[shard] if x.figure > self.cap and x.id not in self.moves]
            for space in sorted(hot, key=lambda x: (-x.figure, x.id)):
                why = (
                    f"alone at {space.figure / self.mean:.2f}x the mean, over the target "
                    f"{p.target:g}x: moving it would only move the hotspot"
                )
                found.append(Skip(space.id, shard, why))
            stuck = self.pressure(shard) > (p.trigger - p.target) * self.mean
            if balanced and not self.full() and stuck and self.on[shard] and not hot:
                biggest = min(self.on[shard], key=lambda x: (-x.figure, x.id))
                why = (
                    f"shard {shard} at {self.ratio(shard)}: no allowed move relieves it (no "
                    "shard has room for its spaces under the target, or they rest after a move)"
                )
                found.append(Skip(biggest.id, shard, why))
        return found
