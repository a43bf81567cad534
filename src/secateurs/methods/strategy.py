"""Channel pruning strategy: how many channels each group loses, and the search for a goal.

The parts, in the order a run uses them:

- :func:`plan_channels` turns scores and a removal ratio into the channels each
  group loses (per group, or ranked globally); :func:`plan_for` makes that a
  surgery :class:`~secateurs.surgery.Plan`.
- :class:`Planner` gives the *feasible* :class:`Candidate` for a ratio: the plan
  with every group whose removal breaks the forward kept whole (rehearsed on meta
  tensors, or in place for small models), or, for transformers models, one width
  per kind of layer.
- A :class:`Goal` searches the ratio: a plain ratio is one candidate; a channel
  budget, a MACs target and a latency target bisect. Each returns an
  :class:`Outcome`: the candidate, whether the goal was met, and what the report
  records about it.

Nothing here scores channels (``importance``) or changes a model except through
``apply_checked_`` on the small-model fast path.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from ..errors import SecateursError
from ..graph import DependencyGraph, Group
from ..surgery import Plan, apply_plan_
from ..surgery.hf import config_for_plan
from ..surgery.rehearsal import apply_checked_, feasible_groups, plan_macs
from .common import keep_count
from .width import Role, kind_ratios, role_targets, uniform_removed

if TYPE_CHECKING:
    from .channels import Channels

log = logging.getLogger(__name__)

__all__ = ["Candidate", "ChannelBudget", "Goal", "LatencyGoal", "MacsGoal", "Outcome", "Planner", "RatioGoal",
           "goal_for", "plan_channels", "plan_for", "round_to_for"]

MACS_STEPS = 14  # bisection steps for a MACs target or a channel budget: 2**-14 of the ratio range
LATENCY_STEPS = 8  # each latency step builds and times a model: fewer, coarser steps


def round_to_for(config: Channels) -> int:
    """The multiple kept widths are rounded to (8 on CUDA for a latency target, where tensor cores want it)."""
    if config.round_to is not None:
        return config.round_to
    return 8 if config.target_latency is not None and (config.device or "cpu").startswith("cuda") else 1


def multiplicity(group: Group) -> int:
    """Channel width of one prunable unit (grouped convs move several channels at once)."""
    return min(group.indices[m].shape[1] for m in group.members)


def plan_channels(graph: DependencyGraph, scores: dict[int, Tensor], config: Channels, ratio: float,
                  per_group: dict[int, float] | None = None) -> dict[int, Tensor]:
    """Decide which channels go: group id -> positions of its channels to remove.

    ``per_group`` (from sensitivity allocation) gives each group its own ratio instead of ``ratio``.
    """
    round_to = round_to_for(config)
    if config.scope == "global":
        return _plan_global(graph, scores, config, ratio, round_to)
    removed: dict[int, Tensor] = {}
    for g in graph.groups:
        share = per_group.get(g.id, 0.0) if per_group is not None else ratio
        keep = keep_count(g.size, share, max(1, round_to // math.gcd(round_to, multiplicity(g))))
        removed[g.id] = torch.argsort(scores[g.id], stable=True)[:g.size - keep]
    return removed


def _plan_global(graph: DependencyGraph, scores: dict[int, Tensor], config: Channels, ratio: float,
                 round_to: int) -> dict[int, Tensor]:
    """One ranking over all groups (scores normalised within each group, so layers with large weights do
    not dominate), each group capped at ``max_ratio``."""
    pool = [(scores[g.id] / (scores[g.id].mean() + 1e-12), g) for g in graph.groups]
    budget = math.floor(ratio * sum(g.size for g in graph.groups) + 1e-9)
    flat = torch.cat([s for s, _ in pool])
    owners = torch.cat([torch.full((g.size,), i) for i, (_, g) in enumerate(pool)])
    taken = [0] * len(pool)
    caps = [g.size - keep_count(g.size, config.max_ratio, 1) for _, g in pool]
    chosen: list[list[int]] = [[] for _ in pool]
    offsets = torch.cumsum(torch.tensor([0] + [g.size for _, g in pool]), 0)
    for pos in torch.argsort(flat, stable=True).tolist():
        if budget <= 0:
            break
        i = int(owners[pos])
        if taken[i] < caps[i]:
            taken[i] += 1
            chosen[i].append(pos - int(offsets[i]))
            budget -= 1
    removed: dict[int, Tensor] = {}
    for (_, g), idx in zip(pool, chosen, strict=True):
        keep = keep_count(g.size, len(idx) / g.size, round_to // math.gcd(round_to, multiplicity(g)) or 1)
        drop = g.size - keep
        removed[g.id] = torch.argsort(scores[g.id], stable=True)[:drop] if drop else torch.empty(0, dtype=torch.long)
    return removed


def plan_for(graph: DependencyGraph, removed: dict[int, Tensor], group_ids: set[int] | None = None) -> Plan:
    """The surgery plan removing ``removed[g]`` channels of each group (all groups or ``group_ids``)."""
    plan = Plan()
    removed_roots: set[int] = set()
    for g in graph.groups:
        idx = removed.get(g.id)
        if idx is None or idx.numel() == 0 or (group_ids is not None and g.id not in group_ids):
            continue
        removed_roots.update(g.roots[i] for i in idx.tolist())
        for member in g.members:
            plan.add(member.tensor, member.dim, g.indices[member][idx].reshape(-1))
    plan.attrs = graph.new_sizes(removed_roots)
    return plan.normalized()


@dataclass
class Candidate:
    """A feasible plan for one removal ratio: what it removes, and the groups kept whole (id -> why)."""

    ratio: float
    plan: Plan
    removed: dict[int, Tensor]
    failed: dict[int, str] = field(default_factory=dict)

    @property
    def removed_channels(self) -> int:
        return sum(int(v.numel()) for v in self.removed.values())


@dataclass
class Outcome:
    """What a goal's search chose: the candidate, whether the goal was met, and what the report keeps."""

    candidate: Candidate
    met: bool = True
    details: dict[str, Any] = field(default_factory=dict)


