"""Sensitivity analysis: how much each prunable unit alone can lose, measured on data.

For every channel group (``channel``) or prunable layer (``unstructured``)
and every ratio of a grid, the unit alone is pruned and the model is scored
on a few batches against the dense model (see :mod:`.sensitivity_curves`,
which also turns curves into an allocation). This module is the entry point:
it resolves a method config's selection (``include``, ``ignore``,
``filter_fn``) on the model and scans the units it picks.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import SecateursError
from ..graph import build_graph
from ..importance.stats import split_batch
from ..selection import select_targets
from .channels import Channels, calibration_stats, score_groups
from .sensitivity_curves import (
    DEFAULT_RATIOS,
    Curve,
    SensitivityResult,
    allocate,
    allocation_order,
    channel_curves,
    drop_counts,
    unstructured_curves,
)
from .unstructured import Unstructured

__all__ = ["DEFAULT_RATIOS", "Curve", "SensitivityResult", "allocate", "allocation_order", "channel_curves",
           "drop_counts", "sensitivity", "unstructured_curves"]


def sensitivity(
    model: nn.Module,
    data: Sequence[Any],
    *,
    method: str = "channel",
    example_inputs: Any = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    importance: str | None = None,
    batches: int = 4,
    config: Any = None,
    progress: bool | None = None,
    replay: bool = True,
) -> SensitivityResult:
    """Scan every prunable unit of ``model`` alone at each ratio (see the module docs).

    Args:
        model: the model (unchanged afterwards).
        data: batches, with labels for accuracy.
        method: ``channel`` (coupled channel groups) or ``unstructured`` (layers).
        example_inputs: inputs for the channel trace (default: the first batch's inputs).
        ratios: fractions to remove, each in (0, 1).
        importance: which channels/weights go first (default ``l2`` / ``magnitude``).
        batches: batches of ``data`` scored per trial.
        config: a :class:`~secateurs.Channels` / :class:`~secateurs.Unstructured` config
            whose selection (``ignore``, ``include``, ``filter_fn``) applies as in pruning:
            with ``include``, only the channel groups (or layers) it touches are scanned; a
            name that matches no module is refused before anything runs.
        progress: progress bar on stderr.
        replay: trials re-use the dense run's outputs of the modules they leave
            unchanged (exact; :mod:`secateurs.importance.replay`). False runs every
            trial's forward in full.

    Example:
        >>> import torch, secateurs
        >>> from secateurs.zoo import DigitsCNN
        >>> from secateurs.methods.sensitivity import sensitivity
        >>> data = [(torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,)))]
        >>> result = sensitivity(DigitsCNN(), data, ratios=[0.5])
        >>> [len(c.ratios) for c in result.curves]  # dense point + one ratio, per group
        [2, 2, 2, 2]
    """
    if any(not 0.0 < r < 1.0 for r in ratios) or not ratios:
        raise SecateursError(f"ratios must be fractions in (0, 1), got {list(ratios)}")
    ratios = sorted(float(r) for r in ratios)
    data = list(itertools.islice(iter(data), batches))
    if not data:
        raise SecateursError("sensitivity analysis measures the model on data: pass data= (CLI: --data)")
    if method == "channel":
        cfg = config if config is not None else Channels(ratio=0.5, importance=importance or "l2")
        chosen = cfg.resolve(model)
        x = example_inputs if example_inputs is not None else split_batch(data[0])[0]
        graph = build_graph(model, x, frozen_tensors=chosen.frozen_tensors())
        graph.groups = chosen.groups(graph.groups)  # include scans only the groups touching its layers
        if not graph.groups:
            raise SecateursError("no prunable channel group found: nothing to scan")
        stats = calibration_stats(model, graph, dataclasses.replace(cfg, calib_batches=len(data)), data)
        return channel_curves(model, graph, score_groups(model, graph, cfg, stats), data, ratios=ratios, batches=batches,
                              progress=progress, replay=replay)
    if method == "unstructured":
        cfg = config if config is not None else Unstructured(sparsity=0.5, importance=importance or "magnitude")
        targets, _ = select_targets(model, cfg, example_inputs=example_inputs)
        return unstructured_curves(model, targets, data, ratios=ratios, batches=batches, importance=cfg.importance,
                                   seed=cfg.seed, progress=progress, replay=replay)
    raise SecateursError(f"sensitivity scans method 'channel' or 'unstructured', not '{method}'")
