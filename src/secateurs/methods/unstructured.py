"""Unstructured pruning: zero individual weights by ratio (per layer or global) or threshold."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from ..errors import SecateursError
from ..importance import ELEMENT_IMPORTANCE, element_scores
from ..masks import get_mask, mask_tied_
from ..selection import Selection, select_targets
from .common import config_to_dict, layer_report, lowest_k, make_generator
from .registry import register_method
from .report import PruneReport

__all__ = ["Unstructured"]


@dataclass(kw_only=True)
class Unstructured(Selection):
    """Zero individual weights of Linear/Conv layers.

    Exactly one of ``sparsity`` and ``threshold`` is given.

    Attributes:
        sparsity: fraction of weights to zero, in [0, 1).
        threshold: zero every weight with ``|w| <= threshold`` (magnitude only).
        scope: ``"layer"`` gives every layer the same sparsity; ``"global"`` ranks
            all selected weights together, so layers end up with different sparsity.
        importance: ``"magnitude"`` (|w|) or ``"random"``.
        seed: seed for ``random`` importance.

    Example:
        >>> import torch, secateurs
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 4))
        >>> report = secateurs.prune_(model, secateurs.Unstructured(sparsity=0.75))
        >>> report.layers[0].sparsity
        0.75
    """

    method: ClassVar[str] = "unstructured"

    sparsity: float | None = None
    threshold: float | None = None
    scope: Literal["layer", "global"] = "layer"
    importance: str = "magnitude"
    seed: int | None = None

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
            if self.importance != "magnitude":
                raise SecateursError("threshold pruning compares |w|: use importance='magnitude'")
        if self.scope not in ("layer", "global"):
            raise SecateursError(f"scope must be 'layer' or 'global', got '{self.scope}'")
        if self.importance not in ELEMENT_IMPORTANCE:
            raise SecateursError(
                f"unknown importance '{self.importance}': choose one of {', '.join(ELEMENT_IMPORTANCE)}"
            )


@register_method(Unstructured)
def apply_unstructured(
    model: nn.Module, config: Unstructured, *, example_inputs: Any = None, data: Any = None
) -> PruneReport:
    targets, skipped = select_targets(model, config, example_inputs=example_inputs)
    report = PruneReport(method=config.method, config=config_to_dict(config), skipped=skipped)

    if config.threshold is not None:
        # The seed's rule: keep |w| > t, so |w| <= t goes.
        keeps = {t.name: t.weight.detach().abs() > config.threshold for t in targets}
    else:
        gen = make_generator(config.seed)
        scores = {
            t.name: element_scores(config.importance, t.weight, get_mask(t.module, t.tensor), gen)
            for t in targets
        }
        if config.scope == "global":
            flat = torch.cat([s.reshape(-1).cpu() for s in scores.values()])
            drop_all = lowest_k(flat, round(config.sparsity * flat.numel()))
            keeps, offset = {}, 0
            for name, s in scores.items():
                keeps[name] = ~drop_all[offset : offset + s.numel()].view(s.shape)
                offset += s.numel()
        else:
            keeps = {name: ~lowest_k(s, round(config.sparsity * s.numel())) for name, s in scores.items()}
    for t in targets:
        mask = mask_tied_(model, t.module, keeps[t.name], t.tensor)
        report.layers.append(layer_report(t.name, mask))
    return report
