"""Structured channel pruning: remove whole channels/neurons, physically, on any model.

Data flow: graph (coupled groups) -> importance (scores per channel) ->
strategy (how many channels each group loses) -> plan -> surgery.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..cli_options import option, positive_int
from ..errors import SecateursError
from ..graph import DependencyGraph, Group, build_graph
from ..importance.channel import (
    CHANNEL_IMPORTANCE,
    REDUCTIONS,
    ChannelImportance,
    ScoringContext,
    channel_importance,
    score_channels,
)
from ..importance.stats import InputMeans, calibration_list, split_batch
from ..progress import Progress
from ..selection import ResolvedSelection, Selection
from ..surgery import CONFIG_STALE_ATTR, Plan, apply_plan_
from ..surgery.compensate import compensate_
from ..surgery.recalibrate import recalibrate_bn_
from ..surgery.rehearsal import checked_on, model_macs, plan_macs
from ..utils import is_transformers_model
from .common import config_to_dict, keep_count, make_generator
from .reconstruct import reconstruct_, reconstruction_targets
from .registry import register_method
from .report import LayerReport, PruneReport
from .sensitivity_curves import (
    DEFAULT_RATIOS,
    SensitivityResult,
    allocate,
    allocation_order,
    channel_curves,
)
from .strategy import (
    LatencyGoal,
    Outcome,
    Planner,
    RatioGoal,
    goal_for,
    plan_channels,
    plan_for,
    round_to_for,
)
from .width import Role, classify_roles, groups_to_score

log = logging.getLogger(__name__)

__all__ = ["Channels", "calibration_stats", "channel_steps", "merge_step_reports", "plan_channels", "plan_uniform_widths", "score_groups"]

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
    ``scope='global'``, ``allocate='sensitivity'``, ``include`` and ``filter_fn``
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
            Minitron (Muralidharan et al., 2024). Your own criterion is a
            :class:`~secateurs.importance.ChannelImportance`: pass the instance, or register it
            (:func:`~secateurs.importance.register_channel_importance`) and pass its name.
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
        scope: ``layer`` (the same ratio for every group) or ``global`` (rank channels across all
            groups, so groups lose different shares). ``global_ranking=True`` is the old spelling of
            ``scope='global'``: still accepted, with a ``DeprecationWarning``.
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
            model's own activations (:mod:`secateurs.methods.reconstruct`); the last
            layer of a residual branch (``down_proj``) so that its block reproduces the
            dense block's output. Layers that
            cannot mix channels (grouped convolutions) get their mean output corrected
            instead; the report's ``reconstruction`` lists every layer and its error.
        reconstruct_damp: ridge damping of the refit, relative to the mean squared input;
            None (the default) chooses it per layer by cross-validation between even and
            odd calibration batches.
        steps: reach the target in this many prune steps, re-scoring channels on the
            already-pruned model each time (fine-tune between steps with the trainer);
            a latency target is approached through geometric intermediate targets.
        allocate: ``uniform`` (as ``scope`` says) or
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
    amount: ClassVar[str] = "ratio"  # the field that says how much to remove

    ratio: float | None = option(None, help="fraction of channels to remove, in [0, 1)")
    target_macs: float | None = option(None, help="keep this fraction of the model's MACs, in (0, 1]")
    importance: str | ChannelImportance = option("l2", metavar="NAME", choices=lambda: tuple(CHANNEL_IMPORTANCE),
                                                 help="criterion: what goes first")
    reduction: str = "mean"
    scope: Literal["layer", "global"] = option("layer", help="rank per layer, or across all layers together")
    max_ratio: float = option(0.9, help="most any layer may lose with --scope global or --target-macs")
    round_to: int | None = option(None, type=positive_int, metavar="N", help="keep channel counts a multiple of N")
    seed: int | None = option(None, flag="--seed")
    calib_batches: int = option(8, type=positive_int, metavar="N")
    steps: int = option(1, type=positive_int, help="reach the target in this many re-scored steps")
    compensate: bool = option(False, help="fold removed channels' mean contribution into the next layer; needs --data")
    recalibrate_bn: bool = option(False, help="re-estimate BatchNorm statistics after pruning; needs --data")
    reconstruct: bool = option(False, help="refit the layers that read removed channels by least squares, layer by "
                               "layer, to reproduce the dense model on --data")
    reconstruct_damp: float | None = None
    allocate: str = option("uniform", choices=("uniform", "sensitivity"))
    target_latency: float | None = option(None, metavar="MS", help="prune until one forward takes at most MS "
                                          "milliseconds, measured on --device")
    latency_batch_size: int | None = option(None, type=positive_int, metavar="B", help="batch size for --target-latency")
    device: str | None = option(None, flag="--device", when="target_latency")  # where target_latency is measured
    width: Any = option(None, metavar="KINDS", help="transformers models: prune only these widths, each at --ratio or "
                        "its own, e.g. heads,ffn or heads=0.25,ffn=0.3,hidden=0.1; kinds: hidden, heads, ffn")

    def __post_init__(self) -> None:
        super().__post_init__()
        from .width import parse_width

        self.width = parse_width(self.width)
        by_kind = self.width is not None and all(v is not None for v in self.width.values())
        if self.width is not None and any(v is not None for v in self.width.values()) and (
                self.target_macs is not None or self.target_latency is not None):
            raise SecateursError("per-kind width ratios (heads=0.25) go with ratio mode; with target_macs or "
                                 "target_latency name the kinds alone (--width heads,ffn)")
        if self.scope not in ("layer", "global"):
            raise SecateursError(f"scope must be 'layer' or 'global', got '{self.scope}'")
        if self.width is not None and (self.scope == "global" or self.allocate != "uniform" or self.include is not None
                                       or self.filter_fn is not None):
            raise SecateursError("width keeps every layer the same shape; scope='global', allocate='sensitivity', "
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
        channel_importance(self.importance)  # a registered name or a ChannelImportance, else one line naming them
        if self.reduction not in REDUCTIONS:
            raise SecateursError(f"unknown reduction '{self.reduction}': choose one of {', '.join(REDUCTIONS)}")
        if self.steps < 1:
            raise SecateursError(f"steps must be at least 1, got {self.steps}")
        if self.allocate not in ("uniform", "sensitivity"):
            raise SecateursError(f"unknown allocation '{self.allocate}': choose uniform or sensitivity")
        if self.allocate == "sensitivity" and self.scope == "global":
            raise SecateursError("allocate='sensitivity' chooses each group's share itself: drop scope='global'")
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

    def scan(self, model: nn.Module, data: Sequence[Any], *, ratios: Sequence[float], batches: int,
             example_inputs: Any = None, progress: bool | None = None, replay: bool = True) -> SensitivityResult:
        """How much each channel group alone can lose: one curve per group over the fractions ``ratios``
        (what :func:`secateurs.methods.sensitivity.sensitivity` runs for this method). With ``include``,
        only the groups touching those layers are scanned."""
        chosen = self.resolve(model)
        x = example_inputs if example_inputs is not None else split_batch(data[0])[0]
        graph = build_graph(model, x, frozen_tensors=chosen.frozen_tensors())
        graph.groups = chosen.groups(graph.groups)
        if not graph.groups:
            raise SecateursError("no prunable channel group found: nothing to scan")
        stats = calibration_stats(model, graph, dataclasses.replace(self, calib_batches=len(data)), data)
        return channel_curves(model, graph, score_groups(model, graph, self, stats), data, ratios=ratios,
                              batches=batches, progress=progress, replay=replay)

    def step_configs(self, model: nn.Module, steps: int, example_inputs: Any = None) -> Iterator[Channels]:
        """One single-step config per prune step of an iterative run (prune, fine-tune, repeat): equal
        geometric shares of the target, each computed on the model as it is by then (:func:`channel_steps`)."""
        return channel_steps(model, dataclasses.replace(self, steps=steps), example_inputs)


def _accept_global_ranking(init: Callable[..., None]) -> Callable[..., None]:
    """``Channels(global_ranking=True)``, the old spelling of ``scope='global'``, still works (with a warning)."""

    @functools.wraps(init)
    def __init__(self: Channels, *args: Any, global_ranking: bool | None = None, **kwargs: Any) -> None:
        if global_ranking is not None:
            warnings.warn("Channels(global_ranking=...) is deprecated: use scope='global'", DeprecationWarning,
                          stacklevel=2)
            wanted = "global" if global_ranking else "layer"
            # dataclasses.replace(config, global_ranking=...) passes the current scope along: only a
            # contradiction is an error
            if kwargs.get("scope", wanted) != wanted:
                raise SecateursError(f"global_ranking={global_ranking} contradicts scope={kwargs['scope']!r}: "
                                     "give scope alone (global_ranking is its old spelling)")
            kwargs["scope"] = wanted
        init(self, *args, **kwargs)

    return __init__


Channels.__init__ = _accept_global_ranking(Channels.__init__)  # type: ignore[method-assign]
Channels.global_ranking = property(lambda self: self.scope == "global",  # type: ignore[attr-defined]
                                   doc="Old spelling: whether ``scope == 'global'``.")


def calibration_stats(model: nn.Module, graph: DependencyGraph, config: Channels, data: Any) -> Any:
    """The statistics ``config.importance`` scores channels by, measured on ``data`` (None: it measures none).

    The criterion's ``collect`` runs whenever there is data; a criterion that ``needs_data`` is refused without.
    """
    criterion = channel_importance(config.importance)
    if data is None:
        if criterion.needs_data:
            raise SecateursError(f"importance '{criterion.name}' is measured on data: pass data= (CLI: --data)")
        return None
    return criterion.collect(model, graph, data, config.calib_batches)


def score_groups(model: nn.Module, graph: DependencyGraph, config: Channels, stats: Any, *,
                 tensors: Mapping[str, Tensor] | None = None, only: set[int] | None = None) -> dict[int, Tensor]:
    """Group id -> importance of each of its channels, by ``config.importance`` (``stats``: what it collected).

    ``tensors``: the model's parameters and buffers by name, where they are not in ``model`` itself (a
    meta skeleton whose weights are read from disk as the criterion asks for them). ``only``: the ids
    of the groups to score (default: all).
    """
    named_params = dict(model.named_parameters())
    if tensors is None:
        tensors = named_params | dict(model.named_buffers())
    norm_scales = {
        f"{n}.weight" for n, m in model.named_modules()
        if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)) and getattr(m, "weight", None) is not None
    }
    context = ScoringContext(tensors=tensors, params=set(named_params), norm_scales=norm_scales,
                             reduction=config.reduction, generator=make_generator(config.seed), stats=stats, cache={})
    criterion = channel_importance(config.importance)
    return {g.id: score_channels(criterion, g, context) for g in graph.groups if only is None or g.id in only}


def _warn_rounded_away(graph: DependencyGraph, config: Channels, removed: dict[int, Tensor],
                       failed: dict[int, str]) -> None:
    """Say so when ``round_to`` kept groups whole that ``ratio`` would have cut (silent otherwise)."""
    round_to = round_to_for(config)
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
        dense = LatencyGoal.of(model, config, example_inputs).dense if config.steps > 1 else config.target_latency
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

    The last step's measurements (latency) stay; ``outcome["steps_detail"]`` holds each step's own achieved ratio.
    """
    final = reports[-1]
    final.config = config_to_dict(config)
    final.outcome["steps_detail"] = [r.outcome.get("achieved_ratio") for r in reports]
    fractions = [r.outcome.get("achieved_macs") for r in reports]
    if all(f is not None for f in fractions):  # each step's share of the MACs it started from: of the dense model
        final.outcome["achieved_macs"] = math.prod(fractions)
    if "latency_ms" in final.outcome and "latency_ms" in reports[0].outcome:  # measured before the first step
        final.outcome["latency_ms"] = final.outcome["latency_ms"] | {"dense": reports[0].outcome["latency_ms"]["dense"]}

    def key(name: str) -> str:  # a group's tensors; its name also holds its (shrinking) width and step-local id
        return name.partition(" channels: ")[2] or name

    first = reports[0].layers  # channels before the first step
    kept = {key(layer.name): layer.numel for layer in first}
    for report in reports:
        for layer in report.layers:
            kept[key(layer.name)] = layer.numel - layer.zeros
    final.layers = [LayerReport(name=layer.name, shape=[layer.numel], numel=layer.numel,
                                zeros=layer.numel - kept[key(layer.name)]) for layer in first]
    final.outcome["achieved_ratio"] = final.sparsity  # the share of all channels removed
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