class Planner:
    """Feasible candidates of one scored graph, by removal ratio.

    ``shares`` (sensitivity allocation) maps a fraction of the greedy steps to
    per-group ratios; ``roles`` (transformers models) make every layer the same
    shape; ``apply_directly`` applies the full plan to ``model`` in place and
    checks it there (small models: that saves the meta copy), falling back to
    rehearsing group by group. :attr:`applied` says the model already holds the
    last candidate.
    """

    def __init__(self, model: nn.Module, graph: DependencyGraph, scores: dict[int, Tensor], config: Channels,
                 example_inputs: Any, expected: Any, *, shares: Any = None, roles: list[Role] | None = None,
                 apply_directly: bool = False) -> None:
        self.model, self.graph, self.scores, self.config = model, graph, scores, config
        self.inputs, self.expected, self.shares = example_inputs, expected, shares
        self.roles, self.apply_directly = roles, apply_directly
        self.applied = False
        # transformers widths: roles whose group broke the rehearsal stay whole in every layer
        self._whole_roles: set[tuple[str, int, int]] = set()
        self._role_failures: dict[int, str] = {}
        self._uniform: dict[tuple, Candidate] = {}
        self._width_info: dict[int, dict[str, Any]] = {}  # id of a uniform candidate's plan -> per-kind widths

    @property
    def max_ratio(self) -> float:
        """The largest ratio a search may try (sensitivity shares allocate up to everything)."""
        return self.config.max_ratio if self.shares is None else 1.0

    def __call__(self, ratio: float) -> Candidate:
        return self._uniform_candidate(ratio) if self.roles is not None else self._group_candidate(ratio)

    def width_info(self, plan: Plan) -> dict[str, Any]:
        """Transformers models: kept/total widths per kind, and the kinds kept whole with why."""
        return self._width_info.get(id(plan), {})

    def removal(self, ratio: float) -> dict[int, Tensor]:
        """Channels each group would lose at ``ratio``, before any rehearsal."""
        return plan_channels(self.graph, self.scores, self.config, ratio,
                             self.shares(ratio) if self.shares is not None else None)

    def _group_candidate(self, ratio: float) -> Candidate:
        removed = self.removal(ratio)
        candidates = [gid for gid, idx in removed.items() if idx.numel()]
        plans: dict[frozenset[int], Plan] = {}

        def plan_of(keep: set[int]) -> Plan:  # the rehearsed plan is usually the one applied: build it once
            key = frozenset(keep)
            if key not in plans:
                plans[key] = plan_for(self.graph, removed, keep)
            return plans[key]

        if self.apply_directly and not plan_of(set(candidates)).drop:
            self.applied = apply_checked_(self.model, plan_of(set(candidates)), self.inputs, self.expected) == ""
            if self.applied:
                return Candidate(ratio, plan_of(set(candidates)), removed)
        ids, failed = feasible_groups(self.model, self.graph, plan_of, candidates, self.inputs, self.expected)
        kept = {gid: (idx if gid in ids else idx[:0]) for gid, idx in removed.items()}
        return Candidate(ratio, plan_of(ids), kept, failed)

    def _uniform_candidate(self, ratio: float) -> Candidate:
        """Every layer the same shape: one keep count per role, widths the config can describe.

        Ratios that round to the same keep counts give the same plan (targets bisect
        over many): it is searched and rehearsed once.
        """
        config, roles = self.config, self.roles or []
        ratios = kind_ratios(config.width, ratio)
        role_of = {g.id: r for r in roles for g in r.groups}
        while True:
            targets = role_targets(roles, ratios, round_to_for(config), self._whole_roles)
            key = (tuple(sorted(targets.items())), frozenset(self._whole_roles))
            if key in self._uniform:
                seen = self._uniform[key]
                return Candidate(ratio, seen.plan, seen.removed, dict(self._role_failures))
            removed, info = uniform_removed(
                self.model, self.graph, roles, self.scores, targets, ratios, round_to_for(config), self._whole_roles,
                explicit=config.width is not None,
                check=lambda r: config_for_plan(self.model, plan_for(self.graph, r)) is not None)
            candidates = [gid for gid, idx in removed.items() if idx.numel()]
            _, broke = feasible_groups(self.model, self.graph, functools.partial(plan_for, self.graph, removed),
                                       candidates, self.inputs, self.expected)
            if not broke:
                plan = plan_for(self.graph, removed)
                self._uniform[key] = Candidate(ratio, plan, removed)
                self._width_info[id(plan)] = info
                return Candidate(ratio, plan, removed, dict(self._role_failures))
            for gid, reason in broke.items():  # the whole role stays, in every layer
                role = role_of[gid]
                self._whole_roles.add(role.key)
                self._role_failures.update({
                    g.id: reason if g.id == gid else f"a layer's {role.kind} group broke the forward ({reason}), "
                    "and every layer keeps one shape"
                    for g in role.groups})


