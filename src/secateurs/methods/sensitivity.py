"""Sensitivity analysis: how much each prunable unit alone can lose, measured on data.

For every channel group (``channel``) or prunable layer (``unstructured``)
and every ratio of a grid, the unit alone is pruned and the model is scored
on a few batches against the dense model (see :mod:`.sensitivity_curves`,
which also turns curves into an allocation). This module is the entry point:
it picks the method's config, whose ``scan`` resolves its selection
(``include``, ``ignore``, ``filter_fn``) on the model and scans the units it
picks. A method can scan when its config has a ``scan`` method and names the
field of its amount (``amount = "ratio"``): ``channel`` and ``unstructured`` do.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..errors import SecateursError
from .registry import config_class, method_names
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

__all__ = ["DEFAULT_RATIOS", "Curve", "SensitivityResult", "allocate", "allocation_order", "channel_curves",
           "drop_counts", "scan_config", "scan_methods", "sensitivity", "unstructured_curves"]


def scan_methods() -> list[str]:
    """The methods whose config can scan: it has a ``scan`` method.

    Example:
        >>> scan_methods()
        ['channel', 'unstructured']
    """
    return [name for name in method_names() if callable(getattr(config_class(name), "scan", None))]


def scan_config(method: str, **fields: Any) -> Any:
    """A config of ``method`` for a scan: its amount (``ratio``, ``sparsity``) at 0.5, which a scan
    replaces by each fraction of its grid, and ``fields`` (``importance``, ``ignore``, ``include``).

    Example:
        >>> scan_config("unstructured", importance="random").importance
        'random'
    """
    names = scan_methods()
    if method not in names:
        raise SecateursError(f"sensitivity scans method {' or '.join(repr(n) for n in names)}, not '{method}'")
    cls = config_class(method)
    amount = getattr(cls, "amount", None)
    return cls(**({amount: 0.5} if amount else {}), **fields)


def sensitivity(
    model: nn.Module,
    data: Sequence[Any],
    *,
    method: str | None = None,
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
        method: ``channel`` (coupled channel groups; the default) or ``unstructured`` (layers);
            with ``config``, its method (a different one is refused).
        example_inputs: inputs for the channel trace (default: the first batch's inputs).
        ratios: fractions to remove, each in (0, 1).
        importance: which channels/weights go first (default ``l2`` / ``magnitude``); a
            ``config`` says it itself.
        batches: batches of ``data`` scored per trial.
        config: a :class:`~secateurs.Channels` / :class:`~secateurs.Unstructured` config
            whose selection (``ignore``, ``include``, ``filter_fn``) applies as in pruning:
            with ``include``, only the channel groups (or layers) it touches are scanned; a
            name that matches no module is refused before anything runs. Its ``scan``
            method does the work.
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
    if config is None:
        config = scan_config(method or "channel", **({"importance": importance} if importance is not None else {}))
    elif method is not None and getattr(config, "method", None) != method:
        raise SecateursError(f"config is a {type(config).__name__} (method '{getattr(config, 'method', '?')}'), "
                             f"not method '{method}': drop method= or pass a matching config")
    if not callable(getattr(config, "scan", None)):
        raise SecateursError(f"{type(config).__name__} cannot scan: use a config of method "
                             f"{' or '.join(repr(n) for n in scan_methods())}")
    return config.scan(model, data, ratios=ratios, batches=batches, example_inputs=example_inputs,
                       progress=progress, replay=replay)