def _prune_once(model: nn.Module, config: Channels, example_inputs: Any, data: Any) -> PruneReport:
    """One step: select groups -> score -> search the goal -> apply (and repair) -> report."""
    if (config.compensate or config.recalibrate_bn or config.reconstruct) and data is None:
        raise SecateursError("compensate, recalibrate_bn and reconstruct are measured on data: pass data= "
                             "(CLI: --data)")
    chosen = config.resolve(model)  # unknown include/ignore names are refused before any work
    uniform = _uniform_widths(model, config)
    means = InputMeans(model).run(data, config.calib_batches) if config.compensate else None
    dense = copy.deepcopy(model) if config.reconstruct else None  # the reference every refit reproduces
    # large models take minutes between these stages: say which one runs
    stages = ["tracing", "scoring", "searching", "applying"] + (["reconstructing"] if dense is not None else [])
    with Progress(len(stages), "channel pruning",
                  enabled=None if _tensor_bytes(model) > IN_PLACE_MAX_BYTES else False) as bar:
        bar.update(0, stage=stages[0])
        graph = _selected_graph(model, chosen, example_inputs)
        bar.update(stage=stages[1])
        roles = classify_roles(model, graph) if uniform else None
        scores = score_groups(model, graph, config, calibration_stats(model, graph, config, data),
                              only=_groups_to_score(roles, config))
        expected = graph.output_shapes  # what every rehearsal must still produce
        bar.update(stage=stages[2])
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
        planner = Planner(model, graph, scores, config, example_inputs, expected, shares=shares,
                          roles=roles,
                          apply_directly=(by_ratio and not config.compensate and getattr(model, "config", None) is None
                                          and _tensor_bytes(model) <= IN_PLACE_MAX_BYTES))
        outcome = goal_for(model, config, example_inputs, expected, sensitivity=shares is not None,
                           dense_macs=dense_macs).search(planner)
        plan = outcome.candidate.plan
        bar.update(stage=stages[3])

        compensated = compensate_(model, plan, means.means(), means.followers) if means is not None else None
        if not planner.applied:
            apply_plan_(model, plan)
        if dense is not None:
            bar.update(stage=stages[4])
        fits = (reconstruct_(model, dense, reconstruction_targets(dense, plan),
                             calibration_list(data, config.calib_batches, "reconstruct"), config.reconstruct_damp)
                if dense is not None else None)
        del dense
        if config.recalibrate_bn:
            recalibrate_bn_(model, data, config.calib_batches)
        bar.update(stage="done")
    report = _channel_report(model, config, graph, scores, outcome, planner.width_info(plan) if uniform else None)
    report.plan = plan_as_applied(model, report.plan)
    report.outcome["rehearsal"] = checked_on(model, expected)  # "meta", or "real" where meta cannot run it
    if compensated is not None:
        report.outcome["compensated_layers"] = len(compensated)
    if fits is not None:
        report.reconstruction = [f.to_dict() for f in fits]
    if shares is not None:
        report.sensitivity = shares.scan.to_dict()
    if config.ratio is not None and shares is None and not uniform:
        _warn_rounded_away(graph, config, outcome.candidate.removed, outcome.candidate.failed)
    return report