class Goal(Protocol):
    """What a run aims for; :meth:`search` finds the candidate that meets it."""

    def search(self, planner: Planner) -> Outcome: ...


@dataclass
class RatioGoal:
    """Remove ``ratio`` of each group's channels (of all channels, with global ranking); no search."""

    ratio: float

    def search(self, planner: Planner) -> Outcome:
        return Outcome(planner(self.ratio))


@dataclass
class ChannelBudget:
    """Sensitivity allocation of a channel budget: the fraction of the greedy allocation whose planned
    removal is at most ``ratio`` of all channels (counted before the rehearsal)."""

    ratio: float

    def search(self, planner: Planner) -> Outcome:
        total = sum(g.size for g in planner.graph.groups)
        lo, hi = 0.0, 1.0
        for _ in range(MACS_STEPS):
            mid = (lo + hi) / 2
            counted = plan_channels(planner.graph, planner.scores, planner.config, 0.0, planner.shares(mid))
            lo, hi = (mid, hi) if sum(int(v.numel()) for v in counted.values()) <= self.ratio * total else (lo, mid)
        return Outcome(planner(lo))


def _bisect(planner: Planner, meets: Callable[[Plan], bool], steps: int) -> tuple[Candidate | None, float]:
    """The smallest removal ratio (to ``steps`` halvings of ``[0, planner.max_ratio]``) whose candidate
    meets the goal, or None; and the upper end of the range left."""
    lo, hi = 0.0, planner.max_ratio
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        candidate = planner(mid)
        if meets(candidate.plan):
            best, hi = candidate, mid
        else:
            lo = mid
    return best, hi


def _out_of_reach(planner: Planner, want: str, got: str) -> None:
    config = planner.config
    hints = (["raise --max-ratio"] if planner.shares is None else []) + (
        ["lower --round-to"] if round_to_for(config) > 1 else [])
    log.warning("target %s is out of reach: pruned as far as allowed, to %s (max_ratio %.2f, round_to %d)%s",
                want, got, config.max_ratio, round_to_for(config), f"; {' or '.join(hints)} to go further" if hints
                else "")


