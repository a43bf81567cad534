"""Unstructured pruning: zero individual weights by ratio (per layer or global) or threshold."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from ..cli_options import option, positive_int
from ..errors import SecateursError
from ..importance import ELEMENT_IMPORTANCE, ElementImportance, element_importance, element_scores
from ..masks import get_mask, lowest_k, mask_tied_
from ..selection import Selection, select_targets
from .common import config_to_dict, layer_report, make_generator
from .registry import register_method
from .report import PruneReport
from .schedule import AGP
from .sensitivity_curves import SensitivityResult, allocation_order, unstructured_curves

__all__ = ["Unstructured", "layer_keep"]

# The sparsities a sensitivity scan tries per layer; the allocation interpolates between them.
ALLOCATION_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)
MAX_ALLOCATED = ALLOCATION_GRID[-1]


@dataclass(kw_only=True)
class Unstructured(Selection):
    """Zero individual weights of Linear/Conv layers.

    Exactly one of ``sparsity`` and ``threshold`` is given.

    Attributes:
        sparsity: fraction of weights to zero, in [0, 1).
        threshold: zero every weight with ``|w| <= threshold`` (magnitude only).
        scope: ``"layer"`` gives every layer the same sparsity; ``"global"`` ranks
            all selected weights together, so layers end up with different sparsity.
        importance: ``"magnitude"`` (|w|), ``"random"``, another registered name, or your own
            :class:`~secateurs.importance.ElementImportance`.
        seed: seed for ``random`` importance.
        allocate: ``"uniform"`` (as ``scope`` says) or ``"sensitivity"``: measure on
            ``data`` how much each layer alone loses at each sparsity, then give
            each layer its own sparsity so the selected weights reach ``sparsity``
            in all with the least predicted loss (robust layers go further,
            fragile ones stay denser).
        calib_batches: batches of ``data`` each sensitivity trial is scored on.

    Example:
        >>> import torch, secateurs
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
        >>> report = secateurs.prune_(model, secateurs.Unstructured(sparsity=0.75))
        >>> report.layers[0].sparsity
        0.75
    """

    method: ClassVar[str] = "unstructured"
    amount: ClassVar[str] = "sparsity"  # the field that says how much to remove

    sparsity: float | None = option(None, help="fraction of weights to zero, in [0, 1)")
    threshold: float | None = option(None, metavar="T", help="zero every weight with |w| <= T")
    scope: Literal["layer", "global"] = option("layer", help="rank per layer, or across all layers together")
    importance: str | ElementImportance = option("magnitude", metavar="NAME", choices=lambda: tuple(ELEMENT_IMPORTANCE),
                                                 help="criterion: what goes first")
    seed: int | None = option(None, flag="--seed")
    allocate: Literal["uniform", "sensitivity"] = option(
        "uniform", help="sensitivity: measure each channel group or layer alone on --data, and cut where it costs least")
    calib_batches: int = option(4, type=positive_int, metavar="N", help="batches of --data to use")

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.sparsity is None) == (self.threshold is None):
            raise SecateursError("give exactly one of sparsity (a fraction) or threshold (|w| cut-off)")
        if self.sparsity is not None and not 0.0 <= self.sparsity < 1.0:
            raise SecateursError(
                f"sparsity must be in [0, 1), got {self.sparsity}: e.g. 0.8 zeros 80% of weights"
            )
        if self.threshold is not None:
            if not math.isfinite(self.threshold) or self.threshold < 0:
                raise SecateursError(f"threshold must be a finite number >= 0, got {self.threshold}")
            if element_importance(self.importance).name != "magnitude":
                raise SecateursError("threshold pruning compares |w|: use importance='magnitude'")
        if self.scope not in ("layer", "global"):
            raise SecateursError(f"scope must be 'layer' or 'global', got '{self.scope}'")
        if self.allocate not in ("uniform", "sensitivity"):
            raise SecateursError(f"unknown allocation '{self.allocate}': choose uniform or sensitivity")
        if self.allocate == "sensitivity":
            if self.sparsity is None:
                raise SecateursError("allocate='sensitivity' spreads a sparsity target: give sparsity, not threshold")
            if self.scope != "layer":
                raise SecateursError("allocate='sensitivity' chooses each layer's sparsity itself: drop scope='global'")
            if self.sparsity > MAX_ALLOCATED:
                raise SecateursError(f"allocate='sensitivity' scans layers up to {MAX_ALLOCATED:.0%} sparsity: "
                                     f"ask for at most {MAX_ALLOCATED}, got {self.sparsity}")
        if self.calib_batches < 1:
            raise SecateursError(f"calib_batches must be at least 1, got {self.calib_batches}")
        element_importance(self.importance)  # a registered name or an ElementImportance, else one line naming them

    def scan(self, model: nn.Module, data: Sequence[Any], *, ratios: Sequence[float], batches: int,
             example_inputs: Any = None, progress: bool | None = None, replay: bool = True) -> SensitivityResult:
        """How much each selected layer alone can lose: one curve per layer over the sparsities ``ratios``
        (what :func:`secateurs.methods.sensitivity.sensitivity` runs for this method)."""
        targets, _ = select_targets(model, self, example_inputs=example_inputs)
        return unstructured_curves(model, targets, data, ratios=ratios, batches=batches, importance=self.importance,
                                   seed=self.seed, progress=progress, replay=replay)

    def step_configs(self, model: nn.Module, steps: int, example_inputs: Any = None) -> Iterator[Unstructured]:
        """One config per prune step of an iterative run (prune, fine-tune, repeat): the sparsity climbs
        the cubic AGP curve, big cuts first and small ones near the target."""
        if self.sparsity is None:
            raise SecateursError("prune-and-fine-tune steps climb to a sparsity, not a threshold: give sparsity "
                                 "(CLI: --sparsity)")
        schedule = AGP(final=self.sparsity, start=0, end=steps, every=1)
        for k in range(1, steps + 1):
            yield dataclasses.replace(self, sparsity=schedule.sparsity(k))


def layer_keep(config: Unstructured, weight: Tensor, mask: Tensor | None, generator: torch.Generator, *,
               stacked: bool = False) -> Tensor:
    """The keep-mask of one weight when every layer is pruned on its own (a threshold, or the same
    sparsity per layer): what streaming pruning applies to one tensor at a time. A ``stacked`` weight
    (fused experts: one matrix per expert along dim 0) is ranked expert by expert."""
    if stacked:
        return torch.stack([layer_keep(config, weight[e], None if mask is None else mask[e], generator)
                            for e in range(weight.shape[0])])
    if config.threshold is not None:
        return weight.detach().abs() > config.threshold  # the seed's rule: keep |w| > t, so |w| <= t goes
    scores = element_scores(config.importance, weight, mask, generator)
    return ~lowest_k(scores, round(config.sparsity * scores.numel()))


@register_method(Unstructured)
def apply_unstructured(
    model: nn.Module, config: Unstructured, *, example_inputs: Any = None, data: Any = None
) -> PruneReport:
    # fused expert weights (one 3-D stack per projection): each expert's matrix is a layer of its own; the
    # sensitivity scan measures layers as modules, which a stack's experts are not
    targets, skipped = select_targets(model, config, example_inputs=example_inputs,
                                      stacked=config.allocate == "uniform")
    report = PruneReport(method=config.method, config=config_to_dict(config), skipped=skipped)

    gen = make_generator(config.seed)
    if config.threshold is not None or (config.scope == "layer" and config.allocate == "uniform"):
        keeps = {t.name: layer_keep(config, t.weight, get_mask(t.module, t.tensor), gen, stacked=t.stacked)
                 for t in targets}
    else:
        scores = {
            t.name: element_scores(config.importance, t.weight, get_mask(t.module, t.tensor), gen)
            for t in targets
        }
        if config.allocate == "sensitivity":
            counts, scan = _sensitivity_counts(model, targets, config, data)
            report.sensitivity = scan.to_dict()
            keeps = {name: ~lowest_k(s, counts[name]) for name, s in scores.items()}
        else:  # global
            flat = torch.cat([s.reshape(-1).cpu() for s in scores.values()])
            drop_all = lowest_k(flat, round(config.sparsity * flat.numel()))
            keeps, offset = {}, 0
            for name, s in scores.items():
                keeps[name] = ~drop_all[offset : offset + s.numel()].view(s.shape)
                offset += s.numel()
    for t in targets:
        mask = mask_tied_(model, t.module, keeps[t.name], t.tensor)
        report.layers.append(layer_report(t.name, mask))
    return report


def _sensitivity_counts(model: nn.Module, targets: list[Any], config: Unstructured,
                        data: Any) -> tuple[dict[str, int], Any]:
    """How many weights each layer loses under sensitivity allocation, and the scan behind it.

    The greedy walk of :func:`~secateurs.methods.sensitivity_curves.allocation_order`
    (least loss increase per weight removed first) runs until the removed
    weights reach the target; its last step is cut short, so the total is
    exactly ``round(sparsity * selected weights)``.
    """
    if data is None:
        raise SecateursError("sensitivity allocation measures each layer on data: pass data= (CLI: --data)")
    scan = unstructured_curves(model, targets, data, ratios=ALLOCATION_GRID, batches=config.calib_batches,
                               importance=config.importance, seed=config.seed)
    curves = scan.curves
    need = round(config.sparsity * sum(c.size for c in curves))
    counts = [0] * len(curves)
    removed = 0
    for k, i in allocation_order(curves, ""):
        if removed >= need:
            break
        step = round(curves[k].ratios[i] * curves[k].size) - counts[k]
        take = min(step, need - removed)
        counts[k] += take
        removed += take
    return {t.name: n for t, n in zip(targets, counts, strict=True)}, scan
