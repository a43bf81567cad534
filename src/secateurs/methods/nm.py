"""N:M semi-structured sparsity: in every run of M consecutive input weights keep N."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from ..cli_options import option
from ..errors import SecateursError
from ..importance import ELEMENT_IMPORTANCE, ElementImportance, element_importance, element_scores
from ..masks import get_mask, mask_tied_, nm_mask
from ..selection import Selection, input_dim, select_targets
from .common import config_to_dict, layer_report, make_generator
from .registry import register_method
from .report import PruneReport

__all__ = ["NM", "nm_keep", "nm_mask", "parse_nm"]


def parse_nm(text: str) -> tuple[int, int]:
    """Parse ``"2:4"`` into ``(2, 4)``."""
    try:
        n_str, m_str = text.split(":")
        return int(n_str), int(m_str)
    except ValueError:
        raise SecateursError(f"N:M pattern must look like 2:4, got '{text}'") from None


@dataclass(kw_only=True)
class NM(Selection):
    """Keep ``n`` of every ``m`` consecutive weights along the input dimension.

    For Linear the groups run along ``in_features``; for convolutions along the
    input channels at each kernel position (the layout sparse tensor cores use).
    Layers whose input size is not a multiple of ``m`` are skipped and reported.

    Example:
        >>> import torch, secateurs
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> report = secateurs.prune_(model, secateurs.NM(n=2, m=4))
        >>> report.layers[0].sparsity
        0.5
    """

    method: ClassVar[str] = "nm"

    n: int = option(2, flag="--nm", metavar="N:M", parse=parse_nm, spread=("n", "m"),
                    help="keep N of every M consecutive input weights, e.g. 2:4 (wanda, sparsegpt: instead of --sparsity)")
    m: int = 4
    importance: str | ElementImportance = option("magnitude", metavar="NAME", choices=lambda: tuple(ELEMENT_IMPORTANCE),
                                                 help="criterion: what goes first")
    seed: int | None = option(None, flag="--seed")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.n, int) and isinstance(self.m, int)) or self.n < 1 or self.n >= self.m:
            raise SecateursError(
                f"N:M needs 1 <= N < M, got {self.n}:{self.m}: e.g. 2:4 keeps 2 of every 4 weights"
            )
        element_importance(self.importance)  # a registered name or an ElementImportance, else one line naming them


def nm_keep(config: NM, module: nn.Module, tensor: str, weight: Tensor, generator: torch.Generator) -> Tensor | str:
    """The N:M keep-mask of ``module.<tensor>`` (whose values are ``weight``), or why it cannot have one."""
    dim = input_dim(module, tensor)
    if weight.shape[dim] % config.m:
        return f"input size {weight.shape[dim]} is not a multiple of {config.m}"
    scores = element_scores(config.importance, weight, get_mask(module, tensor), generator)
    return nm_mask(scores, config.n, config.m, dim)


@register_method(NM)
def apply_nm(model: nn.Module, config: NM, *, example_inputs: Any = None, data: Any = None) -> PruneReport:
    targets, skipped = select_targets(model, config, example_inputs=example_inputs)
    report = PruneReport(method=config.method, config=config_to_dict(config), skipped=skipped)
    gen = make_generator(config.seed)
    for t in targets:
        keep = nm_keep(config, t.module, t.tensor, t.weight, gen)
        if isinstance(keep, str):
            report.skipped[t.name] = keep
            continue
        mask = mask_tied_(model, t.module, keep, t.tensor)
        report.layers.append(layer_report(t.name, mask))
    if not report.layers:
        raise SecateursError(
            f"no selected layer has an input size divisible by {config.m}; "
            f"choose a smaller M or other layers ({len(targets)} candidates)"
        )
    return report
