"""Structured channel pruning: remove whole channels/neurons, physically, on any model.

Data flow: graph (coupled groups) -> importance (scores per channel) ->
strategy (how many channels each group loses) -> plan -> surgery.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import SecateursError
from ..graph import DependencyGraph, Group, build_graph
from ..importance.channel import CHANNEL_IMPORTANCE, NEEDS_DATA, REDUCTIONS, channel_scores
from ..importance.stats import (
    ActivationStats,
    InputActivationStats,
    InputGrams,
    InputMeans,
    TaylorStats,
    calibration_list,
)
from ..patches import refit_blocker
from ..selection import Selection, input_dim
from ..surgery import CONFIG_STALE_ATTR, Plan, apply_plan_
from ..surgery.compensate import compensate_
from ..surgery.hf import config_for_plan
from ..train.recalibrate import recalibrate_bn_
from ..utils import is_transformers_model
from .common import config_to_dict, keep_count, make_generator
from .reconstruct import reconstruct_, reconstruction_targets
from .registry import register_method
from .rehearsal import (
    apply_checked_,
    checked_on,
    feasible_groups,
    model_macs,
    plan_macs,
)
from .report import LayerReport, PruneReport
from .sensitivity_curves import DEFAULT_RATIOS, allocate, allocation_order, channel_curves
from .width import KINDS, classify_roles, role_targets, uniform_removed

log = logging.getLogger(__name__)

__all__ = ["Channels", "calibration_stats", "channel_steps", "merge_step_reports", "plan_channels", "score_groups"]

# Models up to this many bytes of tensors get their plan applied in place and checked there
# (see _prune_once); bigger ones rehearse on a meta copy first.
IN_PLACE_MAX_BYTES = 64 * 2**20


@dataclass(kw_only=True)
class Channels(Selection):
    """Remove whole channels (conv filters, Linear neurons) and everything coupled to them.

    Give ``ratio`` (fraction of each group's channels to remove) or
    ``target_macs`` (fraction of the model's MACs to keep).

    On a transformers model (``PreTrainedModel``) every layer keeps the same shape,
    so that the updated config describes the pruned model and stock
    ``save_pretrained`` / ``from_pretrained`` round-trip it: whole attention heads
    (with grouped-query attention, a key/value head with its query heads), the
    head width unchanged, one FFN width and one head count for all layers, and the
    hidden size cut the same way in the embeddings, every norm, every layer and the
    LM head (tied embeddings stay tied). The hidden size and head count are chosen
    together, nearest the target, among the values the config class accepts and
    rebuilds exactly (``round_to`` honoured); see :mod:`secateurs.methods.width`.
    ``global_ranking``, ``allocate='sensitivity'``, ``include`` and ``filter_fn``
    ask for per-layer widths instead: the model is then saved with
    :func:`secateurs.save`, and the report's ``skipped["config"]`` says so when the
    config cannot describe it.

    Attributes:
        ratio: fraction of channels to remove, in [0, 1).
        target_macs: keep this fraction of MACs, in (0, 1]; the achieved value is reported.
        importance: ``l1``, ``l2``, ``bn``, ``fpgm``, ``random``, or the data-driven
            ``taylor``, ``activation``, ``minitron`` and ``obs`` (these need ``data`` in ``prune_``).
            ``obs`` scores a channel by the output error it leaves in the layers that read
            it once their other weights are refitted (greedy structured OBS, as in ZipLM);
            it pairs with ``reconstruct``.
            ``minitron`` scores a channel by the mean |activation| entering the layers
            that read it (an FFN neuron by its input to the down projection, a head by
            its attention output entering the output projection, a hidden channel by the
            normalised hidden states entering the projections and the LM head), as in
            Minitron (Muralidharan et al., 2024).
        width: transformers models only: which kinds of width to prune, each with its
            own ratio or ``ratio``'s: kinds are ``hidden`` (the embedding / residual
            width), ``heads`` (attention heads) and ``ffn`` (MLP neurons). A string
            ``"heads,ffn"`` or ``"heads=0.25,ffn=0.3,hidden=0.1"``, a sequence of kinds
            or a mapping kind -> ratio (None: ``ratio``). Kinds left out stay whole;
            None (the default) prunes every kind the config can describe pruned and
            lists the others in the report's ``skipped``. With a ratio for every kind
            named, ``ratio`` may be left out. Per-kind ratios need ``ratio`` mode (not
            ``target_macs`` / ``target_latency``, which move every kind named together).
        reduction: how scores of the tensors a channel spans combine: ``mean``, ``max``, ``sum``.
        global_ranking: rank channels across all groups instead of the same ratio per group.
        max_ratio: in global ranking and MACs targets, no group loses more than this fraction.
        round_to: keep channel counts a multiple of this (e.g. 8 for tensor cores).
        seed: seed for ``random`` importance.
        calib_batches: batches of ``data`` used by ``taylor``, ``activation``,
            ``compensate`` and ``recalibrate_bn``.
        compensate: fold the mean contribution of removed input channels into the
            next layer's bias (or its BatchNorm's running mean); needs ``data``.
        recalibrate_bn: after surgery, re-estimate every BatchNorm's running
            statistics on ``data`` (no gradients, weights unchanged).
        reconstruct: after surgery, refit every layer that read removed channels by
            least squares so that it reproduces the dense layer's output on ``data``
            (``calib_batches`` batches), layer by layer in forward order on the pruned
            model's own activations (:mod:`secateurs.methods.reconstruct`). Layers that
            cannot mix channels (grouped convolutions) get their mean output corrected
            instead; the report's ``reconstruction`` lists every layer and its error.
        reconstruct_damp: ridge damping of the refit, relative to the mean squared input;
            None (the default) chooses it per layer by cross-validation between even and
            odd calibration batches.
        steps: reach the target in this many prune steps, re-scoring channels on the
            already-pruned model each time (fine-tune between steps with the trainer);
            a latency target is approached through geometric intermediate targets.
        allocate: ``uniform`` (the same ratio for every group, or ``global_ranking``) or
            ``sensitivity``: measure on ``data`` how much each group alone can lose
            and give the cut to the groups where it costs the least loss per MAC
            (``target_macs``) or per channel (``ratio``).
        target_latency: prune until one forward takes at most this many milliseconds,
            *measured* on ``device`` at ``latency_batch_size`` (the pruned candidates
            are built and timed for real). If even the most pruned candidate is slower
            than the dense model, nothing is pruned. On CPU this calls
            :func:`secateurs.analysis.steady_allocator` first, so glibc's allocator
            does not make some timings page-fault bound and others not.
        latency_batch_size: batch size for ``target_latency`` (default: the example inputs').
        device: where ``target_latency`` is measured (``cpu``, ``cuda``); on CUDA,
            ``round_to`` defaults to 8 (tensor-core friendly widths).

    Example:
        >>> import torch, secateurs
        >>> from secateurs.zoo import DigitsCNN
        >>> model = DigitsCNN()
        >>> report = secateurs.prune_(model, secateurs.Channels(ratio=0.5), example_inputs=torch.randn(1, 1, 8, 8))
        >>> model.features[0].out_channels, model.features[3].in_channels
        (16, 16)
    """

    method: ClassVar[str] = "channel"

    ratio: float | None = None
    target_macs: float | None = None
    importance: str = "l2"
    reduction: str = "mean"
    global_ranking: bool = False
    max_ratio: float = 0.9
    round_to: int | None = None
    seed: int | None = None
    calib_batches: int = 8
    steps: int = 1
    compensate: bool = False
    recalibrate_bn: bool = False
    reconstruct: bool = False
    reconstruct_damp: float | None = None
    allocate: str = "uniform"
    target_latency: float | None = None
    latency_batch_size: int | None = None
    device: str | None = None
    width: Any = None  # normalised to a dict kind -> ratio (None: ``ratio``'s)

    def __post_init__(self) -> None:
        super().__post_init__()
        from .width import parse_width

        self.width = parse_width(self.width)
        by_kind = self.width is not None and all(v is not None for v in self.width.values())
        if self.width is not None and any(v is not None for v in self.width.values()) and (
                self.target_macs is not None or self.target_latency is not None):
            raise SecateursError("per-kind width ratios (heads=0.25) go with ratio mode; with target_macs or "
                                 "target_latency name the kinds alone (--width heads,ffn)")
        if self.width is not None and (self.global_ranking or self.allocate != "uniform" or self.include is not None
                                       or self.filter_fn is not None):
            raise SecateursError("width keeps every layer the same shape; global_ranking, allocate='sensitivity', "
                                 "include and filter_fn choose per-layer widths: use one or the other")
        if self.width is not None and not by_kind and self.ratio is None and self.target_macs is None \
                and self.target_latency is None:
            raise SecateursError(f"width {', '.join(k for k, v in self.width.items() if v is None)} has no ratio of "
                                 "its own: give ratio (--ratio) or one per kind (--width heads=0.25,ffn=0.3)")
        if self.prune_output_layer:
            raise SecateursError(
                "channel pruning never changes the model's output width, so prune_output_layer does not apply"
            )
        if sum(v is not None for v in (self.ratio, self.target_macs, self.target_latency)) != 1 and not (
                by_kind and self.target_macs is None and self.target_latency is None):
            raise SecateursError("give exactly one of ratio (fraction of channels to remove), target_macs or "
                                 "target_latency")
        if self.target_latency is not None and not self.target_latency > 0:
            raise SecateursError(f"target_latency must be a positive number of milliseconds, got {self.target_latency}")
        if self.latency_batch_size is not None and self.target_latency is None:
            raise SecateursError("latency_batch_size is the batch a target_latency is measured at: give target_latency "
                                 "(CLI: --target-latency)")
        if self.latency_batch_size is not None and self.latency_batch_size < 1:
            raise SecateursError(f"latency_batch_size must be at least 1, got {self.latency_batch_size}")
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise SecateursError(f"unknown device '{self.device}': use cpu, cuda or cuda:N") from None
        if self.ratio is not None and not (0.0 <= self.ratio < 1.0):
            raise SecateursError(f"ratio must be in [0, 1), got {self.ratio}: e.g. 0.5 removes half the channels")
        if self.target_macs is not None and not (0.0 < self.target_macs <= 1.0):
            raise SecateursError(f"target_macs must be in (0, 1], got {self.target_macs}: e.g. 0.5 keeps half the MACs")
        if not 0.0 < self.max_ratio < 1.0:
            raise SecateursError(f"max_ratio must be in (0, 1), got {self.max_ratio}")
        if self.importance not in CHANNEL_IMPORTANCE:
            raise SecateursError(
                f"unknown importance '{self.importance}': choose one of {', '.join(CHANNEL_IMPORTANCE)}"
            )
        if self.reduction not in REDUCTIONS:
            raise SecateursError(f"unknown reduction '{self.reduction}': choose one of {', '.join(REDUCTIONS)}")
        if self.steps < 1:
            raise SecateursError(f"steps must be at least 1, got {self.steps}")
        if self.allocate not in ("uniform", "sensitivity"):
            raise SecateursError(f"unknown allocation '{self.allocate}': choose uniform or sensitivity")
        if self.allocate == "sensitivity" and self.global_ranking:
            raise SecateursError("allocate='sensitivity' chooses each group's share itself: drop global_ranking")
        if self.calib_batches < 1:
            raise SecateursError(f"calib_batches must be at least 1, got {self.calib_batches}")
        if (self.compensate or self.recalibrate_bn) and self.calib_batches < 1:
            raise SecateursError("compensate and recalibrate_bn need calib_batches of at least 1")
        if self.reconstruct and self.compensate:
            raise SecateursError("reconstruct refits the biases that compensate would shift: drop compensate "
                                 "(CLI: --compensate)")
        if self.reconstruct_damp is not None and not self.reconstruct_damp > 0:
            raise SecateursError(f"reconstruct_damp must be positive, got {self.reconstruct_damp}")
        if self.round_to is not None and self.round_to < 1:
            raise SecateursError(f"round_to must be a positive integer, got {self.round_to}")


def _multiplicity(group: Group) -> int:
    """Channel width of one prunable unit (grouped convs move several channels at once)."""
    return min(group.indices[m].shape[1] for m in group.members)


def calibration_stats(model: nn.Module, graph: DependencyGraph, config: Channels, data: Any) -> dict[str, Tensor] | None:
    """The statistics ``config.importance`` scores channels by, measured on ``data`` (None: it needs none)."""
    if config.importance not in NEEDS_DATA:
        return None
    if data is None:
        raise SecateursError(f"importance '{config.importance}' is measured on data: pass data= (CLI: --data)")
    if config.importance == "taylor":
        return TaylorStats(model).run(data, config.calib_batches).scores
    if config.importance == "minitron":
        return InputActivationStats(model).run(data, config.calib_batches).per_channel()
    if config.importance == "obs":
        return _obs_stats(model, graph, config, data)
    return ActivationStats(model).run(data, config.calib_batches).per_channel()


def _obs_stats(model: nn.Module, graph: DependencyGraph, config: Channels, data: Any) -> dict[str, Tensor]:
    """Gram matrices of the inputs of every layer that reads a group's channels (and can be refitted)."""
    modules = dict(model.named_modules())
    layers = set()
    for g in graph.groups:
        for m in g.members:
            name, _, attr = m.tensor.rpartition(".")
            layer = modules.get(name)
            if attr == "weight" and layer is not None and refit_blocker(layer) is None and m.dim == input_dim(layer):
                layers.add(name)
    return InputGrams(model, sorted(layers)).run(data, config.calib_batches).grams


def score_groups(model: nn.Module, graph: DependencyGraph, config: Channels, stats: dict[str, Tensor] | None) -> dict[int, Tensor]:
    named_params = dict(model.named_parameters())
    tensors = named_params | dict(model.named_buffers())
    params = set(named_params)
    norm_scales = {
        f"{n}.weight" for n, m in model.named_modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None
    }
    gen = make_generator(config.seed)
    cache: dict = {}
    return {
        g.id: channel_scores(config.importance, g, tensors, params=params, norm_scales=norm_scales,
                             reduction=config.reduction, generator=gen, stats=stats, cache=cache)
        for g in graph.groups
    }


def _round_to(config: Channels) -> int:
    if config.round_to is not None:
        return config.round_to
    return 8 if config.target_latency is not None and (config.device or "cpu").startswith("cuda") else 1


def _warn_rounded_away(graph: DependencyGraph, config: Channels, removed: dict[int, Tensor],
                       failed: dict[int, str]) -> None:
    """Say so when ``round_to`` kept groups whole that ``ratio`` would have cut (silent otherwise)."""
    round_to = _round_to(config)
    if round_to <= 1 or not config.ratio:
        return
    whole = [g for g in graph.groups if g.id not in failed and not removed[g.id].numel()
             and keep_count(g.size, config.ratio, 1) < g.size]
    if not whole:
        return
    cut = sum(int(v.numel()) for v in removed.values())
    total = sum(g.size for g in graph.groups)
    log.warning("round_to %d kept %d of %d channel groups whole (too few channels for a multiple of %d), so %.1f%% "
                "of the channels were removed instead of %.1f%%: lower --round-to", round_to, len(whole),
                len(graph.groups), round_to, 100 * cut / max(1, total), 100 * config.ratio)


def plan_channels(graph: DependencyGraph, scores: dict[int, Tensor], config: Channels, ratio: float,
                  per_group: dict[int, float] | None = None) -> dict[int, Tensor]:
    """Decide which channels go: group id -> positions of its channels to remove.

    ``per_group`` (from sensitivity allocation) gives each group its own ratio instead of ``ratio``.
    """
    round_to = _round_to(config)
    removed: dict[int, Tensor] = {}
    if config.global_ranking:
        # Normalise within each group so layers with large weights do not dominate.
        pool = []
        for g in graph.groups:
            s = scores[g.id]
            pool.append((s / (s.mean() + 1e-12), g))
        total = sum(g.size for g in graph.groups)
        budget = math.floor(ratio * total + 1e-9)
        flat = torch.cat([s for s, _ in pool])
        owners = torch.cat([torch.full((g.size,), i) for i, (_, g) in enumerate(pool)])
        order = torch.argsort(flat, stable=True)
        taken = [0] * len(pool)
        caps = [g.size - keep_count(g.size, config.max_ratio, 1) for _, g in pool]
        chosen: list[list[int]] = [[] for _ in pool]
        offsets = torch.cumsum(torch.tensor([0] + [g.size for _, g in pool]), 0)
        for pos in order.tolist():
            if budget <= 0:
                break
            i = int(owners[pos])
            if taken[i] < caps[i]:
                taken[i] += 1
                chosen[i].append(pos - int(offsets[i]))
                budget -= 1
        for (_, g), idx in zip(pool, chosen, strict=True):
            keep = keep_count(g.size, len(idx) / g.size, round_to // math.gcd(round_to, _multiplicity(g)) or 1)
            drop = g.size - keep
            removed[g.id] = torch.argsort(scores[g.id], stable=True)[:drop] if drop else torch.empty(0, dtype=torch.long)
    else:
        for g in graph.groups:
            unit = _multiplicity(g)
            share = per_group.get(g.id, 0.0) if per_group is not None else ratio
            keep = keep_count(g.size, share, max(1, round_to // math.gcd(round_to, unit)))
            drop = g.size - keep
            removed[g.id] = torch.argsort(scores[g.id], stable=True)[:drop]
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


@register_method(Channels)
def apply_channels(model: nn.Module, config: Channels, *, example_inputs: Any = None, data: Any = None) -> PruneReport:
    if example_inputs is None:
        raise SecateursError("channel pruning traces the model: pass example_inputs (CLI: --input-shape)")
    if config.steps == 1:
        return _prune_once(model, config, example_inputs, data)
    reports = [_prune_once(model, step_config, example_inputs, data)
               for step_config in channel_steps(model, config, example_inputs)]
    return merge_step_reports(reports, config)


def channel_steps(model: nn.Module, config: Channels, example_inputs: Any) -> Iterator[Channels]:
    """One single-step config per step of ``config.steps``, each computed on the model as it is by then.

    Steps are equal geometric shares: each keeps the same fraction of what is
    left (channels for ``ratio``, MACs for ``target_macs``, milliseconds for
    ``target_latency``, measured on the dense model before the first step), so
    the caller may prune and fine-tune alternately between them.
    """
    if config.target_latency is not None:
        dense = _LatencyGoal(model, config, example_inputs).dense if config.steps > 1 else config.target_latency
        shrink = min(1.0, config.target_latency / dense)  # a target the dense model meets is every step's target
        for step in range(1, config.steps + 1):
            goal = config.target_latency if step == config.steps else dense * shrink ** (step / config.steps)
            yield dataclasses.replace(config, target_latency=goal, steps=1)
        return
    base_macs = model_macs(model, example_inputs) if config.target_macs is not None else None
    for step in range(1, config.steps + 1):
        if config.target_macs is None:
            def per_step(r: float | None) -> float | None:
                return None if r is None else 1 - (1 - r) ** (1 / config.steps)

            width = {k: per_step(v) for k, v in config.width.items()} if config.width is not None else None
            yield dataclasses.replace(config, ratio=per_step(config.ratio), width=width, steps=1)
        else:
            now = model_macs(model, example_inputs)
            goal = config.target_macs ** (step / config.steps) * base_macs
            yield dataclasses.replace(config, target_macs=min(1.0, goal / now), steps=1)


def merge_step_reports(reports: list[PruneReport], config: Channels) -> PruneReport:
    """One report for all the steps: the whole config, every step's plan, each group's widths from first to last.

    The last step's measurements (latency) stay; ``steps_detail`` holds each step's own achieved ratio.
    """
    final = reports[-1]
    detail = [r.config.get("achieved_ratio") for r in reports]
    skip = {f.name for f in dataclasses.fields(config)} | {"achieved_ratio"}
    final.config = config_to_dict(config) | {k: v for k, v in final.config.items() if k not in skip}
    final.config["steps_detail"] = detail
    if "latency_ms" in final.config and "latency_ms" in reports[0].config:  # measured before the first step
        final.config["latency_ms"] = final.config["latency_ms"] | {"dense": reports[0].config["latency_ms"]["dense"]}

    def key(name: str) -> str:  # a group's tensors; its name also holds its (shrinking) width and step-local id
        return name.partition(" channels: ")[2] or name

    first = reports[0].layers  # channels before the first step
    kept = {key(layer.name): layer.numel for layer in first}
    for report in reports:
        for layer in report.layers:
            kept[key(layer.name)] = layer.numel - layer.zeros
    final.layers = [LayerReport(name=layer.name, shape=[layer.numel], numel=layer.numel,
                                zeros=layer.numel - kept[key(layer.name)]) for layer in first]
    final.config["achieved_ratio"] = final.sparsity  # the share of all channels removed
    final.plan = {"steps": [r.plan for r in reports]}
    return final


def _sensitivity_shares(model: nn.Module, graph: DependencyGraph, scores: dict[int, Tensor], config: Channels,
                        data: Any, example_inputs: Any, expected: Any, dense_macs: Callable[[], int]) -> Any:
    """For ``allocate='sensitivity'``: a map from a fraction of the greedy steps to per-group ratios."""
    if config.allocate != "sensitivity":
        return None
    if data is None:
        raise SecateursError("sensitivity allocation measures each group on data: pass data= (CLI: --data)")

    def saved(group: Group, idx: Tensor) -> int:
        macs = plan_macs(model, plan_for(graph, {group.id: idx}), example_inputs, expected)
        return dense_macs() - macs if macs is not None else 0

    grid = [r for r in DEFAULT_RATIOS if r <= config.max_ratio + 1e-9]
    # MACs (and latency, which MACs stand in for) targets price each step by the MACs it saves;
    # a channel ratio prices it by channels
    by_macs = config.target_macs is not None or config.target_latency is not None
    result = channel_curves(model, graph, scores, data, ratios=grid, batches=config.calib_batches,
                            macs_saved=saved if by_macs else None)
    order = allocation_order(result.curves, "macs_saved" if by_macs else "")

    def shares(fraction: float) -> dict[int, float]:
        return allocate(result.curves, fraction, order)

    shares.scan = result  # type: ignore[attr-defined]  # the curves, for the report
    return shares


class _MacsGoal:
    """Does a plan keep at most ``target_macs`` of the model's MACs? (counted on a meta rehearsal, or
    on real tensors for a model the meta device cannot run)"""

    def __init__(self, model: nn.Module, config: Channels, example_inputs: Any, expected: Any, base: int) -> None:
        self.model, self.config, self.inputs, self.expected = model, config, example_inputs, expected
        self.base = base  # the dense model's MACs
        self.log = None
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

    def __call__(self, plan: Plan) -> bool:
        return self.fraction(plan) <= self.config.target_macs


class _LatencyGoal:
    """Is a plan's pruned model at most ``target_latency`` ms on the device? (built and timed for real)"""

    def __init__(self, model: nn.Module, config: Channels, example_inputs: Any) -> None:
        import copy

        from ..analysis import measure_latency, steady_allocator

        self.model, self.target = model, config.target_latency
        self.device = torch.device(config.device or "cpu")
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise SecateursError("target_latency on 'cuda' needs a CUDA GPU: measure on --device cpu")
        if self.device.type == "cpu":
            steady_allocator()
        x = example_inputs
        if config.latency_batch_size is not None and isinstance(x, Tensor):
            x = x[:1].expand(config.latency_batch_size, *x.shape[1:]).contiguous()
        self.inputs = x.to(self.device) if isinstance(x, Tensor) else x
        self._copy, self._measure = copy.deepcopy, measure_latency
        self.dense = self._time(copy.deepcopy(model))
        self.log: dict[str, Any] = {"dense": self.dense, "target": self.target, "device": str(self.device),
                                    "trials": []}

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
        candidate = self._copy(self.model)
        apply_plan_(candidate, plan)
        t = self._time(candidate)
        self.log["trials"].append(round(t, 4))
        return t

    def __call__(self, plan: Plan) -> bool:
        return self.latency(plan) <= self.target

    def faster_than_dense(self, plan: Plan) -> bool:
        return self.latency(plan) < self.dense


def _prune_once(model: nn.Module, config: Channels, example_inputs: Any, data: Any) -> PruneReport:
    if (config.compensate or config.recalibrate_bn or config.reconstruct) and data is None:
        raise SecateursError("compensate, recalibrate_bn and reconstruct are measured on data: pass data= "
                             "(CLI: --data)")
    chosen = config.resolve(model)  # unknown include/ignore names are refused before any work
    uniform = _uniform_widths(model, config)
    means = InputMeans(model).run(data, config.calib_batches) if config.compensate else None
    dense = copy.deepcopy(model) if config.reconstruct else None  # the reference every refit reproduces
    graph = build_graph(model, example_inputs, frozen_tensors=chosen.frozen_tensors())
    graph.groups = chosen.groups(graph.groups)  # include picks groups (a layer and all coupled to it), not tensors
    if not graph.groups:
        raise SecateursError("no prunable channel group found: every layer is coupled to the inputs/outputs or ignored")
    scores = score_groups(model, graph, config, calibration_stats(model, graph, config, data))
    expected = graph.output_shapes  # what every rehearsal must still produce
    # the dense MACs, counted once (on a meta copy where meta runs the model): the allocation and a MACs
    # target need them, counted the same way as each plan's
    dense_macs = functools.cache(lambda: plan_macs(model, None, example_inputs, expected))
    shares = _sensitivity_shares(model, graph, scores, config, data, example_inputs, expected, dense_macs)

    # A small model with a plain ratio gets its plan applied in place and checked there (on
    # meta twins of its tensors), undone and rehearsed group by group only if that fails:
    # that saves the meta copy, whose fixed cost dominates for small models. The undo keeps
    # the old tensors alive until the check passes, so big models (memory, and fresh pages
    # for every new tensor) rehearse on a meta copy first. So do targets (many plans),
    # compensation (needs the unpruned model) and transformers models (state in a config).
    by_ratio = config.target_macs is None and config.target_latency is None
    apply_directly = (by_ratio and not config.compensate
                      and getattr(model, "config", None) is None
                      and _tensor_bytes(model) <= IN_PLACE_MAX_BYTES)
    applied = False
    roles = classify_roles(model, graph) if uniform else []
    whole_roles: set[tuple[str, int, int]] = set()  # roles a layer's group of which broke the rehearsal
    role_failures: dict[int, str] = {}  # group id -> why its role stays whole
    uniform_plans: dict[tuple, tuple[Plan, dict[int, Tensor]]] = {}
    width_info: dict[int, dict[str, Any]] = {}  # id of a plan in uniform_plans -> what happened per kind

    def uniform_plan(ratio: float) -> tuple[Plan, dict[int, Tensor], dict[int, str]]:
        """Every layer the same shape: one keep count per role, widths the config can describe.

        Ratios that round to the same keep counts give the same plan (targets bisect
        over many): it is searched and rehearsed once.
        """
        kinds = config.width if config.width is not None else dict.fromkeys(KINDS)
        ratios = {k: (v if v is not None else ratio) for k, v in kinds.items()}
        role_of = {g.id: r for r in roles for g in r.groups}
        while True:
            targets = role_targets(roles, ratios, _round_to(config), whole_roles)
            key = (tuple(sorted(targets.items())), frozenset(whole_roles))
            if key in uniform_plans:
                plan, removed = uniform_plans[key]
                return plan, removed, dict(role_failures)
            removed, info = uniform_removed(
                model, graph, roles, scores, targets, ratios, _round_to(config), whole_roles,
                explicit=config.width is not None,
                check=lambda r: config_for_plan(model, plan_for(graph, r)) is not None)
            candidates = [gid for gid, idx in removed.items() if idx.numel()]
            _, broke = feasible_groups(model, graph, functools.partial(plan_for, graph, removed), candidates,
                                       example_inputs, expected)
            if not broke:
                plan = plan_for(graph, removed)
                uniform_plans[key] = plan, removed
                width_info[id(plan)] = info
                return plan, removed, dict(role_failures)
            for gid, reason in broke.items():  # the whole role stays, in every layer
                whole_roles.add(role_of[gid].key)
                role_failures.update({g.id: reason if g.id == gid else f"a layer's {role_of[gid].kind} group broke "
                                      f"the forward ({reason}), and every layer keeps one shape"
                                      for g in role_of[gid].groups})

    def feasible_plan(ratio: float) -> tuple[Plan, dict[int, Tensor], dict[int, str]]:
        nonlocal applied
        if uniform:
            return uniform_plan(ratio)
        removed = plan_channels(graph, scores, config, ratio, shares(ratio) if shares is not None else None)
        candidates = [gid for gid, idx in removed.items() if idx.numel()]
        plans: dict[frozenset[int], Plan] = {}

        def plan_of(keep: set[int]) -> Plan:  # the rehearsed plan is usually the one applied: build it once
            key = frozenset(keep)
            if key not in plans:
                plans[key] = plan_for(graph, removed, keep)
            return plans[key]

        if apply_directly and not plan_of(set(candidates)).drop:
            applied = apply_checked_(model, plan_of(set(candidates)), example_inputs, expected) == ""
            if applied:
                return plan_of(set(candidates)), removed, {}
        ids, failed = feasible_groups(model, graph, plan_of, candidates, example_inputs, expected)
        plan = plan_of(ids)
        removed = {gid: (idx if gid in ids else idx[:0]) for gid, idx in removed.items()}
        return plan, removed, failed

    latency_log, target_met, achieved_macs = None, True, None
    if by_ratio and shares is None:
        ratio = config.ratio if config.ratio is not None else 0.0  # 0: every kind named has its own ratio
        plan, removed, failed = feasible_plan(ratio)
    elif config.ratio is not None:  # sensitivity allocation of a channel budget
        total = sum(g.size for g in graph.groups)
        lo, hi = 0.0, 1.0
        for _ in range(14):
            mid = (lo + hi) / 2
            removed_count = sum(int(v.numel()) for v in plan_channels(graph, scores, config, 0.0, shares(mid)).values())
            lo, hi = (mid, hi) if removed_count <= config.ratio * total else (lo, mid)
        ratio = lo
        plan, removed, failed = feasible_plan(ratio)
    else:
        meets = (_MacsGoal(model, config, example_inputs, expected, dense_macs()) if config.target_macs is not None
                 else _LatencyGoal(model, config, example_inputs))
        lo, hi = 0.0, config.max_ratio if shares is None else 1.0
        best = None
        for _ in range(14 if config.target_macs is not None else 8):  # bisection on the removal ratio
            mid = (lo + hi) / 2
            cand = feasible_plan(mid)
            if meets(cand[0]):
                best, hi = (mid, *cand), mid
                if meets.log is not None:
                    meets.log["achieved"] = meets.log["trials"][-1]
            else:
                lo = mid
        target_met = best is not None
        if best is None:  # the target is out of reach: prune as much as allowed
            best = (hi, *feasible_plan(hi))
            if config.target_latency is not None:
                if meets.faster_than_dense(best[1]):
                    meets.log["achieved"] = meets.log["trials"][-1]
                else:  # never slower than the dense model: undo
                    best = (0.0, *feasible_plan(0.0))
                    meets.log["achieved"] = meets.dense
        ratio, plan, removed, failed = best
        latency_log = getattr(meets, "log", None)
        if config.target_macs is not None:
            achieved_macs = meets.fraction(plan)
        if not target_met:
            got = (f"{latency_log['achieved']:.3g} ms" if config.target_latency is not None
                   else f"{achieved_macs:.3g} of the MACs")
            want = (f"{config.target_latency:.3g} ms" if config.target_latency is not None
                    else f"{config.target_macs:.3g} of the MACs")
            hints = (["raise --max-ratio"] if shares is None else []) + (["lower --round-to"] if _round_to(config) > 1
                                                                         else [])
            log.warning("target %s is out of reach: pruned as far as allowed, to %s (max_ratio %.2f, round_to %d)%s",
                        want, got, config.max_ratio, _round_to(config),
                        f"; {' or '.join(hints)} to go further" if hints else "")
    compensated = compensate_(model, plan, means.means(), means.followers) if means is not None else []
    if not applied:
        apply_plan_(model, plan)
    fits = (reconstruct_(model, dense, reconstruction_targets(dense, plan),
                         calibration_list(data, config.calib_batches, "reconstruct"), config.reconstruct_damp)
            if dense is not None else None)
    del dense
    if config.recalibrate_bn:
        recalibrate_bn_(model, data, config.calib_batches)
    report = PruneReport(method=config.method, config=config_to_dict(config))
    # the share of all channels removed: rounding (round_to, grouped convs), groups kept whole and
    # sensitivity allocation all make it differ from the ratio asked for
    report.config["achieved_ratio"] = (sum(int(v.numel()) for v in removed.values())
                                       / max(1, sum(g.size for g in graph.groups)))
    report.config["rehearsal"] = checked_on(model, expected)  # "meta", or "real" where meta cannot run it
    if config.ratio is not None and shares is None and not uniform:
        _warn_rounded_away(graph, config, removed, failed)
    if not by_ratio:
        report.config["target_met"] = target_met
    if not by_ratio and latency_log:
        report.config["latency_ms"] = latency_log
    if achieved_macs is not None:
        report.config["achieved_macs"] = achieved_macs
    if means is not None:
        report.config["compensated_layers"] = len(compensated)
    if fits is not None:
        report.reconstruction = [f.to_dict() for f in fits]
    for g in graph.groups:
        report.layers.append(LayerReport(name=g.describe(), shape=[g.size], numel=g.size,
                                         zeros=int(removed[g.id].numel())))
    report.skipped = dict(graph.frozen_tensors)
    by_id = {g.id: g for g in graph.groups}
    for gid, reason in failed.items():
        report.skipped[by_id[gid].describe()] = f"kept whole: pruning it breaks the forward ({reason})"
    if uniform:
        info = width_info.get(id(plan), {})
        report.config["widths"] = info.get("widths", {})  # kind -> [kept, total] channels
        for kind, reason in info.get("kept_whole", {}).items():
            report.skipped[f"width {kind}"] = f"kept whole: {reason}"
            if config.width is not None:
                log.warning("width %s: kept whole: %s", kind, reason)
    if getattr(model, CONFIG_STALE_ATTR, False):
        report.skipped["config"] = ("the transformers config cannot describe the pruned shapes (e.g. fewer heads at "
                                    "the same hidden size, or a hidden size the head count does not divide): save "
                                    "with secateurs.save, or keep widths a multiple of the head count with round_to "
                                    "(--round-to); save_pretrained output would not reload with stock from_pretrained")
    for call, count in graph.unknown_calls.items():
        report.skipped[f"call {call}"] = f"not understood ({count}x): tensors through it were kept"
    report.plan = plan.to_dict()
    if shares is not None:
        report.sensitivity = shares.scan.to_dict()
    report.importance = {"criterion": config.importance, "groups": {
        g.describe(): _score_summary(scores[g.id], removed[g.id]) for g in graph.groups}}
    return report


def _uniform_widths(model: nn.Module, config: Channels) -> bool:
    """Prune a transformers model with every layer the same shape (see :mod:`.width`)?"""
    if not is_transformers_model(model):
        if config.width is not None:
            raise SecateursError("width names the hidden size, attention heads and FFN of a transformers model "
                                 f"(PreTrainedModel); {type(model).__name__} is not one: choose layers with "
                                 "include/ignore instead")
        return False
    return not (config.global_ranking or config.allocate != "uniform" or config.include is not None
                or config.filter_fn is not None)


def _tensor_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _score_summary(scores: Tensor, removed: Tensor) -> dict[str, list[float]]:
    """Five-number summaries of kept and removed scores, relative to the group's mean."""
    values = scores.float().tolist()  # plain Python: a group has few channels, tensor ops cost more
    scale = abs(sum(values) / len(values)) + 1e-12
    gone = [False] * len(values)
    for i in removed.tolist():
        gone[i] = True
    parts = {"kept": sorted([v for v, g in zip(values, gone, strict=True) if not g]),
             "removed": sorted([v for v, g in zip(values, gone, strict=True) if g])}
    return {name: [round(_quantile(part, q) / scale, 4) for q in (0.0, 0.25, 0.5, 0.75, 1.0)] if part else []
            for name, part in parts.items()}


def _quantile(ordered: list[float], q: float) -> float:
    """``torch.quantile``'s linear interpolation, on a sorted list (a group has few channels)."""
    pos = q * (len(ordered) - 1)
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)