def plan_as_applied(model: nn.Module, plan: dict[str, Any]) -> dict[str, Any]:
    """``plan`` (as a dict) with only the size attributes ``model`` (pruned by it) now holds.

    The tracer links attributes to dims by value, so an attribute that merely
    equals a pruned size (a ``layer_idx`` of 2 beside 2 KV heads) is in the
    plan; a transformers model's attributes are then reset from its updated
    config, and the plan in the report should say what was done.
    """
    attrs = {}
    for mod_name, values in plan.get("attrs", {}).items():
        module = model.get_submodule(mod_name)
        kept = {attr: value for attr, value in values.items() if vars(module).get(attr) == value}
        if kept:
            attrs[mod_name] = kept
    return {**plan, "attrs": attrs}


def _selected_graph(model: nn.Module, chosen: ResolvedSelection, example_inputs: Any) -> DependencyGraph:
    """The model's channel groups the selection ``chosen`` (resolved from the config) keeps."""
    graph = build_graph(model, example_inputs, frozen_tensors=chosen.frozen_tensors())
    graph.groups = chosen.groups(graph.groups)  # include picks groups (a layer and all coupled to it), not tensors
    if not graph.groups:
        raise SecateursError("no prunable channel group found: every layer is coupled to the inputs/outputs or ignored")
    return graph