class MacsGoal:
    """Keep at most ``target_macs`` of the dense model's MACs (counted on a meta rehearsal, or on real
    tensors for a model the meta device cannot run)."""

    def __init__(self, model: nn.Module, target: float, example_inputs: Any, expected: Any, base: int) -> None:
        self.model, self.target, self.inputs, self.expected = model, target, example_inputs, expected
        self.base = base  # the dense model's MACs
        self._seen: dict[int, tuple[Plan, float]] = {}  # the same plan object comes back for the same widths

    def fraction(self, plan: Plan) -> float:
        """The share of the dense MACs the model keeps under ``plan``."""
        seen = self._seen.get(id(plan))
        if seen is not None and seen[0] is plan:
            return seen[1]
        macs = plan_macs(self.model, plan, self.inputs, self.expected)
        value = (macs if macs is not None else self.base) / max(self.base, 1)
        self._seen[id(plan)] = (plan, value)  # holding the plan keeps its id from being reused
        return value

    def meets(self, plan: Plan) -> bool:
        return self.fraction(plan) <= self.target

    def search(self, planner: Planner) -> Outcome:
        best, hi = _bisect(planner, self.meets, MACS_STEPS)
        met = best is not None
        if best is None:  # out of reach: prune as much as allowed
            best = planner(hi)
        achieved = self.fraction(best.plan)
        if not met:
            _out_of_reach(planner, f"{self.target:.3g} of the MACs", f"{achieved:.3g} of the MACs")
        return Outcome(best, met, {"target_met": met, "achieved_macs": achieved})


class LatencyGoal:
    """Run at most ``target`` ms on ``device`` (each candidate built and timed for real), and never slower
    than the dense model."""

    def __init__(self, model: nn.Module, target: float, example_inputs: Any, *, device: str | None = None,
                 batch_size: int | None = None) -> None:
        from ..analysis import measure_latency, steady_allocator

        self.model, self.target = model, target
        self.device = torch.device(device or "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SecateursError("target_latency on 'cuda' needs a CUDA GPU: measure on --device cpu")
        if self.device.type == "cpu":
            steady_allocator()
        x = example_inputs
        if batch_size is not None and isinstance(x, Tensor):
            x = x[:1].expand(batch_size, *x.shape[1:]).contiguous()
        self.inputs = x.to(self.device) if isinstance(x, Tensor) else x
        self._measure = measure_latency
        self.dense = self._time(copy.deepcopy(model))
        self.log: dict[str, Any] = {"dense": self.dense, "target": self.target, "device": str(self.device),
                                    "trials": []}

    @classmethod
    def of(cls, model: nn.Module, config: Channels, example_inputs: Any) -> LatencyGoal:
        return cls(model, config.target_latency, example_inputs, device=config.device,
                   batch_size=config.latency_batch_size)

    def _time(self, candidate: nn.Module) -> float:
        """The best of three medians.

        Interference from other processes only ever slows a run down, and on a
        shared machine it comes in bursts of seconds that can spoil two medians
        of three. With the allocator steady there are no lucky fast runs either,
        so the fastest median is the closest to the model's own speed.
        """
        candidate = candidate.to(self.device).eval()
        return min(self._measure(candidate, self.inputs, warmup=2, repeats=10, max_seconds=3.0) for _ in range(3))

    def latency(self, plan: Plan) -> float:
        candidate = copy.deepcopy(self.model)
        apply_plan_(candidate, plan)
        t = self._time(candidate)
        self.log["trials"].append(round(t, 4))
        return t

    def meets(self, plan: Plan) -> bool:
        met = self.latency(plan) <= self.target
        if met:
            self.log["achieved"] = self.log["trials"][-1]
        return met

    def search(self, planner: Planner) -> Outcome:
        best, hi = _bisect(planner, self.meets, LATENCY_STEPS)
        met = best is not None
        if best is None:  # out of reach: prune as much as allowed, if that is faster than dense at all
            best = planner(hi)
            if self.latency(best.plan) < self.dense:
                self.log["achieved"] = self.log["trials"][-1]
                _out_of_reach(planner, f"{self.target:.3g} ms", f"{self.log['achieved']:.3g} ms")
            else:  # never slower than the dense model: undo
                best = planner(0.0)
                self.log["achieved"] = self.dense
                log.warning("target %.3g ms is out of reach and no plan allowed was faster than the dense model "
                            "(%.3g ms): nothing was pruned", self.target, self.dense)
        return Outcome(best, met, {"target_met": met, "latency_ms": self.log})


def goal_for(model: nn.Module, config: Channels, example_inputs: Any, expected: Any, *, sensitivity: bool,
             dense_macs: Callable[[], int]) -> Goal:
    """The goal ``config`` asks for (a plain ratio of 0 when every kind of width has its own ratio)."""
    if config.target_macs is not None:
        return MacsGoal(model, config.target_macs, example_inputs, expected, dense_macs())
    if config.target_latency is not None:
        return LatencyGoal.of(model, config, example_inputs)
    if sensitivity:
        return ChannelBudget(config.ratio)
    return RatioGoal(config.ratio if config.ratio is not None else 0.0)