def plan_uniform_widths(model: nn.Module, config: Channels, example_inputs: Any, *,
                        tensors: Mapping[str, Tensor] | None = None, data: Any = None,
                        runnable: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                        ) -> tuple[Plan, PruneReport]:
    """The plan channel pruning would apply to a transformers ``model`` by a plain ratio or ``width``,
    and its report, without changing ``model``: for a model whose weights live elsewhere (a meta
    skeleton streamed from disk, with ``tensors`` reading them). A data-driven criterion collects its
    statistics on ``data`` inside ``runnable()``, which makes the model able to run (its weights read
    as each module is called); the same plan :func:`~secateurs.prune_` applies to the same weights and data."""
    if not _uniform_widths(model, config) or config.target_macs is not None or config.target_latency is not None:
        raise SecateursError("planning without the weights in memory takes a transformers model and a ratio or "
                             "--width")
    graph = _selected_graph(model, config.resolve(model), example_inputs)
    roles = classify_roles(model, graph)
    only = _groups_to_score(roles, config)
    scored = graph if only is None else dataclasses.replace(graph, groups=[g for g in graph.groups if g.id in only])
    with runnable():  # (a criterion measures only the groups it will score: a forward may end sooner)
        stats = calibration_stats(model, scored, config, data)
    scores = score_groups(model, graph, config, stats, tensors=tensors, only=only)
    planner = Planner(model, graph, scores, config, example_inputs, graph.output_shapes, roles=roles)
    outcome = RatioGoal(config.ratio if config.ratio is not None else 0.0).search(planner)
    plan = outcome.candidate.plan
    return plan, _channel_report(model, config, graph, scores, outcome, planner.width_info(plan))


def _channel_report(model: nn.Module, config: Channels, graph: DependencyGraph, scores: dict[int, Tensor],
                    outcome: Outcome, widths: dict[str, Any] | None) -> PruneReport:
    """The report of one step: groups and their widths, what stayed whole and why, the plan, the scores."""
    candidate = outcome.candidate
    removed = candidate.removed
    report = PruneReport(method=config.method, config=config_to_dict(config))
    # the share of all channels removed: rounding (round_to, grouped convs), groups kept whole and
    # sensitivity allocation all make it differ from the ratio asked for
    report.outcome["achieved_ratio"] = candidate.removed_channels / max(1, sum(g.size for g in graph.groups))
    report.outcome.update(outcome.details)
    for g in graph.groups:
        report.layers.append(LayerReport(name=g.describe(), shape=[g.size], numel=g.size,
                                         zeros=int(removed[g.id].numel())))
    report.skipped = dict(graph.frozen_tensors)
    by_id = {g.id: g for g in graph.groups}
    for gid, reason in candidate.failed.items():
        report.skipped[by_id[gid].describe()] = f"kept whole: pruning it breaks the forward ({reason})"
    if widths is not None:
        report.outcome["widths"] = widths.get("widths", {})  # kind -> [kept, total] channels
        for kind, reason in widths.get("kept_whole", {}).items():
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
    report.plan = candidate.plan.to_dict()
    report.importance = {"criterion": channel_importance(config.importance).name, "groups": {
        g.describe(): _score_summary(scores[g.id], removed[g.id]) for g in graph.groups if g.id in scores}}
    return report


def _groups_to_score(roles: list[Role] | None, config: Channels) -> set[int] | None:
    """Transformers widths: only the groups of the kinds being cut need scores (sensitivity allocation
    measures every group, so it scores them all)."""
    if roles is None or config.allocate == "sensitivity":
        return None
    return groups_to_score(roles, config.width, config.ratio)


def _uniform_widths(model: nn.Module, config: Channels) -> bool:
    """Prune a transformers model with every layer the same shape (see :mod:`.width`)?"""
    if not is_transformers_model(model):
        if config.width is not None:
            raise SecateursError("width names the hidden size, attention heads and FFN of a transformers model "
                                 f"(PreTrainedModel); {type(model).__name__} is not one: choose layers with "
                                 "include/ignore instead")
        return False
    return not (config.scope == "global" or config.allocate != "uniform" or config.include is not None
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
